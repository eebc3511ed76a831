"""What two or more stages share: distributed start and console, data reading, THE tokenization of (prompt, response),
the reward model, the DeepSpeed config, argparse number types and the chat template's end-of-turn token. Each stage's
own logic lives in the stage; saving and resuming are in checkpoint.py, the vLLM engine and the gold reward model
(make_data.py and rloo.py) in generation.py, which the reward-model stages never import."""

import argparse
import functools
import glob
import gzip
import hashlib
import importlib
import json
import logging
import math
import os
import re
import socket
import sys
import time
import warnings
import zlib

import torch
import torch.nn as nn
import transformers  # a lazy module: its Auto classes (seconds more) load on first use, not with `import utils`
from tqdm import tqdm
from transformers.utils import logging as hf_logging

# Imported where used: deepspeed (its import logs, so it must come after quiet_libraries, and it costs seconds),
# datasets (seconds, and only for a hub dataset id).

# ---------------------------------------------------------------------------------------------------
# Distributed start and the console
# ---------------------------------------------------------------------------------------------------


def init_distributed():
    """Start torch.distributed through DeepSpeed (NCCL on GPU, gloo on CPU); returns (rank, world, local_rank, device).

    Under plain `python` (no RANK from `deepspeed` or `torchrun`) we set a world of one: DeepSpeed would try MPI."""
    import deepspeed

    _deepspeed_op_builds()
    own_port = "RANK" not in os.environ and "MASTER_PORT" not in os.environ
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        # DeepSpeed's CPU communicator JIT-compiles a shared-memory all-reduce (45-170 s at the first launch) that only
        # inference tensor parallelism uses; training and eval collectives go through gloo either way. (import_module:
        # `import deepspeed.comm.torch as m` would bind the torch library, an attribute of deepspeed.comm.)
        device = torch.device("cpu")
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    for attempt in range(5):
        if own_port:  # a free port; another process may take it before we listen on it, so a refusal retries
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        try:
            if not torch.distributed.is_initialized():
                deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
            break
        except torch.distributed.DistNetworkError:
            if not own_port or attempt == 4:
                raise
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device


def torch_extensions_dir():
    """Where DeepSpeed's compiled ops are cached: $TORCH_EXTENSIONS_DIR, else one folder per Python environment (torch's
    default is shared by all environments of one Python version, which then rebuilt each other's ops)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    env_id = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions", f"env-{env_id}")


def _deepspeed_op_builds():
    """Give DeepSpeed's op builds this environment's cache folder, and print one line before an op compiles."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    os.environ["TORCH_EXTENSIONS_DIR"] = torch_extensions_dir()  # read by torch when an op is loaded
    if getattr(OpBuilder.jit_load, "announces_compiles", False):
        return
    jit_load = OpBuilder.jit_load

    def announced_jit_load(self, *args, **kwargs):
        root = os.environ["TORCH_EXTENSIONS_DIR"]
        if not glob.glob(os.path.join(root, "*", self.name, "*.so")):  # torch's layout: ROOT/py311_cu124/NAME/NAME.so
            print0(f"[deepspeed] compiling its {self.name} op (once per environment, can take minutes; "
                   f"cached in {root})")
        return jit_load(self, *args, **kwargs)

    announced_jit_load.announces_compiles = True
    OpBuilder.jit_load = announced_jit_load


def is_rank0():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs, flush=True)


def barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def gather_objects(obj):
    """Every rank's python object, as a list on every rank (rank order)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# Library messages that ask nothing of the user (logger name -> message prefixes), each printed once per stage in every
# CPU run. Everything else, real warnings included, still prints.
HARMLESS_LOG_MESSAGES = {
    "DeepSpeed": ("Setting accelerator to CPU",),  # a CPU machine is the expected case here, not a failed detection
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record):
        return not record.getMessage().startswith(self.prefixes)


def quiet_libraries():
    """Silence HARMLESS_LOG_MESSAGES, two FutureWarnings of torch.distributed that DeepSpeed triggers and HF's progress
    bars. Call it before importing deepspeed or vllm (the filters wait on loggers they create under those names)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*|.*all_gather_into_tensor.*")
    hf_logging.disable_progress_bar()
    for name, prefixes in HARMLESS_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every stage: the docstring's layout kept and each flag's default shown, except None ("decided at run
    time", the help says how) and False (an off switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


PROGRESS_LOG_INTERVAL_S = 30.0


def progress(iterable=None, interval=None, **kwargs):
    """tqdm for every stage: the live bar on a terminal. In a file or a pipe (CI, `bash run_all.sh > log`) a redraw per
    step would flood it with carriage returns, so a plain line at most every `interval` s, plus the final state."""
    stream = kwargs.get("file") or sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        return tqdm(iterable, **kwargs)
    return LogProgress(iterable, interval=PROGRESS_LOG_INTERVAL_S if interval is None else interval, **kwargs)


class LogProgress(tqdm):
    """A tqdm that writes whole lines, each at least `interval` s after the last, and the final state at close."""

    def __init__(self, iterable=None, interval=PROGRESS_LOG_INTERVAL_S, **kwargs):
        self._interval, self._last_line, self._last_n = interval, None, None
        kwargs.update(mininterval=interval, leave=False)  # leave=False: close() asks display(msg='') once
        super().__init__(iterable, **kwargs)

    def display(self, msg=None, pos=None):
        now = time.monotonic()
        due = self._last_line is None or now - self._last_line >= self._interval
        if (due or msg == "") and self.n != self._last_n:
            self.fp.write(self.__str__() + "\n")
            self.fp.flush()
            self._last_line, self._last_n = now, self.n
        return False  # nothing to erase: tqdm must not write its '\r'


# ---------------------------------------------------------------------------------------------------
# Data reading: errors name the file, the line and the field
# ---------------------------------------------------------------------------------------------------


class DataError(ValueError):
    """Bad input data. The message names the source, the row (line) and the field."""


GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)  # a .gz cut short (an interrupted download) or not gzip


def _open_bytes(path):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # hh-rlhf ships train.jsonl.gz


def _lines(path):
    """(line number, text) of a local file, decoded line by line so that invalid UTF-8 names its line (a BOM on line 1
    is dropped)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    lineno = 0
    with _open_bytes(path) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                                    f"{e.start + 1} of the line); save the file as UTF-8") from None
        except GZIP_ERRORS as e:
            raise DataError(f"{path}:{lineno + 1}: not a complete gzip file ({e}); fetch it again") from None


def read_jsonl(path):
    """Yield (line number, dict) for each non-blank line; a line that is not a JSON object is an error."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def read_json(path):
    """A whole JSON file (e.g. RM-Bench's or AlpacaEval's lists), with the errors of read_jsonl."""
    try:
        return json.loads("".join(line for _, line in _lines(path)))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def append_jsonl(path, rows):
    """Append rows to a JSONL log (rank 0 writes)."""
    if is_rank0():
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def iter_rows(source, split="train"):
    """(where, dict) for each row of a local JSONL file, a local JSON list file or a hub dataset id (or a local dataset
    folder); `where` reads 'file:line', 'file[i]' or 'id[split] row i'."""
    if os.path.isfile(source) and not source.endswith((".jsonl", ".jsonl.gz")):
        try:
            with _open_bytes(source) as f:
                is_list = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
        except GZIP_ERRORS as e:
            raise DataError(f"{source}: not a complete gzip file ({e}); fetch it again") from None
        if is_list:
            for i, row in enumerate(read_json(source)):
                if not isinstance(row, dict):
                    raise DataError(f"{source}[{i}]: expected a JSON object, got {type(row).__name__}")
                yield f"{source}[{i}]", row
            return
    if source.endswith((".jsonl", ".jsonl.gz")) or os.path.isfile(source):
        for lineno, row in read_jsonl(source):
            yield f"{source}:{lineno}", row
    else:
        from datasets import load_dataset  # seconds to import, and only for a hub dataset

        try:
            rows = load_dataset(source, split=split)
        except (ValueError, OSError) as e:  # an unknown split; no such dataset, or no hub access
            reason = str(e).splitlines()[0][:200]
            raise DataError(f"{source}[{split}]: cannot load it as a dataset ({reason})") from None
        for i, row in enumerate(rows):
            yield f"{source}[{split}] row {i}", row


# The roles every chat template we meet renders; anything else ('robot', 'tool' without a tool-aware template) would
# be trained on silently or crash inside jinja2, so it is refused when the row is read.
ROLES = ("system", "user", "assistant")


def as_messages(value, role, where, field):
    """A prompt/response given as a string or as a chat message list -> a validated message list."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        msgs = []
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: field '{field}'[{j}] must be a message {{'role': str, 'content': str}}")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: field '{field}'[{j}].role is {m['role']!r} (expected {', '.join(ROLES)})")
            msgs.append({"role": m["role"], "content": m["content"]})
        return msgs
    raise DataError(f"{where}: field '{field}' must be a string or a non-empty list of chat messages, "
                    f"got {type(value).__name__}{' (empty)' if isinstance(value, list) else ''}")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def is_transcript(value):
    """True for an Anthropic hh-rlhf style string: '\\n\\nHuman: ...\\n\\nAssistant: ...'."""
    return isinstance(value, str) and re.match(r"\s*Human:", value) is not None and "\n\nAssistant:" in value


def parse_transcript(text, where, field):
    """An hh-rlhf transcript -> user/assistant messages, contents stripped. Turns split only at a blank line followed
    by 'Human:' or 'Assistant:'; a prompt's empty last 'Assistant:' is dropped; a response ends with 'Assistant:'."""
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    turns = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
             for who, body in zip(parts[1::2], parts[2::2])]
    if field == "prompt":
        if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns.pop()
    elif turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{field}' is a Human:/Assistant: transcript (hh-rlhf format) whose last turn "
                        f"is 'Human:', not the 'Assistant:' response")
    return turns


def parse_pair(row, where):
    """One preference row -> (prompt, chosen, rejected) message lists, or ('skip', reason) for an empty response or
    chosen == rejected; a structural problem is a DataError.

    Accepts {prompt, chosen, rejected} (strings, message lists or hh-rlhf transcripts) and {chosen, rejected} whole
    conversations (Skywork, hh-rlhf), whose shared leading messages are the prompt."""
    for field in ("chosen", "rejected"):
        if field not in row:
            raise DataError(f"{where}: missing field '{field}'")
    fields = ("chosen", "rejected") + (("prompt",) if row.get("prompt") is not None else ())
    value = {f: parse_transcript(row[f], where, f) if is_transcript(row[f]) else row[f] for f in fields}
    if "prompt" not in value and is_transcript(row["chosen"]) != is_transcript(row["rejected"]):
        one, other = ("chosen", "rejected") if is_transcript(row["chosen"]) else ("rejected", "chosen")
        raise DataError(f"{where}: field '{one}' is a Human:/Assistant: transcript (hh-rlhf format) but '{other}' "
                        "is not; without a 'prompt' both must be whole transcripts")
    chosen = as_messages(value["chosen"], "assistant", where, "chosen")
    rejected = as_messages(value["rejected"], "assistant", where, "rejected")
    if "prompt" in value:
        prompt = as_messages(value["prompt"], "user", where, "prompt")
        for msgs in (chosen, rejected):  # conversational rows may repeat the prompt inside chosen/rejected
            if msgs[: len(prompt)] == prompt and len(msgs) > len(prompt):
                del msgs[: len(prompt)]
    else:  # whole conversations: the common prefix is the prompt
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not any(m["content"].strip() for m in chosen) or not any(m["content"].strip() for m in rejected):
        return "skip", "empty response"
    if chosen == rejected:
        return "skip", "chosen == rejected"
    return prompt, chosen, rejected


# ---------------------------------------------------------------------------------------------------
# Tokenization: ONE function turns (prompt, response) into model input, for every stage
# ---------------------------------------------------------------------------------------------------

# Used only for a decoder tokenizer that ships no chat template; it is saved with every checkpoint.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def load_tokenizer(name_or_path):
    """AutoTokenizer with a pad token (else eos: see encode_prompt_response for why that is safe) and, for a decoder,
    a chat template (else DEFAULT_CHAT_TEMPLATE); an encoder keeps none: '[CLS] prompt [SEP] response [SEP]'."""
    tok = transformers.AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"{name_or_path}: tokenizer has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
    if not tok.chat_template and not is_encoder_tokenizer(tok):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def is_encoder_tokenizer(tok):
    return not tok.chat_template and tok.cls_token_id is not None and tok.sep_token_id is not None


def encode_prompt_response(tokenizer, prompt, response, max_length=None, truncate=False):
    """(prompt, response) -> token ids, the exact model input of train_rm, eval_rm and rloo.

    prompt: str, message list or None/[]; response: str or assistant messages. Decoders: the chat template's text,
    tokenized without extra special tokens; encoders: [CLS] prompt [SEP] response [SEP].
    Trailing pad ids are dropped: HF's classification head reads the rightmost non-pad token, so with pad == eos a
    trailing eos is never read; without it "last real token" and "what HF reads" agree, and so do the rewards of our
    trainer, eval, RLOO and a plain AutoModelForSequenceClassification reload.
    Longer than max_length: None, or with truncate=True a leading special token (BOS / [CLS], which the head may read)
    plus the LAST tokens, so the end of the response, where the reward is read, survives."""
    prompt_msgs = [] if prompt is None else as_messages(prompt, "user", "encode", "prompt") if prompt else []
    response_msgs = as_messages(response, "assistant", "encode", "response")
    if tokenizer.chat_template:
        ids = tokenize_chat(tokenizer, prompt_msgs + response_msgs)
    elif is_encoder_tokenizer(tokenizer):  # a "[SEP]" written in a text stays text (see tokenize_chat)
        ids = tokenizer("\n\n".join(m["content"] for m in prompt_msgs),
                        "\n\n".join(m["content"] for m in response_msgs), split_special_tokens=True)["input_ids"]
    else:
        raise ValueError("tokenizer has no chat template; load it with utils.load_tokenizer")
    pad = tokenizer.pad_token_id
    while len(ids) > 1 and ids[-1] == pad:
        ids = ids[:-1]
    if max_length is not None and len(ids) > max_length:
        if not truncate:
            return None
        special_first = ids[0] in (tokenizer.bos_token_id, tokenizer.cls_token_id) and ids[0] is not None
        ids = ids[:1] + ids[len(ids) - max_length + 1:] if special_first else ids[len(ids) - max_length:]
    return ids


def special_token_ids(tokenizer):
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


@functools.lru_cache(maxsize=16)
def special_tokens(tokenizer, vocab_size):
    """(ids, a regex matching the text of any) of the tokenizer's special tokens; vocab_size: len(tokenizer)."""
    ids = special_token_ids(tokenizer)
    names = sorted({tokenizer.convert_ids_to_tokens(i) for i in ids} - {""}, key=len, reverse=True)
    return ids, re.compile("|".join(map(re.escape, names)) or "(?!)")


def tokenize_chat(tokenizer, messages, add_generation_prompt=False, offsets=False):
    """Token ids of the chat template's text (with offsets: (ids, the character where each token starts)).

    A special token SPELLED inside a message (a response that writes "<|im_end|>" with ordinary characters) stays
    text instead of becoming the control token HF's tokenizer makes of it: rloo.py decodes the policy's samples and
    re-encodes them for the RM, and a policy must not end the RM's view of its turn by spelling its end. HF tokenizes
    the text between two control tokens on its own; such a piece that holds a spelled one is tokenized again with the
    spelled token as text, which is HF's result had the token been text (SentencePiece with prepend_scheme "first":
    plus a leading "▁"). Messages that spell none (nearly all): HF's own ids. A template that renders the contents
    neither verbatim nor trimmed, or a slow (Python) tokenizer, which gives no offsets: HF's ids."""
    text = render_chat(tokenizer, messages, add_generation_prompt)
    specials, spelled_rx = special_tokens(tokenizer, len(tokenizer))
    spelled = tokenizer.is_fast and any(spelled_rx.search(m["content"]) for m in messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets or spelled)
    ids, starts = enc["input_ids"], [a for a, _ in enc.get("offset_mapping", [])]
    if not spelled:
        return (ids, starts) if offsets else ids
    spans = content_spans(tokenizer, messages, add_generation_prompt, text)

    def in_a_message(a, b):  # the token's own characters, not the whitespace an lstrip/rstrip token takes along
        core = text[a:b]
        a, b = a + len(core) - len(core.lstrip()), b - (len(core) - len(core.rstrip()))
        return any(lo <= a and b <= hi for lo, hi in spans)

    ids, starts, piece, piece_start = [], [], [], 0
    end_of_text = (None, (len(text), len(text)))  # closes the last piece
    for i, (a, b) in list(zip(enc["input_ids"], enc["offset_mapping"])) + [end_of_text]:
        template_control = i is None or (i in specials and not in_a_message(a, b))
        if not template_control:
            piece.append((i, a))  # ordinary text, or a special token spelled in a message
            continue
        if any(j in specials for j, _ in piece):  # the piece up to this control token, again, all as text
            sub = tokenizer(text[piece_start:a], add_special_tokens=False, split_special_tokens=True,
                            return_offsets_mapping=True)
            piece = [(j, piece_start + c) for j, (c, _) in zip(sub["input_ids"], sub["offset_mapping"])]
        ids += [j for j, _ in piece] + ([i] if i is not None else [])
        starts += [c for _, c in piece] + ([a] if i is not None else [])
        piece, piece_start = [], b
    return (ids, starts) if offsets else ids


def content_spans(tokenizer, messages, add_generation_prompt, text):
    """[(start, end)] of each message's content in the rendered text, found by rendering placeholders in their place;
    [] when the template renders a content neither verbatim nor trimmed (Llama-3 and Gemma templates trim)."""
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    skeleton = render_chat(tokenizer, [dict(m, content=k) for m, k in zip(messages, marks)], add_generation_prompt)
    spans, pos = [], 0
    for m, k in zip(messages, marks):
        before, _, skeleton = skeleton.partition(k)
        if not text.startswith(before, pos):
            return []
        pos += len(before)
        content = next((c for c in (m["content"], m["content"].strip()) if text.startswith(c, pos)), None)
        if content is None:
            return []
        spans.append((pos, pos + len(content)))
        pos += len(content)
    return spans if text[pos:] == skeleton else []


def pad_batch(seqs, pad_id, device=None):
    """Right-pad token id lists -> (input_ids, attention_mask) long tensors."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------------
# The reward model: r(x, y) = Wp^T h(x, y), read where the architecture's own head reads it
# ---------------------------------------------------------------------------------------------------


def reward_head(model):
    """The Linear(H, 1) projection Wp of an AutoModelForSequenceClassification."""
    for name in ("score", "classifier"):  # decoders (Llama, Qwen2, Mistral, Gemma, ...) / BERT-style
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear) and head.out_features == 1:
            return head
    raise ValueError(f"{type(model).__name__}: no Linear(H, 1) reward head named 'score' or 'classifier' "
                     "(supported: decoder LMs with a 'score' head, BERT-style encoders with a pooler)")


def check_reward_head(model):
    """reward_head(model), which must read h directly: a model with layers of its own between the encoder and that
    Linear (DistilBERT's pre_classifier, DeBERTa's pooler, ModernBERT's head) is refused (ValueError), since
    r = Wp^T h would then be another function than the checkpoint computes. Checked once, when a model is wrapped."""
    head = reward_head(model)
    extra = [n for n, child in model.named_children() if child is not head and n != model.base_model_prefix
             and any(True for _ in child.parameters())]  # dropout layers hold no parameters
    if extra:
        raise ValueError(f"{type(model).__name__}: layers {', '.join(map(repr, extra))} between the encoder and its "
                         "Linear(H, 1) head; the reward r = Wp^T h needs the head to read the encoder's output "
                         "(supported: decoder LMs with a 'score' head, BERT-style encoders with a pooler)")
    return head


class RewardModel(nn.Module):
    """Wraps an AutoModelForSequenceClassification(num_labels=1); forward returns (rewards, hidden).

    hidden is h(x, y), the exact vector the head multiplies: for decoders the last layer's state at the
    last real token (right padding); for BERT-style encoders the pooler output ([CLS] path). Dropout is
    off (see load_reward_model), so rewards equal a plain HF forward of the same model.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model  # the only submodule: state-dict keys are "model." + the HF keys
        check_reward_head(model)

    def forward(self, input_ids, attention_mask):
        """A right-padded batch (pad_batch). train_rm.PackedRewardModel also reads packed rows (--padding-free)."""
        out = getattr(self.model, self.model.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask)
        if getattr(out, "pooler_output", None) is not None:
            hidden = out.pooler_output
        else:
            last = attention_mask.sum(dim=1) - 1
            hidden = out.last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), last]
        rewards = reward_head(self.model)(hidden).squeeze(-1)
        return rewards, hidden


def dropout_off(config):
    """The model config with every dropout rate 0: RM training and scoring, and RLOO's log-probs, are deterministic.
    Rates are named *dropout* (most models) or *_pdrop (GPT-2 style: resid_pdrop, embd_pdrop, attn_pdrop)."""
    for key, value in list(config.to_dict().items()):
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def load_reward_model(name_or_path, tokenizer, dtype=torch.float32, attn_implementation=None):
    """AutoModelForSequenceClassification(num_labels=1), dropout off, pad_token_id set: from a causal LM (new head) or
    a trained reward model. Under an active HfDeepSpeedConfig (ZeRO-3) the parameters are partitioned while loading."""
    config = dropout_off(transformers.AutoConfig.from_pretrained(name_or_path, num_labels=1))
    vocab = config.get_text_config().vocab_size
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id >= vocab:
        raise SystemExit(f"{name_or_path}: the tokenizer's pad token {tokenizer.pad_token!r} (id "
                         f"{tokenizer.pad_token_id}) is not in the model's vocabulary of {vocab}; give the "
                         "tokenizer a pad token the model knows (e.g. its eos token)")
    config.pad_token_id = tokenizer.pad_token_id
    config.use_cache = False
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized: score.weight" report is expected
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(name_or_path, config=config,
                                                                                dtype=dtype, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    try:
        check_reward_head(model)  # fail early, in one line, on an unsupported architecture
    except ValueError as e:
        raise SystemExit(f"{name_or_path}: {e}") from None
    return model


def head_weight_norm(model):
    """||Wp|| (gathers the partitioned weight under ZeRO-3)."""
    import deepspeed

    head = reward_head(model)
    with deepspeed.zero.GatheredParameters([head.weight]):
        return head.weight.detach().float().norm().item()


@torch.no_grad()
def score_sequences(model_fn, seqs, pad_id, device, batch_size=16, desc=None):
    """Rewards and hidden states of token-id lists, sharded over ranks, gathered on every rank, in the input order.

    model_fn(input_ids, attention_mask) -> (rewards, hidden). Scored in length order to cut padding; every rank runs
    the same number of forwards, as ZeRO-3 needs (parameters are gathered collectively)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    per_rank = math.ceil(len(order) / world) if order else 0
    mine = order[rank * per_rank: (rank + 1) * per_rank]
    n_batches = math.ceil(per_rank / batch_size) if per_rank else 0
    rewards, hiddens = [], []
    for b in progress(range(n_batches), desc=desc, disable=not (desc and rank == 0), leave=False):
        idx = mine[b * batch_size: (b + 1) * batch_size] or order[:1]  # a dummy forward keeps ranks in step
        r, h = model_fn(*pad_batch([seqs[i] for i in idx], pad_id, device))
        if b * batch_size < len(mine):
            rewards.append(r.float().cpu())
            hiddens.append(h.float().cpu())
    r_local = torch.cat(rewards) if rewards else torch.zeros(0)
    h_local = torch.cat(hiddens) if hiddens else torch.zeros(0, 0)
    parts = gather_objects((mine, r_local, h_local))
    all_r = torch.zeros(len(seqs))
    all_h = torch.zeros(len(seqs), max(p[2].shape[1] for p in parts) if parts else 0)
    for idx, r, h in parts:
        if idx:
            all_r[idx] = r
            all_h[idx] = h
    return all_r, all_h


# ---------------------------------------------------------------------------------------------------
# The DeepSpeed config of the training stages (sft.py, train_rm.py, rloo.py)
# ---------------------------------------------------------------------------------------------------


def training_ds_config(path, *, global_batch, micro_batch, grad_accum, max_grad_norm, bf16, hidden_size,
                       zero_stage=None, world_size=1):
    """The DeepSpeed JSON config with each "auto" filled from the script's flags; returns (config, zero3).

    A value the file sets must agree with the flags (they never silently disagree); a flag's key the file leaves out is
    added (DeepSpeed's defaults would differ: 1 accumulation step, no clipping). ZeRO stage: --zero-stage, else the
    file's number, else ("auto") 3 with several processes and 0 with one, where there is nothing to partition and
    ZeRO-3's per-module hooks only cost time. Under zero3, load the model with an HfDeepSpeedConfig alive."""
    flags = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": micro_batch,
             "gradient_accumulation_steps": grad_accum, "gradient_clipping": max_grad_norm, "bf16.enabled": bf16}
    if zero_stage is not None:
        flags["zero_optimization.stage"] = zero_stage
    values = {"zero_optimization.stage": 3 if world_size > 1 else 0,  # defaults: fill "auto", never conflict
              "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
              "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
              "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size, **flags}
    with open(path) as f:
        cfg = json.load(f)

    def fill(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                fill(v, key + ".")
            elif key in flags and v != "auto" and v != flags[key]:
                raise SystemExit(f"{path}: '{key}' is {v!r} but the flags give {flags[key]!r}; "
                                 "set it to \"auto\" or change the flag")
            elif v == "auto" and key not in values:
                raise SystemExit(f"{path}: no value for \"auto\" key '{key}'")
            elif v == "auto":
                node[k] = values[key]

    fill(cfg, "")
    for key, value in flags.items():  # a key the file leaves out gets the flag's value, not DeepSpeed's default
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise SystemExit(f"{path}: '{name}' must be an object (it holds '{key}')")
        node.setdefault(leaf, value)
    return cfg, cfg.get("zero_optimization", {}).get("stage") == 3


# ---------------------------------------------------------------------------------------------------
# argparse types: a bad number is a usage error naming the flag, not a traceback later
# ---------------------------------------------------------------------------------------------------


def number_type(kind, low=None, high=None, low_open=False, none=False):
    """argparse type: a finite int/float in [low, high] ((low, high] with low_open); none=True also accepts 'none'."""
    bound = ("" if low is None else f" {'>' if low_open else '>='} {low}") + (
        "" if high is None else f"{' and' if low is not None else ''} <= {high}")
    what = f"{'an integer' if kind is int else 'a finite number'}{bound}"

    def parse(text):
        if none and text.lower() == "none":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = number_type(int, 1)
nonneg_int = number_type(int, 0)
positive_float = number_type(float, 0, low_open=True)
nonneg_float = number_type(float, 0)
finite_float = number_type(float)
fraction = number_type(float, 0, 1)


# ---------------------------------------------------------------------------------------------------
# Chat template: rendering, and the token that ends an assistant turn (sft.py, rloo.py)
# ---------------------------------------------------------------------------------------------------


def render_chat(tokenizer, messages, add_generation_prompt):
    """The chat template's text for messages ("" for an empty conversation without generation prompt)."""
    if not messages and not add_generation_prompt:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:  # some templates cannot render an empty prefix
        if messages:
            raise
        return ""


def turn_end_ids(tokenizer):
    """[id] of the first special token the chat template puts after an assistant message's content
    (<|im_end|>, <|eot_id|>, eos, ...), or [] when it puts none: the policy's stop token besides eos."""
    probe = "Zq"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    before = render_chat(tokenizer, msgs[:1], True)
    after = render_chat(tokenizer, msgs, False)
    tail = after[len(before):]
    tail = tail[tail.index(probe) + len(probe):] if probe in tail else ""
    special = special_token_ids(tokenizer)
    ids = [i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in special]
    return ids[:1]  # the first special token after the content ends the turn
