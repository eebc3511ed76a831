"""Nothing lost, nothing silently wrong (issue 14 items 1-5, 7, 9-13): folder ownership, inputs never written,
reward-model checks, resume refusals, torn logs, leftovers of a crashed save, bad numbers, pickle-free RNG state."""

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import read_metrics, run_script, write_pairs

import make_data as md
import checkpoint
import rloo
import sft
import train_rm
import utils


def dead_pid():
    """The id of a process that has exited (so a '.tmp-<pid>' of it is a leftover)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def tree(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


# ------------------------------------------------------------------------------------------ 1-2. folder ownership


def test_make_data_keeps_a_folder_that_merely_holds_a_manifest(tmp_path):
    pairs = write_pairs(str(tmp_path / "pairs.jsonl"), 6)
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "manifest.json").write_text('{"name": "x"}')
    (trap / "thesis.txt").write_text("draft")
    with pytest.raises(SystemExit, match="non-empty folder not written by make_data.py"):
        md.main(["--source", "jsonl", "--train-file", pairs, "--out", str(trap)])
    assert (trap / "thesis.txt").read_text() == "draft" and sorted(os.listdir(trap)) == ["manifest.json", "thesis.txt"]
    # its own folder (and a folder an older make_data.py wrote: a manifest with its keys) is replaced as before
    out = tmp_path / "mine"
    md.main(["--source", "jsonl", "--train-file", pairs, "--out", str(out)])
    assert json.load(open(out / checkpoint.OWNER_FILE)) == {"stage": "make_data.py"}
    os.remove(out / checkpoint.OWNER_FILE)
    md.main(["--source", "jsonl", "--train-file", pairs, "--out", str(out)])
    assert len(list(utils.read_jsonl(str(out / "train.jsonl")))) == 6


def test_make_data_out_naming_a_file_or_holding_an_input_is_refused_and_leaves_no_tmp(tmp_path):
    pairs = write_pairs(str(tmp_path / "pairs.jsonl"), 6)
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(SystemExit, match="is an existing file"):
        md.main(["--source", "jsonl", "--train-file", pairs, "--out", str(tmp_path / "a_file")])
    assert (tmp_path / "a_file").read_text() == "keep"
    with pytest.raises(SystemExit, match=r"contains the input --train-file"):
        md.main(["--source", "jsonl", "--train-file", pairs, "--out", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["a_file", "pairs.jsonl"]  # no '.tmp-<pid>' folder left behind


def test_make_data_removes_its_own_stale_tmp_folder_only(tmp_path):
    pairs = write_pairs(str(tmp_path / "pairs.jsonl"), 6)
    pid = dead_pid()
    ours, foreign = tmp_path / f"out.tmp-{pid}", tmp_path / f"out.tmp-{pid + 1}"
    ours.mkdir()
    checkpoint.write_owner(str(ours), "make_data.py")
    foreign.mkdir()
    (foreign / "x").write_text("not ours")
    md.main(["--source", "jsonl", "--train-file", pairs, "--out", str(tmp_path / "out")])
    assert not ours.exists() and (foreign / "x").read_text() == "not ours"
    # a crash between atomic_path's two renames: --out moved to its backup, the new one not yet in place
    backup = tmp_path / f"out.old-{pid}"
    os.replace(tmp_path / "out", backup)
    (tmp_path / "out.old").mkdir()  # someone's own backup of that name is no leftover of ours
    (tmp_path / "out.old" / "notes.txt").write_text("mine")
    md.remove_stale_tmp(str(tmp_path / "out"))
    assert (tmp_path / "out" / "train.jsonl").exists() and not backup.exists()  # put back
    md.main(["--source", "jsonl", "--train-file", pairs, "--out", str(tmp_path / "out")])  # replaces out in place
    assert (tmp_path / "out.old" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["out", "out.old", f"out.tmp-{pid + 1}", "pairs.jsonl"]


def test_make_data_new_models_are_inputs_and_need_distinct_names(tmp_path):
    """A local --new-models folder inside --out would be read, then deleted with the old --out; two folders of one
    name would write one model's name on both models' responses: both refused before anything runs."""
    pairs = write_pairs(str(tmp_path / "pairs.jsonl"), 6)
    out = tmp_path / "out"
    md.main(["--source", "jsonl", "--train-file", pairs, "--out", str(out)])
    (out / "base").mkdir()
    (out / "base" / "config.json").write_text("{}")
    (tmp_path / "a" / "final").mkdir(parents=True)
    (tmp_path / "b" / "final").mkdir(parents=True)
    uf = ["--source", "ultrafeedback", "--dataset", pairs, "--gold-model", "org/gold"]
    with pytest.raises(SystemExit, match=f"--out {out} contains the input --new-models {out}/base"):
        md.main(uf + ["--new-models", f"{out}/base,org/x", "--out", str(out)])
    assert (out / "base" / "config.json").exists()
    with pytest.raises(SystemExit, match=r"--new-models: .*a/final and .*b/final are both named 'final'"):
        md.main(uf + ["--new-models", f"{tmp_path}/a/final,{tmp_path}/b/final", "--out", str(tmp_path / "o2")])


def test_claim_out_dir_rules(tmp_path, tiny_llama):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    before = tree(model)
    for out, how in ((model, "is"), (model / "rm", "is inside"), (tmp_path, "contains")):
        with pytest.raises(SystemExit, match=f"--out {out} {how} the input --model"):
            checkpoint.claim_out_dir(str(out), "train_rm.py", [("--model", str(model))])
    checkpoint.claim_out_dir(str(tmp_path / "new"), "train_rm.py", [("--model", str(model)), ("--eval-file", None),
                                                                    ("--train-file", "org/hub-dataset")])
    assert json.load(open(tmp_path / "new" / ".written_by")) == {"stage": "train_rm.py"}
    checkpoint.claim_out_dir(str(tmp_path / "new"), "train_rm.py")  # its own folder: accepted
    with pytest.raises(SystemExit, match="non-empty folder written by train_rm.py; sft.py writes only"):
        checkpoint.claim_out_dir(str(tmp_path / "new"), "sft.py")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match="non-empty folder not written by eval_rm.py"):
        checkpoint.claim_out_dir(str(other), "eval_rm.py")
    (other / "eval_config.json").write_text(json.dumps({"args": {}, "models": {}}))  # an older eval_rm.py's folder
    checkpoint.claim_out_dir(str(other), "eval_rm.py", legacy=("eval_config.json", ("args", "models")))
    assert tree(model) == before


def test_every_stage_refuses_its_input_as_out_before_writing(tmp_path, tiny_llama):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = (model / "config.json").read_text()
    pairs = write_pairs(str(tmp_path / "pairs.jsonl"), 8)
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                                                 {"role": "assistant", "content": "b"}]}) + "\n")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    runs = {
        train_rm: ["--model", str(model), "--train-file", pairs, "--out", str(model)],
        sft: ["--model", str(model), "--train-file", str(tmp_path / "sft.jsonl"), "--out", str(model / "sft")],
        rloo: ["--policy", str(model), "--reward-model", str(model), "--prompts", str(tmp_path / "prompts.jsonl"),
               "--out", str(model)],
    }
    for stage, argv in runs.items():
        with pytest.raises(SystemExit, match="the input --model|the input --policy"):
            stage.main(argv)
    import eval_rm

    with pytest.raises(SystemExit, match="is inside the input --model"):
        eval_rm.main(["--model", str(model), "--data-dir", str(tmp_path), "--out", str(model / "eval")])
    assert (model / "config.json").read_text() == config and not (model / "sft").exists()
    # an unrelated non-empty folder is not written either
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="non-empty folder not written by train_rm.py"):
        train_rm.main(["--model", str(model), "--train-file", pairs, "--out", str(other)])
    assert os.listdir(other) == ["config.json"] and (other / "config.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------ 3. reward-model check


def test_causal_lm_as_reward_model_is_refused_by_every_loader(tmp_path, tiny_llama):
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(SystemExit, match=r"--reward-model .*: not a reward model \(config.architectures = "
                                         r"\['LlamaForCausalLM'\]\)"):
        rloo.main(["--policy", tiny_llama, "--reward-model", tiny_llama, "--prompts", str(tmp_path / "prompts.jsonl"),
                   "--out", str(tmp_path / "rloo")])
    pairs = write_pairs(str(tmp_path / "pairs.jsonl"), 8)
    with pytest.raises(SystemExit, match=r"--head-init keep\) .*: not a reward model"):
        train_rm.main(["--model", tiny_llama, "--train-file", pairs, "--out", str(tmp_path / "rm"),
                       "--head-init", "keep"])
    with pytest.raises(SystemExit, match="not a reward model"):
        checkpoint.check_reward_model(tiny_llama, "--model")  # eval_rm.py's check (end to end: test_eval_rm)
    assert not (tmp_path / "rloo").exists() and not (tmp_path / "rm").exists()
    # a real reward model passes the shared check
    tok = utils.load_tokenizer(tiny_llama)
    utils.load_reward_model(tiny_llama, tok).save_pretrained(tmp_path / "real_rm")
    checkpoint.check_reward_model(str(tmp_path / "real_rm"), "--reward-model")


# ------------------------------------------------------------------------------------------ 4. resume refusals


def _saved_config(parse, argv):
    args = parse(argv)
    return {"args": json.loads(json.dumps(vars(args))), "world_size": 1,
            "ds_config": {"zero_optimization": {"stage": 0}}}


@pytest.mark.parametrize("stage,base,refused,accepted", [
    (train_rm, ["--model", "m", "--train-file", "t.jsonl", "--out", "o"],
     [["--truncate"], ["--warmup-ratio", "0.5"], ["--max-grad-norm", "0.5"], ["--weight-decay", "0.1"],
      ["--micro-batch-size", "4"], ["--bf16"], ["--padding-free"], ["--attn-implementation", "eager"],
      ["--head-init", "keep"], ["--eval-file", "e.jsonl"], ["--train-split", "x"], ["--max-length", "64"],
      ["--eval-split", "test"]],
     [["--save-steps", "7"], ["--eval-batch-size", "4"], ["--norm-stats-pairs", "0"],
      ["--max-tokens-per-forward", "512"], ["--gradient-checkpointing"], ["--ds-config", "other.json"]]),
    (sft, ["--model", "m", "--train-file", "t.jsonl", "--out", "o"],
     [["--truncate"], ["--warmup-ratio", "0.5"], ["--max-grad-norm", "0.5"], ["--weight-decay", "0.1"],
      ["--micro-batch-size", "2"], ["--eval-split", "x"]],
     [["--save-steps", "7"], ["--eval-batch-size", "4"], ["--gradient-checkpointing"]]),
    (rloo, ["--policy", "p", "--reward-model", "r", "--prompts", "t.jsonl", "--out", "o"],
     [["--warmup-ratio", "0.5"], ["--max-grad-norm", "0.5"], ["--weight-decay", "0.1"], ["--gen-batch-size", "2"],
      ["--rm-max-length", "64"], ["--max-prompt-length", "9"], ["--vllm"]],
     [["--save-steps", "7"], ["--gold-every", "3"], ["--rm-batch-size", "2"], ["--gradient-checkpointing"]]),
])
def test_resume_refuses_every_flag_that_changes_the_result(tmp_path, stage, base, refused, accepted):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(_saved_config(stage.parse_args, base)))
    ds = {"zero_optimization": {"stage": 0}}
    for extra in refused:
        flag = extra[0]
        with pytest.raises(SystemExit, match=f"--resume: {flag} is .* but the run in"):
            checkpoint.check_resume(str(cfg), stage.parse_args(base + extra + ["--resume"]), 1, ds,
                                    stage.RESUME_MAY_CHANGE)
    for extra in accepted:
        checkpoint.check_resume(str(cfg), stage.parse_args(base + extra + ["--resume"]), 1, ds, stage.RESUME_MAY_CHANGE)
    with pytest.raises(SystemExit, match="DeepSpeed config differs"):
        checkpoint.check_resume(str(cfg), stage.parse_args(base + ["--resume"]), 1,
                                {"zero_optimization": {"stage": 0}, "gradient_clipping": 2.0}, stage.RESUME_MAY_CHANGE)
    added = getattr(stage, "RESUME_ADDED_FLAGS", None)
    if added:  # a run saved before a flag existed resumes when the flag keeps the value that run used
        older = json.loads(cfg.read_text())
        for key in added:
            del older["args"][key]
        cfg.write_text(json.dumps(older))
        checkpoint.check_resume(str(cfg), stage.parse_args(base + ["--resume"]), 1, ds, stage.RESUME_MAY_CHANGE,
                                None, added)
        with pytest.raises(SystemExit, match="is 'test' but the run in .* used 'train'"):
            checkpoint.check_resume(str(cfg), stage.parse_args(base + ["--eval-split", "test", "--resume"]), 1, ds,
                                    stage.RESUME_MAY_CHANGE, None, added)


def test_fingerprint_follows_content(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"a": 1}\n')
    first = checkpoint.fingerprint(str(f))
    os.utime(f, (1, 1))
    assert checkpoint.fingerprint(str(f)) == first  # a touch is not a change
    f.write_text('{"a": 2}\n')
    assert checkpoint.fingerprint(str(f)) != first
    assert checkpoint.fingerprint("org/hub-dataset") is None and checkpoint.fingerprint(None) is None
    cfg = tmp_path / "train_config.json"
    args = argparse.Namespace(train_file=str(f))
    cfg.write_text(json.dumps({"args": vars(args), "world_size": 1, "ds_config": {}, "data_fingerprints": {
        "train_file": first}}))
    with pytest.raises(SystemExit, match=r"--train-file .*d.jsonl changed since the run in .* started"):
        checkpoint.check_resume(str(cfg), args, 1, {}, (), {"train_file": checkpoint.fingerprint(str(f))})
    checkpoint.check_resume(str(cfg), args, 1, {}, (), {"train_file": first})


def test_resume_refuses_a_model_saved_anew_in_place(tmp_path):
    """--model (sft, train_rm) and --policy / --reward-model / --gold-model (rloo) are inputs of the result too: a
    model saved again into the same folder is refused on --resume. Its fingerprint is the top-level model files'
    names, sizes and modification times; logs and subfolders (a finished run's resume/) are not the model."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"w" * 10)
    first = checkpoint.model_fingerprint(str(model))
    (model / "metrics.jsonl").write_text("{}\n")
    (model / "resume").mkdir()
    assert checkpoint.model_fingerprint(str(model)) == first
    assert checkpoint.model_fingerprint("org/hub-model") is None
    cfg = tmp_path / "train_config.json"
    args = argparse.Namespace(model=str(model))
    cfg.write_text(json.dumps({"args": vars(args), "world_size": 1, "ds_config": {},
                               "data_fingerprints": {"model": first}}))
    checkpoint.check_resume(str(cfg), args, 1, {}, (), {"model": first})
    os.utime(model / "model.safetensors", ns=(1, 1))  # saved anew (same size)
    now = checkpoint.model_fingerprint(str(model))
    with pytest.raises(SystemExit, match=r"--model .*/m changed since the run in .* started \(a model file's size or "
                                         r"modification time differs: it was saved anew\)"):
        checkpoint.check_resume(str(cfg), args, 1, {}, (), {"model": now})
    cfg.write_text(json.dumps({"args": vars(args), "world_size": 1, "ds_config": {}, "data_fingerprints": {}}))
    checkpoint.check_resume(str(cfg), args, 1, {}, (), {"model": now})  # an older run kept no model fingerprint


RM_FLAGS = ["--micro-batch-size", "8", "--lr", "1e-3", "--global-batch-size", "8", "--epochs", "2", "--max-length",
            "128", "--seed", "0", "--save-steps", "2", "--norm-stats-pairs", "16", "--max-train-pairs", "32",
            "--warmup-ratio", "0.25"]


def test_killed_run_resume_checks_data_drops_torn_line_cleans_leftovers_keeps_config(tmp_path, tiny_llama):
    """Items 4 (edited data, train_config.json kept), 7 (torn metrics line), 11 (leftovers of a crashed save, and a
    complete step folder that a crash kept 'latest' from naming), 13 (the RNG state is safetensors), on one killed
    train_rm.py run."""
    data = write_pairs(str(tmp_path / "train.jsonl"), 40)
    out = tmp_path / "run"
    argv = ["train_rm.py", "--model", tiny_llama, "--train-file", data, "--out", str(out)] + RM_FLAGS
    assert run_script(argv, env={"BSR_FAULT": "after_step@3"}, check=False).returncode == -9
    state = out / "resume" / "step-00000002"
    assert (state / "rng_rank0.safetensors").exists() and not (state / "rng_rank0.pt").exists()
    config = (out / "train_config.json").read_bytes()

    original = open(data).read()
    with open(data, "a") as f:  # edited in place: same path, one more row
        f.write(json.dumps({"prompt": "p", "chosen": "yes a", "rejected": "no b"}) + "\n")
    refused = run_script(argv + ["--resume"], check=False)
    assert refused.returncode == 1 and "--resume: --train-file" in refused.stderr and "changed since" in refused.stderr
    open(data, "w").write(original)

    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')  # a write that the kill cut short
    pid = dead_pid()
    (out / f"epoch-1.tmp-{pid}").mkdir()
    (out / f"epoch-1.tmp-{pid}" / "model.safetensors").write_bytes(b"0" * 1000)
    (out / "resume" / ".tmp-step-00000004").mkdir()
    # a crash after a save's rename, before 'latest' moved: a complete step-4 that 'latest' (step 2) does not name
    shutil.copytree(out / "resume" / "step-00000002", out / "resume" / "step-00000004")
    (out / "notes.tmp").write_text("not a leftover of ours")
    proc = run_script(argv + ["--resume"])
    assert "dropped a torn last line" in proc.stdout and f"removed {out}/epoch-1.tmp-{pid}" in proc.stdout
    assert not (out / f"epoch-1.tmp-{pid}").exists() and not (out / "resume" / ".tmp-step-00000004").exists()
    assert (out / "notes.tmp").read_text() == "not a leftover of ours"
    assert (out / "train_config.json").read_bytes() == config  # not rewritten on resume
    steps = [r["step"] for r in read_metrics(out) if "train/loss" in r]
    assert steps == list(range(1, 9))


# ------------------------------------------------------------------------------------------ 5. gold scores


@pytest.mark.parametrize("row,field", [
    ({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": float("nan"), "rejected_score": 0.0},
     "chosen_score"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 1.0, "rejected_score": float("-inf")},
     "rejected_score"),
])
def test_non_finite_gold_score_in_pairs_is_a_data_error(tmp_path, row, field):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    assert "NaN" in path.read_text() or "Infinity" in path.read_text()
    with pytest.raises(SystemExit, match=rf"data error: {path}:2: field '{field}' must be a finite number"):
        md.main(["--source", "jsonl", "--train-file", str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_non_finite_gold_score_in_ranking_file_is_a_data_error(tmp_path):
    pairs = write_pairs(str(tmp_path / "pairs.jsonl"), 4)
    rank = tmp_path / "rank.jsonl"
    rank.write_text(json.dumps({"prompt": "p", "responses": ["a", "b", "c"], "gold_scores": [1.0, float("-inf"), 0]})
                    + "\n")
    with pytest.raises(SystemExit, match=rf"data error: {rank}:1: field 'gold_scores'\[1\] is -inf"):
        md.main(["--source", "jsonl", "--train-file", pairs, "--prompt-ood-file", str(rank), "--out",
                 str(tmp_path / "out")])


def test_gold_model_non_finite_scores_are_counted_skips(monkeypatch):
    monkeypatch.setattr(md, "gold_scorer", lambda args: lambda items: [
        float("nan") if y == "bad" else float(len(y)) for _, y in items])
    cands = {"p1": [{"model": "m", "response": r} for r in ("a", "bad", "ccc")]}
    skipped = {}
    md.label_with_gold(argparse.Namespace(gold_model="g"), {"p1": "prompt"}, [cands], skipped)
    assert [c["response"] for c in cands["p1"]] == ["a", "ccc"] and [c["score"] for c in cands["p1"]] == [1.0, 3.0]
    assert skipped == {"source": {"non-finite gold score": 1}}


# ------------------------------------------------------------------------------------------ 7. torn log line


def test_torn_last_line_is_dropped_and_a_bad_middle_line_is_an_error(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "tr')
    checkpoint.truncate_torn_jsonl(str(log), lambda r: r["step"] <= 2)
    assert [json.loads(x) for x in log.read_text().splitlines()] == [{"step": 1}, {"step": 2}]
    assert "metrics.jsonl:4: dropped a torn last line" in capsys.readouterr().out
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not valid JSON"):
        checkpoint.truncate_torn_jsonl(str(log))


# ------------------------------------------------------------------------------------------ 9. bad numbers


@pytest.mark.parametrize("stage,base", [
    (train_rm, ["--model", "m", "--train-file", "t", "--out", "o"]),
    (sft, ["--model", "m", "--train-file", "t", "--out", "o"]),
    (rloo, ["--policy", "p", "--reward-model", "r", "--prompts", "t", "--out", "o"]),
])
@pytest.mark.parametrize("bad", [["--lr", "nan"], ["--lr", "0"], ["--lr=-1e-5"], ["--epochs", "0"],
                                 ["--global-batch-size", "0"], ["--micro-batch-size", "-2"], ["--warmup-ratio", "inf"],
                                 ["--max-grad-norm", "nan"]])
def test_bad_numbers_are_usage_errors(stage, base, bad, capsys):
    with pytest.raises(SystemExit) as e:
        stage.parse_args(base + bad)
    flag = bad[0].split("=")[0]
    assert e.value.code == 2
    assert f"argument {flag}: expected a" in capsys.readouterr().err


def test_bad_numbers_of_make_data_and_eval_rm_are_usage_errors(capsys):
    import eval_rm

    for parse, argv in ((md.parse_args, ["--out", "o", "--num-prompts", "0"]),
                        (md.parse_args, ["--out", "o", "--top-p", "nan"]),
                        (eval_rm.parse_args, ["--model", "m", "--data-dir", "d", "--out", "o", "--batch-size", "0"])):
        with pytest.raises(SystemExit) as e:
            parse(argv)
        assert e.value.code == 2 and ": expected" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 10. non-finite loss advice


def test_non_finite_loss_advice_is_true_with_and_without_a_saved_state(tmp_path):
    assert "No resume state was saved" in checkpoint.last_good_state(str(tmp_path))
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / "latest").write_text("step-00000002")
    advice = checkpoint.last_good_state(str(tmp_path))
    assert f"{tmp_path}/resume/step-00000002" in advice and "another --out" in advice


def test_nan_loss_without_any_saved_state_does_not_point_at_a_missing_resume_folder(tmp_path, tiny_llama):
    data = write_pairs(str(tmp_path / "train.jsonl"), 40)
    out = tmp_path / "nan"
    flags = [f for f in RM_FLAGS]
    flags[flags.index("--save-steps") + 1] = "0"
    proc = run_script(["train_rm.py", "--model", tiny_llama, "--train-file", data, "--out", str(out)] + flags,
                      env={"BSR_FAULT": "nan@2"}, check=False)
    assert proc.returncode == 1 and "non-finite loss at step 2" in proc.stdout
    assert "No resume state was saved" in proc.stdout and "resume/" not in proc.stdout
    assert not (out / "resume").exists()


# ------------------------------------------------------------------------------------------ 11. leftovers


def test_remove_leftovers_takes_only_our_dead_temporaries(tmp_path):
    pid = dead_pid()
    for d in (f"epoch-1.tmp-{pid}", "resume/.tmp-step-00000004", "epoch-2.old", "epoch-3.old", "epoch-3",
              f"epoch-4.tmp-{os.getpid()}", "my.tmp", "resume/step-00000002", f"epoch-5.old-{pid}",
              f"epoch-6.old-{pid}", "epoch-6", f"epoch-7.old-{os.getpid()}", "mine.old"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "epoch-2.old" / "model.safetensors").write_text("the only complete copy")
    (tmp_path / f"epoch-5.old-{pid}" / "model.safetensors").write_text("the only complete copy")
    (tmp_path / f"metrics.jsonl.tmp-{pid}").write_text("{")
    checkpoint.remove_leftovers(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["epoch-2", "epoch-3", f"epoch-4.tmp-{os.getpid()}", "epoch-5", "epoch-6",
                                            f"epoch-7.old-{os.getpid()}", "mine.old", "my.tmp", "resume"]
    for put_back in ("epoch-2", "epoch-5"):
        assert (tmp_path / put_back / "model.safetensors").read_text() == "the only complete copy"
    assert os.listdir(tmp_path / "resume") == ["step-00000002"]


# ------------------------------------------------------------------------------------------ 12. --resume, nothing saved


def test_resume_without_a_saved_state_is_refused(tmp_path, tiny_llama):
    pairs = write_pairs(str(tmp_path / "pairs.jsonl"), 8)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    for stage, argv in ((train_rm, ["--model", tiny_llama, "--train-file", pairs]),
                        (sft, ["--model", tiny_llama, "--train-file", pairs]),
                        (rloo, ["--policy", tiny_llama, "--reward-model", tiny_llama, "--prompts",
                                str(tmp_path / "prompts.jsonl")])):
        out = tmp_path / f"fresh_{stage.__name__}"
        with pytest.raises(SystemExit, match="--resume: .*resume/latest does not exist, so there is nothing to "
                                             "continue; drop --resume"):
            stage.main(argv + ["--out", str(out), "--resume"])
        assert not out.exists()


# ------------------------------------------------------------------------------------------ 13. no pickle


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_rng_state_is_safetensors_and_a_crafted_pickle_is_not_executed(tmp_path):
    state = tmp_path / "step-00000002"
    state.mkdir()
    torch.manual_seed(123)
    checkpoint.save_rng_state(str(state), 0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    checkpoint.load_rng_state(str(state), 0)
    assert torch.equal(torch.rand(3), expected)  # round trip

    marker = tmp_path / "pwned"
    os.remove(state / "rng_rank0.safetensors")  # an older state's pickle, crafted by an attacker
    with open(state / "rng_rank0.pt", "wb") as f:
        pickle.dump({"torch": _Exploit(marker)}, f)
    with pytest.raises(SystemExit, match="is not a plain RNG state"):
        checkpoint.load_rng_state(str(state), 0)
    assert not marker.exists()
    # an older state written by torch.save of tensors still loads
    torch.save({"torch": torch.get_rng_state(), "cuda": None}, state / "rng_rank0.pt")
    checkpoint.load_rng_state(str(state), 0)


# ------------------------------------------------------------------------------------------ a full disk while saving


def wrapped(inner):
    """A library error with no message of its own, raised from the OSError that caused it."""
    outer = RuntimeError()
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
                                   RuntimeError("Error while serializing: I/O error: File too large (os error 27)"),
                                   wrapped(OSError(122, "Disk quota exceeded"))])
def test_a_save_without_room_is_one_line_and_removes_its_partial_folder(tmp_path, error):
    partial = tmp_path / "resume" / ".tmp-step-00000004"
    partial.mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"^\[save\] no room to write .*GiB free there.*--resume") as e:
        with checkpoint.no_room_is_one_line(str(tmp_path / "resume"), partial=str(partial)):
            raise error
    assert "\n" not in str(e.value) and not partial.exists()
    with pytest.raises(OSError, match="Permission denied"):  # any other failure keeps its own error
        with checkpoint.no_room_is_one_line(str(tmp_path)):
            raise OSError(13, "Permission denied")


def test_train_rm_out_of_room_while_saving_ends_with_one_line_and_no_partial_state(tmp_path, tiny_llama):
    """A real failed write: the process may write files of at most 60 kB (RLIMIT_FSIZE; a write beyond it fails with
    EFBIG, as a full disk fails with ENOSPC), so the first resume state (the model states alone are ~90 kB) fails."""
    data = write_pairs(str(tmp_path / "train.jsonl"), 40)
    out = tmp_path / "rm"
    argv = ["train_rm.py", "--model", tiny_llama, "--train-file", data, "--out", str(out)] + RM_FLAGS
    code = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)); "
            f"sys.argv = {argv!r}; runpy.run_path('train_rm.py', run_name='__main__')")
    proc = run_script(["-c", code], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "no room" in line]
    assert len(lines) == 1 and lines[0].startswith(f"[save] no room to write {out}/resume (")
    assert "rerun the command with --resume" in lines[0] and "Traceback" not in proc.stderr
    assert read_metrics(str(out))[-1]["step"] == 2  # it trained up to the save
    assert os.listdir(out / "resume") == []  # the half-written state is gone, and no 'latest' points at it
