"""The report of eval_rm.py: report.md's tables and the figures, from the metrics in report.json.

A module, not a stage (as toy_world.py): eval_rm.py computes the metrics and calls `write_report`; rloo.py draws its
own run's Figure 5 with `figure5` and writes its summary (Table 3 layout) with `write_rloo_summary`. Only numpy and
the standard library at import; matplotlib is imported inside the plotting functions (it is slow to import, and the
tables need none of it).

    report.md   the paper's layouts: Table 5 (robustness), Figures 1-3 / Table 1 (hidden states), Table 2 (RM-Bench),
                mean ± std over seeds, Table 3 (RLHF with each reward model), the settings of every run
    fig1_wp_norm.png, fig2_hidden_diff_per_epoch.png, fig3_hidden_norms.png, fig5_rloo.png (with --rloo)
"""

import json
import math
import os
import re

import numpy as np


def model_label(path):
    """A short name for a model folder: its last part, or its last two when the last is only a seed or an epoch
    (runs/toy/rm/bt/seed1 -> bt/seed1, runs/rm_bsr/epoch-2 -> rm_bsr/epoch-2), so the name says which method."""
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) > 1 and re.fullmatch(r"seed\d+|epoch-\d+", parts[-1]):
        return "/".join(parts[-2:])
    return parts[-1]


# the evaluation sets of eval_rm.py, as the tables name them
SCENARIOS = ("id", "prompt_ood", "response_ood", "mutual_ood")
TITLES = {"id": "In-Domain", "prompt_ood": "Prompt OOD", "response_ood": "Response OOD", "mutual_ood": "Mutual OOD",
          "train": "Train sample", "rm_bench": "RM-Bench"}
PAIRS = "pairs/"  # set name prefix of --pairs NAME=FILE: keys read pairs/NAME/accuracy, norms/pairs/NAME/...
DOMAINS = ("chat", "math", "code", "safety")  # RM-Bench's domains, in the paper's Table 2 order

# the headline metrics of the seed table and of the differences against BT: (report.json key, column title)
SEED_TABLE = (("id/accuracy", "In-Domain (Acc ↑)"), ("prompt_ood/kendall_tau", "Prompt OOD (τ ↑)"),
              ("response_ood/kendall_tau", "Response OOD (τ ↑)"), ("mutual_ood/kendall_tau", "Mutual OOD (τ ↑)"),
              ("wp_norm", "‖Wp‖"), ("norms/mutual_ood/std", "std ‖h‖ mutual OOD"),
              ("erank/gap/mutual_ood", "erank Δ mutual OOD"), ("length_corr/response_ood", "length corr. resp. OOD"))

# the flags that say how each run was made: (report name, key in the run's *_config.json "args")
RM_SETTINGS = (("loss", "loss"), ("λ", "lam"), ("lr", "lr"), ("epochs", "epochs"),
               ("global batch", "global_batch_size"), ("micro batch", "micro_batch_size"), ("max length", "max_length"),
               ("seed", "seed"))
RLOO_SETTINGS = (("β (KL)", "beta"), ("lr", "lr"), ("epochs", "epochs"), ("global batch", "global_batch_size"),
                 ("k", "k"), ("max new tokens", "max_new_tokens"), ("seed", "seed"))


# ===================================================================================================
# Numbers and cells
# ===================================================================================================


def set_title(name):
    """A set's column title; --pairs sets are "Pairs NAME"."""
    return TITLES.get(name) or f"Pairs {name[len(PAIRS):]}"


def fmt_number(v, digits=4, scale=1.0, sign=""):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{scale * v:{sign}.{digits}f}"


def value_with_ci(m, key, digits=4, ci=False):
    """"value [ci_low, ci_high]" of report.json key `key` (and its _ci_low / _ci_high keys)."""
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return fmt_number(m.get(key), digits) + (f" [{lo:.3f}, {hi:.3f}]" if ci and lo is not None and not math.isnan(lo)
                                             else "")


def plus_minus(value, spread):
    return f"{fmt_number(value)} ± {fmt_number(spread)}"


def mean_pm_std(stat):
    """"mean ± std" of a seed group's {"mean", "std", "n"}; a std over one seed would read as "no spread", so one seed
    shows the value alone."""
    return plus_minus(stat["mean"], stat["std"]) if stat["n"] > 1 else fmt_number(stat["mean"])


def distribution_cell(m, prefix):
    """"mean ± std (skew)" of the norm statistics under `prefix` (e.g. norms/id)."""
    return (f"{fmt_number(m[prefix + '/mean'], 3)} ± {fmt_number(m[prefix + '/std'], 3)} "
            f"({fmt_number(m[prefix + '/skew'], 2)})")


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def fmt_setting(v):
    return "—" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


# ===================================================================================================
# Seed groups, RLOO runs, run settings: the report.json blocks besides the metrics
# ===================================================================================================


def seed_groups(models):
    """{method: {"members": [...], key: {"mean", "std", "n"}}} for labels ending in /seed<N> (or _seed<N>)."""
    groups = {}
    for label in models:
        match = re.match(r"^(.+)[/_]seed\d+$", label)
        if match:
            groups.setdefault(match.group(1), []).append(label)
    out = {}
    for group, members in groups.items():
        out[group] = {"members": members}
        for key, value in models[members[0]].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                vals = np.array([models[m].get(key) for m in members], dtype=float)
                vals = vals[~np.isnan(vals)]
                if len(vals):
                    out[group][key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1
                                       else 0.0, "n": int(len(vals))}
    return out


def split_rloo_rows(rows):
    """rloo.py's metrics.jsonl rows -> {"train": per-step rows, "gold": held-out gold rows}."""
    return {"train": [r for r in rows if "train/kl" in r], "gold": [r for r in rows if "gold/reward" in r]}


def load_rloo(specs):
    """--rloo NAME=DIR -> {name: {"dir", "summary", "train": per-step rows, "gold": gold rows}}."""
    runs = {}
    for spec in specs or []:
        name, _, folder = spec.partition("=")
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        with open(os.path.join(folder, "summary.json")) as f:
            runs[name] = {"dir": folder, "summary": json.load(f), **split_rloo_rows(rows)}
    return runs


def rloo_report(runs, model_paths=None):
    """report.json block: the SFT row and each policy's final row (Table 3), plus its last training step.

    reward_model_label: the RM's label among the evaluated models (e.g. bsr/seed1), so tables name it by method.
    """
    by_path = {os.path.normpath(p): label for label, p in (model_paths or {}).items()}
    out = {}
    for name, run in runs.items():
        s, last = run["summary"], (run["train"] or [{}])[-1]
        rm = s.get("reward_model")
        out[name] = {"dir": run["dir"], "reward_model": rm, "steps": s.get("steps"),
                     "reward_model_label": by_path.get(os.path.normpath(rm)) or model_label(rm) if rm else None,
                     "sft": s.get("sft"), "final": s.get("rloo"), "train/proxy_reward": last.get("train/proxy_reward"),
                     "train/kl": last.get("train/kl"), "train/response_length": last.get("train/response_length")}
    return out


def write_rloo_summary(out, rows, args, total_steps):
    """rloo.py's summary.json and summary.md (Table 3 layout: the SFT and the final policy on the held-out prompts,
    then the first and last training steps) from its metrics rows; args: rloo.py's flags."""
    import checkpoint  # it imports torch: only the functions that need it import it

    gold = {r["step"]: r for r in rows if "gold/reward" in r}
    train = [r for r in rows if "train/kl" in r]
    summary = {"policy": args.policy, "reward_model": args.reward_model, "steps": total_steps,
               "gold": args.gold or args.gold_model, "gold_prompts": args.gold_prompts}
    lines = [f"# RLOO summary: {args.out}", "", f"policy `{args.policy}`, reward model `{args.reward_model}`, "
             f"{total_steps} steps, beta {args.beta}, k {args.k}", ""]
    if gold:
        first, last = gold[min(gold)], gold[max(gold)]
        for name, r in (("sft", first), ("rloo", last)):
            summary[name] = {"step": r["step"], "gold_reward": r["gold/reward"],
                             "gold_reward_sem": r["gold/reward_sem"], "length_tokens": r["gold/response_length"],
                             "length_chars": r["gold/response_chars"], "no_eos_fraction": r["gold/no_eos_fraction"],
                             "prompts": r["gold/prompts"]}
        lines += [f"Held-out prompts ({args.gold_prompts}), one sample each, gold r* = {summary['gold']}:", "",
                  "| policy | gold reward r* (mean ± s.e.) | length (tokens) | length (chars) | no-EOS share |",
                  "|---|---|---|---|---|"]
        for label, r in (("SFT", first), (f"+ RLOO (RM `{model_label(args.reward_model)}`, "
                                           f"step {last['step']})", last)):
            lines.append(f"| {label} | {r['gold/reward']:.4f} ± {r['gold/reward_sem']:.4f} | "
                         f"{r['gold/response_length']:.1f} | {r['gold/response_chars']:.1f} | "
                         f"{r['gold/no_eos_fraction']:.2f} |")
    if train:
        summary["train_first"] = {k: v for k, v in train[0].items() if k.startswith("train/")}
        summary["train_last"] = {k: v for k, v in train[-1].items() if k.startswith("train/")}
        lines += ["", "| training samples | proxy reward | KL | length (tokens) |", "|---|---|---|---|"]
        for label, r in (("first step", train[0]), ("last step", train[-1])):
            lines.append(f"| {label} (step {r['step']}) | {r['train/proxy_reward']:.4f} | {r['train/kl']:.4f} | "
                         f"{r['train/response_length']:.1f} |")
    checkpoint.write_json(os.path.join(out, "summary.json"), summary)
    with checkpoint.atomic_path(os.path.join(out, "summary.md")) as tmp:
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
    return summary


def run_settings(report):
    """{"models": {label: {...}}, "rloo": {name: {...}}}: the training flags read from each run's own config file
    (train_rm.py's train_config.json, rloo.py's rloo_config.json); a model without one (hub RM) is left out."""
    from checkpoint import read_json_or_none as read  # it imports torch: only the functions that need it import it

    out = {"models": {}, "rloo": {}}
    for label, m in report["models"].items():
        cfg = read(os.path.join(m["model"], "train_config.json")) if os.path.isdir(m["model"]) else None
        if cfg:
            out["models"][label] = {key: cfg["args"].get(key) for _, key in RM_SETTINGS}
            out["models"][label]["train_pairs"] = cfg.get("train_pairs")
    for name, r in (report.get("rloo") or {}).items():
        cfg = read(os.path.join(r["dir"], "rloo_config.json"))
        if cfg:
            out["rloo"][name] = {key: cfg["args"].get(key) for _, key in RLOO_SETTINGS}
            out["rloo"][name]["steps"] = cfg.get("total_steps")
    return out


# ===================================================================================================
# report.md
# ===================================================================================================


def settings_section(report):
    """The settings each run was made with, so the report reads on its own."""
    settings, md = report.get("settings") or {}, []
    if settings.get("models"):
        md += ["\n## Settings\n\nReward models (train_rm.py, from each model's train_config.json; λ applies to "
               "bsr and center):\n\n",
               markdown_table(["Model"] + [name for name, _ in RM_SETTINGS] + ["train pairs"],
                              [[label] + [fmt_setting(v.get(key)) if key != "lam" or v.get("loss") in ("bsr", "center")
                                          else "—" for _, key in RM_SETTINGS] + [fmt_setting(v.get("train_pairs"))]
                               for label, v in settings["models"].items()])]
    if settings.get("rloo"):
        rm = {name: r.get("reward_model_label") for name, r in (report.get("rloo") or {}).items()}
        md += ["\nRLOO policies (rloo.py, from each run's rloo_config.json):\n\n",
               markdown_table(["Policy", "Reward model"] + [name for name, _ in RLOO_SETTINGS] + ["steps"],
                              [[name, f"`{rm.get(name)}`"] + [fmt_setting(v.get(key)) for _, key in RLOO_SETTINGS]
                               + [fmt_setting(v.get("steps"))] for name, v in settings["rloo"].items()])]
    return md


def differences_section(report):
    """Each method's mean minus BT's, on the headline metrics (needs a 'bt' seed group and one other)."""
    groups = report.get("groups") or {}
    others = [g for g in groups if g != "bt"]
    if "bt" not in groups or not others:
        return []
    header, lines = ["Metric", "bt"], []
    for g in others:
        header += [g, f"{g} − bt"]
    for key, title in SEED_TABLE:
        bt = (groups["bt"].get(key) or {}).get("mean")
        line = [title, fmt_number(bt)]
        for g in others:
            value = (groups[g].get(key) or {}).get("mean")
            diff = value - bt if value is not None and bt is not None else None
            line += [fmt_number(value), fmt_number(diff, sign="+")]
        lines.append(line)
    seeds = sorted({len(v["members"]) for v in groups.values()})
    over = "one seed each" if seeds == [1] else "means over seeds (" + ", ".join(
        f"{g}: {len(v['members'])}" for g, v in groups.items()) + ")"
    return [f"\n## Each method against BT ({over}; difference = method − BT)\n\n", markdown_table(header, lines)]


def pinned_norms(models, names, threshold=1e-3):
    """{label: largest std/mean of ||h|| over the sets} for models whose ||h|| is pinned (below threshold)."""
    out = {}
    for label, m in models.items():
        rel = [m[f"norms/{n}/std"] / m[f"norms/{n}/mean"] for n in names
               if m.get(f"norms/{n}/mean") and m.get(f"norms/{n}/std") is not None]
        if rel and max(rel) < threshold:
            out[label] = max(rel)
    return out


def pinned_note(pinned):
    if not pinned:
        return []
    worst = max(pinned.values())
    return [f"\nNote: ‖h‖ is pinned for {', '.join(pinned)}: its relative spread (std / mean) is at most "
            f"{100 * worst:.2g}% in every set (below 0.1%), so differences between models in its std are tiny in "
            "absolute terms; fig3's x-axes are zoomed to the data and make them look large.\n"]


def robustness_section(models, names):
    """Paper Table 5: in-domain accuracy and Kendall's tau per OOD scenario, then pair accuracy."""
    if not set(SCENARIOS) & set(names):
        return []
    ood, rows = SCENARIOS[1:], [[label] for label in models]
    return ["\n## Robustness (paper Table 5 layout; 95% bootstrap intervals over prompts)\n\n",
            markdown_table(["Model", "In-Domain (Accuracy ↑)"] + [f"{TITLES[s]} (Kendall's τ ↑)" for s in ood],
                           [row + [value_with_ci(m, "id/accuracy", ci=True)]
                            + [value_with_ci(m, f"{s}/kendall_tau", ci=True) for s in ood]
                            for row, m in zip(rows, models.values())]),
            "\nPair accuracy over every response pair with different gold scores (a reward tie is wrong):\n\n",
            markdown_table(["Model", "Train sample"] + [TITLES[s] for s in ood],
                           [row + [value_with_ci(m, "train/accuracy")]
                            + [value_with_ci(m, f"{s}/pair_accuracy", ci=True) for s in ood]
                            for row, m in zip(rows, models.values())])]


def pairs_section(report, pair_sets):
    """--pairs sets: accuracy, norms and length bias against the data's own."""
    if not pair_sets:
        return []
    return ["\n## Preference test sets (--pairs; 95% bootstrap intervals over prompts)\n\n"
            "Accuracy = share of pairs with r(chosen) > r(rejected) (a tie is wrong). Longer preferred = share of "
            "pairs, among those whose responses differ in length, where the longer response gets the higher reward; "
            "the data's own share (chosen is the longer) is the reference.\n\n",
            markdown_table(["Model", "Set", "Pairs", "Accuracy ↑", "‖h‖ mean ± std (skew)",
                            "‖h_w − h_l‖ mean ± std (skew)", "Length corr.",
                            "Longer preferred (data: chosen longer)"],
                           [[label, n[len(PAIRS):], fmt_number(m[f"{n}/n_pairs"], 0),
                             value_with_ci(m, f"{n}/accuracy", ci=True), distribution_cell(m, f"norms/{n}"),
                             distribution_cell(m, f"diff_norms/{n}"), fmt_number(m[f"length_corr/{n}"], 3),
                             f"{fmt_number(m[f'{n}/longer_preferred'], 3)} "
                             f"({fmt_number(report['gold'].get(f'{n}/chosen_longer'), 3)})"]
                            for label, m in report["models"].items() for n in pair_sets])]


def hidden_states_section(report, names):
    """Paper Figures 1-3 and Table 1 as tables: ||h||, ||h_w - h_l||, effective rank; then the length bias."""
    models = report["models"]
    evals = [n for n in names if n != "train" and not n.startswith(PAIRS)]

    def rows(cells):  # one row per model
        return [[label] + cells(m) for label, m in models.items()]

    n_rows = next(iter(models.values()))["erank/n_rows"]
    return ["\n## Hidden states (paper Figures 1-3, Table 1)\n\n||h(x, y)||, mean ± std (skew):\n\n",
            markdown_table(["Model", "‖Wp‖"] + [set_title(n) for n in names],
                           rows(lambda m: [fmt_number(m["wp_norm"], 3)]
                                + [distribution_cell(m, f"norms/{n}") for n in names])),
            *pinned_note(pinned_norms(models, names)),
            "\n||h(x, y_w) - h(x, y_l)|| over preference pairs, mean ± std (skew):\n\n",
            markdown_table(["Model"] + [set_title(n) for n in names],
                           rows(lambda m: [distribution_cell(m, f"diff_norms/{n}") for n in names])),
            f"\nEffective rank (eq. 32; rows not mean-centred; {n_rows} rows per set), Δ = erank_eval - erank_train:"
            "\n\n", markdown_table(["Model", "erank train"] + [f"{TITLES[n]} (Δ ↓)" for n in evals],
                                   rows(lambda m: [fmt_number(m["erank/train"], 2)] + [
                                       f"{fmt_number(m[f'erank/{n}'], 2)} "
                                       f"({fmt_number(m[f'erank/gap/{n}'], 2, sign='+')})" for n in evals])),
            "\n## Length bias: Spearman correlation of reward with response length in characters\n\n",
            markdown_table(["Model"] + [set_title(n) for n in names],
                           rows(lambda m: [fmt_number(m[f"length_corr/{n}"], 3) for n in names])
                           + [["gold r* (reference)"]
                              + [fmt_number(report["gold"].get(f"length_corr/{n}"), 3) for n in names]])]


def rm_bench_section(models):
    """Paper Table 2: RM-Bench accuracy per domain and difficulty, and the 3x3 style matrix."""
    styles = ("concise", "detailed", "markdown")
    cols = DOMAINS + ("hard", "normal", "easy", "overall")
    matrix = {k: np.mean([m[f"rm_bench/matrix/{d}"] for d in DOMAINS if m.get(f"rm_bench/matrix/{d}")], axis=0)
              for k, m in models.items()}
    return ["\n## RM-Bench (paper Table 2 layout, accuracy %)\n\n",
            markdown_table(["Model", "Chat", "Math", "Code", "Safety", "Hard Acc", "Normal Acc", "Easy Acc", "Overall"],
                           [[label] + [fmt_number(m[f"rm_bench/{c}"], 1, 100) for c in cols]
                            for label, m in models.items()]),
            "\n3x3 accuracy matrix (%), mean over domains; row = chosen style, column = rejected style "
            "(hard = above the diagonal, easy = below):\n\n",
            markdown_table(["Model", "chosen \\ rejected"] + list(styles),
                           [[k if i == 0 else "", style] + [fmt_number(v, 1, 100) for v in matrix[k][i]] for k in models
                            for i, style in enumerate(styles)])]


def seeds_section(groups):
    """Mean ± std over seeds per method (labels "<method>/seed<N>")."""
    if groups and all(len(v["members"]) == 1 for v in groups.values()):
        return ["\n## Mean ± std over seeds\n\nOne seed per method: nothing to average (the rows above are the "
                "methods; SEEDS=\"1 2 3\" bash run_all.sh gives the spread over seeds).\n"]
    if not groups:
        return []
    return ["\n## Mean ± std over seeds\n\n",
            markdown_table(["Method", "Seeds"] + [title for _, title in SEED_TABLE],
                           [[g, str(len(v["members"]))] + [mean_pm_std(v[k]) if k in v else "n/a"
                                                           for k, _ in SEED_TABLE] for g, v in groups.items()])]


def rloo_section(runs):
    """Paper Table 3: gold reward and length of the SFT policy and of each RLOO policy, with its last training step."""
    if not runs:
        return []
    sft = next((r["sft"] for r in runs.values() if r.get("sft")), None)
    lines = [["SFT (step 0)", plus_minus(sft["gold_reward"], sft["gold_reward_sem"]),
              fmt_number(sft["length_tokens"], 1), fmt_number(sft["length_chars"], 1), "", "", ""]] if sft else []
    for name, r in runs.items():
        fin = r.get("final") or {}
        lines.append([f"{name} (RM {r.get('reward_model_label') or r['reward_model']}, step {fin.get('step')})",
                      plus_minus(fin.get("gold_reward"), fin.get("gold_reward_sem")),
                      fmt_number(fin.get("length_tokens"), 1), fmt_number(fin.get("length_chars"), 1),
                      fmt_number(r["train/proxy_reward"]), fmt_number(r["train/kl"]),
                      fmt_number(r["train/response_length"], 1)])
    return ["\n## RLHF with each reward model (paper Table 3 layout; held-out prompts, gold r*, mean ± s.e.)\n\n",
            markdown_table(["Policy", "Gold reward r*", "Length (tokens)", "Length (chars)", "Proxy reward (last step)",
                            "KL (last step)", "Train length (last step)"], lines)]


def write_report_md(path, report, sets, figures):
    """report.md: every section above, in order, then the data read and the figures."""
    models, names = report["models"], [s.name for s in sets if s.sizes]
    md = ["# Reward model evaluation\n\n",
          markdown_table(["Model", "Path"], [[label, f"`{m['model']}`"] for label, m in models.items()])]
    md += settings_section(report) + differences_section(report) + robustness_section(models, names)
    md += pairs_section(report, [n for n in names if n.startswith(PAIRS)]) + hidden_states_section(report, names)
    md += rm_bench_section(models) if "rm_bench" in names else []
    md += seeds_section(report.get("groups")) + rloo_section(report.get("rloo"))
    md += ["\n## Data\n\n", markdown_table(["Set", "Source", "Rows read", "Prompts", "Responses", "Skipped"],
                                           [[s.name, f"`{s.source}`", s.rows_read, len(s.sizes), len(s.responses),
                                             "; ".join(f"{v} {k}" for k, v in s.skipped.items()) or "0"]
                                            for s in sets])]
    md += ["\n## Plots\n\n"] + [f"![{f}]({f})\n" for f in figures]
    with open(path, "w") as f:
        f.write("".join(md))


def write_report(out, report, sets, scores, rloo_runs):
    """The figures and report.md in `out` (rank 0); returns the figure file names."""
    figures = model_figures(out, report, sets, scores)
    if rloo_runs:
        figures += figure5(out, rloo_runs)
    write_report_md(os.path.join(out, "report.md"), report, sets, figures)
    return figures


# ===================================================================================================
# Figures 1-3: the reward models
# ===================================================================================================


def pyplot():
    """matplotlib.pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metrics_rows(model):
    """train_rm.py's per-epoch rows (metrics.jsonl in the model folder, or its parent for an epoch-N folder)."""
    if not os.path.isdir(model):
        return []
    dirs = [model]
    if os.path.basename(os.path.normpath(model)).startswith("epoch-"):
        dirs.append(os.path.dirname(os.path.abspath(model)))
    for d in dirs:
        path = os.path.join(d, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            return [r for r in rows if "epoch/hidden_diff_norm_mean" in r]
    return []


def save_figure(fig, out, name, figures):
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=120)
    plt.close(fig)
    figures.append(name)


def model_figures(out, report, sets, scores):
    """Figure 1 (||Wp|| per model), Figure 2 (||h_w - h_l|| per epoch), Figure 3 (||h|| per scenario).

    With seed groups (labels "<method>/seed<N>") colours follow the method, Figure 3 pools each method's seeds,
    and legends name methods, so 5 methods x 3 seeds stay readable.
    """
    plt = pyplot()
    models, labels, figures = report["models"], list(report["models"]), []
    method = {m: g for g, v in report.get("groups", {}).items() for m in v["members"]}
    method = {label: method.get(label, label) for label in labels}
    series = list(dict.fromkeys(method[label] for label in labels))  # one colour and legend entry each
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {m: colors[i % len(colors)] for i, m in enumerate(series)}
    save_figure(hidden_norms_figure(sets, scores, labels, method, series, color), out, "fig3_hidden_norms.png",
                figures)
    curves = {label: metrics_rows(models[label]["model"]) for label in labels}
    if any(curves.values()):
        save_figure(hidden_diff_figure(curves, method, color, len(series) > 1, len(labels) > len(series)), out,
                    "fig2_hidden_diff_per_epoch.png", figures)
    save_figure(wp_norm_figure(labels, [models[label]["wp_norm"] for label in labels],
                               [color[method[label]] for label in labels]), out, "fig1_wp_norm.png", figures)
    return figures


def hidden_norms_figure(sets, scores, labels, method, series, color):
    """Figure 3: ||h(x, y)|| distribution per scenario, models (or methods, seeds pooled) overlaid."""
    plt = pyplot()
    names = [s.name for s in sets if s.sizes]
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.6 * nrows), squeeze=False)
    for ax, n in zip(axes.flat, names):
        data = {m: np.concatenate([scores[label][n]["hidden_norm"].numpy() for label in labels
                                   if method[label] == m]) for m in series}
        lo, hi = min(d.min() for d in data.values()), max(d.max() for d in data.values())
        bins = np.linspace(lo - 1e-3 * (abs(lo) + 1), hi + 1e-3 * (abs(hi) + 1), 41)
        for m, d in data.items():
            ax.hist(d, bins=bins, density=True, histtype="stepfilled", alpha=0.25, color=color[m])
            ax.hist(d, bins=bins, density=True, histtype="step", color=color[m],
                    label=f"{m}: {d.mean():.4g} ± {d.std():.3g}")
        xlabel, mid = "||h(x, y)||", (abs(lo) + abs(hi)) / 2
        if mid and (hi - lo) / mid < 0.01:  # a zoomed axis: say how narrow, so small differences do not look large
            xlabel += f" (axis spans only {hi - lo:.3g} = {100 * (hi - lo) / mid:.2g}% of ||h||)"
        ax.set(title=set_title(n), xlabel=xlabel, ylabel="density")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    pooled = " (each method's seeds pooled)" if len(series) < len(labels) else ""
    fig.suptitle(f"Hidden-state norm per scenario (paper Fig. 3){pooled}: legend = mean ± std")
    return fig


def hidden_diff_figure(curves, method, color, wide, several_seeds):
    """Figure 2: ||h_w - h_l|| per epoch from train_rm.py's metrics.jsonl (mean, band = ± std)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5 if wide else 6, 4))
    seen = set()
    for label, rows in curves.items():
        if rows:
            m = method[label]
            e = np.array([r["epoch"] for r in rows])
            mu, sd = (np.array([r[f"epoch/hidden_diff_norm_{k}"] for r in rows]) for k in ("mean", "std"))
            ax.plot(e, mu, "o-", color=color[m], label=None if m in seen else m)
            ax.fill_between(e, mu - sd, mu + sd, color=color[m], alpha=0.08 if several_seeds else 0.2)
            seen.add(m)
    ax.set(xlabel="epoch (0 = before training)", ylabel="||h(x, y_w) - h(x, y_l)||",
           title="Hidden-state difference per epoch (paper Fig. 2): mean, band ± std")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return fig


def wp_norm_figure(labels, values, colors):
    """Figure 1: ||Wp|| per model as bars, the initialisation's E||Wp|| ~ 1 (N(0, 1/(H+1)) init) as a dashed line.

    The values are written inside the bars, at half height: trained norms sit near 1, so a value on top of a bar
    would sit on the dashed line. The figure is wide enough for its title (tight_layout cannot shrink a title).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.75 * len(labels) + 2)), 3.8))
    bars = ax.bar(range(len(labels)), values, color=colors)
    ax.bar_label(bars, labels=[fmt_number(v, 3) for v in values], label_type="center", fontsize=7, color="white",
                 fontweight="bold")
    many = len(labels) > 4  # slanted labels so that "bsr_lam1e-3/seed2" does not overlap its neighbours
    ax.set_xticks(range(len(labels)), labels, rotation=45 if many else 0, ha="right" if many else "center", fontsize=8)
    ax.axhline(1.0, ls="--", color="gray", label="initialisation, E||Wp|| ≈ 1")
    finite = [v for v in values if v is not None and math.isfinite(v)]
    ax.set(ylabel="||Wp||", ylim=(0, max(finite + [1.0]) * 1.4))
    ax.set_title("Reward head norm per model (paper Fig. 1)", fontsize=11)
    ax.legend(loc="upper left", fontsize=8)
    return fig


# ===================================================================================================
# Figure 5: RLOO runs (eval_rm.py --rloo overlays several; rloo.py draws its own)
# ===================================================================================================


def moving_average(values, window):
    """Centred moving average over `window` consecutive values (the smoothed trend of a per-step curve); near the
    ends, the mean of the values that exist in the window."""
    v = np.asarray(values, dtype=float)
    half = max(0, int(window) // 2)
    return np.array([v[max(0, i - half): i + half + 1].mean() for i in range(len(v))])


def reward_vs_kl_trend(rows):
    """Figure 5a-b's trend: (kl, proxy reward) of RLOO's per-step rows, each smoothed over ~1/5 of the steps.

    KL is not monotone in the step, so joining the raw points in step order zigzags across the panel; the figure draws
    the raw points coloured by step and this smoothed path on top.
    """
    kl = [r["train/kl"] for r in rows]
    window = max(3, len(kl) // 5) | 1  # odd, so centred; at least 3 steps, or a short run would not be smoothed
    return moving_average(kl, window), moving_average([r["train/proxy_reward"] for r in rows], window)


def figure5(out, runs, name="fig5_rloo.png"):
    """Figure 5 in out/name: proxy reward vs KL (a-b), gold reward vs step (c-d), and held-out response length, one
    colour per run. runs: {name: {"train": per-step rows, "gold": gold rows}} (split_rloo_rows). Returns [name]."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    cmaps = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
    for i, (run_name, run) in enumerate(runs.items()):
        t, g = run["train"], run["gold"]
        cmap = plt.get_cmap(cmaps[i % len(cmaps)])
        # points coloured by step (light = early), the smoothed trend in the policy's colour: KL is not monotone
        # in the step, so a line through the points in step order would zigzag across the panel
        axes[0].scatter([r["train/kl"] for r in t], [r["train/proxy_reward"] for r in t], c=[r["step"] for r in t],
                        cmap=cmap, vmin=-0.3 * max([r["step"] for r in t] or [1]), s=10, alpha=0.8)
        if t:
            axes[0].plot(*reward_vs_kl_trend(t), color=cmap(0.85), lw=2, label=f"{run_name} (trend)")
        axes[1].errorbar([r["step"] for r in g], [r["gold/reward"] for r in g],
                         yerr=[r.get("gold/reward_sem", 0) for r in g], marker="o", capsize=3, label=run_name)
        axes[2].plot([r["step"] for r in g], [r["gold/response_length"] for r in g], "o-", label=run_name)
    axes[0].set(xlabel="KL(π || π_ref), per sequence", ylabel="proxy reward (each policy's own RM)",
                title="Proxy reward vs KL (paper Fig. 5a-b)\npoints: steps, darker = later; line: moving average")
    axes[0].locator_params(axis="x", nbins=5)  # long tick labels such as -0.075 overlapped at the default count
    axes[1].set(xlabel="RLOO step", ylabel="gold reward r* (held-out prompts)", title="Gold reward (paper Fig. 5c-d)")
    axes[2].set(xlabel="RLOO step", ylabel="response length (tokens)", title="Held-out response length")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run without --gold-prompts leaves the gold panels empty
            ax.legend(fontsize=8)
    figures = []
    save_figure(fig, out, name, figures)
    return figures
