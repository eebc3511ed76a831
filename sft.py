"""Chat SFT of a base causal LM: the initial policy of the RLHF part and the starting point of every RM.

Hong et al., "On the Robustness of Reward Models for Language Model Alignment" (ICML 2025), App. A.1:
one epoch, global batch 512 conversations, lr 1e-5, 10% warmup then cosine decay (Tunstall et al.).
The loss is next-token cross-entropy on assistant tokens only (each assistant turn's content and its
end-of-turn marker), averaged over all assistant tokens of the global batch.

    # one process, CPU or one GPU (the toy world: DATA/base is the tiny base model make_data.py saves)
    python sft.py --model runs/toy/data/base --train-file runs/toy/data/sft.jsonl --out runs/toy/sft \
        --global-batch-size 32 --micro-batch-size 8 --lr 1e-3 --epochs 1
    # one node, 8 GPUs (paper: UltraChat for Sec. 3.2, TULU 3 SFT mixture for Sec. 3.3)
    deepspeed --num_gpus 8 sft.py --model Qwen/Qwen2.5-1.5B --train-file HuggingFaceH4/ultrachat_200k \
        --train-split train_sft --out runs/sft_qwen1.5b --micro-batch-size 8 --gradient-checkpointing
    deepspeed --num_gpus 8 sft.py --model Qwen/Qwen2.5-1.5B --train-file allenai/tulu-3-sft-mixture \
        --out runs/sft_tulu --micro-batch-size 8 --gradient-checkpointing
    # continue after a crash or kill
    python sft.py ...same flags... --resume

--resume refuses any flag that differs from the run's (and a --train-file / --eval-file whose content changed, a
--model folder saved anew)
except --save-steps, --eval-batch-size, --gradient-checkpointing, --zero-stage / --ds-config (the filled DeepSpeed
config must be the same). --out must be a new folder or one sft.py wrote (never the --model or data folder).

Which tokens are trained is derived from the tokenizer's chat template, not from hand-written markers:
for the assistant message i, render messages[:i] with the generation prompt and messages[:i+1]
without it; the characters between the two renders are the assistant span, and a token is trained
when it starts inside a span (character offsets of a fast tokenizer). A template that does not render
prefixes as prefixes of the full conversation is refused with an error. When the template puts no
special token after the assistant content (nothing would teach the model to stop), the eos token is
inserted after each assistant span and trained.

Batches: each epoch is a seeded shuffle cut into global batches; inside a global batch the
conversations are sorted by length before being dealt to devices and micro-steps (length grouping:
less padding, the same set of conversations per optimizer step). Conversations longer than
--max-length are skipped and counted (or cut with --truncate).

--out receives: the final HF causal-LM checkpoint (AutoModelForCausalLM.from_pretrained(out); tokenizer
with chat template; generation_config.json whose eos_token_id lists eos and the template's end-of-turn
token, so rloo.py and generate() stop where the template ends a turn), sft_config.json, metrics.jsonl
('train/loss', 'train/lr', 'train/tokens', ... per step; 'eval/loss' per epoch with --eval-file),
epoch-N/ (a checkpoint per epoch) and resume/ (DeepSpeed state for --resume).
"""

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import checkpoint
import utils
from utils import print0

# ===================================================================================================
# ALGORITHM CORE: which tokens are trained (assistant tokens only), and the loss
# ===================================================================================================


def tokenize_conversation(tokenizer, messages, append_eos=False):
    """messages -> (ids, mask); mask[t] = 1 iff token t is in an assistant turn (content + end-of-turn).

    append_eos: insert the eos token after each assistant span (templates without an end-of-turn token).
    """
    text = utils.render_chat(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = utils.render_chat(tokenizer, messages[:i], True)
        after = utils.render_chat(tokenizer, messages[: i + 1], False)
        if not (after.startswith(before) and text.startswith(after)):
            raise ValueError("the chat template does not render a conversation's prefixes as prefixes of the "
                             "whole conversation, so assistant tokens cannot be located; use another template")
        spans.append((len(before), len(after)))
    ids, mask, span_i = [], [], 0
    # HF's ids and offsets, except that a special token spelled inside a message stays text (as train_rm and rloo
    # encode it)
    for tok, start in zip(*utils.tokenize_chat(tokenizer, messages, offsets=True)):
        while append_eos and span_i < len(spans) and start >= spans[span_i][1]:
            ids.append(tokenizer.eos_token_id)
            mask.append(1)
            span_i += 1
        ids.append(tok)
        mask.append(int(any(s <= start < e for s, e in spans)))
    if append_eos and span_i < len(spans):
        ids.extend([tokenizer.eos_token_id] * (len(spans) - span_i))
        mask.extend([1] * (len(spans) - span_i))
    return ids, mask


def sft_loss_sum(logits, input_ids, train_mask):
    """Sum over trained positions of -log p(token_t | tokens_<t); returns (sum, number of trained tokens)."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = train_mask[:, 1:].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll.view_as(mask) * mask).sum(), mask.sum()


# --resume accepts new values of these (besides checkpoint.RESUME_MAY_CHANGE): they change no trained weight
RESUME_MAY_CHANGE = ("eval_batch_size",)

# ===================================================================================================
# Arguments
# ===================================================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--model", required=True, help="hub id or local path of the base causal LM (e.g. DATA/base)")
    p.add_argument("--train-file", required=True,
                   help="JSONL with a 'messages' list of {role, content} per row (DATA/sft.jsonl), or a hub "
                        "dataset id with a 'messages' column (HuggingFaceH4/ultrachat_200k, "
                        "allenai/tulu-3-sft-mixture)")
    p.add_argument("--train-split", default="train", help="split of a hub dataset (ultrachat_200k: train_sft)")
    p.add_argument("--eval-file", default=None, help="conversations in the same format; eval/loss each epoch")
    p.add_argument("--eval-split", default="train", help="split, when --eval-file is a hub dataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--lr", type=utils.positive_float, default=1e-5, help="peak learning rate (paper: 1e-5)")
    p.add_argument("--warmup-ratio", type=utils.fraction, default=0.1,
                   help="linear warmup share, then cosine decay to 0")
    p.add_argument("--weight-decay", type=utils.nonneg_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=utils.nonneg_float, default=1.0, help="gradient clipping (0 = off)")
    p.add_argument("--epochs", type=utils.positive_int, default=1, help="passes over the train set (paper: 1)")
    p.add_argument("--global-batch-size", type=utils.positive_int, default=512,
                   help="conversations per optimizer step, all ranks")
    p.add_argument("--micro-batch-size", type=utils.positive_int, default=4,
                   help="conversations per device per forward")
    p.add_argument("--eval-batch-size", type=utils.positive_int, default=8,
                   help="conversations per device per eval forward")
    p.add_argument("--max-length", type=utils.positive_int, default=2048, help="tokens per conversation")
    p.add_argument("--truncate", action="store_true",
                   help="cut over-long conversations to --max-length (kept if an assistant token survives) "
                        "instead of skipping them")
    p.add_argument("--max-train-rows", type=utils.positive_int, default=None,
                   help="use only the first N usable conversations")
    p.add_argument("--seed", type=int, default=42, help="seed for data order")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights/activations (default: on with a GPU, off (fp32) on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--attn-implementation", default="sdpa", help="sdpa | eager | flash_attention_2")
    p.add_argument("--save-steps", type=utils.nonneg_int, default=200,
                   help="resume checkpoint every N steps (0 = epochs only)")
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
# Data: conversations -> (ids, mask), with counted skips
# ===================================================================================================


def load_conversations(source, split, tokenizer, max_length, truncate, append_eos, max_rows=None):
    """[(ids, mask)] and a {reason: count} of skipped rows; structural problems raise utils.DataError (message roles
    are checked by utils.as_messages: system, user or assistant)."""
    convs, skipped = [], {}
    for where, row in utils.iter_rows(source, split):
        if "messages" not in row:
            raise utils.DataError(f"{where}: missing field 'messages'")
        if not isinstance(row["messages"], list):
            raise utils.DataError(f"{where}: field 'messages' must be a list of chat messages")
        msgs = utils.as_messages(row["messages"], "user", where, "messages")
        reason = None
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            reason = "no non-empty assistant turn"
        elif next(m["role"] for m in msgs if m["role"] != "system") == "assistant":
            # an assistant turn's tokens are found after the rendered prefix before it, which an empty prefix does
            # not give (templates refuse to render it, or add a system prompt)
            reason = "an assistant turn before any user turn"
        else:
            try:
                ids, mask = tokenize_conversation(tokenizer, msgs, append_eos)
            except Exception as e:  # the template refuses this row (jinja2: "roles must alternate", ...)
                raise utils.DataError(f"{where}: field 'messages': the chat template cannot render this "
                                      f"conversation ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
            if len(ids) > max_length:
                if truncate and any(mask[1:max_length]):
                    ids, mask = ids[:max_length], mask[:max_length]
                else:
                    reason = f"longer than --max-length {max_length}"
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        convs.append((ids, mask))
        if max_rows and len(convs) >= max_rows:
            break
    return convs, skipped


def load_data(args, tokenizer):
    """Train and eval conversations, the skip counts, and the end-of-turn ids (eos when the template has none)."""
    if not tokenizer.is_fast:
        raise SystemExit(f"{args.model}: sft.py needs a fast tokenizer (character offsets locate assistant tokens)")
    end_ids = utils.turn_end_ids(tokenizer)
    append_eos = not end_ids
    if append_eos:
        end_ids = [tokenizer.eos_token_id]
        print0(f"[data] the chat template ends assistant turns with no special token: eos "
               f"{tokenizer.eos_token!r} is appended to each assistant turn and trained")
    try:
        convs, skipped = load_conversations(args.train_file, args.train_split, tokenizer, args.max_length,
                                            args.truncate, append_eos, args.max_train_rows)
        eval_convs, eval_skipped = (load_conversations(args.eval_file, args.eval_split, tokenizer, args.max_length,
                                                       args.truncate, append_eos) if args.eval_file else ([], {}))
    except utils.DataError as e:
        raise SystemExit(f"data error: {e}") from None
    if (args.eval_file, args.eval_split) == (args.train_file, args.train_split):
        print0("[data] --eval-file is the training data itself (same file and split): eval loss is on training "
               "conversations; for a hub dataset, pass its held-out split with --eval-split")
    for name, counts in (("train", skipped), ("eval", eval_skipped)):
        for reason, count in counts.items():
            print0(f"[data] {name}: skipped {count} rows ({reason})")
    if len(convs) < args.global_batch_size:
        raise SystemExit(f"{args.train_file}: {len(convs)} usable conversations, fewer than one global batch "
                         f"({args.global_batch_size})")
    return convs, eval_convs, {"train": skipped, "eval": eval_skipped}, end_ids, append_eos


def epoch_batches(n, global_batch, epoch, seed, lengths):
    """The epoch's global batches: a seeded shuffle, each batch sorted by length (longest first)."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    batches = [perm[i: i + global_batch] for i in range(0, n - global_batch + 1, global_batch)]
    return [sorted(b, key=lambda i: -lengths[i]) for b in batches]


def collate(convs, idx, pad_id, device):
    """Right-padded (input_ids, attention_mask, train_mask) for the conversations idx."""
    ids, attn = utils.pad_batch([convs[i][0] for i in idx], pad_id, device)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(idx):
        mask[row, : len(convs[i][1])] = torch.tensor(convs[i][1])
    return ids, attn, mask


# ===================================================================================================
# Model: the causal LM as a DeepSpeed engine (AdamW, warmup then cosine decay)
# ===================================================================================================


def warmup_cosine(warmup, total_steps):
    """LambdaLR factor: linear warmup, then cosine decay to 0 (s counts finished optimizer steps)."""
    def lr_lambda(s):
        if s < warmup:
            return (s + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total_steps - warmup))))
    return lr_lambda


def load_model(args, ds_config, zero3, tokenizer, end_ids, bf16, device, total_steps):
    """(engine, the HF model, scheduler, the HfDeepSpeedConfig that the caller keeps alive under ZeRO-3)."""
    import deepspeed  # after utils.quiet_libraries() (it logs on import)
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None  # ZeRO-3: partitioned while loading
    kwargs = {"dtype": torch.bfloat16 if bf16 else torch.float32}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if tokenizer.pad_token_id >= model.config.get_text_config().vocab_size:
        raise SystemExit(f"{args.model}: pad token id {tokenizer.pad_token_id} is outside the model's vocabulary")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    # generate() and rloo.py stop at eos and at the template's end-of-turn token
    model.generation_config.eos_token_id = list(dict.fromkeys([tokenizer.eos_token_id] + end_ids))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(math.ceil(args.warmup_ratio * total_steps), total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, model, scheduler, hf_ds_config


# ===================================================================================================
# Training step, evaluation, logs and checkpoints
# ===================================================================================================


def train_step(engine, convs, batch, micro_batch, grad_accum, pad_id, rank, world, device):
    """One optimizer step on a global batch; returns (token-mean loss over the global batch, its trained tokens)."""
    per_micro_step = micro_batch * world  # conversations in one forward/backward over all ranks
    n_global = sum(sum(convs[i][1][1:]) for i in batch)  # trained tokens in the whole global batch
    loss_sum = torch.zeros((), device=device)
    for g in range(grad_accum):
        idx = batch[g * per_micro_step + rank * micro_batch: g * per_micro_step + (rank + 1) * micro_batch]
        ids, attn, mask = collate(convs, idx, pad_id, device)
        s, _ = sft_loss_sum(engine(input_ids=ids, attention_mask=attn).logits, ids, mask)
        # DeepSpeed divides by grad_accum and averages over ranks: this scale makes the gradient that of
        # (sum of token losses over the global batch) / (trained tokens in the global batch)
        engine.backward(s * (grad_accum * world / max(1, n_global)))
        engine.step()
        loss_sum += s.detach()
    if world > 1:
        torch.distributed.all_reduce(loss_sum)
    return loss_sum.item() / max(1, n_global), n_global


@torch.no_grad()
def evaluate(engine, eval_convs, pad_id, batch_size, rank, world, device):
    """Token-mean loss on the eval conversations (all ranks)."""
    engine.eval()
    n_batches = math.ceil(len(eval_convs) / (world * batch_size))
    mine = list(range(rank, len(eval_convs), world))
    total = torch.zeros(2, device=device)
    for b in range(n_batches):  # every rank runs the same number of forwards (ZeRO-3 gathers collectively)
        idx = mine[b * batch_size: (b + 1) * batch_size]
        ids, attn, mask = collate(eval_convs, idx or [0], pad_id, device)
        s, n = sft_loss_sum(engine(input_ids=ids, attention_mask=attn).logits, ids, mask)
        if idx:
            total += torch.stack([s, n])
    if world > 1:
        torch.distributed.all_reduce(total)
    engine.train()
    return (total[0] / total[1].clamp(min=1)).item()


def start_or_resume(args, engine, resume_dir, metrics_path, saved_config, fresh_config):
    """(start step, the run's config). --resume restores the state and drops log rows after it; a fresh start clears
    the log and writes sft_config.json (a resumed run keeps the one written at its start)."""
    if args.resume:
        return checkpoint.load_train_state(engine, resume_dir, metrics_path), saved_config
    if utils.is_rank0():
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
        checkpoint.write_json(os.path.join(args.out, "sft_config.json"), fresh_config)
    return 0, fresh_config


def save_epoch_checkpoint(engine, model, tokenizer, out, epoch, run_config, row):
    """out/epoch-N: an HF checkpoint with the run's config and the epoch's metrics."""
    model.config.use_cache = True  # the saved config is for inference (generate with a KV cache)
    checkpoint.save_hf_checkpoint(model, checkpoint.consolidated_state_dict(engine), tokenizer,
                                  os.path.join(out, f"epoch-{epoch}"),
                                  {"sft_config.json": run_config, "epoch_metrics.json": row}, prefix="")
    model.config.use_cache = False
    torch.distributed.barrier()


# ===================================================================================================
# Main: args -> data -> model -> loop (train, log, eval + checkpoint per epoch) -> save
# ===================================================================================================


def main(argv=None):
    args = parse_args(argv)
    utils.quiet_libraries()  # before deepspeed is imported: it logs on import
    checkpoint.check_model_source(args.model, "--model")
    resume_dir = os.path.join(args.out, "resume")
    checkpoint.claim_out_dir(args.out, "sft.py", [("--model", args.model), ("--train-file", args.train_file),
                                                  ("--eval-file", args.eval_file)],
                             legacy=("sft_config.json", ("args", "ds_config")), create=False,
                             resume=bool(args.resume))
    rank, world, _, device = utils.init_distributed()
    checkpoint.claim_out_dir(args.out, "sft.py", legacy=("sft_config.json", ("args", "ds_config")))
    checkpoint.remove_leftovers(args.out)
    torch.manual_seed(args.seed)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    micro_batch = args.micro_batch_size
    if args.global_batch_size % (micro_batch * world):
        raise SystemExit(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                         f"--micro-batch-size x world size = {micro_batch} x {world}")
    grad_accum = args.global_batch_size // (micro_batch * world)

    # ---------------------------------------------------------------- data
    tokenizer = utils.load_tokenizer(args.model)
    convs, eval_convs, skipped, end_ids, append_eos = load_data(args, tokenizer)
    lengths = [len(ids) for ids, _ in convs]
    steps_per_epoch = len(convs) // args.global_batch_size
    total_steps = steps_per_epoch * args.epochs
    unused = len(convs) % args.global_batch_size
    print0(f"[data] {len(convs)} train conversations ({sum(sum(m) for _, m in convs)} assistant tokens), "
           f"{len(eval_convs)} eval; {steps_per_epoch} steps/epoch x {args.epochs} epochs; {unused} "
           "conversations/epoch past the last full global batch wait for the next shuffle"
           + (" (unused: one epoch)" if unused and args.epochs == 1 else ""))
    print0(f"[batch] global {args.global_batch_size} = micro {micro_batch} x world {world} x "
           f"accumulation {grad_accum}")

    # ---------------------------------------------------------------- model (partitioned while loading)
    hidden_size = AutoConfig.from_pretrained(args.model).get_text_config().hidden_size
    ds_config, zero3 = utils.training_ds_config(
        args.ds_config, global_batch=args.global_batch_size, micro_batch=micro_batch,
        grad_accum=grad_accum, max_grad_norm=args.max_grad_norm, bf16=bf16, hidden_size=hidden_size,
        zero_stage=args.zero_stage, world_size=world)
    data_fingerprints = {"train_file": checkpoint.fingerprint(args.train_file),
                         "eval_file": checkpoint.fingerprint(args.eval_file),
                         "model": checkpoint.model_fingerprint(args.model)}
    saved_config = None
    if args.resume:  # before the model loads: a refused resume costs seconds
        saved_config = checkpoint.check_resume(os.path.join(args.out, "sft_config.json"), args, world, ds_config,
                                               RESUME_MAY_CHANGE, data_fingerprints)
    # hf_ds_config must stay alive while the model exists (ZeRO-3: transformers holds only a weak reference)
    engine, model, scheduler, hf_ds_config = load_model(args, ds_config, zero3, tokenizer, end_ids, bf16, device,
                                                        total_steps)

    # ---------------------------------------------------------------- resume / fresh start
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    start_step, run_config = start_or_resume(args, engine, resume_dir, metrics_path, saved_config, {
        "args": vars(args), "world_size": world, "grad_accum": grad_accum, "bf16": bf16,
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "train_conversations": len(convs),
        "conversations_past_last_batch_per_epoch": unused,
        "eval_conversations": len(eval_convs), "skipped": skipped, "turn_end_ids": end_ids,
        "eos_appended": append_eos, "data_fingerprints": data_fingerprints, "ds_config": ds_config})
    if args.resume:
        print0(f"[resume] at step {start_step}/{total_steps}")

    # ---------------------------------------------------------------- training loop
    engine.train()
    bar = utils.progress(total=total_steps, initial=start_step, desc="sft", disable=not utils.is_rank0())
    batches_epoch, batches = -1, None
    for step in range(start_step, total_steps):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches, batches_epoch = epoch_batches(len(convs), args.global_batch_size, epoch, args.seed, lengths), epoch
        batch = batches[in_epoch]
        t0, lr_now = time.time(), scheduler.get_last_lr()[0]
        loss, n_global = train_step(engine, convs, batch, micro_batch, grad_accum, tokenizer.pad_token_id, rank,
                                    world, device)
        if not math.isfinite(loss):
            print0(f"[error] non-finite loss at step {step + 1}; stopping before anything of this step is saved. "
                   f"{checkpoint.last_good_state(args.out)}")
            raise SystemExit(1)
        dt = time.time() - t0
        utils.append_jsonl(metrics_path, [{"step": step + 1, "epoch": epoch + (in_epoch + 1) / steps_per_epoch,
                                     "train/loss": loss, "train/lr": lr_now, "train/tokens": n_global,
                                     "train/tokens_per_s": sum(lengths[i] for i in batch) / dt}])
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if in_epoch + 1 == steps_per_epoch:  # end of an epoch: eval, an HF checkpoint and the resume state
            epoch_row = {"step": step + 1, "epoch": epoch + 1}
            if eval_convs:
                epoch_row["eval/loss"] = evaluate(engine, eval_convs, tokenizer.pad_token_id, args.eval_batch_size,
                                                  rank, world, device)
                print0(f"\n[epoch {epoch + 1}] eval/loss {epoch_row['eval/loss']:.4f}")
            utils.append_jsonl(metrics_path, [epoch_row])
            save_epoch_checkpoint(engine, model, tokenizer, args.out, epoch + 1, run_config, epoch_row)
            checkpoint.save_train_state(engine, resume_dir, step + 1)
        elif args.save_steps and (step + 1) % args.save_steps == 0:
            checkpoint.save_train_state(engine, resume_dir, step + 1)
    bar.close()

    # ---------------------------------------------------------------- final checkpoint = last epoch
    checkpoint.publish_checkpoint(os.path.join(args.out, f"epoch-{args.epochs}"), args.out)
    torch.distributed.barrier()
    print0(f"[done] SFT model in {args.out} (AutoModelForCausalLM.from_pretrained('{args.out}'))")
    if sum(skipped["train"].values()) + sum(skipped["eval"].values()):
        print0(f"[data] skipped rows: train {skipped['train']}, eval {skipped['eval']} (also in sft_config.json)")


if __name__ == "__main__":
    main()
