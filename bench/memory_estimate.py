"""Will it fit? ZeRO-3 memory for a reward model, from DeepSpeed's own estimator plus the activations.

    python bench/memory_estimate.py                                   # Llama-3.1-8B RM, 8 x 80 GB, batch 128, 2k
    python bench/memory_estimate.py --hidden 3584 --layers 28 --intermediate 18944 --kv-heads 4 --heads 28 \
        --vocab 152064 --name Qwen2.5-7B

Model states (fp32 master weights, Adam moments, bf16 weights and gradients, partitioned over all GPUs) come from
deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs (no GPU needed). Activations are estimated for
train_rm.py's forward: a sequence-classification model has no LM head, so no vocab-sized logits; with
--gradient-checkpointing the layer inputs are kept (tokens x H x 2 bytes per layer) plus one layer's recompute
(about (6H + 2 kv + 4I) bf16 values per token with sdpa/flash attention, which never stores the attention matrix).
Each GPU's micro-batch holds 2 x micro pairs of --seq-len tokens (chosen and rejected share the forward).
"""

import argparse


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="Llama-3.1-8B", help="label")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-gb", type=float, default=80.0)
    p.add_argument("--global-batch-size", type=int, default=128, help="pairs")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (worst case: every one this long)")
    args = p.parse_args()
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    H, I, L = args.hidden, args.intermediate, args.layers
    kv = H // args.heads * args.kv_heads
    per_layer = H * H + 2 * H * kv + H * H + 3 * H * I + 2 * H  # q, k, v, o, gate/up/down, two norms
    embed = args.vocab * H
    total = embed + L * per_layer + H + H  # + final norm + the score head (H x 1); no LM head
    world = args.gpus * args.nodes
    print(f"{args.name} reward model: {total / 1e9:.2f}B parameters (largest layer: embedding {embed / 1e6:.0f}M); "
          f"{world} GPUs x {args.gpu_gb:.0f} GB; global batch {args.global_batch_size} pairs of {args.seq_len} tokens\n")
    print("| placement | GPU GB / GPU (model states) | CPU GB / node |")
    print("|---|---|---|")
    for label, off, off_p in (("all on GPU", False, False), ("optimizer on CPU", True, False),
                              ("optimizer + params on CPU", True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, embed, args.gpus, args.nodes, cpu_offload=off,
                                                            cpu_offload_params=off_p, zero_init=True)
        print(f"| {label} | {gpu / 2**30:.1f} | {cpu / 2**30:.1f} |")
    states = estimate_zero3_model_states_mem_needs(total, embed, args.gpus, args.nodes, cpu_offload=False,
                                                   cpu_offload_params=False, zero_init=True)[1] / 2**30
    print(f"\nActivations per GPU (bf16, sdpa/flash, gradient checkpointing on / off), with model states all on GPU "
          f"({states:.1f} GB):\n")
    print("| micro pairs / GPU | accumulation | tokens / GPU / forward | activations GB (ckpt) | total GB (ckpt) | "
          "activations GB (no ckpt) | fits (ckpt) |")
    print("|---|---|---|---|---|---|---|")
    per_token_layer = (6 * H + 2 * kv + 4 * I) * 2  # bytes kept by one layer for its backward
    for micro in (1, 2, 4, 8, 16):
        if args.global_batch_size % (micro * world):
            continue
        tokens = 2 * micro * args.seq_len
        ckpt = (tokens * H * 2 * L + tokens * per_token_layer) / 2**30
        full = tokens * per_token_layer * L / 2**30
        total_gb = states + ckpt
        print(f"| {micro} | {args.global_batch_size // (micro * world)} | {tokens} | {ckpt:.1f} | {total_gb:.1f} | "
              f"{full:.1f} | {'yes' if total_gb < 0.9 * args.gpu_gb else 'no'} |")


if __name__ == "__main__":
    main()
