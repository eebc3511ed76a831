"""Checkpoints and run folders, read and written so that nothing is lost or silently wrong: the model-path and
reward-head checks done before loading, atomic files and folders (one line when the disk is full), HF checkpoints, the
resume state of the training stages and the checks that refuse a resume that would change the result, and the rules
for --out folders (a stage writes only into a folder it owns; a crash's leftovers are cleaned at the next start).
Used by every stage; train_rm.py's fork is train_rm.py + utils.py + checkpoint.py + ds_config.json."""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil

import safetensors.torch
import torch
import transformers  # lazy: its Auto classes load on first use
from huggingface_hub.utils import HFValidationError, validate_repo_id

import utils


# ---------------------------------------------------------------------------------------------------
# Reading a model: one clear line for a path that is not a model, or a checkpoint without a trained reward head
# ---------------------------------------------------------------------------------------------------


def check_model_source(name, flag="--model"):
    """A model flag names a local folder or a hub id; anything else stops here with one clear line (transformers
    would give a long chained traceback ending in "Repo id must be in the form 'repo_name'")."""
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise SystemExit(f"{flag} {name}: the folder holds no config.json, so it is not a saved model")
        return
    if os.path.exists(name):
        raise SystemExit(f"{flag} {name}: a file, not a model folder or a hub id")
    try:
        validate_repo_id(name)
        hub_id = name.count("/") <= 1 and not name.startswith(("/", "./", "../", "~"))
    except HFValidationError:
        hub_id = False
    if not hub_id:
        raise SystemExit(f"{flag} {name}: no such local folder, and not a valid hub id (a hub id is 'name' or "
                         "'org/name')")
    parent = name.split("/")[0]
    if "/" in name and os.path.isdir(parent):  # 'runs/sft' with a local runs/: almost surely a mistyped path
        raise SystemExit(f"{flag} {name}: no such local folder (there is a local {parent}/, so this is not read as "
                         "a hub id)")


def check_reward_model(name, flag="--model"):
    """Refuse a checkpoint without a trained Linear(H, 1) head (a causal LM or a bare encoder would be scored through a
    random head); every stage that loads a TRAINED reward model calls it first."""
    check_model_source(name, flag)
    try:
        config = transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag} {name}: cannot load a model config ({e})") from None
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise SystemExit(f"{flag} {name}: not a reward model (config.architectures = {archs}). A trained reward head "
                         "is needed: an ...ForSequenceClassification checkpoint with num_labels=1, such as "
                         "train_rm.py's --out. A causal LM or a bare encoder has none; train one with train_rm.py.")
    if config.num_labels != 1:
        raise SystemExit(f"{flag} {name}: a classifier with {config.num_labels} labels; a reward model has 1")
    keys = []
    index, weights = os.path.join(name, "model.safetensors.index.json"), os.path.join(name, "model.safetensors")
    if os.path.isdir(name) and os.path.exists(index):
        with open(index) as f:
            keys = list(json.load(f)["weight_map"])
    elif os.path.isdir(name) and os.path.exists(weights):
        with safetensors.safe_open(weights, "pt") as f:
            keys = list(f.keys())
    if keys and not any(k.split(".")[-2] in ("score", "classifier") for k in keys if k.count(".")):
        raise SystemExit(f"{flag} {name}: config says {archs} but the weights hold no 'score'/'classifier' "
                         "head; the head would be random")


# ---------------------------------------------------------------------------------------------------
# Atomic writes: a crash or a full disk never leaves a half-written file in place of a complete one
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(final):
    """`with atomic_path(final) as tmp:` write to tmp (a file or a folder); on success tmp replaces final, and a crash
    inside the block leaves final untouched. An existing final folder is moved to final.old-<pid> and deleted after, so
    one complete copy exists at every instant (the name is this process's: a final.old of someone else is not ours)."""
    final = os.path.abspath(final)
    tmp = f"{final}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(final), exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_tree(tmp)  # the data reaches the disk before the rename makes it final: a machine crash after the rename
    if os.path.isdir(tmp):  # must not find final holding empty or partial files (the rename may be committed first)
        old = f"{final}.old-{os.getpid()}"
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_path(os.path.dirname(final))  # the rename itself


def fsync_path(path):
    """Flush one file or folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path):
    """Flush a file, or every file and folder under a folder, to disk."""
    for folder, _, files in os.walk(path) if os.path.isdir(path) else [(None, None, [path])]:
        for name in files:
            fsync_path(name if folder is None else os.path.join(folder, name))
        if folder is not None:
            fsync_path(folder)


# A write that found no room: a full disk, a quota, the process's file-size limit. torch and safetensors wrap the
# OSError in their own errors (torch: "file write failed" or "unexpected pos N vs M"), so their messages are read too.
NO_ROOM_ERRNO = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_ROOM_TEXT = ("No space left", "Disk quota exceeded", "File too large", "file write failed", "unexpected pos")


def no_room(exc):
    """The exception in exc's chain that says a write found no room, or None."""
    while exc is not None:
        if (isinstance(exc, OSError) and exc.errno in NO_ROOM_ERRNO) or any(t in str(exc) for t in NO_ROOM_TEXT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def no_room_is_one_line(path, partial=None):
    """A save that runs out of room ends the stage with one line naming the folder and its free space, not a library
    traceback. Nothing complete was replaced (saves write to a temporary first); `partial` (that temporary) is removed
    so the space comes back."""
    try:
        yield
    except Exception as e:
        cause = no_room(e)
        if cause is None:
            raise
        if partial:
            shutil.rmtree(partial, ignore_errors=True)
        where = os.path.abspath(path)
        while not os.path.exists(where):
            where = os.path.dirname(where)
        free = shutil.disk_usage(where).free / 2 ** 30
        reason = str(cause).splitlines()[0][:120]
        raise SystemExit(f"[save] no room to write {path} ({reason}; {free:.1f} GiB free there). "
                         "Nothing already saved was replaced. Free space (a finished run's resume/ folder can go), "
                         "then rerun the command with --resume to continue from the last saved state, if one was "
                         "saved.") from None


def write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")


def write_jsonl(path, rows):
    """Write rows atomically (temp file + rename): a crash never leaves a half-written file."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_json_or_none(path):
    """A small JSON file of ours (a config, an owner mark), or None when it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------
# HF checkpoints: what the next stage, or AutoModel*.from_pretrained, loads
# ---------------------------------------------------------------------------------------------------


def consolidated_state_dict(engine):
    """Full state dict of a DeepSpeed engine's module on rank 0 (None elsewhere); all ranks must call."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if utils.is_rank0() else None


def save_hf_checkpoint(hf_model, state_dict, tokenizer, out_dir, extra_json=None, prefix=""):
    """Rank 0: write an HF checkpoint (safetensors, config, tokenizer, extra json files) atomically. prefix: what to
    strip from the state dict's keys (RewardModel's "model."); "" for a bare HF model, whose keys may start "model."."""
    if not utils.is_rank0():
        return
    sd = {k[len(prefix):] if k.startswith(prefix) else k: v.detach().cpu().contiguous()
          for k, v in state_dict.items()}
    with no_room_is_one_line(out_dir), atomic_path(out_dir) as tmp:
        hf_model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra_json or {}).items():
            write_json(os.path.join(tmp, name), obj)


def publish_checkpoint(src_dir, dst_dir):
    """Rank 0: copy a finished checkpoint's files into dst_dir, each atomically, config.json last: once it is there the
    weights are complete, so run_all.sh may read dst_dir/config.json as "this stage finished"."""
    if not utils.is_rank0():
        return
    for name in sorted(os.listdir(src_dir), key=lambda n: n == "config.json"):
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            with no_room_is_one_line(dst_dir), atomic_path(os.path.join(dst_dir, name)) as tmp:
                shutil.copyfile(src, tmp)


# ---------------------------------------------------------------------------------------------------
# Resume: the full training state, and the refusals that keep a resumed run the same run
# ---------------------------------------------------------------------------------------------------


def save_train_state(engine, resume_dir, step):
    """DeepSpeed shards + optimizer + scheduler + RNG in resume_dir/step-N, written to a temporary folder and renamed
    when complete; then the 'latest' pointer moves and older states go. All ranks must call."""
    name = f"step-{step:08d}"
    tmp = os.path.join(resume_dir, f".tmp-{name}")
    if utils.is_rank0():
        os.makedirs(resume_dir, exist_ok=True)
    torch.distributed.barrier()
    with no_room_is_one_line(resume_dir, partial=tmp):
        engine.save_checkpoint(tmp, tag="ds", save_latest=False)
        save_rng_state(tmp, torch.distributed.get_rank())
    torch.distributed.barrier()  # every rank has written all of its files (no temporary of a rank is left to vanish)
    with no_room_is_one_line(resume_dir, partial=tmp):  # a full disk can surface only at the flush
        fsync_tree(tmp)  # on every rank: on a shared filesystem only the writer's flush counts
    torch.distributed.barrier()
    if utils.is_rank0():
        write_json(os.path.join(tmp, "trainer_state.json"), {"step": step})
        # a step-N already there is left by a crash after this rename, before 'latest' moved: 'latest' names an earlier
        # state (a resumed run starts after the step it names), so this step was redone and its old copy goes
        if os.path.isdir(os.path.join(resume_dir, name)):
            shutil.rmtree(os.path.join(resume_dir, name))
        os.replace(tmp, os.path.join(resume_dir, name))
        fsync_path(resume_dir)
        with atomic_path(os.path.join(resume_dir, "latest")) as t:
            with open(t, "w") as f:
                f.write(name)
        for old in os.listdir(resume_dir):
            if old.startswith("step-") and old != name:
                shutil.rmtree(os.path.join(resume_dir, old), ignore_errors=True)
    torch.distributed.barrier()


def save_rng_state(state_dir, rank):
    """This rank's torch (and CUDA) RNG state as safetensors: a format that holds tensors only, never code."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    safetensors.torch.save_file(tensors, os.path.join(state_dir, f"rng_rank{rank}.safetensors"))


def load_train_state(engine, resume_dir, metrics_path=None):
    """Restore the state save_train_state wrote last and return its step; metrics rows after it are dropped.
    DeepSpeed's own loader unpickles its files, so a resume folder must be trusted like any pickle."""
    with open(os.path.join(resume_dir, "latest")) as f:
        state_dir = os.path.join(resume_dir, f.read().strip())
    engine.load_checkpoint(state_dir, tag="ds")
    with open(os.path.join(state_dir, "trainer_state.json")) as f:
        step = json.load(f)["step"]
    load_rng_state(state_dir, torch.distributed.get_rank())
    if metrics_path and utils.is_rank0():  # rows logged after the state are redone
        truncate_torn_jsonl(metrics_path, lambda r: r.get("step", 0) <= step)
    torch.distributed.barrier()
    return step


def load_rng_state(state_dir, rank):
    """Restore what save_rng_state wrote. An older version's rng_rank<r>.pt (a pickle) is read with
    torch.load(weights_only=True), which refuses anything but tensors and plain containers: no code runs."""
    path = os.path.join(state_dir, f"rng_rank{rank}.safetensors")
    if os.path.exists(path):
        rng = safetensors.torch.load_file(path)
    else:
        path = os.path.join(state_dir, f"rng_rank{rank}.pt")
        try:
            rng = torch.load(path, weights_only=True)
        except Exception as e:  # UnpicklingError for a pickle that would run code
            raise SystemExit(f"--resume: {path} is not a plain RNG state ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); refusing to load it") from None
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def truncate_torn_jsonl(path, keep=None):
    """Rewrite a JSONL log keeping the rows keep(row) accepts. A last line that is not valid JSON is the torn tail of
    a write that a kill interrupted: it is dropped, and said so. A bad line before the last is an error (file:line)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):
                utils.print0(f"[resume] {path}:{lineno}: dropped a torn last line (a write cut short by the crash): "
                       f"{line[:60]!r}")
                continue
            raise SystemExit(f"--resume: {path}:{lineno}: not valid JSON; the log is damaged (only its last line "
                             "may be torn). Repair or remove that line") from None
        if keep is None or keep(row):
            rows.append(row)
    write_jsonl(path, rows)


def fingerprint(path):
    """sha256 of a local data file (or of every file under a local dataset folder), None for a hub id: kept in a run's
    config so that --resume refuses a data file edited in place."""
    if not path or not os.path.exists(path):
        return None
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for f in files:
        h.update(os.path.relpath(f, path).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".tiktoken", ".py")


def model_fingerprint(path):
    """A local model folder's top-level model files (weights, config, tokenizer) by name, size and modification time,
    None for a hub id: --resume refuses a model saved anew in place. Hashing the weights' contents would take minutes
    for a large model; subfolders and logs (a finished run's resume/, metrics.jsonl) are not the model."""
    if not path or not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not name.startswith(".") and name.endswith(MODEL_FILE_SUFFIXES) and os.path.isfile(full):
            st = os.stat(full)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "files:" + h.hexdigest()


# Flags that never change a training result, so --resume accepts new values; every other flag must match the run.
RESUME_MAY_CHANGE = ("resume", "out", "save_steps", "local_rank", "zero_stage", "ds_config", "gradient_checkpointing")


def check_resume(config_path, args, world_size, ds_config, may_change=(), fingerprints=None, added_flags=None):
    """--resume: refuse a flag that differs from the saved run's (but RESUME_MAY_CHANGE and may_change), a data file
    whose fingerprint changed, and a DeepSpeed config that differs once filled. Returns the saved config.
    added_flags: {flag: value} for flags newer than the saved run, compared with the value that run used."""
    if not os.path.exists(config_path):
        raise SystemExit(f"--resume: {config_path} is missing; the run cannot be checked, so it is not resumed")
    with open(config_path) as f:
        saved = json.load(f)
    where = os.path.dirname(config_path)
    free = set(RESUME_MAY_CHANGE) | set(may_change)
    listed = ", ".join("--" + k.replace("_", "-") for k in sorted(free - {"resume", "local_rank", "out"}))
    for key, value in sorted(vars(args).items()):
        old = saved["args"].get(key, (added_flags or {}).get(key, "(not recorded)"))
        if key not in free and old != value:
            raise SystemExit(f"--resume: --{key.replace('_', '-')} is {value!r} but the run in {where} used {old!r}; "
                             f"only {listed} may change on resume. Use the run's flags, or start a new run with "
                             "another --out")
    if fingerprints and "data_fingerprints" not in saved:  # a run started by an older version kept none
        utils.print0(f"[resume] {config_path} holds no data fingerprints (an older version wrote it): the data files "
               "cannot be checked for changes")
        fingerprints = {}
    for key, value in (fingerprints or {}).items():
        if key in saved["data_fingerprints"] and saved["data_fingerprints"][key] != value:  # (older runs: no models)
            what = ("a model file's size or modification time differs: it was saved anew" if str(value).startswith(
                "files:") else "its sha256 differs; resuming would mix two data sets")
            raise SystemExit(f"--resume: --{key.replace('_', '-')} {getattr(args, key)} changed since the run in "
                             f"{where} started ({what}). Restore it, or start a new run with another --out")
    stage = saved["ds_config"].get("zero_optimization", {}).get("stage")
    if saved["world_size"] != world_size or stage != ds_config.get("zero_optimization", {}).get("stage"):
        raise SystemExit(f"--resume: the saved state is ZeRO stage {stage} on {saved['world_size']} processes; "
                         f"resume with {saved['world_size']} processes and --zero-stage {stage}")
    now = json.loads(json.dumps(ds_config, default=str))
    if now != saved["ds_config"]:
        diff = sorted(k for k in set(now) | set(saved["ds_config"]) if now.get(k) != saved["ds_config"].get(k))
        raise SystemExit(f"--resume: the DeepSpeed config differs from the run's in {where} (keys {diff}); "
                         "use the run's --ds-config")
    return saved


def last_good_state(out):
    """What to do after a non-finite loss, true for this --out (the advice of every training stage)."""
    latest = os.path.join(out, "resume", "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            state = os.path.join(out, "resume", f.read().strip())
        return (f"The last good state is {state}; --resume continues from it only with the same flags (it refuses a "
                "changed --lr or data), so to change them start a new run with another --out.")
    return ("No resume state was saved before this step; change --lr or the data and start again (the same --out "
            "is accepted: it holds no state to resume).")


# ---------------------------------------------------------------------------------------------------
# Output folders: a stage writes only into a folder it owns, never into (or around) its inputs
# ---------------------------------------------------------------------------------------------------


OWNER_FILE = ".written_by"
LEFTOVER = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")  # atomic_path's temporary and backup names


def folder_owner(out):
    """The stage named in out/.written_by, or None."""
    owner = read_json_or_none(os.path.join(out, OWNER_FILE))
    return owner.get("stage") if isinstance(owner, dict) else None


def write_owner(out, stage):
    """Mark a folder as written by this stage (see claim_out_dir)."""
    write_json(os.path.join(out, OWNER_FILE), {"stage": stage})


def claim_out_dir(out, stage, inputs=(), legacy=None, create=True, resume=None):
    """Refuse an --out this stage may not write; otherwise (create=True, rank 0) create it and mark it as ours.

    Refused: --out equal to, inside or containing an input (inputs: (flag, path) pairs; hub ids and None are ignored);
    a file; a non-empty folder that is not this stage's (.written_by names another stage, or none and the folder lacks
    legacy = (the stage's own config file, keys it must have), as runs of older versions do). resume (a training
    stage's --resume): also refuse a run in --out without --resume, and --resume with no saved state. Read-only on every
    rank with create=False, so call it so before writing anything."""
    if create and not utils.is_rank0():  # rank 0 checks and creates; another rank checking now could see rank 0's
        utils.barrier()                # half-made folder (its .written_by temp file) and refuse it. Every rank ran the
        return                    # read-only check (create=False) before the process group existed.
    real = os.path.realpath(out)
    for flag, path in inputs:
        if not path or not os.path.exists(path):
            continue
        other = os.path.realpath(path)
        how = ("is" if real == other else "is inside" if within(real, other) else
               "contains" if within(other, real) else None)
        if how:
            raise SystemExit(f"--out {out} {how} the input {flag} {path}; a stage never writes into (or replaces) "
                             "its own inputs: choose another --out")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out} is an existing file, not a folder: choose another --out")
    if os.path.isdir(out) and os.listdir(out):
        owner = folder_owner(out)
        config = legacy and owner is None and read_json_or_none(os.path.join(out, legacy[0]))
        if owner != stage and not (isinstance(config, dict) and all(k in config for k in legacy[1])):
            by = f"written by {owner}" if owner else f"not written by {stage}"
            raise SystemExit(f"--out {out} is a non-empty folder {by}; {stage} writes only into a new folder or "
                             "one it wrote itself: choose another --out")
    latest = os.path.join(out, "resume", "latest")
    if resume is False and os.path.exists(latest):
        raise SystemExit(f"{out} already holds a run (resume/latest); pass --resume to continue it "
                         "or choose another --out")
    if resume and not os.path.exists(latest):
        raise SystemExit(f"--resume: {latest} does not exist, so there is nothing to continue; "
                         "drop --resume to start a new run")
    if create:
        os.makedirs(out, exist_ok=True)
        if folder_owner(out) != stage:
            write_owner(out, stage)
        utils.barrier()


def within(path, folder):
    """path is folder or lies inside it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_leftovers(folder, recurse=("resume",)):
    """Rank 0, at start: delete what a crashed save left in a folder this stage owns: atomic_path's '<name>.tmp-<pid>'
    of a process that is gone, save_train_state's resume/.tmp-step-N, and a backup '<name>.old-<pid>' (or an older
    version's 'epoch-N.old' / 'final.old') whose replacement is complete (if the replacement is missing, the backup is
    put back). Returns the removed paths."""
    if not utils.is_rank0() or not os.path.isdir(folder):
        return []

    def dead(name, kind):
        """For atomic_path's '<final>.<kind>-<pid>' of a process that is gone: <final>; else None."""
        m = LEFTOVER.match(name)
        return m["name"] if m is not None and m["kind"] == kind and not pid_alive(int(m["pid"])) else None

    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        backup_of = dead(name, "old") or (name[: -len(".old")] if re.fullmatch(r"(epoch-\d+|final)\.old", name)
                                          else None)
        if dead(name, "tmp"):
            removed.append(path)
        elif backup_of and os.path.isdir(path):
            if os.path.isdir(os.path.join(folder, backup_of)):
                removed.append(path)
            else:
                os.replace(path, os.path.join(folder, backup_of))
        elif name in recurse and os.path.isdir(path):
            removed += [os.path.join(path, sub) for sub in sorted(os.listdir(path))
                        if re.fullmatch(r"\.tmp-step-\d+", sub) or dead(sub, "tmp")]
    for path in removed:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    for path in removed:
        utils.print0(f"[start] removed {path}, left by a crash while saving")
    return removed

