"""Train a reward model with Bradley-Terry, BT + BSR, or a baseline loss, under DeepSpeed ZeRO-3.

Hong et al., "On the Robustness of Reward Models for Language Model Alignment" (ICML 2025), Sec. 4.

    # one process, CPU or one GPU (gloo on CPU)
    python train_rm.py --model runs/toy/sft --train-file runs/toy/data/train.jsonl \
        --eval-file runs/toy/data/valid_id.jsonl --out runs/toy/rm/bsr/seed1 --loss bsr --lam 1e-3 --seed 1
    # one node, 8 GPUs (the paper: global batch 128, lr 5e-6 for 1-1.5B, 3e-6 for 3B, 2e-6 for 7-8B)
    deepspeed --num_gpus 8 train_rm.py --model Qwen/Qwen2.5-1.5B --train-file data/train.jsonl \
        --out runs/rm_bsr --loss bsr --lam 1e-3 --lr 5e-6 --micro-batch-size 16 --gradient-checkpointing
    # several nodes (shared filesystem for --out)
    deepspeed --hostfile hostfile train_rm.py ...
    # continue after a crash or kill
    python train_rm.py ...same flags... --resume

--resume refuses any flag that differs from the run's (and a --train-file / --eval-file whose content changed)
except these, which change no trained weight: --save-steps, --eval-batch-size, --norm-stats-pairs,
--max-tokens-per-forward, --gradient-checkpointing, --zero-stage / --ds-config (the filled DeepSpeed config must
be the same). --out must be a new folder or one train_rm.py wrote (never the --model or data folder).

--out receives: the final HF checkpoint (AutoModelForSequenceClassification.from_pretrained(out) loads it),
train_config.json, metrics.jsonl (per step and per epoch), epoch-N/ (a checkpoint per epoch) and resume/
(DeepSpeed state for --resume).
"""

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import utils

# ===================================================================================================
# ALGORITHM CORE: the loss (torch only; paste it anywhere)
# ===================================================================================================


def preference_loss(rewards_chosen, rewards_rejected, loss_type="bsr", lam=1e-3, margin=1.0):
    """Reward-model loss on a batch B of pairs; returns (loss, bt_loss). Means run over B.

    bt     -log s(r_w - r_l)                                   eq. 3/18
    bsr    bt + lam * ((1/2|B|) sum_i (r_w,i + r_l,i))^2        eq. 24-25 (sum-to-zero over the WHOLE batch)
    hinge  max(0, m - (r_w - r_l))                             eq. 30
    norm   -log s((r_w - r_l) / sqrt(r_w^2 + r_l^2))           eq. 29
    dr     bt - log s(r_w) - log s(-r_l)                       eq. 31
    center bt + lam * mean((r_w + r_l)^2)   TRL's center_rewards_coefficient: zero-centres each pair
    Exact gradient of the BSR term on h(x_i, y_ij) = (mean reward of B / |B|) * Wp (eq. 28 prints
    r(x_i, y_ij) in place of the batch mean). bt_loss is plain BT on the same rewards, for logging.
    """
    rc, rr = rewards_chosen.float(), rewards_rejected.float()
    bt = -F.logsigmoid(rc - rr).mean()
    if loss_type == "bt":
        loss = bt
    elif loss_type == "bsr":
        loss = bt + lam * torch.cat([rc, rr]).mean().square()
    elif loss_type == "center":
        loss = bt + lam * (rc + rr).square().mean()
    elif loss_type == "dr":
        loss = bt - (F.logsigmoid(rc) + F.logsigmoid(-rr)).mean()
    elif loss_type == "hinge":
        loss = torch.relu(margin - (rc - rr)).mean()
    elif loss_type == "norm":  # the tiny epsilon keeps the gradient finite when both rewards are 0
        loss = -F.logsigmoid((rc - rr) / (rc.square() + rr.square() + 1e-12).sqrt()).mean()
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return loss, bt


LOSSES = ("bt", "bsr", "hinge", "norm", "dr", "center")
# --resume accepts new values of these (besides utils.RESUME_MAY_CHANGE: --save-steps, --zero-stage, --ds-config,
# --gradient-checkpointing, --out): they change what is logged or how it is computed, never a trained weight
RESUME_MAY_CHANGE = ("eval_batch_size", "norm_stats_pairs", "max_tokens_per_forward")

# ===================================================================================================
# Arguments
# ===================================================================================================


def parse_args(argv=None):
    from utils import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="hub id or local path of a causal LM / encoder checkpoint")
    p.add_argument("--train-file", required=True,
                   help="JSONL with prompt/chosen/rejected (strings or chat message lists), or a hub dataset id "
                        "with chosen/rejected message lists (Skywork-Reward-Preference-80K-v0.2 format)")
    p.add_argument("--train-split", default="train", help="split, when --train-file is a hub dataset")
    p.add_argument("--eval-file", default=None, help="pairs in the same format; pair accuracy each epoch")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--loss", choices=LOSSES, default="bsr", help="loss (see preference_loss)")
    p.add_argument("--lam", type=utils.nonneg_float, default=1e-3, help="BSR / center weight lambda")
    p.add_argument("--margin", type=utils.finite_float, default=1.0, help="hinge margin m")
    p.add_argument("--bsr-scope", choices=("global", "micro"), default="global",
                   help="global: |B| = the whole global batch (all ranks, all accumulation steps; exact "
                        "eq. 25). micro: the official code's form, per device: lam * micro_batch * mean^2")
    p.add_argument("--lr", type=utils.positive_float, default=5e-6,
                   help="peak lr (paper: 5e-6 1-1.5B, 3e-6 3B, 2e-6 7-8B)")
    p.add_argument("--warmup-ratio", type=utils.fraction, default=0.05, help="linear warmup share, then linear decay")
    p.add_argument("--weight-decay", type=utils.nonneg_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=utils.nonneg_float, default=1.0, help="gradient clipping (0 = off)")
    p.add_argument("--epochs", type=utils.positive_int, default=1, help="passes over the train set")
    p.add_argument("--global-batch-size", type=utils.positive_int, default=128,
                   help="pairs per optimizer step, all ranks")
    p.add_argument("--micro-batch-size", type=utils.positive_int, default=8, help="pairs per device per forward")
    p.add_argument("--eval-batch-size", type=utils.positive_int, default=32,
                   help="sequences per device per eval forward")
    p.add_argument("--max-length", type=utils.positive_int, default=2048, help="tokens per (prompt, response) sequence")
    p.add_argument("--truncate", action="store_true",
                   help="truncate over-long pairs (keeps the end of the response) instead of skipping them")
    p.add_argument("--max-train-pairs", type=utils.positive_int, default=None, help="use only the first N valid pairs")
    p.add_argument("--seed", type=int, default=42, help="seed for head init and data order")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights/activations (default: on with a GPU, off (fp32) on CPU)")
    p.add_argument("--max-tokens-per-forward", type=utils.nonneg_int, default=None,
                   help="split a micro-batch's length-sorted sequences into forwards of at most this many "
                        "(padded) tokens; rewards are joined before the loss, so the result is unchanged, only less "
                        "padding. Default: 2048 on CPU, --micro-batch-size x --max-length on GPU (see "
                        "default_tokens_per_forward); 0 = one forward per micro-batch")
    p.add_argument("--padding-free", action="store_true",
                   help="pack each forward's sequences into one row (decoders; pays off with flash_attention_2)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--attn-implementation", default="sdpa", help="sdpa | eager | flash_attention_2")
    p.add_argument("--head-init", choices=("paper", "keep"), default="paper",
                   help="paper: re-initialise Wp ~ N(0, 1/(H+1)); keep: continue from --model's head")
    p.add_argument("--save-steps", type=utils.nonneg_int, default=100,
                   help="resume checkpoint every N steps (0 = epochs only)")
    p.add_argument("--norm-stats-pairs", type=utils.nonneg_int, default=2048,
                   help="train pairs sampled for the per-epoch ||h_w - h_l|| statistics (0 = off)")
    p.add_argument("--resume", action="store_true", help="continue from --out/resume/latest")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help="DeepSpeed ZeRO stage (default: the --ds-config file's; its \"auto\" = 3 with several "
                        "processes, 0 with one)")
    p.add_argument("--local_rank", type=int, default=None,
                   help="set by the deepspeed launcher (the LOCAL_RANK environment variable is what is used)")
    p.add_argument("--ds-config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_config.json"),
                   help="DeepSpeed JSON config; its \"auto\" values are filled from these flags")
    return p.parse_args(argv)


# ===================================================================================================
# Data: pairs -> token ids, with counted skips
# ===================================================================================================


def load_pairs(source, split, tokenizer, max_length, truncate, max_pairs=None):
    """Tokenized pairs [(chosen_ids, rejected_ids)] and a {reason: count} of skipped rows."""
    from utils import encode_prompt_response, iter_rows, parse_pair

    pairs, skipped = [], {}
    for where, row in iter_rows(source, split):
        parsed = parse_pair(row, where)
        if parsed[0] == "skip":
            skipped[parsed[1]] = skipped.get(parsed[1], 0) + 1
            continue
        prompt, chosen, rejected = parsed
        ids_c = encode_prompt_response(tokenizer, prompt, chosen, max_length, truncate)
        ids_r = encode_prompt_response(tokenizer, prompt, rejected, max_length, truncate)
        if ids_c is None or ids_r is None:
            skipped[f"longer than --max-length {max_length}"] = skipped.get(f"longer than --max-length {max_length}", 0) + 1
            continue
        if ids_c == ids_r:
            skipped["chosen == rejected after tokenization"] = skipped.get("chosen == rejected after tokenization", 0) + 1
            continue
        pairs.append((ids_c, ids_r))
        if max_pairs and len(pairs) >= max_pairs:
            break
    return pairs, skipped


def forward_chunks(lengths, max_tokens, padding_free, n_chunks=None):
    """Split sequence positions (longest first) into forwards of at most max_tokens tokens each.

    Greedy over the length-sorted sequences; a sequence is never split. Cost is padded width x count, or real
    tokens when padding_free. n_chunks forces the count (ranks must agree): the costliest chunk is halved until
    there are that many. Returns lists of positions into `lengths`.
    """
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    cost = (lambda c: sum(lengths[j] for j in c)) if padding_free else (lambda c: lengths[c[0]] * len(c))
    chunks = [[]]
    for j in order:
        if max_tokens and chunks[-1] and cost(chunks[-1] + [j]) > max_tokens:
            chunks.append([])
        chunks[-1].append(j)
    while n_chunks and len(chunks) < n_chunks:
        k = max((k for k in range(len(chunks)) if len(chunks[k]) > 1), key=lambda k: cost(chunks[k]))
        half = len(chunks[k]) // 2
        chunks[k: k + 1] = [chunks[k][:half], chunks[k][half:]]
    return chunks


def default_tokens_per_forward(device_type, micro_batch_size, max_length):
    """--max-tokens-per-forward when not given. Splitting never changes a number of the training (the rewards are
    joined before the loss), so it is on by default; 0 turns it off.

    CPU: 2048, the fastest budget measured (bench/RESULTS.md: 1.47x the pairs/s of one forward per micro-batch;
    1024 and 4096 were slower). GPU: half of a full micro-batch (2 x micro x max-length tokens, which the user sized
    to fit memory): only a micro-batch whose longest sequences pass half of --max-length is split, so forwards stay
    large enough to keep the GPU busy while the short half stops padding to the long one's width.
    """
    return 2048 if device_type == "cpu" else micro_batch_size * max_length


def peak_memory_gb(device):
    """Peak accelerator memory allocated by torch on this rank, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def epoch_batches(n_pairs, global_batch, epoch, seed, pair_len):
    """The epoch's global batches: a seeded shuffle (paper: random batches), each batch sorted by length.

    Sorting inside a batch only changes which device/micro-step gets which pairs (less padding); the set
    of pairs in B, and so the loss, is unchanged. Pairs beyond the last full batch wait for the next epoch.
    """
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n_pairs, generator=gen).tolist()
    batches = [perm[i: i + global_batch] for i in range(0, n_pairs - global_batch + 1, global_batch)]
    return [sorted(b, key=lambda i: -pair_len[i]) for b in batches]


# ===================================================================================================
# Main
# ===================================================================================================


def main(argv=None):
    args = parse_args(argv)
    import utils

    utils.quiet_libraries()  # before deepspeed is imported: it logs on import
    utils.check_model_source(args.model, "--model")
    import deepspeed
    import scipy.stats
    from transformers.integrations import HfDeepSpeedConfig

    from utils import DataError, print0

    resume_dir = os.path.join(args.out, "resume")
    utils.claim_out_dir(args.out, "train_rm.py", [("--model", args.model), ("--train-file", args.train_file),
                                                  ("--eval-file", args.eval_file)],
                        legacy=("train_config.json", ("args", "ds_config")), create=False,
                        resume=bool(args.resume))
    if args.head_init == "keep":  # continuing from --model's head: it must be a trained one
        utils.check_reward_model(args.model, "--model (with --head-init keep)")
    rank, world, _, device = utils.init_distributed()
    utils.claim_out_dir(args.out, "train_rm.py", legacy=("train_config.json", ("args", "ds_config")))
    utils.remove_leftovers(args.out)
    torch.manual_seed(args.seed)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    per_step_pairs = args.micro_batch_size * world
    if args.global_batch_size % per_step_pairs:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                         f"--micro-batch-size x world size = {args.micro_batch_size} x {world}")
    grad_accum = args.global_batch_size // per_step_pairs
    if args.max_tokens_per_forward is None:  # resolved here, so train_config.json records the value used
        args.max_tokens_per_forward = default_tokens_per_forward(device.type, args.micro_batch_size, args.max_length)

    # ---------------------------------------------------------------- data
    tokenizer = utils.load_tokenizer(args.model)
    try:
        pairs, skipped = load_pairs(args.train_file, args.train_split, tokenizer, args.max_length,
                                    args.truncate, args.max_train_pairs)
        eval_pairs, eval_skipped = (load_pairs(args.eval_file, "train", tokenizer, args.max_length, args.truncate)
                                    if args.eval_file else ([], {}))
    except DataError as e:
        raise SystemExit(f"data error: {e}") from None
    for name, sk in (("train", skipped), ("eval", eval_skipped)):
        for reason, count in sk.items():
            print0(f"[data] {name}: skipped {count} rows ({reason})")
    if len(pairs) < args.global_batch_size:
        raise SystemExit(f"{args.train_file}: {len(pairs)} usable pairs, fewer than one global batch "
                         f"({args.global_batch_size})")
    pair_len = [max(len(c), len(r)) for c, r in pairs]
    steps_per_epoch = len(pairs) // args.global_batch_size
    total_steps = steps_per_epoch * args.epochs
    print0(f"[data] {len(pairs)} train pairs, {len(eval_pairs)} eval pairs; {steps_per_epoch} steps/epoch x "
           f"{args.epochs} epochs; {len(pairs) % args.global_batch_size} pairs/epoch wait for the next shuffle")
    print0(f"[batch] global {args.global_batch_size} = micro {args.micro_batch_size} x world {world} x "
           f"accumulation {grad_accum}; BSR batch |B| = "
           + (f"{args.global_batch_size} (global)" if args.bsr_scope == "global" else f"{args.micro_batch_size} per device (micro)")
           + (f"; forwards of at most {args.max_tokens_per_forward} tokens (--max-tokens-per-forward, 0 = off)"
              if args.max_tokens_per_forward else ""))

    # ---------------------------------------------------------------- model (partitioned while loading)
    from transformers import AutoConfig

    hidden_size = AutoConfig.from_pretrained(args.model).get_text_config().hidden_size
    ds_config, zero3 = utils.training_ds_config(
        args.ds_config, global_batch=args.global_batch_size, micro_batch=args.micro_batch_size,
        grad_accum=grad_accum, max_grad_norm=args.max_grad_norm, bf16=bf16, hidden_size=hidden_size,
        zero_stage=args.zero_stage, world_size=world)
    data_fingerprints = {"train_file": utils.fingerprint(args.train_file),
                         "eval_file": utils.fingerprint(args.eval_file)}
    saved_config = None
    if args.resume:  # before the model loads: a refused resume costs seconds
        saved_config = utils.check_resume(os.path.join(args.out, "train_config.json"), args, world, ds_config,
                                          RESUME_MAY_CHANGE, data_fingerprints)
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841 (must stay alive)
    hf_model = utils.load_reward_model(args.model, tokenizer, torch.bfloat16 if bf16 else torch.float32,
                                       args.attn_implementation)
    if args.head_init == "paper":
        utils.init_reward_head(hf_model, args.seed)
    if args.gradient_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = utils.RewardModel(hf_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    warmup = math.ceil(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup
                                                  else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    def forward(input_ids, attention_mask):
        return engine(input_ids, attention_mask)

    # ---------------------------------------------------------------- resume / fresh start
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    start_step = 0
    if args.resume:  # the run's train_config.json stays as it was written at its start
        start_step = utils.load_train_state(engine, resume_dir, metrics_path)
        run_config = saved_config
        print0(f"[resume] from {resume_dir} at step {start_step}/{total_steps}")
    else:
        if utils.is_rank0() and os.path.exists(metrics_path):
            os.remove(metrics_path)
        run_config = {"args": vars(args), "world_size": world, "grad_accum": grad_accum, "bf16": bf16,
                      "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "train_pairs": len(pairs),
                      "eval_pairs": len(eval_pairs), "skipped": {"train": skipped, "eval": eval_skipped},
                      "data_fingerprints": data_fingerprints, "ds_config": ds_config}
        if utils.is_rank0():
            utils.write_json(os.path.join(args.out, "train_config.json"), run_config)

    def log(row):
        if utils.is_rank0():
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    # ---------------------------------------------------------------- epoch diagnostics (Figures 1-2)
    stats_gen = torch.Generator().manual_seed(args.seed)
    stats_idx = torch.randperm(len(pairs), generator=stats_gen)[: args.norm_stats_pairs].tolist()

    eval_rewards = {}

    def epoch_diagnostics(epoch):
        engine.eval()
        row = {"step": epoch * steps_per_epoch, "epoch": epoch, "epoch/wp_norm": utils.head_weight_norm(hf_model)}
        if stats_idx:
            seqs = [pairs[i][0] for i in stats_idx] + [pairs[i][1] for i in stats_idx]
            _, hidden = utils.score_sequences(forward, seqs, tokenizer.pad_token_id, device, args.eval_batch_size,
                                              desc=f"norm stats e{epoch}")
            n = len(stats_idx)
            diff = (hidden[:n] - hidden[n:]).norm(dim=1).numpy()
            norms = hidden.norm(dim=1).numpy()
            row.update({"epoch/hidden_diff_norm_mean": float(diff.mean()), "epoch/hidden_diff_norm_std": float(diff.std()),
                        "epoch/hidden_diff_norm_skew": float(scipy.stats.skew(diff)),
                        "epoch/hidden_norm_mean": float(norms.mean()), "epoch/hidden_norm_std": float(norms.std())})
        if eval_pairs:
            seqs = [c for c, _ in eval_pairs] + [r for _, r in eval_pairs]
            rewards, _ = utils.score_sequences(forward, seqs, tokenizer.pad_token_id, device, args.eval_batch_size,
                                               desc=f"eval e{epoch}")
            rc, rr = rewards[: len(eval_pairs)], rewards[len(eval_pairs):]
            eval_rewards[epoch] = {"rewards_chosen": rc.tolist(), "rewards_rejected": rr.tolist()}
            row.update({"eval/accuracy": float((rc > rr).float().mean()),
                        "eval/loss_bt": float(-F.logsigmoid(rc - rr).mean()),
                        "eval/reward_mean": float(rewards.mean()), "eval/reward_std": float(rewards.std())})
        engine.train()
        log(row)
        return row

    def save_epoch_checkpoint(epoch):
        ckpt = os.path.join(args.out, f"epoch-{epoch}")
        sd = utils.consolidated_state_dict(engine)
        extra = {"train_config.json": run_config}
        if epoch in eval_rewards:  # the trainer's own rewards on --eval-file, in file order
            extra["eval_rewards.json"] = eval_rewards[epoch]
        utils.save_hf_checkpoint(hf_model, sd, tokenizer, ckpt, extra, prefix="model.")
        torch.distributed.barrier()
        return ckpt

    # ---------------------------------------------------------------- training loop
    if start_step == 0:
        print0(f"[epoch 0] {epoch_diagnostics(0)}")
    engine.train()
    per_rank = args.micro_batch_size
    exact_prepass = args.loss == "bsr" and args.bsr_scope == "global" and grad_accum > 1
    seq_len = [(len(c), len(r)) for c, r in pairs]
    bar = utils.progress(total=total_steps, initial=start_step, desc=f"train_rm {args.loss}", disable=not utils.is_rank0())
    batches_epoch, batches = -1, None
    for step in range(start_step, total_steps):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches, batches_epoch = epoch_batches(len(pairs), args.global_batch_size, epoch, args.seed, pair_len), epoch
        batch = batches[in_epoch]
        micro = [[batch[g * per_step_pairs + rank * per_rank + i] for i in range(per_rank)] for g in range(grad_accum)]
        # every rank must run the same number of forwards (ZeRO-3 gathers parameters collectively), so the chunk
        # count is planned from the whole global batch, which every rank knows
        n_chunks = max(len(forward_chunks([seq_len[i][0] for i in batch[k: k + per_rank]] +
                                          [seq_len[i][1] for i in batch[k: k + per_rank]],
                                          args.max_tokens_per_forward, args.padding_free))
                       for k in range(0, len(batch), per_rank))
        t0 = time.time()
        lr_now = scheduler.get_last_lr()[0]
        token_counts = [0, 0]  # real and processed (padded) tokens of this rank's training forwards
        utils.set_fault_step(step + 1)

        def micro_forward(idx):
            """Rewards (chosen, rejected) of these pairs; chosen and rejected share the forward(s)."""
            seqs = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
            parts = forward_chunks([len(q) for q in seqs], args.max_tokens_per_forward, args.padding_free, n_chunks)
            order = [j for part in parts for j in part]
            outs = []
            for part in parts:
                chunk = [seqs[j] for j in part]
                token_counts[0] += sum(len(q) for q in chunk)
                token_counts[1] += sum(len(q) for q in chunk) if args.padding_free else len(chunk) * len(chunk[0])
                if args.padding_free:
                    input_ids, position_ids = utils.pack_batch(chunk, device)
                    outs.append(engine(input_ids, None, position_ids)[0])
                else:
                    outs.append(forward(*utils.pad_batch(chunk, tokenizer.pad_token_id, device))[0])
            rewards = torch.cat(outs)[torch.argsort(torch.tensor(order, device=device))]  # back to seqs order
            return rewards[: len(idx)], rewards[len(idx):]

        if exact_prepass:  # every reward of the global batch, to centre over all of B (no grad, same weights)
            with torch.no_grad():
                pre = [tuple(utils.all_gather_cat(r) for r in micro_forward(idx)) for idx in micro]
        losses, bts, all_c, all_r = [], [], [], []
        finite = torch.ones((), device=device)
        for g, idx in enumerate(micro):
            rc, rr = micro_forward(idx)
            if args.bsr_scope == "micro":  # official code: per device, lam scaled by the per-device batch
                loss, bt = preference_loss(rc, rr, args.loss, args.lam * len(idx), args.margin)
                scale = 1.0
                rc_log, rr_log = utils.all_gather_cat(rc.detach()), utils.all_gather_cat(rr.detach())
            else:
                rc_all, rr_all = utils.all_gather_cat(rc), utils.all_gather_cat(rr)
                if exact_prepass:  # this micro-step's rewards live, the rest of B as constants
                    rc_all = torch.cat([p[0] for p in pre[:g]] + [rc_all] + [p[0] for p in pre[g + 1:]])
                    rr_all = torch.cat([p[1] for p in pre[:g]] + [rr_all] + [p[1] for p in pre[g + 1:]])
                loss, bt = preference_loss(rc_all, rr_all, args.loss, args.lam, args.margin)
                scale = grad_accum if exact_prepass else 1.0  # DeepSpeed divides by grad_accum
                rc_log, rr_log = rc_all.detach(), rr_all.detach()
            if utils.fault_here("nan"):
                loss = loss * float("nan")
            finite = finite * torch.isfinite(loss.detach())
            if g == grad_accum - 1:  # one host sync per step, before the update is applied
                if args.bsr_scope == "micro" and world > 1:  # local losses differ: all ranks must agree to stop
                    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                if finite.item() == 0:
                    print0(f"[error] non-finite loss at step {step + 1} (epoch {epoch + 1}); stopping, the update "
                           f"was not applied. {utils.last_good_state(args.out)}")
                    raise SystemExit(1)
            engine.backward(loss * scale)
            engine.step()
            losses.append(loss.detach())
            bts.append(bt.detach())
            if not (exact_prepass and g > 0):
                all_c.append(rc_log)
                all_r.append(rr_log)

        # -------------------------------------------------------- per-step log (one host sync)
        rc_log, rr_log = torch.cat(all_c).float(), torch.cat(all_r).float()
        loss_v = torch.stack(losses).mean()
        bt_v = torch.stack(bts).mean()
        if args.bsr_scope == "micro" and world > 1:
            lv = torch.stack([loss_v, bt_v])
            torch.distributed.all_reduce(lv)
            loss_v, bt_v = lv / world
        rewards_all = torch.cat([rc_log, rr_log])
        stats = torch.stack([loss_v, bt_v, (rc_log > rr_log).float().mean(), rewards_all.mean(), rewards_all.std(),
                             (rc_log - rr_log).mean()]).tolist()
        if world > 1:
            counts = torch.tensor(token_counts, dtype=torch.float64, device=device)
            torch.distributed.all_reduce(counts)
            token_counts = counts.tolist()
        dt = time.time() - t0
        n_tokens = sum(len(pairs[i][0]) + len(pairs[i][1]) for i in batch)
        row = {"step": step + 1, "epoch": epoch + (in_epoch + 1) / steps_per_epoch,
               "train/loss": stats[0], "train/loss_bt": stats[1], "train/loss_reg": stats[0] - stats[1],
               "train/accuracy": stats[2], "train/reward_mean": stats[3], "train/reward_std": stats[4],
               "train/margin_mean": stats[5], "train/lr": lr_now, "train/pairs_per_s": len(batch) / dt, "train/tokens_per_s": n_tokens / dt,
               "train/padding_fraction": 1 - token_counts[0] / token_counts[1], "train/peak_mem_gb": peak_memory_gb(device)}
        log(row)
        utils.maybe_fault("after_step")
        bar.update(1)
        bar.set_postfix(loss=f"{stats[0]:.4f}", acc=f"{stats[2]:.3f}")

        # -------------------------------------------------------- epoch end / periodic checkpoints
        if in_epoch + 1 == steps_per_epoch:
            print0(f"\n[epoch {epoch + 1}] {epoch_diagnostics(epoch + 1)}")
            save_epoch_checkpoint(epoch + 1)
            utils.save_train_state(engine, resume_dir, step + 1)
        elif args.save_steps and (step + 1) % args.save_steps == 0:
            utils.save_train_state(engine, resume_dir, step + 1)
    bar.close()

    # ---------------------------------------------------------------- final checkpoint = last epoch
    utils.publish_checkpoint(os.path.join(args.out, f"epoch-{args.epochs}"), args.out)
    torch.distributed.barrier()
    print0(f"[done] reward model in {args.out} (AutoModelForSequenceClassification.from_pretrained('{args.out}'))")
    skipped_total = sum(skipped.values()) + sum(eval_skipped.values())
    if skipped_total:
        print0(f"[data] skipped rows: train {skipped}, eval {eval_skipped} (also in train_config.json)")


if __name__ == "__main__":
    main()
