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

--resume refuses a changed flag, --train-file / --eval-file content or --model folder (saved anew), except what
changes no trained weight:
--save-steps, --eval-batch-size, --norm-stats-pairs, --max-tokens-per-forward, --gradient-checkpointing, --zero-stage /
--ds-config (the filled DeepSpeed config must be the same). --out, a new folder or one train_rm.py wrote, receives the
final HF checkpoint (AutoModelForSequenceClassification.from_pretrained(out)), train_config.json, metrics.jsonl (per
step and per epoch), epoch-N/ (a checkpoint per epoch) and resume/ (DeepSpeed state for --resume).
"""

import argparse
import functools
import math
import os
import resource
import time

from transformers import AutoConfig

import checkpoint
import utils

# deepspeed and scipy are imported where used: both take seconds, deepspeed logs on import (after quiet_libraries), and
# `from train_rm import preference_loss` needs neither. torch, dist and F come with the block below.

# ==== BSR: paste from here ==========================================================================================
# The method, self-contained (torch only). Hong et al., "On the Robustness of Reward Models for Language Model
# Alignment" (ICML 2025), Sec. 4. preference_loss: the losses on one batch. global_batch_losses: makes that batch the
# whole global batch B (every rank, every accumulation step), as eq. 25 means; a loss on each micro-batch alone would
# centre each micro-batch (the official code's form). Usage: README "Use BSR in your own trainer";
# tests/test_pasted_block.py runs this block alone on 2 processes against eq. 25 by plain autograd.
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F


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


def all_gather_cat(t):
    """t of every rank, joined along dim 0 in rank order, keeping autograd.

    Its backward SUMS over ranks the gradients that every rank's copy of the loss sends back, so a loss computed
    alike on every rank from gathered rewards, with gradients then averaged over ranks (DDP, DeepSpeed), gets
    exactly the gradient of that loss on the joined batch.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    return torch.cat(dist_nn.all_gather(t.contiguous()), dim=0)


def global_batch_losses(reward_fn, micro_batches, loss_type="bsr", lam=1e-3, margin=1.0, scope="global"):
    """preference_loss with |B| = the global batch (this rank's micro_batches, on every rank): eq. 25 exactly.

    reward_fn(micro_batch) -> (rewards_chosen, rewards_rejected) of this rank's pairs, with autograd; deterministic
    (dropout off): for BSR over several micro-batches it runs twice on each, first in a no-grad pre-pass that learns
    every reward of B (so B's mean), then with grad. Every rank needs as many micro-batches, of the same size.
    Yields per micro-batch (loss, weight, bt_loss, rewards_chosen, rewards_rejected): backpropagate
    loss * weight / len(micro_batches) (DeepSpeed's engine.backward divides by the accumulation steps itself: give it
    loss * weight) and average gradients over ranks (DDP, DeepSpeed): the summed gradient is d(eq. 24 on B)/d(params).
    The rewards (detached, all ranks) are those the loss saw: all of B after a pre-pass, else this micro-step's.
    scope="micro": the official code's per-device loss instead (each rank centres its own micro-batch, BSR's lam x its
    size; not eq. 25). loss and bt_loss are then this rank's.
    """
    if scope not in ("global", "micro"):
        raise ValueError(f"unknown scope {scope!r}")
    n = len(micro_batches)
    prepass = scope == "global" and loss_type == "bsr" and n > 1  # the pairwise losses average exactly without one
    if prepass:
        with torch.no_grad():
            fixed = [tuple(all_gather_cat(r) for r in reward_fn(mb)) for mb in micro_batches]
    for g, mb in enumerate(micro_batches):
        rc, rr = reward_fn(mb)
        if scope == "micro":
            loss, bt = preference_loss(rc, rr, loss_type, lam * len(rc) if loss_type == "bsr" else lam, margin)
            yield loss, 1.0, bt, all_gather_cat(rc.detach()), all_gather_cat(rr.detach())
            continue
        rc, rr = all_gather_cat(rc), all_gather_cat(rr)
        if prepass:  # this micro-step's rewards live, the rest of B as constants: the loss and mean of all of B,
            # the gradient through this micro-step only (the n micro-steps' gradients add up to B's: weight n)
            rc = torch.cat([c for c, _ in fixed[:g]] + [rc] + [c for c, _ in fixed[g + 1:]])
            rr = torch.cat([r for _, r in fixed[:g]] + [rr] + [r for _, r in fixed[g + 1:]])
        loss, bt = preference_loss(rc, rr, loss_type, lam, margin)
        yield loss, (n if prepass else 1.0), bt, rc.detach(), rr.detach()
# ==== BSR: to here ==================================================================================================


LOSSES = ("bt", "bsr", "hinge", "norm", "dr", "center")
# --resume accepts new values of these (besides checkpoint.RESUME_MAY_CHANGE: --save-steps, --zero-stage, --ds-config,
# --gradient-checkpointing, --out): they change what is logged or how it is computed, never a trained weight
RESUME_MAY_CHANGE = ("eval_batch_size", "norm_stats_pairs", "max_tokens_per_forward")
# flags newer than some saved runs, with the value those runs used (so --resume compares against it)
RESUME_ADDED_FLAGS = {"eval_split": "train"}

# ===================================================================================================
# Arguments
# ===================================================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--model", required=True, help="hub id or local path of a causal LM / encoder checkpoint")
    p.add_argument("--train-file", required=True,
                   help="JSONL with prompt/chosen/rejected (strings or chat message lists), or a hub dataset id "
                        "with chosen/rejected message lists (Skywork-Reward-Preference-80K-v0.2 format)")
    p.add_argument("--train-split", default="train", help="split, when --train-file is a hub dataset")
    p.add_argument("--eval-file", default=None, help="pairs in the same format; pair accuracy each epoch")
    p.add_argument("--eval-split", default="train", help="split, when --eval-file is a hub dataset (e.g. test)")
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
# Data: pairs -> token ids, with counted skips; batches and the forwards of a micro-batch
# ===================================================================================================


def load_pairs(source, split, tokenizer, max_length, truncate, max_pairs=None):
    """Tokenized pairs [(chosen_ids, rejected_ids)] and a {reason: count} of skipped rows."""
    pairs, skipped = [], {}
    for where, row in utils.iter_rows(source, split):
        parsed = utils.parse_pair(row, where)  # ("skip", reason) or (prompt, chosen, rejected)
        if parsed[0] == "skip":
            reason = parsed[1]
        else:
            ids_c, ids_r = (utils.encode_prompt_response(tokenizer, parsed[0], response, max_length, truncate)
                            for response in parsed[1:])
            reason = (f"longer than --max-length {max_length}" if ids_c is None or ids_r is None
                      else "chosen == rejected after tokenization" if ids_c == ids_r else None)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        pairs.append((ids_c, ids_r))
        if max_pairs and len(pairs) >= max_pairs:
            break
    return pairs, skipped


def load_data(args, tokenizer):
    """Train and eval pairs and their skip counts; bad input is a one-line error naming file, line and field."""
    try:
        pairs, skipped = load_pairs(args.train_file, args.train_split, tokenizer, args.max_length,
                                    args.truncate, args.max_train_pairs)
        eval_pairs, eval_skipped = (load_pairs(args.eval_file, args.eval_split, tokenizer, args.max_length,
                                               args.truncate) if args.eval_file else ([], {}))
    except utils.DataError as e:
        raise SystemExit(f"data error: {e}") from None
    if (args.eval_file, args.eval_split) == (args.train_file, args.train_split):
        utils.print0("[data] --eval-file is the training data itself (same file and split): eval accuracy is on "
                     "training pairs; for a hub dataset, pass its held-out split with --eval-split")
    for name, sk in (("train", skipped), ("eval", eval_skipped)):
        for reason, count in sk.items():
            utils.print0(f"[data] {name}: skipped {count} rows ({reason})")
    if len(pairs) < args.global_batch_size:
        raise SystemExit(f"{args.train_file}: {len(pairs)} usable pairs, fewer than one global batch "
                         f"({args.global_batch_size})")
    return pairs, eval_pairs, skipped, eval_skipped


def epoch_batches(n_pairs, global_batch, epoch, seed, pair_lengths):
    """The epoch's global batches: a seeded shuffle (paper: random batches), each batch sorted by pair_lengths (the
    longer sequence of each pair), which only changes which device/micro-step gets which pairs (less padding), not the
    set B or the loss. Pairs beyond the last full batch wait for the next epoch."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n_pairs, generator=gen).tolist()
    batches = [perm[i: i + global_batch] for i in range(0, n_pairs - global_batch + 1, global_batch)]
    return [sorted(b, key=lambda i: -pair_lengths[i]) for b in batches]


def rank_micro_batches(batch, rank, world, micro_batch_size):
    """This rank's micro-batches of a global batch: micro-step g covers batch[g x micro x world: ...], rank by rank, so
    gathering over ranks then joining the micro-steps gives back the batch in order."""
    n_micro_steps = len(batch) // (micro_batch_size * world)
    return [batch[(g * world + rank) * micro_batch_size: (g * world + rank + 1) * micro_batch_size]
            for g in range(n_micro_steps)]


def pair_sequences(pairs, idx):
    """The sequences one forward scores for pairs idx: every chosen, then every rejected."""
    return [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]


def forward_chunks(lengths, max_tokens, padding_free, n_chunks=None):
    """Split sequence positions (longest first, greedily, never inside a sequence) into forwards of at most max_tokens
    tokens: padded width x count, or real tokens when padding_free. n_chunks forces the count (ranks must agree): the
    costliest chunk is halved until there are that many. Returns lists of positions into `lengths`."""
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
    """--max-tokens-per-forward when not given (splitting changes no number of the training: rewards are joined before
    the loss). CPU: 2048, the fastest measured (bench/RESULTS.md: 1.47x one forward per micro-batch; 1024, 4096 slower).
    GPU: half a full micro-batch (which the user sized to fit memory): only a micro-batch whose longest sequences pass
    half of --max-length is split, so forwards stay large while the short half stops padding to the long one's width.
    """
    return 2048 if device_type == "cpu" else micro_batch_size * max_length


def pack_batch(seqs, device=None):
    """Padding-free: token id lists -> one row (input_ids [1, N], position_ids [1, N]), positions restart at 0, which
    transformers turns into per-sequence attention (varlen flash_attention_2, a block-diagonal mask with sdpa/eager)."""
    input_ids = torch.tensor([[t for s in seqs for t in s]], dtype=torch.long)
    position_ids = torch.tensor([[p for s in seqs for p in range(len(s))]], dtype=torch.long)
    if device is not None:
        input_ids, position_ids = input_ids.to(device), position_ids.to(device)
    return input_ids, position_ids


# ===================================================================================================
# Model: the reward model, its head, the DeepSpeed engine
# ===================================================================================================


class PackedRewardModel(utils.RewardModel):
    """utils.RewardModel (padded batches: (input_ids, attention_mask)) that also reads packed rows (--padding-free):
    (input_ids, None, position_ids) from pack_batch."""

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if attention_mask is not None:
            return super().forward(input_ids, attention_mask)
        out = getattr(self.model, self.model.base_model_prefix)(input_ids=input_ids, position_ids=position_ids)
        if getattr(out, "pooler_output", None) is not None:
            raise ValueError("padding-free batches need a decoder; encoders read [CLS] of each row")
        pos = position_ids[0]  # one row: a sequence ends where the next position restarts at 0
        ends = torch.nonzero(torch.cat([pos[1:] == 0, pos.new_ones(1, dtype=torch.bool)])).squeeze(-1)
        hidden = out.last_hidden_state[0, ends]
        return utils.reward_head(self.model)(hidden).squeeze(-1), hidden


def init_reward_head(model, seed):
    """Wp ~ N(0, 1/(H+1)) (paper Sec. 2.1), bias zeroed and frozen; works with ZeRO-3 partitioned params."""
    import deepspeed

    head = utils.reward_head(model)
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        gen = torch.Generator().manual_seed(seed)
        std = 1.0 / math.sqrt(head.in_features + 1)
        w = torch.randn(head.weight.shape, generator=gen, dtype=torch.float32) * std
        with torch.no_grad():
            head.weight.copy_(w.to(head.weight.dtype))
            if head.bias is not None:  # the paper's head is bias-free; a bias would absorb the BSR centring
                head.bias.zero_()
    if head.bias is not None:
        head.bias.requires_grad_(False)


def check_packed_attention(engine, pairs, pad_id, device, bf16):
    """--padding-free: a packed sequence must attend only to itself, which transformers derives from the restarting
    position_ids and not every architecture honours (Falcon and OPT do not). Refused when the first pair's two
    sequences score differently packed together than padded. Every rank runs the same two forwards (ZeRO-3)."""
    seqs = list(pairs[0])
    with torch.no_grad():
        input_ids, position_ids = pack_batch(seqs, device)
        packed = engine(input_ids, None, position_ids)[0].float()
        padded = engine(*utils.pad_batch(seqs, pad_id, device))[0].float()
    gap = (packed - padded).abs().max().item()
    if gap > (2e-2 if bf16 else 1e-3) * max(1.0, padded.abs().max().item()):
        raise SystemExit(f"--padding-free: packed and padded rewards differ by {gap:.3g}: this architecture's "
                         "attention crosses packed sequences (it ignores the restarting position_ids); drop "
                         "--padding-free")


def load_model(args, tokenizer, bf16, ds_config, total_steps, device):
    """The HF sequence-classifier (head initialised as the paper does unless --head-init keep) and its DeepSpeed engine:
    AdamW, linear warmup then linear decay to 0. Returns (hf_model, engine, scheduler). Under ZeRO-3 call it with the
    HfDeepSpeedConfig alive: the parameters are then partitioned while loading."""
    import deepspeed

    hf_model = utils.load_reward_model(args.model, tokenizer, torch.bfloat16 if bf16 else torch.float32,
                                       args.attn_implementation)
    if args.head_init == "paper":
        init_reward_head(hf_model, args.seed)
    if args.gradient_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PackedRewardModel(hf_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    warmup = math.ceil(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup
                                                  else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return hf_model, engine, scheduler


# ===================================================================================================
# Training: the rewards of a micro-batch, one optimizer step, its log row
# ===================================================================================================


def micro_batch_rewards(idx, engine, pairs, n_chunks, token_counts, args, pad_id, device):
    """Rewards (chosen, rejected) of pairs idx: chosen and rejected share n_chunks length-sorted forwards.

    token_counts[0] / [1] accumulate the real / processed (padded) tokens, for the log's padding fraction.
    """
    seqs = pair_sequences(pairs, idx)
    parts = forward_chunks([len(q) for q in seqs], args.max_tokens_per_forward, args.padding_free, n_chunks)
    order = [j for part in parts for j in part]
    outs = []
    for part in parts:
        chunk = [seqs[j] for j in part]
        token_counts[0] += sum(len(q) for q in chunk)
        token_counts[1] += sum(len(q) for q in chunk) if args.padding_free else len(chunk) * len(chunk[0])
        if args.padding_free:
            input_ids, position_ids = pack_batch(chunk, device)
            outs.append(engine(input_ids, None, position_ids)[0])
        else:
            outs.append(engine(*utils.pad_batch(chunk, pad_id, device))[0])
    rewards = torch.cat(outs)[torch.argsort(torch.tensor(order, device=device))]  # back to seqs order
    return rewards[: len(idx)], rewards[len(idx):]


def train_step(engine, pairs, batch, args, rank, world, pad_id, device, step, epoch):
    """One optimizer step on the global batch `batch` (pair indices), through the BSR block.

    Returns the step's [loss, bt loss, accuracy, reward mean, reward std, margin mean] over B and the token counts of
    its forwards (all ranks). Stops the run (the update not applied) when the loss is not finite.
    """
    micro = args.micro_batch_size
    # every rank must run the same number of forwards (ZeRO-3 gathers parameters collectively), so the chunk
    # count is planned from the whole global batch, which every rank knows
    n_chunks = max(len(forward_chunks([len(q) for q in pair_sequences(pairs, batch[k: k + micro])],
                                      args.max_tokens_per_forward, args.padding_free))
                   for k in range(0, len(batch), micro))
    token_counts = [0, 0]
    reward_fn = functools.partial(micro_batch_rewards, engine=engine, pairs=pairs, n_chunks=n_chunks,
                                  token_counts=token_counts, args=args, pad_id=pad_id, device=device)
    micro_batches = rank_micro_batches(batch, rank, world, micro)
    losses, bts, seen_c, seen_r = [], [], [], []
    finite = torch.ones((), device=device)
    for g, (loss, weight, bt, rc, rr) in enumerate(global_batch_losses(reward_fn, micro_batches, args.loss, args.lam,
                                                                       args.margin, args.bsr_scope)):
        finite = finite * torch.isfinite(loss.detach())
        if g == len(micro_batches) - 1:  # one host sync per step, before the update is applied
            if args.bsr_scope == "micro" and world > 1:  # local losses differ: all ranks must agree to stop
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 0:
                utils.print0(f"[error] non-finite loss at step {step + 1} (epoch {epoch + 1}); stopping, the update "
                             f"was not applied. {checkpoint.last_good_state(args.out)}")
                raise SystemExit(1)
        engine.backward(loss * weight)  # DeepSpeed divides by the number of micro-steps and averages over ranks
        engine.step()
        losses.append(loss.detach())
        bts.append(bt.detach())
        if sum(len(c) for c in seen_c) < len(batch):  # each pair once: after a pre-pass the first loss saw all of B
            seen_c.append(rc)
            seen_r.append(rr)

    rc, rr = torch.cat(seen_c).float(), torch.cat(seen_r).float()
    loss_v, bt_v = torch.stack(losses).mean(), torch.stack(bts).mean()
    if args.bsr_scope == "micro" and world > 1:  # the per-device losses, averaged over ranks
        both = torch.stack([loss_v, bt_v])
        dist.all_reduce(both)
        loss_v, bt_v = both / world
    rewards = torch.cat([rc, rr])
    stats = torch.stack([loss_v, bt_v, (rc > rr).float().mean(), rewards.mean(), rewards.std(),
                         (rc - rr).mean()]).tolist()  # one host sync
    if world > 1:
        counts = torch.tensor(token_counts, dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        token_counts = counts.tolist()
    return stats, token_counts


def peak_memory_gb(device):
    """Peak accelerator memory allocated by torch on this rank, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def step_row(step, epoch_progress, stats, lr, n_pairs, n_tokens, seconds, token_counts, device):
    """The metrics.jsonl row of one training step."""
    loss, bt, accuracy, reward_mean, reward_std, margin_mean = stats
    return {"step": step, "epoch": epoch_progress,
            "train/loss": loss, "train/loss_bt": bt, "train/loss_reg": loss - bt,
            "train/accuracy": accuracy, "train/reward_mean": reward_mean, "train/reward_std": reward_std,
            "train/margin_mean": margin_mean, "train/lr": lr, "train/pairs_per_s": n_pairs / seconds,
            "train/tokens_per_s": n_tokens / seconds, "train/padding_fraction": 1 - token_counts[0] / token_counts[1],
            "train/peak_mem_gb": peak_memory_gb(device)}


# ===================================================================================================
# Epoch end: diagnostics (Figures 1-2, eval accuracy) and the checkpoint
# ===================================================================================================


def epoch_diagnostics(engine, hf_model, pairs, stats_idx, eval_pairs, args, pad_id, device, epoch, step):
    """The epoch row: ||Wp||, ||h_w - h_l|| and ||h|| over stats_idx train pairs, eval accuracy / BT loss / rewards.

    Returns (row, eval rewards {"rewards_chosen", "rewards_rejected"} in --eval-file order, or None).
    """
    import scipy.stats

    engine.eval()
    row = {"step": step, "epoch": epoch, "epoch/wp_norm": utils.head_weight_norm(hf_model)}
    if stats_idx:
        _, hidden = utils.score_sequences(engine, pair_sequences(pairs, stats_idx), pad_id, device,
                                          args.eval_batch_size, desc=f"norm stats e{epoch}")
        n = len(stats_idx)
        diff = (hidden[:n] - hidden[n:]).norm(dim=1).numpy()
        norms = hidden.norm(dim=1).numpy()
        row.update({"epoch/hidden_diff_norm_mean": float(diff.mean()), "epoch/hidden_diff_norm_std": float(diff.std()),
                    "epoch/hidden_diff_norm_skew": float(scipy.stats.skew(diff)),
                    "epoch/hidden_norm_mean": float(norms.mean()), "epoch/hidden_norm_std": float(norms.std())})
    eval_rewards = None
    if eval_pairs:
        seqs = [c for c, _ in eval_pairs] + [r for _, r in eval_pairs]
        rewards, _ = utils.score_sequences(engine, seqs, pad_id, device, args.eval_batch_size, desc=f"eval e{epoch}")
        rc, rr = rewards[: len(eval_pairs)], rewards[len(eval_pairs):]
        eval_rewards = {"rewards_chosen": rc.tolist(), "rewards_rejected": rr.tolist()}
        row.update({"eval/accuracy": float((rc > rr).float().mean()),
                    "eval/loss_bt": float(-F.logsigmoid(rc - rr).mean()),
                    "eval/reward_mean": float(rewards.mean()), "eval/reward_std": float(rewards.std())})
    engine.train()
    return row, eval_rewards


def save_epoch_checkpoint(engine, hf_model, tokenizer, out, epoch, run_config, eval_rewards):
    """out/epoch-N: an HF checkpoint, its train_config.json and the trainer's own rewards on --eval-file."""
    ckpt = os.path.join(out, f"epoch-{epoch}")
    state_dict = checkpoint.consolidated_state_dict(engine)
    extra = {"train_config.json": run_config}
    if eval_rewards is not None:
        extra["eval_rewards.json"] = eval_rewards
    checkpoint.save_hf_checkpoint(hf_model, state_dict, tokenizer, ckpt, extra, prefix="model.")
    dist.barrier()


# ===================================================================================================
# Main: args -> data -> model -> loop (steps, epoch diagnostics, checkpoints) -> final checkpoint
# ===================================================================================================


def main(argv=None):
    args = parse_args(argv)
    utils.quiet_libraries()  # before deepspeed is imported: it logs on import
    checkpoint.check_model_source(args.model, "--model")
    from transformers.integrations import HfDeepSpeedConfig  # after quiet_libraries, like deepspeed itself

    resume_dir = os.path.join(args.out, "resume")
    checkpoint.claim_out_dir(args.out, "train_rm.py", [("--model", args.model), ("--train-file", args.train_file),
                                                       ("--eval-file", args.eval_file)],
                             legacy=("train_config.json", ("args", "ds_config")), create=False,
                             resume=bool(args.resume))
    if args.head_init == "keep":  # continuing from --model's head: it must be a trained one
        checkpoint.check_reward_model(args.model, "--model (with --head-init keep)")
    rank, world, _, device = utils.init_distributed()
    checkpoint.claim_out_dir(args.out, "train_rm.py", legacy=("train_config.json", ("args", "ds_config")))
    checkpoint.remove_leftovers(args.out)
    torch.manual_seed(args.seed)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    micro_step_pairs = args.micro_batch_size * world  # pairs of one micro-step, all ranks
    if args.global_batch_size % micro_step_pairs:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                         f"--micro-batch-size x world size = {args.micro_batch_size} x {world}")
    grad_accum = args.global_batch_size // micro_step_pairs
    if args.max_tokens_per_forward is None:  # resolved here, so train_config.json records the value used
        args.max_tokens_per_forward = default_tokens_per_forward(device.type, args.micro_batch_size, args.max_length)

    # ---------------------------------------------------------------- data
    tokenizer = utils.load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id
    pairs, eval_pairs, skipped, eval_skipped = load_data(args, tokenizer)
    pair_lengths = [max(len(c), len(r)) for c, r in pairs]
    steps_per_epoch = len(pairs) // args.global_batch_size
    total_steps = steps_per_epoch * args.epochs
    utils.print0(f"[data] {len(pairs)} train pairs, {len(eval_pairs)} eval pairs; {steps_per_epoch} steps/epoch x "
                 f"{args.epochs} epochs; {len(pairs) % args.global_batch_size} pairs/epoch wait for the next shuffle")
    utils.print0(f"[batch] global {args.global_batch_size} = micro {args.micro_batch_size} x world {world} x "
                 f"accumulation {grad_accum}; BSR batch |B| = "
                 + (f"{args.global_batch_size} (global)" if args.bsr_scope == "global"
                    else f"{args.micro_batch_size} per device (micro)")
                 + (f"; forwards of at most {args.max_tokens_per_forward} tokens (--max-tokens-per-forward, 0 = off)"
                    if args.max_tokens_per_forward else ""))

    # ---------------------------------------------------------------- model (partitioned while loading)
    hidden_size = AutoConfig.from_pretrained(args.model).get_text_config().hidden_size
    ds_config, zero3 = utils.training_ds_config(
        args.ds_config, global_batch=args.global_batch_size, micro_batch=args.micro_batch_size,
        grad_accum=grad_accum, max_grad_norm=args.max_grad_norm, bf16=bf16, hidden_size=hidden_size,
        zero_stage=args.zero_stage, world_size=world)
    data_fingerprints = {"train_file": checkpoint.fingerprint(args.train_file),
                         "eval_file": checkpoint.fingerprint(args.eval_file),
                         "model": checkpoint.model_fingerprint(args.model)}
    saved_config = None
    if args.resume:  # before the model loads: a refused resume costs seconds
        saved_config = checkpoint.check_resume(os.path.join(args.out, "train_config.json"), args, world, ds_config,
                                               RESUME_MAY_CHANGE, data_fingerprints, RESUME_ADDED_FLAGS)
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841 (must stay alive)
    hf_model, engine, scheduler = load_model(args, tokenizer, bf16, ds_config, total_steps, device)
    if args.padding_free:
        check_packed_attention(engine, pairs, pad_id, device, bf16)

    # ---------------------------------------------------------------- resume / fresh start
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    start_step = 0
    if args.resume:  # the run's train_config.json stays as it was written at its start
        start_step = checkpoint.load_train_state(engine, resume_dir, metrics_path)
        run_config = saved_config
        utils.print0(f"[resume] from {resume_dir} at step {start_step}/{total_steps}")
    else:
        if utils.is_rank0() and os.path.exists(metrics_path):
            os.remove(metrics_path)
        run_config = {"args": vars(args), "world_size": world, "grad_accum": grad_accum, "bf16": bf16,
                      "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "train_pairs": len(pairs),
                      "eval_pairs": len(eval_pairs), "skipped": {"train": skipped, "eval": eval_skipped},
                      "data_fingerprints": data_fingerprints, "ds_config": ds_config}
        if utils.is_rank0():
            checkpoint.write_json(os.path.join(args.out, "train_config.json"), run_config)

    # ---------------------------------------------------------------- training loop
    # the same train pairs every epoch for the ||h_w - h_l|| statistics (Figures 1-2)
    stats_idx = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed))[
        : args.norm_stats_pairs].tolist()
    diagnose = functools.partial(epoch_diagnostics, engine, hf_model, pairs, stats_idx, eval_pairs, args, pad_id,
                                 device)
    if start_step == 0:
        row, _ = diagnose(0, 0)
        utils.append_jsonl(metrics_path, [row])
        utils.print0(f"[epoch 0] {row}")
    engine.train()
    bar = utils.progress(total=total_steps, initial=start_step, desc=f"train_rm {args.loss}",
                         disable=not utils.is_rank0())
    batches_epoch, batches = -1, None
    for step in range(start_step, total_steps):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches, batches_epoch = epoch_batches(len(pairs), args.global_batch_size, epoch, args.seed,
                                                   pair_lengths), epoch
        batch = batches[in_epoch]
        t0 = time.time()
        lr = scheduler.get_last_lr()[0]
        stats, token_counts = train_step(engine, pairs, batch, args, rank, world, pad_id, device, step, epoch)
        n_tokens = sum(len(pairs[i][0]) + len(pairs[i][1]) for i in batch)
        row = step_row(step + 1, epoch + (in_epoch + 1) / steps_per_epoch, stats, lr, len(batch), n_tokens,
                       time.time() - t0, token_counts, device)
        utils.append_jsonl(metrics_path, [row])
        bar.update(1)
        bar.set_postfix(loss=f"{stats[0]:.4f}", acc=f"{stats[2]:.3f}")

        if in_epoch + 1 == steps_per_epoch:  # epoch end: diagnostics, checkpoint, resume state
            row, eval_rewards = diagnose(epoch + 1, step + 1)
            utils.append_jsonl(metrics_path, [row])
            utils.print0(f"\n[epoch {epoch + 1}] {row}")
            save_epoch_checkpoint(engine, hf_model, tokenizer, args.out, epoch + 1, run_config, eval_rewards)
            checkpoint.save_train_state(engine, resume_dir, step + 1)
        elif args.save_steps and (step + 1) % args.save_steps == 0:
            checkpoint.save_train_state(engine, resume_dir, step + 1)
    bar.close()

    # ---------------------------------------------------------------- final checkpoint = last epoch
    checkpoint.publish_checkpoint(os.path.join(args.out, f"epoch-{args.epochs}"), args.out)
    dist.barrier()
    utils.print0(f"[done] reward model in {args.out} "
                 f"(AutoModelForSequenceClassification.from_pretrained('{args.out}'))")
    skipped_total = sum(skipped.values()) + sum(eval_skipped.values())
    if skipped_total:
        utils.print0(f"[data] skipped rows: train {skipped}, eval {eval_skipped} (also in train_config.json)")


if __name__ == "__main__":
    main()
