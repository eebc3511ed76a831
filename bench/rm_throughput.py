"""Reward-model training throughput: train_rm.py vs TRL's RewardTrainer on the same work, side by side.

Same model (one saved checkpoint, head already initialised N(0, 1/(H+1)), loaded by both), same pairs, same
global batch, micro batch, max length, precision, optimizer (AdamW, lr, linear schedule with 5% warmup,
clipping 1.0, no weight decay) and number of steps; BT loss. Each trainer runs in its own process, alternating,
--repeats times. Timing is the steady-state wall time per optimizer step (step 1 excluded), data collation
included, evaluation excluded.

    pip install trl==1.16.0                       # for this benchmark only; never a dependency of the product
    python bench/rm_throughput.py                 # CPU: tiny Llama, AlpacaEval pairs (../shared) or synthetic
    python bench/rm_throughput.py --preset 1b     # GPU: ~1.1B Llama config, bf16, sdpa, MFU against a measured peak
    python bench/rm_throughput.py --ours-args "--max-tokens-per-forward 4096"   # try a train_rm.py option

Prints a markdown table (also written to --out/results.md with results.json).
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DEFAULT_ALPACA = os.path.join(REPO, "..", "shared", "data", "alpaca_eval")
PRESETS = {  # LlamaConfig sizes
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab=8192),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab=8192),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab=32000),  # the TinyLlama-1.1B shape
}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


# ---------------------------------------------------------------------------------------------------
# Work: pairs, tokenizer, model (made once, shared by both trainers)
# ---------------------------------------------------------------------------------------------------


def alpaca_pairs(root, n, seed):
    """(instruction, better output, worse output) from two random models' AlpacaEval answers (gold = preference)."""
    import glob

    by_prompt = {}
    for path in sorted(glob.glob(os.path.join(root, "results", "*", "weighted_alpaca_eval_gpt4_turbo", "annotations.json"))):
        for row in json.load(open(path)):
            if row.get("preference") is None or not isinstance(row.get("output_2"), str):
                continue
            by_prompt.setdefault(row["instruction"], []).append((float(row["preference"]), row["output_2"]))
    rng = random.Random(seed)
    prompts = sorted(by_prompt)
    pairs = []
    while len(pairs) < n:
        p = rng.choice(prompts)
        (s1, a), (s2, b) = rng.sample(by_prompt[p], 2)
        if s1 != s2 and a.strip() and b.strip() and a != b:
            pairs.append((p, a, b) if s1 > s2 else (p, b, a))
    return pairs


def synthetic_pairs(n, seed):
    """Lognormal response lengths (median ~170 words, long right tail), like real preference data."""
    rng = random.Random(seed)
    words = ("the model answer is a list of steps that explain how to write code for data and text with "
             "examples first second then finally because however result value number").split()

    def text(median):
        return " ".join(rng.choice(words) for _ in range(max(3, int(rng.lognormvariate(0, 0.7) * median))))
    return [(text(15), text(170), text(170)) for _ in range(n)]


def make_work(args, out):
    """Write pairs (JSONL for train_rm.py, the same rows for TRL), a BPE tokenizer and the model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForSequenceClassification, LlamaConfig, PreTrainedTokenizerFast

    import checkpoint
    import train_rm

    preset = dict(PRESETS[args.preset])
    n_train = args.steps * args.global_batch_size * 2  # skips (too long) must not starve the run
    use_alpaca = os.path.isdir(os.path.join(args.alpaca_eval_dir, "results"))
    pairs = (alpaca_pairs(args.alpaca_eval_dir, n_train + args.eval_pairs, args.seed) if use_alpaca
             else synthetic_pairs(n_train + args.eval_pairs, args.seed))
    for name, rows in (("train", pairs[: n_train]), ("eval", pairs[n_train:])):
        checkpoint.write_jsonl(os.path.join(out, f"{name}.jsonl"),
                               [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows])

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=preset.pop("vocab"), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((t for p in pairs[:4000] for t in p), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    model_dir = os.path.join(out, "model")
    fast.save_pretrained(model_dir)
    config = LlamaConfig(vocab_size=len(fast), max_position_embeddings=4096, pad_token_id=fast.pad_token_id,
                         eos_token_id=fast.eos_token_id, num_labels=1, tie_word_embeddings=False, **preset)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_config(config)
    train_rm.init_reward_head(model, args.seed)  # both trainers start from the paper's head
    model.save_pretrained(model_dir)
    return {"source": "alpaca_eval" if use_alpaca else "synthetic", "train_rows": n_train,
            "params": sum(p.numel() for p in model.parameters()),
            "non_embedding_params": sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)}


# ---------------------------------------------------------------------------------------------------
# The two trainers (each in its own process)
# ---------------------------------------------------------------------------------------------------


def run_process(cmd, env):
    """Run a command; returns (stdout+stderr, peak RSS in GB of that process tree's largest process)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-5000:]}")
    return output, usage.ru_maxrss / 2**20


def run_ours(args, work, out, env):
    run = os.path.join(out, f"ours_{time.time_ns()}")
    cmd = [sys.executable, "train_rm.py", "--model", os.path.join(work, "model"), "--train-file",
           os.path.join(work, "train.jsonl"), "--eval-file", os.path.join(work, "eval.jsonl"), "--out", run,
           "--loss", "bt", "--head-init", "keep", "--lr", str(args.lr), "--global-batch-size",
           str(args.global_batch_size), "--micro-batch-size", str(args.micro_batch_size), "--max-length",
           str(args.max_length), "--max-train-pairs", str(args.steps * args.global_batch_size), "--epochs", "1",
           "--save-steps", "0", "--norm-stats-pairs", "0", "--seed", str(args.seed),
           "--attn-implementation", args.attn] + (["--bf16"] if args.bf16 else ["--no-bf16"]) + args.ours_args.split()
    _, rss = run_process(cmd, env)
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    steps = [r for r in rows if "train/loss" in r]
    times = [args.global_batch_size / r["train/pairs_per_s"] for r in steps]
    tokens = [r["train/tokens_per_s"] * t for r, t in zip(steps, times)]
    return {"step_times": times, "step_tokens": tokens, "losses": [r["train/loss"] for r in steps],
            "padding_fraction": statistics.mean(r["train/padding_fraction"] for r in steps[1:]),
            "eval_accuracy": [r for r in rows if "eval/accuracy" in r][-1]["eval/accuracy"],
            "eval_loss": [r for r in rows if "eval/loss_bt" in r][-1]["eval/loss_bt"],
            "peak_mem_gb": max(r["train/peak_mem_gb"] for r in steps) if args.device == "cuda" else rss}


def trl_worker(args):
    """Runs inside its own process: TRL's RewardTrainer on the same work; prints one JSON line."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    try:
        from trl import RewardConfig, RewardTrainer
    except ImportError:
        raise SystemExit("TRL is not installed: pip install trl==1.16.0 (benchmark only)") from None
    work = args.work
    tok = AutoTokenizer.from_pretrained(os.path.join(work, "model"))

    def dataset(name, limit=None):
        rows = [json.loads(line) for line in open(os.path.join(work, f"{name}.jsonl"))][:limit]
        return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                   "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends, self.padded, self.real = [], [], []

        def on_step_end(self, a, state, control, **kw):
            self.ends.append(time.time())

    timer = Timer()
    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(work, "model"), dtype=torch.bfloat16
                                                               if args.bf16 else torch.float32,
                                                               attn_implementation=args.attn)
    accum = args.global_batch_size // args.micro_batch_size
    config = RewardConfig(
        output_dir=os.path.join(args.out, f"trl_{time.time_ns()}"), per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=args.micro_batch_size, gradient_accumulation_steps=accum,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0.05, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", max_steps=args.steps, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], max_length=args.max_length, bf16=args.bf16, seed=args.seed, disable_dropout=True,
        dataloader_drop_last=True, use_cpu=args.device == "cpu", center_rewards_coefficient=None)
    # TRL drops pairs longer than max_length, as train_rm.py skips them: both train on the same pairs
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset("train"), eval_dataset=dataset("eval"),
                            processing_class=tok, callbacks=[timer])
    pad_stats = {"real": 0, "padded": 0}
    collate = trainer.data_collator

    def counting_collator(examples):  # measures padding without changing the batch
        batch = collate(examples)
        pad_stats["real"] += int(batch["attention_mask"].sum())
        pad_stats["padded"] += batch["attention_mask"].numel()
        return batch

    trainer.data_collator = counting_collator
    trainer.train_dataset_collator = counting_collator
    start = time.time()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    ends = [start] + timer.ends
    evaluation = trainer.evaluate()
    tokens = [h["num_tokens"] for h in logs]
    print("TRL_RESULT " + json.dumps({
        "step_times": [b - a for a, b in zip(ends, ends[1:])], "losses": [h["loss"] for h in logs],
        "step_tokens": [b - a for a, b in zip([0] + tokens, tokens)],
        "padding_fraction": 1 - pad_stats["real"] / max(1, pad_stats["padded"]),
        "eval_accuracy": evaluation.get("eval_accuracy"), "eval_loss": evaluation.get("eval_loss"),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None}))


def run_trl(args, work, out, env):
    cmd = [sys.executable, os.path.abspath(__file__), "--trl-worker", "--work", work, "--out", out] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k in ("preset", "steps", "global_batch_size", "micro_batch_size", "max_length", "lr", "seed", "attn", "device")]
    cmd += ["--bf16"] if args.bf16 else []
    output, rss = run_process(cmd, env)
    result = json.loads(next(line for line in output.splitlines() if line.startswith("TRL_RESULT "))[len("TRL_RESULT "):])
    if result["peak_mem_gb"] is None:
        result["peak_mem_gb"] = rss
    return result


# ---------------------------------------------------------------------------------------------------
# Measure, compare, print
# ---------------------------------------------------------------------------------------------------


def measured_peak_tflops():
    """bf16 dense matmul throughput of this GPU (the MFU denominator), measured, not from a datasheet."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.time() - t) / 1e12


def summarize(result, args, params):
    times, tokens = result["step_times"][1:], result["step_tokens"][1:]  # step 1 carries one-off start-up work
    tail = result["losses"][-max(1, len(result["losses"]) // 4):]
    s = {"pairs_per_s": args.global_batch_size * len(times) / sum(times), "tokens_per_s": sum(tokens) / sum(times),
         "padding_fraction": result["padding_fraction"], "peak_mem_gb": result["peak_mem_gb"],
         "train_tail_loss": statistics.mean(tail), "eval_loss": result["eval_loss"],
         "eval_accuracy": result["eval_accuracy"]}
    if args.device == "cuda":
        s["tflops"] = 6 * params * s["tokens_per_s"] / 1e12
    return s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (LlamaConfig)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    p.add_argument("--global-batch-size", type=int, default=32, help="pairs per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=8, help="pairs per forward")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (longer pairs skipped by both)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--eval-pairs", type=int, default=128, help="held-out pairs for eval accuracy")
    p.add_argument("--repeats", type=int, default=3, help="runs per trainer (alternating)")
    p.add_argument("--seed", type=int, default=0, help="data, model and trainer seed")
    p.add_argument("--attn", default="sdpa", help="attention implementation for both")
    p.add_argument("--bf16", action="store_true", help="bf16 for both (default on with --device cuda)")
    p.add_argument("--alpaca-eval-dir", default=DEFAULT_ALPACA, help="AlpacaEval results/ folder for real pairs")
    p.add_argument("--ours-args", default="", help="extra train_rm.py flags, e.g. '--max-tokens-per-forward 4096'")
    p.add_argument("--threads", type=int, default=None, help="OMP threads per run (CPU)")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "bench_rm_throughput"), help="work folder")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        return trl_worker(args)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.bf16 = args.bf16 or args.device == "cuda"
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "work")
    info = make_work(args, work)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    peak = measured_peak_tflops() if args.device == "cuda" else None
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"[bench] {device_name}; preset {args.preset} ({info['params'] / 1e6:.1f}M params); {info['source']} "
          f"pairs; global {args.global_batch_size}, micro {args.micro_batch_size}, max length {args.max_length}, "
          f"{args.steps} steps, {'bf16' if args.bf16 else 'fp32'}, {args.attn}" +
          (f"; measured bf16 matmul peak {peak:.0f} TFLOP/s" if peak else ""), flush=True)
    results = {"ours": [], "trl": []}
    for r in range(args.repeats):
        for name, fn in (("ours", run_ours), ("trl", run_trl)):
            t = time.time()
            results[name].append(summarize(fn(args, work, args.out, env), args, info["params"]))
            print(f"[bench] repeat {r + 1}/{args.repeats} {name}: {results[name][-1]} ({time.time() - t:.0f} s)",
                  flush=True)

    def agg(name, key):
        vals = [x[key] for x in results[name] if x.get(key) is not None]
        return (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else (None, None)

    rows = [("pairs/s", "pairs_per_s", "{:.2f}"), ("tokens/s (real)", "tokens_per_s", "{:.0f}"),
            ("padding fraction", "padding_fraction", "{:.3f}"), ("peak memory (GB)", "peak_mem_gb", "{:.2f}"),
            ("final loss: BT loss on the same held-out pairs", "eval_loss", "{:.4f}"),
            ("eval accuracy (same held-out pairs)", "eval_accuracy", "{:.3f}"),
            ("train loss, last 25% of steps (each its own data order)", "train_tail_loss", "{:.4f}")]
    if args.device == "cuda":
        rows.append(("model TFLOP/s (6 x params x tokens)", "tflops", "{:.1f}"))
    lines = [f"{device_name}; {args.preset} Llama ({info['params'] / 1e6:.1f}M params), {info['source']} pairs, "
             f"global batch {args.global_batch_size}, micro {args.micro_batch_size}, max length {args.max_length}, "
             f"{args.steps} steps, {'bf16' if args.bf16 else 'fp32'}, {args.attn}, {args.repeats} repeats (mean ± std)"
             + (f"; MFU peak = measured bf16 matmul {peak:.0f} TFLOP/s" if peak else ""),
             f"train_rm.py extra flags: `{args.ours_args or '(none)'}`", "",
             "| metric | train_rm.py | TRL RewardTrainer | ratio |", "|---|---|---|---|"]
    for label, key, fmt in rows:
        (mo, so), (mt, st) = agg("ours", key), agg("trl", key)
        cell = lambda m, s: "n/a" if m is None else f"{fmt.format(m)} ± {fmt.format(s)}"  # noqa: E731
        ratio = f"{mo / mt:.2f}x" if mo is not None and mt else ""
        lines.append(f"| {label} | {cell(mo, so)} | {cell(mt, st)} | {ratio} |")
    if peak:
        m = agg("ours", "tflops")[0]
        lines.append(f"| MFU | {100 * m / peak:.1f}% | {100 * agg('trl', 'tflops')[0] / peak:.1f}% | |")
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "info": info, "peak_tflops": peak, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
