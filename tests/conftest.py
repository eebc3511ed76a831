"""Test fixtures: tiny tokenizers and models made at test time (no hub), preference data written here."""

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WORDS = ("the cat dog sat on a mat ran fast slow red blue green one two three four five answer is yes no "
         "sort list reverse count add sum of and numbers letters word sentence please help me").split()


def random_text(rng, n_min=2, n_max=12):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(n_min, n_max)))


def make_tokenizer(path, pad="distinct", eos_in_template=True):
    """Byte-level BPE trained on a tiny corpus. pad: 'distinct' | 'eos' (pad == eos) | 'none' (no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    tok.train_from_iterator([random_text(rng) for _ in range(300)], trainer)
    kwargs = {"eos_token": "<eos>", "bos_token": "<bos>"}
    if pad == "distinct":
        kwargs["pad_token"] = "<pad>"
    elif pad == "eos":
        kwargs["pad_token"] = "<eos>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.chat_template = CHAT_TEMPLATE if eos_in_template else CHAT_TEMPLATE.replace("{{ eos_token }}", "\n")
    fast.save_pretrained(path)
    return fast


def make_tiny_lm(path, arch="llama", pad="distinct", seed=0, hidden=32, layers=2):
    """A random-init tiny causal LM (llama, qwen2, mistral, gemma, gemma2) + tokenizer saved in HF format."""
    from transformers import (AutoModelForCausalLM, Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig,
                              Qwen2Config)

    tok = make_tokenizer(path, pad=pad)
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=False)
    if arch in ("gemma", "gemma2"):  # Gemma scales embeddings by sqrt(H) and has its own head_dim
        common["head_dim"] = hidden // 4
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma": GemmaConfig,
               "gemma2": Gemma2Config}
    config = configs[arch](**common)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def write_pairs(path, n, seed=0, prompt_kind="str"):
    """n preference rows; chosen contains 'yes' more often so a model can learn something."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = random_text(rng)
            chosen = "yes " + random_text(rng, 1, 10)
            rejected = "no " + random_text(rng, 1, 14)
            if prompt_kind == "messages":
                row = {"chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
                       "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}]}
            else:
                row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(row) + "\n")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fault_env(env):
    """env with BSR_FAULT set also gets tests/fault_hook first on PYTHONPATH: the crash injection that the stages'
    processes then load (tests/fault_hook/sitecustomize.py). Product code holds no test hook."""
    if env.get("BSR_FAULT"):
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "tests", "fault_hook")]
                                            + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_script(args, nproc=1, env=None, timeout=600, check=True, launcher="torchrun"):
    """Run a repo script as the README does: `python x.py` (1 process), or n processes (gloo) under
    `torchrun` or the `deepspeed` launcher (which also passes --local_rank to the script)."""
    full_env = fault_env(dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {})))
    if nproc == 1:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            full_env.pop(k, None)
        cmd = [sys.executable] + args
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}",
               f"--master_port={free_port()}"] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}"] + args
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_lm(str(tmp_path_factory.mktemp("tiny_llama")), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return make_tiny_lm(str(tmp_path_factory.mktemp("tiny_qwen2")), "qwen2")


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    return write_pairs(str(tmp_path_factory.mktemp("data") / "train.jsonl"), 64)
