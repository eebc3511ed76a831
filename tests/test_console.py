"""What a user sees on the console: progress in logs, library noise, --help, DeepSpeed op builds, bad model paths."""

import ast
import io
import os
import subprocess
import sys
import types

import pytest

import checkpoint
import utils
from conftest import REPO

STAGES = ("make_data", "sft", "train_rm", "eval_rm", "rloo")


# ------------------------------------------------------------------------------------------ progress bars


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_progress_in_a_log_writes_plain_lines_at_most_every_interval(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(utils.time, "monotonic", clock)
    log = io.StringIO()  # not a terminal, as a file or a pipe
    bar = utils.progress(total=100, desc="train", file=log, interval=30)
    for step in range(100):
        clock.t += 1.0  # one step per second: 100 s in all
        bar.update(1)
        bar.set_postfix(loss=f"{step:.1f}")  # refreshes on every call, as the stages do
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the start, then at most one line per 30 s (t = 30, 60, 90), then the final state
    assert len(lines) == 5, lines
    assert lines[0].startswith("train:   0%") and " 100/100 " in lines[-1] and "loss=99.0" in lines[-1]
    assert all(line.startswith("train:") for line in lines)


def test_progress_on_a_terminal_is_the_live_tqdm_bar():
    from tqdm import tqdm

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = utils.progress(total=3, file=Terminal())
    assert type(bar) is tqdm
    bar.close()


def test_progress_disabled_writes_nothing():
    log = io.StringIO()
    for _ in utils.progress(range(5), file=log, disable=True):
        pass
    assert log.getvalue() == ""


# ------------------------------------------------------------------------------------------ library noise


def test_known_harmless_library_messages_are_silenced_and_real_warnings_kept():
    code = ("import logging, utils; utils.quiet_libraries(); import deepspeed; from deepspeed.utils import logger; "
            "logger.warning('a real DeepSpeed warning'); "
            "logging.getLogger('vllm.triton_utils.importing').warning(\"Triton is installed, but doesn't include "
            "CPU backend. Running on CPU with Triton disabled.\")")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "a real DeepSpeed warning" in out
    assert "Setting accelerator to CPU" not in out and "Triton is installed" not in out


# ------------------------------------------------------------------------------------------ --help


@pytest.mark.parametrize("stage", STAGES)
def test_help_shows_the_defaults(stage):
    import importlib

    module = importlib.import_module(stage)
    out = io.StringIO()
    with pytest.raises(SystemExit), __import__("contextlib").redirect_stdout(out):
        module.parse_args(["--help"])
    text = " ".join(out.getvalue().split())  # argparse wraps lines
    expected = {"make_data": ["--seed SEED seed for every random choice (same seed -> same files) (default: 0)",
                              "(default: synthetic)"],
                "sft": ["(default: 1e-05)"],
                "train_rm": ["(default: 5e-06)", "(default: bsr)", "(default: 128)"],
                "eval_rm": ["(default: 16)", "(default: 2048)"],
                "rloo": ["KL penalty coefficient (paper: 0.05) (default: 0.05)", "(default: 2e-06)"]}[stage]
    for piece in expected:
        assert piece in text, (stage, piece)
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "usage:" in out.getvalue() and "\n    " in out.getvalue()  # the docstring's indented examples survive


# ------------------------------------------------------------------------------------------ DeepSpeed op builds


def test_cpu_init_compiles_no_deepspeed_op(tmp_path):
    """DeepSpeed's shm all-reduce op (45-170 s to compile) is not built on CPU; the run uses gloo."""
    code = ("import utils, torch; utils.quiet_libraries(); r = utils.init_distributed(); import importlib; "
            "print('DEVICE', r[3]); print('SHM', importlib.import_module('deepspeed.comm.comm').cdb.shm_comm_op); "
            "t = torch.ones(2); torch.distributed.all_reduce(t); print('SUM', t.tolist())")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEVICE cpu" in proc.stdout and "SHM None" in proc.stdout and "SUM [1.0, 1.0]" in proc.stdout
    assert "built successfully" not in proc.stdout and "compiling" not in proc.stdout
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").rglob("*.so"))


def test_op_compile_is_announced_once_and_extensions_dir_is_per_environment(tmp_path, monkeypatch, capsys):
    from deepspeed.ops.op_builder.builder import OpBuilder

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    default = utils.torch_extensions_dir()
    assert default.startswith(os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions", "env-"))
    monkeypatch.setattr(utils.sys, "prefix", "/some/other/venv")
    assert utils.torch_extensions_dir() != default  # another environment, another folder
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert utils.torch_extensions_dir() == str(tmp_path)

    calls = []
    monkeypatch.setattr(OpBuilder, "jit_load", lambda self, verbose=True: calls.append(self.name) or "module")
    utils._deepspeed_op_builds()
    op = types.SimpleNamespace(name="fake_op")
    assert OpBuilder.jit_load(op) == "module"
    assert f"[deepspeed] compiling its fake_op op" in capsys.readouterr().out
    (tmp_path / "py311_cpu" / "fake_op").mkdir(parents=True)
    (tmp_path / "py311_cpu" / "fake_op" / "fake_op.so").write_text("")
    assert OpBuilder.jit_load(op) == "module"  # cached: loaded without a message
    assert capsys.readouterr().out == "" and calls == ["fake_op", "fake_op"]


# ------------------------------------------------------------------------------------------ mistyped model paths


def test_model_source_check_names_the_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"--model runs/toy/base: no such local folder, and not a valid hub id"):
        checkpoint.check_model_source("runs/toy/base")
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit, match=r"--policy runs/sft: no such local folder \(there is a local runs/"):
        checkpoint.check_model_source("runs/sft", "--policy")
    with pytest.raises(SystemExit, match="holds no config.json"):
        checkpoint.check_model_source("runs")
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(SystemExit, match="a file, not a model folder"):
        checkpoint.check_model_source("weights.bin")
    checkpoint.check_model_source("Qwen/Qwen2.5-1.5B")  # a hub id passes (loaded later, by transformers)
    (tmp_path / "runs" / "config.json").write_text("{}")
    checkpoint.check_model_source("runs")


def test_every_stage_refuses_a_mistyped_model_path_with_one_line(tmp_path):
    import rloo
    import sft
    import train_rm

    missing = str(tmp_path / "runs" / "toy" / "base")
    out = str(tmp_path / "out")
    cases = [(train_rm.main, ["--model", missing, "--train-file", "t.jsonl", "--out", out], "--model"),
             (sft.main, ["--model", missing, "--train-file", "t.jsonl", "--out", out], "--model"),
             (rloo.main, ["--policy", missing, "--reward-model", missing, "--prompts", "p.jsonl", "--out", out],
              "--policy"),
             (rloo.main, ["--policy", str(tmp_path), "--reward-model", missing, "--prompts", "p.jsonl", "--out", out],
              "--policy"),  # a folder without config.json
             (checkpoint.check_reward_model, missing, "--model")]
    for main, argv, flag in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert str(e.value).startswith(f"{flag} ") and ("no such local folder" in str(e.value)
                                                        or "holds no config.json" in str(e.value)), str(e.value)
    with pytest.raises(SystemExit, match="--reward-model .*no such local folder"):
        (tmp_path / "config.json").write_text("{}")
        rloo.main(["--policy", str(tmp_path), "--reward-model", missing, "--prompts", "p.jsonl", "--out", out])


# ------------------------------------------------------------------------------------------ the repo's shape


def local_imports(name):
    """The repo's own modules that REPO/<name>.py imports (at the top or inside functions)."""
    ours = {f[:-3] for f in os.listdir(REPO) if f.endswith(".py")}
    with open(os.path.join(REPO, f"{name}.py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & ours


def test_no_stage_imports_a_stage_and_the_trainer_forks_with_utils_and_checkpoint():
    imports = {stage: local_imports(stage) for stage in STAGES}
    for stage, mods in imports.items():
        assert not mods & set(STAGES), f"{stage}.py imports the stage(s) {sorted(mods & set(STAGES))}"
    # the fork the README promises: train_rm.py + utils.py + checkpoint.py + ds_config.json, nothing else of ours
    assert imports["train_rm"] == {"utils", "checkpoint"}
    assert local_imports("utils") == set() and local_imports("checkpoint") == {"utils"}
    # the vLLM engine and the gold model live in generation.py, used by the two stages that generate / judge
    assert {s for s, mods in imports.items() if "generation" in mods} == {"make_data", "rloo"}


def test_product_code_holds_no_test_hook():
    """Crash injection for the resume tests lives in tests/fault_hook/ and patches a stage from outside."""
    for name in sorted(f for f in os.listdir(REPO) if f.endswith(".py")):
        with open(os.path.join(REPO, name)) as f:
            text = f.read()
        assert "BSR_FAULT" not in text and "fault_here" not in text, f"{name} holds a test hook"
