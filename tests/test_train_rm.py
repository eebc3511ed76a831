"""train_rm.py end to end, as the README launches it: 1 process vs 2 processes (DeepSpeed ZeRO-3 over gloo),
gradient accumulation, the logged loss against a hand computation, checkpoint reload, crash + resume, NaN, bad input.
"""

import json
import os

import pytest
import torch

import utils
from conftest import make_tiny_lm, read_metrics, run_script, write_pairs
from train_rm import epoch_batches, forward_chunks, init_reward_head, load_data, load_pairs, parse_args, preference_loss

COMMON = ["--lr", "1e-3", "--global-batch-size", "8", "--epochs", "2", "--max-length", "128", "--seed", "0",
          "--save-steps", "2", "--norm-stats-pairs", "16", "--max-train-pairs", "32", "--warmup-ratio", "0.25"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_data")
    return {"train": write_pairs(str(root / "train.jsonl"), 40, seed=0),
            "eval": write_pairs(str(root / "eval.jsonl"), 12, seed=1)}


def train(out, model, data, *extra, nproc=1, micro=8, env=None, check=True, launcher="torchrun"):
    args = ["train_rm.py", "--model", model, "--train-file", data["train"], "--eval-file", data["eval"],
            "--out", str(out), "--micro-batch-size", str(micro)] + COMMON + list(extra)
    return run_script(args, nproc=nproc, env=env, check=check, launcher=launcher)


def weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model.safetensors"))


def assert_same_weights(a, b, atol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def train_losses(out):
    return [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]


@pytest.fixture(scope="module")
def bsr_run(tiny_llama, data, tmp_path_factory):
    """The reference: 1 process, BSR, whole global batch in one forward. Several tests compare against it."""
    out = tmp_path_factory.mktemp("runs") / "bsr_1p"
    train(out, tiny_llama, data, "--loss", "bsr", "--lam", "0.5")
    return out


# ------------------------------------------------------------------------------------------ exact global batch


def test_two_process_zero3_bsr_equals_one_process(bsr_run, tiny_llama, data, tmp_path):
    """Launched exactly as the README does: `deepspeed --num_gpus 2 train_rm.py ...` (gloo on CPU)."""
    out = tmp_path / "bsr_2p"
    train(out, tiny_llama, data, "--loss", "bsr", "--lam", "0.5", nproc=2, micro=4, launcher="deepspeed")
    assert len(train_losses(out)) == 8
    assert train_losses(out) == pytest.approx(train_losses(bsr_run), rel=1e-5, abs=1e-6)
    assert_same_weights(out, bsr_run, atol=2e-5)
    cfg = json.load(open(out / "train_config.json"))
    assert cfg["world_size"] == 2 and cfg["ds_config"]["zero_optimization"]["stage"] == 3


def test_gradient_accumulation_is_exact_for_bsr(bsr_run, tiny_llama, data, tmp_path):
    """micro 2 x accumulation 4: the pre-pass centres over the whole global batch, so nothing changes."""
    out = tmp_path / "bsr_accum"
    train(out, tiny_llama, data, "--loss", "bsr", "--lam", "0.5", micro=2)
    assert json.load(open(out / "train_config.json"))["grad_accum"] == 4
    assert train_losses(out) == pytest.approx(train_losses(bsr_run), rel=1e-5, abs=1e-6)
    assert_same_weights(out, bsr_run, atol=2e-5)


def test_chunked_padding_free_forwards_change_nothing_on_two_processes(bsr_run, tiny_llama, data, tmp_path):
    """Length-sorted chunks (a different count of real tokens per rank) packed padding-free: same training."""
    out = tmp_path / "bsr_chunked"
    train(out, tiny_llama, data, "--loss", "bsr", "--lam", "0.5", "--max-tokens-per-forward", "60",
          "--padding-free", nproc=2, micro=4)
    assert train_losses(out) == pytest.approx(train_losses(bsr_run), rel=1e-5, abs=1e-6)
    assert_same_weights(out, bsr_run, atol=2e-5)
    assert all(r["train/padding_fraction"] == 0 for r in read_metrics(out) if "train/loss" in r)  # packed


def test_token_budget_is_on_by_default_and_changes_no_number(bsr_run, tiny_llama, data, tmp_path):
    """Default flags split by a token budget (2048 on CPU); a budget small enough to split every micro-batch into
    several padded forwards trains to the same losses and weights as one forward per micro-batch."""
    from train_rm import default_tokens_per_forward

    assert default_tokens_per_forward("cpu", 8, 2048) == 2048
    assert default_tokens_per_forward("cuda", 16, 2048) == 16 * 2048
    assert json.load(open(bsr_run / "train_config.json"))["args"]["max_tokens_per_forward"] == 2048
    off, chunked = tmp_path / "off", tmp_path / "chunked"
    train(off, tiny_llama, data, "--loss", "bsr", "--lam", "0.5", "--max-tokens-per-forward", "0")
    train(chunked, tiny_llama, data, "--loss", "bsr", "--lam", "0.5", "--max-tokens-per-forward", "60")
    assert json.load(open(off / "train_config.json"))["args"]["max_tokens_per_forward"] == 0
    assert train_losses(chunked) == pytest.approx(train_losses(off), rel=1e-5, abs=1e-6)
    assert_same_weights(chunked, off, atol=2e-5)
    assert_same_weights(bsr_run, off, atol=2e-5)
    padding = {out: [r["train/padding_fraction"] for r in read_metrics(out) if "train/loss" in r]
               for out in (off, chunked)}
    assert sum(padding[chunked]) < sum(padding[off])  # it really split: less padding


def test_forward_chunk_planning():
    assert forward_chunks([10, 12, 10, 11], 0, False) == [[1, 3, 0, 2]]  # one forward, longest first
    assert forward_chunks([10, 12, 10, 11], 24, False) == [[1, 3], [0, 2]]  # padded width x count <= 24
    assert forward_chunks([2, 30, 2, 2], 40, True) == [[1, 0, 2, 3]]  # padding-free counts real tokens: 36
    assert forward_chunks([2, 30, 2, 2], 40, False) == [[1], [0, 2, 3]]  # 30 x 2 > 40: the long one alone
    assert forward_chunks([50], 10, False) == [[0]]  # a sequence is never split
    # another rank needed 3 forwards: the costliest chunk with >1 sequence is halved
    assert forward_chunks([2, 30, 2, 2], 40, False, n_chunks=3) == [[1], [0], [2, 3]]


def test_two_process_zero3_bt_equals_one_process_on_qwen2(tiny_qwen2, data, tmp_path):
    one, two = tmp_path / "bt_1p", tmp_path / "bt_2p"
    train(one, tiny_qwen2, data, "--loss", "bt", "--epochs", "1")
    train(two, tiny_qwen2, data, "--loss", "bt", "--epochs", "1", nproc=2, micro=4)
    assert train_losses(two) == pytest.approx(train_losses(one), rel=1e-5, abs=1e-6)
    assert_same_weights(two, one, atol=2e-5)
    # BT trains: accuracy on the (learnable) eval pairs goes up
    evals = [r["eval/accuracy"] for r in read_metrics(one) if "eval/accuracy" in r]
    assert evals[-1] > evals[0]


def _initial_rewards(model_path, data, order):
    tok = utils.load_tokenizer(model_path)
    model = utils.load_reward_model(model_path, tok).eval()
    init_reward_head(model, seed=0)
    pairs, _ = load_pairs(data["train"], "train", tok, 128, False, 32)
    with torch.no_grad():
        seqs = [pairs[i][0] for i in order] + [pairs[i][1] for i in order]
        rewards, _ = utils.RewardModel(model)(*utils.pad_batch(seqs, tok.pad_token_id))
    return rewards[: len(order)], rewards[len(order):]


def test_logged_step1_loss_matches_hand_computation_for_both_bsr_scopes(bsr_run, tiny_llama, data, tmp_path):
    pair_len = None
    tok = utils.load_tokenizer(tiny_llama)
    pairs, _ = load_pairs(data["train"], "train", tok, 128, False, 32)
    pair_len = [max(len(c), len(r)) for c, r in pairs]
    first_batch = epoch_batches(len(pairs), 8, 0, 0, pair_len)[0]
    rc, rr = _initial_rewards(tiny_llama, data, first_batch)

    # global scope: one BSR over all 8 pairs
    expected_global = preference_loss(rc, rr, "bsr", 0.5)[0].item()
    assert train_losses(bsr_run)[0] == pytest.approx(expected_global, rel=1e-5)

    # micro scope on 2 ranks (the official code): each rank centres its own 4 pairs with lam x 4; mean over ranks
    out = tmp_path / "bsr_micro"
    train(out, tiny_llama, data, "--loss", "bsr", "--lam", "0.5", "--bsr-scope", "micro", "--epochs", "1",
          nproc=2, micro=4)
    per_rank = [preference_loss(rc[s], rr[s], "bsr", 0.5 * 4)[0].item() for s in (slice(0, 4), slice(4, 8))]
    assert train_losses(out)[0] == pytest.approx(sum(per_rank) / 2, rel=1e-5)
    assert abs(expected_global - sum(per_rank) / 2) > 1e-3  # the two scopes are different objectives


# ------------------------------------------------------------------------------------------ outputs and reload


def _hf_rewards(out, data):
    from transformers import AutoModelForSequenceClassification

    tok = utils.load_tokenizer(str(out))
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    pairs, _ = load_pairs(data["eval"], "train", tok, 128, False)
    with torch.no_grad():
        score = lambda ids: model(input_ids=torch.tensor([ids])).logits.item()  # noqa: E731 (batch size 1)
        return [score(c) for c, _ in pairs], [score(r) for _, r in pairs]


def test_checkpoint_reloads_with_hf_and_gives_the_trainers_rewards(bsr_run, data):
    saved = json.load(open(bsr_run / "eval_rewards.json"))
    chosen, rejected = _hf_rewards(bsr_run, data)
    assert chosen == pytest.approx(saved["rewards_chosen"], abs=1e-5)
    assert rejected == pytest.approx(saved["rewards_rejected"], abs=1e-5)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "train_config.json", "metrics.jsonl"):
        assert (bsr_run / f).exists(), f
    assert (bsr_run / "epoch-1" / "model.safetensors").exists()
    assert json.load(open(bsr_run / "train_config.json"))["args"]["loss"] == "bsr"


def test_metrics_have_every_key_and_the_schedule_is_warmup_then_linear_decay(bsr_run):
    rows = read_metrics(bsr_run)
    steps = [r for r in rows if "train/loss" in r]
    epochs = [r for r in rows if "epoch/wp_norm" in r]
    keys = {"train/loss", "train/loss_bt", "train/loss_reg", "train/accuracy", "train/reward_mean",
            "train/reward_std", "train/margin_mean", "train/lr", "train/pairs_per_s", "train/tokens_per_s",
            "train/padding_fraction", "train/peak_mem_gb"}
    assert all(keys <= set(r) for r in steps) and [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert 0 < r["train/padding_fraction"] < 1  # one padded forward per step over pairs of varied length
        assert r["train/loss_reg"] == pytest.approx(r["train/loss"] - r["train/loss_bt"], abs=1e-7)
        assert r["train/loss_reg"] >= 0  # lam * mean^2
    # 8 steps, warmup 0.25 -> 2 warmup steps: 0.5, 1.0, then (8 - s) / 6
    assert [r["train/lr"] for r in steps] == pytest.approx([1e-3 * x for x in (0.5, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6)])
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    for r in epochs:
        assert {"epoch/hidden_diff_norm_mean", "epoch/hidden_diff_norm_std", "epoch/hidden_diff_norm_skew",
                "eval/accuracy", "eval/loss_bt"} <= set(r)
    # ||h_w - h_l|| grows with training on this data (the paper's Figure 2 quantity)
    assert epochs[-1]["epoch/hidden_diff_norm_mean"] > epochs[0]["epoch/hidden_diff_norm_mean"]


def test_pad_equal_eos_model_trains_and_reloads(data, tmp_path):
    model = make_tiny_lm(str(tmp_path / "llama_eos"), "llama", pad="eos")
    out = tmp_path / "rm"
    train(out, model, data, "--loss", "bsr", "--epochs", "1")
    saved = json.load(open(out / "eval_rewards.json"))
    chosen, rejected = _hf_rewards(out, data)
    assert chosen == pytest.approx(saved["rewards_chosen"], abs=1e-5)
    assert rejected == pytest.approx(saved["rewards_rejected"], abs=1e-5)


# ------------------------------------------------------------------------------------------ crashes and resume


def test_kill_while_saving_keeps_the_previous_state_and_resume_matches(bsr_run, tiny_llama, data, tmp_path):
    out = tmp_path / "crash_in_save"  # ZeRO-3 here (one process defaults to stage 0): partitioned state resumes
    proc = train(out, tiny_llama, data, "--loss", "bsr", "--lam", "0.5", "--zero-stage", "3",
                 env={"BSR_FAULT": "in_resume_save@4"}, check=False)
    assert proc.returncode == -9  # SIGKILL while the step-4 state was being written
    assert (out / "resume" / "latest").read_text() == "step-00000002"
    assert (out / "resume" / "step-00000002" / "trainer_state.json").exists()
    assert not (out / "model.safetensors").exists()
    # a new run may not silently overwrite it
    refused = train(out, tiny_llama, data, "--loss", "bsr", "--lam", "0.5", check=False)
    assert refused.returncode != 0 and "pass --resume" in refused.stderr
    changed = train(out, tiny_llama, data, "--loss", "bsr", "--lam", "0.1", "--resume", check=False)
    assert changed.returncode != 0 and "--lam is 0.1 but the run" in changed.stderr

    train(out, tiny_llama, data, "--loss", "bsr", "--lam", "0.5", "--zero-stage", "3", "--resume")
    assert json.load(open(out / "train_config.json"))["ds_config"]["zero_optimization"]["stage"] == 3
    assert train_losses(out) == pytest.approx(train_losses(bsr_run), rel=1e-6, abs=1e-7)
    assert_same_weights(out, bsr_run, atol=2e-5)  # ZeRO-3 vs the stage-0 reference: summation order only


def test_kill_mid_epoch_then_resume_ends_with_the_same_weights(bsr_run, tiny_llama, data, tmp_path):
    out = tmp_path / "killed"
    proc = train(out, tiny_llama, data, "--loss", "bsr", "--lam", "0.5", env={"BSR_FAULT": "after_step@7"},
                 check=False)
    assert proc.returncode == -9
    assert (out / "resume" / "latest").read_text() == "step-00000006"
    assert len(train_losses(out)) == 7
    train(out, tiny_llama, data, "--loss", "bsr", "--lam", "0.5", "--resume")
    assert [r["step"] for r in read_metrics(out) if "train/loss" in r] == list(range(1, 9))  # step 7 redone once
    assert train_losses(out) == pytest.approx(train_losses(bsr_run), rel=1e-6, abs=1e-7)
    assert_same_weights(out, bsr_run, atol=1e-6)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tiny_llama, data, tmp_path):
    out = tmp_path / "nan"
    proc = train(out, tiny_llama, data, "--loss", "bsr", env={"BSR_FAULT": "nan@3"}, check=False)
    assert proc.returncode == 1
    assert "non-finite loss at step 3" in proc.stdout and "Traceback" not in proc.stderr
    assert (out / "resume" / "latest").read_text() == "step-00000002"
    # the advice is true: the named state exists, and a changed --lr needs a new --out (--resume refuses it)
    assert f"The last good state is {out}/resume/step-00000002" in proc.stdout and "another --out" in proc.stdout
    assert (out / "resume" / "step-00000002" / "trainer_state.json").exists()
    assert len(train_losses(out)) == 2  # the poisoned step was never applied or logged


def test_bad_input_file_is_a_message_naming_file_line_and_field(tiny_llama, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = open(data["train"]).read().splitlines()
    lines[2] = json.dumps({"prompt": "p", "chosen": "a", "rejected": None})
    bad.write_text("\n".join(lines) + "\n")
    proc = run_script(["train_rm.py", "--model", tiny_llama, "--train-file", str(bad), "--out", str(tmp_path / "o"),
                       "--global-batch-size", "8"], check=False)
    assert proc.returncode == 1
    assert f"data error: {bad}:3: field 'rejected' must be a string" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_split_picks_the_hub_datasets_held_out_split(tiny_llama, tmp_path, capsys):
    """A dataset folder (read as a hub dataset is) with train and test splits: --eval-split test scores the test pairs;
    the default reads the training split itself and says so; an unknown split is a one-line data error."""
    folder = tmp_path / "prefs"
    folder.mkdir()
    write_pairs(str(folder / "train.jsonl"), 16, seed=0)
    write_pairs(str(folder / "test.jsonl"), 5, seed=1)
    tok = utils.load_tokenizer(tiny_llama)
    base = ["--model", tiny_llama, "--train-file", str(folder), "--eval-file", str(folder), "--out", "o",
            "--global-batch-size", "8", "--max-length", "128"]
    pairs, eval_pairs, _, _ = load_data(parse_args(base + ["--eval-split", "test"]), tok)
    assert len(pairs) == 16 and len(eval_pairs) == 5
    assert "training data itself" not in capsys.readouterr().out
    _, eval_pairs, _, _ = load_data(parse_args(base), tok)
    assert eval_pairs == pairs
    assert "[data] --eval-file is the training data itself" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"data error: .*prefs\[valid\]: cannot load it as a dataset \(Unknown split"):
        load_data(parse_args(base + ["--eval-split", "valid"]), tok)
