"""TEST ONLY: crash injection for the resume and non-finite-loss tests; no product file knows about it.

The tests run a stage with BSR_FAULT='<point>@<step>' and this folder first on PYTHONPATH (conftest.fault_env), so
Python imports this file at start-up, in every process of the run. It patches `utils` when a stage imports it:
  after_step@N      SIGKILL (a real, abrupt crash) right after the metrics row of optimizer step N is appended
  nan@N             every training forward of step N returns NaN (so the loss is NaN and the stage must stop)
  in_resume_save@N  SIGKILL inside checkpoint.save_train_state of step N: the state is written, not yet renamed
"""

import importlib.util
import os
import signal
import sys

POINT, _, STEP = os.environ.get("BSR_FAULT", "").partition("@")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def crash():
    os.kill(os.getpid(), signal.SIGKILL)


def patch_utils(utils):
    step = int(STEP)
    if POINT == "after_step":
        append_jsonl = utils.append_jsonl

        def append_then_crash(path, rows):
            append_jsonl(path, rows)
            if any(r.get("step") == step and any(k.startswith("train/") for k in r) for r in rows):
                crash()

        utils.append_jsonl = append_then_crash
    elif POINT == "nan":  # DeepSpeed is imported by init_distributed, not before (it logs on import)
        init_distributed = utils.init_distributed

        def init_then_poison_forward(*args, **kwargs):
            out = init_distributed(*args, **kwargs)
            from deepspeed.runtime.engine import DeepSpeedEngine

            forward = DeepSpeedEngine.forward

            def poisoned(self, *a, **kw):  # global_steps counts finished optimizer steps (restored on resume)
                result = forward(self, *a, **kw)
                if self.module.training and self.global_steps + 1 == step:
                    if isinstance(result, tuple):
                        return (result[0] * float("nan"),) + tuple(result[1:])
                    result.logits = result.logits * float("nan")
                return result

            DeepSpeedEngine.forward = poisoned
            return out

        utils.init_distributed = init_then_poison_forward


def patch_checkpoint(checkpoint):
    if POINT != "in_resume_save":
        return
    write_json = checkpoint.write_json

    def write_then_crash(path, obj):  # save_train_state's last write before the rename
        write_json(path, obj)
        if path.endswith("trainer_state.json") and obj.get("step") == int(STEP):
            crash()

    checkpoint.write_json = write_then_crash


class PatchOnImport:
    """A meta-path finder that lets `utils` / `checkpoint` load as usual, then patches them."""

    patches = {"utils": patch_utils, "checkpoint": patch_checkpoint}

    def find_spec(self, name, path=None, target=None):
        if name not in self.patches:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or not spec.origin or os.path.dirname(spec.origin) != REPO:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            self.patches[name](module)

        spec.loader.exec_module = exec_and_patch
        return spec


if POINT:
    sys.meta_path.insert(0, PatchOnImport())
