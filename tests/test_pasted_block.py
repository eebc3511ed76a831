"""The BSR block of train_rm.py, pasted alone into a folder outside the repo, as a user would: eq. 25 exactly.

2 processes (gloo) x 2 accumulation steps, each rank with its quarter of the global batch per micro-step, must give
the loss and the gradient of eq. 24-25 on the whole batch computed by plain autograd in 1 process, and the hidden-state
gradient of eq. 26-28 with the batch-mean reward. Centring each micro-batch (preference_loss alone in a loop) must not.
"""

import ast
import json
import os
import subprocess
import sys

import torch

from conftest import REPO, free_port

BEGIN, END = "# ==== BSR: paste from here", "# ==== BSR: to here"

# The user's side: a tiny deterministic reward model r = Wp^T tanh(A x + b) (bias-free head), a global batch of
# 8 pairs = 2 pairs per micro-batch x 2 ranks x 2 accumulation steps; summed gradients, averaged over ranks (DDP).
WORKER = r'''
import json, os, sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
assert not any(os.path.isfile(os.path.join(p or ".", "train_rm.py")) for p in sys.path), sys.path
from bsr_block import global_batch_losses, preference_loss  # the pasted block, and nothing else

LAM, N_PAIRS, MICRO, WORLD = 0.5, 8, 2, 2
mode = sys.argv[1]
gen = torch.Generator().manual_seed(0)
backbone, head = torch.nn.Linear(5, 4), torch.nn.Linear(4, 1, bias=False)
with torch.no_grad():
    for p in [*backbone.parameters(), *head.parameters()]:
        p.copy_(torch.randn(p.shape, generator=gen))
# pair i's mean reward drifts with i, so each micro-batch has its own mean, unlike the whole batch
x = torch.randn(N_PAIRS, 2, 5, generator=gen) + 0.4 * torch.arange(N_PAIRS)[:, None, None]
params = {"A": backbone.weight, "b": backbone.bias, "Wp": head.weight}
hidden_grads = {}  # pair index -> (h_chosen, h_rejected) of the forward with grad


def reward_fn(idx):
    h = torch.tanh(backbone(x[idx]))  # [pairs, 2, 4]
    if torch.is_grad_enabled():
        h.retain_grad()
        hidden_grads.update({i: (h, k) for k, i in enumerate(idx)})
    r = head(h).squeeze(-1)
    return r[:, 0], r[:, 1]


def grads(world=1):
    out = {}
    for name, p in params.items():
        g = p.grad.clone()
        if world > 1:  # what DDP / DeepSpeed do: average over ranks
            dist.all_reduce(g)
            g /= world
        out[name] = g.tolist()
    return out


def hidden(world=1):  # all_gather's backward sums the ranks' copies of the loss: divide by the world size
    mine = {i: (h.grad[k] / world).tolist() for i, (h, k) in hidden_grads.items()}
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {int(i): v for part in parts for i, v in part.items()}
    return [mine[i] for i in range(N_PAIRS)]


def zero():
    for p in params.values():
        p.grad = None
    hidden_grads.clear()


def run_block(micro_batches, world=1):
    losses = []
    for loss, weight, bt, rc, rr in global_batch_losses(reward_fn, micro_batches, "bsr", lam=LAM):
        (loss * weight / len(micro_batches)).backward()
        losses.append([loss.item(), bt.item(), len(rc)])
    return {"losses": losses, "grads": grads(world), "hidden": hidden(world)}


if mode == "ref":  # eq. 24-25 on the whole batch, plain autograd, no block
    h = torch.tanh(backbone(x))
    h.retain_grad()
    r = head(h).squeeze(-1)
    rc, rr = r[:, 0], r[:, 1]
    loss = -F.logsigmoid(rc - rr).mean() + LAM * ((rc.sum() + rr.sum()) / (2 * N_PAIRS)) ** 2
    loss.backward()
    out = {"loss": loss.item(), "bt": (-F.logsigmoid(rc - rr).mean()).item(), "grads": grads(),
           "hidden": h.grad.tolist(), "rc": rc.tolist(), "rr": rr.tolist(), "Wp": head.weight[0].tolist()}
    zero()  # the block in one process, 4 accumulation steps of 2 pairs
    out["one_process"] = run_block([[0, 1], [2, 3], [4, 5], [6, 7]])
else:
    rank = int(mode)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=WORLD)
    # micro-step g covers pairs 4g..4g+3: rank 0 the first two, rank 1 the next two
    mine = [[4 * g + 2 * rank, 4 * g + 2 * rank + 1] for g in range(2)]
    out = {"block": run_block(mine, WORLD)}
    zero()  # what pasting preference_loss alone gives: each micro-batch centred on its own mean
    for idx in mine:
        loss, _ = preference_loss(*reward_fn(idx), "bsr", lam=LAM)
        (loss / len(mine)).backward()
    out["per_micro"] = {"grads": grads(WORLD), "hidden": hidden(WORLD)}
    dist.destroy_process_group()
with open(f"out_{mode}.json", "w") as f:
    json.dump(out, f)
'''


def pasted_block():
    lines = open(os.path.join(REPO, "train_rm.py")).read().splitlines(keepends=True)
    begin = [i for i, line in enumerate(lines) if line.startswith(BEGIN)]
    end = [i for i, line in enumerate(lines) if line.startswith(END)]
    assert len(begin) == 1 and len(end) == 1 and begin[0] < end[0], "train_rm.py must mark the block exactly once"
    return "".join(lines[begin[0]: end[0] + 1]), "".join(lines[: begin[0]] + lines[end[0] + 1:])


def test_block_is_torch_only_and_the_trainer_has_no_second_copy():
    block, rest = pasted_block()
    tree = ast.parse(block)
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    modules += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert modules and all(m == "torch" or m.startswith("torch.") for m in modules), modules
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"preference_loss", "all_gather_cat", "global_batch_losses"} <= defined
    # train_rm.py computes its loss through the block only: no other call of the loss or the gather
    assert "global_batch_losses(" in rest
    assert "preference_loss(" not in rest and "all_gather_cat(" not in rest


def test_pasted_block_on_two_processes_with_accumulation_is_eq25_on_the_whole_batch(tmp_path):
    block, _ = pasted_block()
    (tmp_path / "bsr_block.py").write_text(block)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-E", "worker.py", mode, port], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for mode in ("0", "1", "ref")]
    for p in procs:
        output = p.communicate(timeout=120)[0]
        assert p.returncode == 0, output
    ref = json.loads((tmp_path / "out_ref.json").read_text())
    ranks = [json.loads((tmp_path / f"out_{r}.json").read_text()) for r in (0, 1)]
    t = torch.as_tensor

    def close(a, b):
        torch.testing.assert_close(t(a), t(b), rtol=0, atol=1e-6)

    for run in (ranks[0]["block"], ranks[1]["block"], ref["one_process"]):
        for name in ("A", "b", "Wp"):  # the summed, rank-averaged gradient is d(eq. 24-25)/d(params)
            close(run["grads"][name], ref["grads"][name])
        close(run["hidden"], ref["hidden"])
        # every micro-step's loss is the whole batch's (the pre-pass supplies the other rewards of B)
        for loss, bt, n_rewards in run["losses"]:
            close(loss, ref["loss"])
            close(bt, ref["bt"])
            assert n_rewards == 8
    assert ranks[0]["block"]["grads"] == ranks[1]["block"]["grads"]

    # eq. 26-28 on h(x_i, y_ij): (-/+ s(-dr_i) + lam * mean reward of B) / |B| * Wp, the same BSR pull on every item
    rc, rr, wp = t(ref["rc"]), t(ref["rr"]), t(ref["Wp"])
    rbar, bt_coef = torch.cat([rc, rr]).mean(), torch.sigmoid(-(rc - rr))
    expected = torch.stack([(-bt_coef + 0.5 * rbar) / 8, (bt_coef + 0.5 * rbar) / 8], dim=1)[..., None] * wp
    close(ranks[0]["block"]["hidden"], expected)

    # centring each micro-batch on its own mean (the official code's form) is another gradient: this test would fail
    per_micro = ranks[0]["per_micro"]
    assert (t(per_micro["grads"]["A"]) - t(ref["grads"]["A"])).abs().max() > 1e-3
    assert (t(per_micro["hidden"]) - expected).abs().max() > 1e-3
