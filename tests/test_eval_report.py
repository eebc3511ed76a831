"""eval_rm.py's report and plots as a reader meets them: settings, differences, caveats, labels, figures 1 and 5,
and the truncation message."""

import json
import os
import types

import numpy as np
import pytest
import torch

import eval_rm
from conftest import write_pairs
from report import (figure5, load_rloo, model_label, moving_average, reward_vs_kl_trend, rloo_report, run_settings,
                    seed_groups, wp_norm_figure, write_report_md, write_rloo_summary)


# ------------------------------------------------------------------------------------------ Figure 5: trend


def test_moving_average_by_hand():
    assert moving_average([0, 3, 0, 3], 3).tolist() == [1.5, 1.0, 2.0, 1.5]
    assert moving_average([1, 2, 3, 4, 5], 1).tolist() == [1, 2, 3, 4, 5]


def _rloo_rows(n=40):
    # KL zigzags from step to step (as a real run's does) around a rising trend
    return [{"step": s, "train/kl": 0.1 * s + (0.5 if s % 2 else -0.5), "train/proxy_reward": 0.05 * s,
             "train/response_length": 10.0} for s in range(1, n + 1)]


def test_reward_vs_kl_trend_is_the_moving_average_and_does_not_zigzag():
    rows = _rloo_rows()
    kl, reward = reward_vs_kl_trend(rows)
    window = 9  # 40 steps // 5 = 8 -> odd 9
    np.testing.assert_allclose(kl, moving_average([r["train/kl"] for r in rows], window))
    np.testing.assert_allclose(reward, moving_average([r["train/proxy_reward"] for r in rows], window))

    def path_length(x):  # how far the line travels along the KL axis
        return float(np.abs(np.diff(x)).sum())

    raw = [r["train/kl"] for r in rows]
    assert path_length(kl) < 0.3 * path_length(raw)  # the step-order line zigzagged 1.0 per step; the trend does not
    assert len(reward_vs_kl_trend(rows[:4])[0]) == 4  # a short run is still smoothed (window 3)


def test_both_figure5_plots_are_written(tmp_path):
    import rloo

    rows = _rloo_rows() + [{"step": 0, "gold/reward": 0.1, "gold/reward_sem": 0.01, "gold/response_length": 9.0}]
    rloo.make_plots(str(tmp_path), rows, "RM bsr/seed1")
    assert os.path.getsize(tmp_path / "plots" / "fig5_rloo.png") > 10000
    folder = tmp_path / "pi"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"reward_model": "rm", "steps": 40}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert figure5(str(tmp_path), load_rloo([f"pi={folder}"])) == ["fig5_rloo.png"]
    assert os.path.getsize(tmp_path / "fig5_rloo.png") > 10000


# ------------------------------------------------------------------------------------------ Figure 1


@pytest.mark.parametrize("n_models", [1, 2, 6])
def test_fig1_title_fits_and_bar_values_clear_the_dashed_line(n_models):
    import matplotlib

    matplotlib.use("Agg")
    labels = [f"bsr_lam1e-3/seed{i}" for i in range(n_models)]
    values = [1.0 + 0.01 * i for i in range(n_models)]  # trained norms sit near the initialisation's 1
    fig = wp_norm_figure(labels, values, ["C0"] * n_models)
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    title = ax.title.get_window_extent(renderer)
    assert title.x0 >= 0 and title.x1 <= fig.bbox.x1 and title.y1 <= fig.bbox.y1
    line_y = ax.transData.transform((0, 1.0))[1]
    value_texts = [t for t in ax.texts if t.get_text()]
    assert [t.get_text() for t in value_texts] == [f"{v:.3f}" for v in values]
    for t in value_texts:
        box = t.get_window_extent(renderer)
        assert not box.y0 - 2 <= line_y <= box.y1 + 2, t.get_text()


# ------------------------------------------------------------------------------------------ the truncation message


def test_truncation_message_only_when_a_sequence_was_truncated(tiny_llama, tmp_path, capsys):
    """tiny_llama has 256 positions, fewer than --max-length 2048: only a long response is truncated."""
    args = types.SimpleNamespace(batch_size=8, bf16=False, attn_implementation="sdpa", max_length=2048, no_cache=True,
                                 erank_rows=16, seed=0)
    short = eval_rm.load_pair_set("id", write_pairs(str(tmp_path / "short.jsonl"), 4))
    scores, _ = eval_rm.score_model(tiny_llama, "rm", [short], args, torch.device("cpu"), {}, [])
    assert scores["id"]["n_truncated"] == 0
    assert "truncated" not in capsys.readouterr().out
    with open(tmp_path / "long.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "count", "chosen": "one " * 400, "rejected": "two"}) + "\n")
    long = eval_rm.load_pair_set("id", str(tmp_path / "long.jsonl"))
    scores, _ = eval_rm.score_model(tiny_llama, "rm", [long], args, torch.device("cpu"), {}, [])
    assert scores["id"]["n_truncated"] == 1
    assert "[model] rm/id: 1 sequences truncated at the model's 256 positions (< --max-length 2048)" in \
        capsys.readouterr().out


# ------------------------------------------------------------------------------------------ report.md


def _metrics(acc, norm_mean, norm_std):
    m = {k: 0.5 for k in eval_rm.fixed_keys()}
    m.update({"id/accuracy": acc, "wp_norm": 1.0, "erank/n_rows": 16})
    for n in ("id", "mutual_ood", "train"):
        m.update({f"norms/{n}/mean": norm_mean, f"norms/{n}/std": norm_std})
    return m


def _world(tmp_path, norm_std):
    models = {}
    for loss, acc in (("bt", 0.6), ("bsr", 0.7)):
        folder = tmp_path / "rm" / loss / "seed1"
        folder.mkdir(parents=True)
        (folder / "train_config.json").write_text(json.dumps({"args": {
            "loss": loss, "lam": 1e-3, "lr": 1e-3, "epochs": 2, "global_batch_size": 32, "micro_batch_size": 32,
            "max_length": 256, "seed": 1}, "train_pairs": 2363}))
        models[f"{loss}/seed1"] = {"model": str(folder), **_metrics(acc, 12.95, norm_std)}
    rloo_dir = tmp_path / "rloo" / "bsr"
    rloo_dir.mkdir(parents=True)
    (rloo_dir / "rloo_config.json").write_text(json.dumps({"args": {
        "beta": 0.05, "lr": 3e-4, "epochs": 2, "global_batch_size": 32, "k": 4, "max_new_tokens": 48, "seed": 1},
        "total_steps": 64}))
    final = {"step": 64, "gold_reward": 0.5, "gold_reward_sem": 0.04, "length_tokens": 12.0, "length_chars": 50.0}
    (rloo_dir / "summary.json").write_text(json.dumps({"reward_model": models["bsr/seed1"]["model"], "steps": 64,
                                                         "sft": final, "rloo": final}))
    (rloo_dir / "metrics.jsonl").write_text(json.dumps({"step": 64, "train/kl": 1.0, "train/proxy_reward": 2.0,
                                                        "train/response_length": 9.0}) + "\n")
    report = {"models": models, "gold": {}, "data": {}}
    report["groups"] = seed_groups(models)
    report["rloo"] = rloo_report(load_rloo([f"pi_bsr={rloo_dir}"]),
                                         {label: m["model"] for label, m in models.items()})
    report["settings"] = run_settings(report)
    sets = [types.SimpleNamespace(name=n, sizes=[2], source=f"{n}.jsonl", rows_read=1, responses=[0, 1], skipped={})
            for n in ("id", "mutual_ood", "train")]
    path = tmp_path / "report.md"
    write_report_md(str(path), report, sets, [])
    return report, path.read_text()


def test_report_reads_on_its_own(tmp_path):
    report, md = _world(tmp_path, norm_std=0.004)  # ||h|| = 12.95 ± 0.004: pinned (0.03%)
    # settings read from each run's config file; λ only where the loss has one
    assert "| bt/seed1 | bt | — | 0.001 | 2 | 32 | 32 | 256 | 1 | 2363 |" in md
    assert "| bsr/seed1 | bsr | 0.001 | 0.001 | 2 | 32 | 32 | 256 | 1 | 2363 |" in md
    assert "| pi_bsr | `bsr/seed1` | 0.05 | 0.0003 | 2 | 32 | 4 | 48 | 1 | 64 |" in md
    # the difference column: bsr - bt on the same metric
    assert "| Metric | bt | bsr | bsr − bt |" in md
    assert "| In-Domain (Acc ↑) | 0.6000 | 0.7000 | +0.1000 |" in md
    # the pinned-||h|| caveat, and no table that one seed per method would only copy
    assert "‖h‖ is pinned for bt/seed1, bsr/seed1" in md
    assert "| Method | Seeds |" not in md and "One seed per method" in md
    # the RLOO rows name the reward model by its method label
    assert "pi_bsr (RM bsr/seed1, step 64)" in md and report["rloo"]["pi_bsr"]["reward_model_label"] == "bsr/seed1"


def test_report_without_pinned_norms_has_no_caveat(tmp_path):
    _, md = _world(tmp_path, norm_std=0.5)  # 4% spread
    assert "is pinned" not in md


def test_labels_keep_their_slash_and_only_cache_file_names_replace_it(tmp_path):
    args = types.SimpleNamespace(cache_dir=str(tmp_path), out=str(tmp_path), no_cache=False, train_pairs=0,
                                 train_split="train", rm_bench_split="train", max_length=8, bf16=False,
                                 attn_implementation="sdpa", erank_rows=8, seed=0)
    s = types.SimpleNamespace(name="id", sources=["x.jsonl"])
    paths, _ = eval_rm.cache_plan(str(tmp_path), "bt/seed1", [s], args)
    assert os.path.dirname(paths["id"]) == str(tmp_path) and os.path.basename(paths["id"]).startswith("bt_seed1-id-")
    assert model_label("runs/toy/rm/bt/seed1") == "bt/seed1"
    assert model_label("runs/rm_bsr/epoch-2") == "rm_bsr/epoch-2"
    assert model_label("runs/rm_bsr") == "rm_bsr"


def test_rloo_summary_names_the_reward_model_by_method(tmp_path):
    args = types.SimpleNamespace(policy="runs/toy/sft", reward_model="runs/toy/rm/bsr/seed1", gold="synthetic",
                                 gold_model=None, gold_prompts="p.jsonl", out=str(tmp_path), beta=0.05, k=4)
    gold = {"gold/reward": 0.1, "gold/reward_sem": 0.01, "gold/response_length": 9.0, "gold/response_chars": 30.0,
            "gold/no_eos_fraction": 0.0, "gold/prompts": 8}
    rows = [{"step": 0, **gold}, {"step": 4, **gold}] + _rloo_rows(4)
    write_rloo_summary(str(tmp_path), rows, args, 4)
    md = (tmp_path / "summary.md").read_text()
    assert "+ RLOO (RM `bsr/seed1`, step 4)" in md
