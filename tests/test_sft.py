"""sft.py: assistant-only token mask, the masked loss, an end-to-end run (checkpoint, metrics, config), bad input."""

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer, random_text, read_metrics, run_script

import sft
import utils

CONV = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "the cat sat"},
        {"role": "assistant", "content": "yes the dog"},
        {"role": "user", "content": "sort list"},
        {"role": "assistant", "content": "no"}]


def expected_by_pieces(tok, pieces):
    """Tokenize (text, trained) pieces one by one: special tokens split pre-tokenization, so this equals
    tokenizing the whole rendered conversation, with the trained flags placed by hand."""
    ids, mask = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def test_assistant_mask_on_hand_made_conversation(tmp_path):
    tok = make_tokenizer(str(tmp_path))  # template: <|role|>content<eos> per message
    ids, mask = sft.tokenize_conversation(tok, CONV)
    pieces = [("<|system|>", 0), ("be brief", 0), ("<eos>", 0), ("<|user|>", 0), ("the cat sat", 0), ("<eos>", 0),
              ("<|assistant|>", 0), ("yes the dog", 1), ("<eos>", 1), ("<|user|>", 0), ("sort list", 0), ("<eos>", 0),
              ("<|assistant|>", 0), ("no", 1), ("<eos>", 1)]
    exp_ids, exp_mask = expected_by_pieces(tok, pieces)
    assert ids == exp_ids
    assert mask == exp_mask
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "yes the dog<eos>no<eos>"
    assert utils.turn_end_ids(tok) == [tok.eos_token_id]


def test_a_special_token_spelled_in_a_message_is_trained_as_text(tmp_path):
    """A reply that writes "<eos>" is text the policy learns to write, not an end of turn inside the turn."""
    tok = make_tokenizer(str(tmp_path))
    conv = [{"role": "user", "content": "say <|assistant|>"}, {"role": "assistant", "content": "yes <eos> no"}]
    ids, mask = sft.tokenize_conversation(tok, conv)
    exp_ids, exp_mask = [], []  # HF splits the text at what it takes for special tokens; the spelled ones: as text
    for text, trained, spelled in [("<|user|>", 0, 0), ("say ", 0, 0), ("<|assistant|>", 0, 1), ("<eos>", 0, 0),
                                   ("<|assistant|>", 0, 0), ("yes ", 1, 0), ("<eos>", 1, 1), (" no", 1, 0),
                                   ("<eos>", 1, 0)]:
        piece = tok(text, add_special_tokens=False, split_special_tokens=bool(spelled))["input_ids"]
        exp_ids += piece
        exp_mask += [trained] * len(piece)
    assert ids == exp_ids and mask == exp_mask
    assert ids.count(tok.eos_token_id) == 2 and ids.count(tok.convert_tokens_to_ids("<|assistant|>")) == 1


def test_assistant_mask_template_without_end_token_appends_eos(tmp_path):
    tok = make_tokenizer(str(tmp_path))
    tok.chat_template = utils.DEFAULT_CHAT_TEMPLATE  # "<|role|>\ncontent\n": nothing special ends a turn
    assert utils.turn_end_ids(tok) == []
    ids, mask = sft.tokenize_conversation(tok, CONV[1:3], append_eos=True)
    pieces = [("<|user|>", 0), ("\nthe cat sat\n", 0), ("<|assistant|>", 0), ("\n", 0), ("yes the dog\n", 1)]
    exp_ids, exp_mask = expected_by_pieces(tok, pieces)
    assert ids == exp_ids + [tok.eos_token_id]
    assert mask == exp_mask + [1]


def test_loss_trains_exactly_the_assistant_tokens(tiny_llama):
    from transformers import AutoModelForCausalLM

    tok = utils.load_tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids, mask = sft.tokenize_conversation(tok, CONV)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    logits = logits.clone().requires_grad_(True)
    total, n = sft.sft_loss_sum(logits, input_ids, torch.tensor([mask]))
    # hand computation: -log p(token_t | <t) summed over the assistant positions only
    manual = sum(-torch.log_softmax(logits[0, t - 1].detach(), -1)[ids[t]].item() for t in range(1, len(ids)) if mask[t])
    assert n.item() == sum(mask[1:]) == len(tok("yes the dog<eos>no<eos>", add_special_tokens=False)["input_ids"])
    assert total.item() == pytest.approx(manual, rel=1e-5)
    total.backward()
    for t in range(1, len(ids)):  # the logits predicting a non-assistant token get no gradient at all
        grad_norm = logits.grad[0, t - 1].abs().sum().item()
        assert (grad_norm > 0) == bool(mask[t]), f"position {t} ({tok.decode([ids[t]])!r}) mask {mask[t]}"


def write_sft_data(path, n, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            p = random_text(rng)
            f.write(json.dumps({"messages": [{"role": "user", "content": p},
                                             {"role": "assistant", "content": "yes " + p}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_run(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    data = write_sft_data(str(d / "sft.jsonl"), 48)
    with open(data, "a") as f:  # one row with no assistant turn: a counted skip
        f.write(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = str(d / "out")
    proc = run_script(["sft.py", "--model", tiny_llama, "--train-file", data, "--eval-file", data, "--out", out,
                       "--global-batch-size", "16", "--micro-batch-size", "4", "--lr", "3e-3", "--epochs", "2",
                       "--save-steps", "0"])
    return tiny_llama, data, out, proc


def test_sft_run_outputs_a_checkpoint_the_next_stages_load(sft_run):
    from transformers import AutoModelForCausalLM, GenerationConfig

    base, data, out, proc = sft_run
    assert "skipped 1 rows (no non-empty assistant turn)" in proc.stdout
    assert "[data] --eval-file is the training data itself" in proc.stdout  # --eval-file = --train-file, said
    # 48 usable rows, global batch 16: none past the last full batch, and said so (a remainder: next test)
    assert "0 conversations/epoch past the last full global batch" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    base_model = AutoModelForCausalLM.from_pretrained(base)
    moved = sum((p - q).abs().sum().item() for p, q in zip(model.parameters(), base_model.parameters()))
    assert moved > 0
    tok = utils.load_tokenizer(out)
    assert tok.chat_template == utils.load_tokenizer(base).chat_template
    assert tok.eos_token_id in GenerationConfig.from_pretrained(out).eos_token_id
    rm = utils.load_reward_model(out, tok)  # train_rm.py starts from it
    assert utils.reward_head(rm).in_features == model.config.hidden_size
    cfg = json.load(open(os.path.join(out, "sft_config.json")))
    assert cfg["train_conversations"] == 48 and cfg["total_steps"] == 6 and cfg["grad_accum"] == 4
    rows = read_metrics(out)
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert [r["epoch"] for r in evals] == [1, 2] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert os.path.isdir(os.path.join(out, "epoch-1")) and os.path.isdir(os.path.join(out, "epoch-2"))


def test_conversations_past_the_last_full_batch_are_said_and_recorded(tmp_path, tiny_llama):
    """10 conversations in global batches of 4, one epoch: 2 steps, and the 2 left over are never trained: said on
    the console and kept in sft_config.json, not dropped in silence."""
    data = write_sft_data(str(tmp_path / "sft.jsonl"), 10)
    out = str(tmp_path / "out")
    proc = run_script(["sft.py", "--model", tiny_llama, "--train-file", data, "--out", out, "--global-batch-size", "4",
                       "--micro-batch-size", "4", "--epochs", "1", "--save-steps", "0"])
    assert "2 conversations/epoch past the last full global batch wait for the next shuffle (unused: one epoch)" in (
        proc.stdout)
    config = json.load(open(os.path.join(out, "sft_config.json")))
    assert (config["total_steps"], config["conversations_past_last_batch_per_epoch"]) == (2, 2)


def test_logged_loss_is_the_token_mean_over_the_global_batch(sft_run):
    """Step 1's logged loss (4 micro-steps of 4) = sum of token losses / assistant tokens of all 16 rows."""
    from transformers import AutoModelForCausalLM

    base, data, out, _ = sft_run
    tok = utils.load_tokenizer(base)
    convs, _ = sft.load_conversations(data, "train", tok, 2048, False, False)
    batch = sft.epoch_batches(len(convs), 16, 0, 42, [len(c[0]) for c in convs])[0]
    model = AutoModelForCausalLM.from_pretrained(base)
    total = n = 0.0
    with torch.no_grad():
        for i in batch:  # one conversation at a time: no padding, no batching
            ids = torch.tensor([convs[i][0]])
            logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            for t in range(1, ids.shape[1]):
                if convs[i][1][t]:
                    total -= logp[t - 1, ids[0, t]].item()
                    n += 1
    assert read_metrics(out)[0]["train/loss"] == pytest.approx(total / n, rel=1e-4)
    assert read_metrics(out)[0]["train/tokens"] == n


def test_bad_rows_name_file_line_and_field(tmp_path, tiny_llama):
    tok = utils.load_tokenizer(tiny_llama)
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    cases = [({"text": "x"}, "missing field 'messages'"),
             ({"messages": "hello"}, "field 'messages' must be a list"),
             ({"messages": [{"role": "user"}]}, "field 'messages'[0]"),
             ({"messages": [{"role": "robot", "content": "x"}]}, "'messages'[0].role")]
    for row, message in cases:
        bad.write_text(good + "\n" + json.dumps(row) + "\n")
        with pytest.raises(utils.DataError, match=rf"{bad}:2: .*{message}".replace("[", r"\[").replace("]", r"\]")):
            sft.load_conversations(str(bad), "train", tok, 2048, False, False)


def test_rows_the_assistant_mask_cannot_handle_are_skipped_or_named(tmp_path, tiny_llama):
    """A conversation opening with an assistant turn has no rendered prefix to locate that turn after (its template
    header would be trained): a counted skip. A row the chat template refuses to render is file:line, not a
    traceback from jinja2."""
    tok = utils.load_tokenizer(tiny_llama)
    rows = tmp_path / "rows.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    opens = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    rows.write_text("\n".join(json.dumps(r) for r in (good, opens, good)) + "\n")
    convs, skipped = sft.load_conversations(str(rows), "train", tok, 2048, False, False)
    assert len(convs) == 2 and skipped == {"an assistant turn before any user turn": 1}
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
                         "{{ raise_exception('system only first') }}{% endif %}{{ m['content'] }}{% endfor %}")
    late_system = {"messages": good["messages"] + [{"role": "system", "content": "s"}]}
    rows.write_text(json.dumps(good) + "\n" + json.dumps(late_system) + "\n")
    with pytest.raises(utils.DataError, match=rf"{rows}:2: field 'messages': the chat template cannot render this "
                                              r"conversation \(.*system only first\)"):
        sft.load_conversations(str(rows), "train", tok, 2048, False, False)


def test_killed_sft_run_resumes_to_the_same_end(sft_run, tmp_path):
    from safetensors.torch import load_file

    base, data, out, _ = sft_run
    args = ["sft.py", "--model", base, "--train-file", data, "--eval-file", data, "--out", str(tmp_path / "o"),
            "--global-batch-size", "16", "--micro-batch-size", "4", "--lr", "3e-3", "--epochs", "2", "--save-steps", "0"]
    killed = run_script(args, env={"BSR_FAULT": "after_step@5"}, check=False)
    assert killed.returncode == -9  # killed in step 5; the last state is the end of epoch 1 (step 3)
    assert "[resume] at step 3/6" in run_script(args + ["--resume"]).stdout
    full, resumed = read_metrics(out), read_metrics(str(tmp_path / "o"))
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed):
        for key in ("train/loss", "train/lr", "train/tokens", "eval/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
    wa, wb = load_file(os.path.join(out, "model.safetensors")), load_file(str(tmp_path / "o" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_two_process_sft_equals_one_process(sft_run, tmp_path):
    """`deepspeed --num_gpus 2 sft.py` (ZeRO-3, gloo): same per-step losses and weights as the 1-process run."""
    from safetensors.torch import load_file

    base, data, out, _ = sft_run
    two = str(tmp_path / "two")
    run_script(["sft.py", "--model", base, "--train-file", data, "--eval-file", data, "--out", two,
                "--global-batch-size", "16", "--micro-batch-size", "2", "--lr", "3e-3", "--epochs", "2",
                "--save-steps", "0"], nproc=2, launcher="deepspeed")
    one_rows = [r for r in read_metrics(out) if "train/loss" in r]
    two_rows = [r for r in read_metrics(two) if "train/loss" in r]
    assert [r["train/loss"] for r in two_rows] == pytest.approx([r["train/loss"] for r in one_rows], rel=1e-5)
    assert [r["train/tokens"] for r in two_rows] == [r["train/tokens"] for r in one_rows]
    wa, wb = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(two, "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=2e-5, msg=lambda m: f"{k}: {m}")


def test_nan_loss_stops_with_a_message_and_keeps_the_last_state(sft_run, tmp_path):
    base, data, _, _ = sft_run
    out = str(tmp_path / "nan")
    proc = run_script(["sft.py", "--model", base, "--train-file", data, "--out", out, "--global-batch-size", "16",
                       "--micro-batch-size", "16", "--lr", "3e-3", "--save-steps", "2"], env={"BSR_FAULT": "nan@3"},
                      check=False)
    assert proc.returncode == 1 and "non-finite loss at step 3" in proc.stdout and "Traceback" not in proc.stderr
    assert open(os.path.join(out, "resume", "latest")).read() == "step-00000002"
    assert [r["step"] for r in read_metrics(out) if "train/loss" in r] == [1, 2]
