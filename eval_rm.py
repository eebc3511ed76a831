"""Evaluate reward models as the paper does: robustness in four scenarios, hidden-state norm dispersion,
effective rank, RM-Bench, and length bias. Works on train_rm.py checkpoints and on any HF
sequence-classification reward model (hub id or path).

Hong et al., "On the Robustness of Reward Models for Language Model Alignment" (ICML 2025): Sec. 2.2 (the
four scenarios), Figures 1-3 (||Wp||, ||h_w - h_l|| per epoch, ||h|| per scenario), Table 1 (effective
rank, eq. 32), Table 2 (RM-Bench), Table 5 (accuracy / Kendall's tau).

    # one process, CPU or one GPU; one or several models, each scored once and cached in OUT/cache
    python eval_rm.py --model runs/toy/rm/bt/seed1 --model runs/toy/rm/bsr/seed1 --data-dir runs/toy/data \
        --out eval_toy
    # add RM-Bench (native JSON list, JSONL, or a hub id); a third-party RM needs no --data-dir
    python eval_rm.py --model Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 --rm-bench THU-KEG/RM-Bench --out eval_sky
    # RM-Bench's own data folder (chat_filtered.json, ...), and plain preference test sets (any train_rm.py format)
    python eval_rm.py --model runs/toy/rm/bsr/seed1 --rm-bench RM-Bench/data --pairs hh=hh_test.jsonl --out eval_hh
    # several GPUs: sequences are sharded over ranks (each rank holds a full copy of the model)
    deepspeed --num_gpus 8 eval_rm.py --model runs/rm_bt --model runs/rm_bsr --data-dir data --out runs/eval
    torchrun --nproc_per_node 8 eval_rm.py ...same flags...

--out must be a new folder or one eval_rm.py wrote (never a --model, data or --rloo folder, nor inside one).
--out receives report.json (one block of fixed, namespaced keys per model), eval_config.json, cache/ (scores per
model and set), and what report.py writes from report.json: report.md (paper Table 5 / Table 1 / Table 2 layouts;
Table 3 with --rloo), fig1_wp_norm.png, fig2_hidden_diff_per_epoch.png (when a model folder has train_rm.py's
metrics.jsonl), fig3_hidden_norms.png and, with --rloo, fig5_rloo.png.
"""

import argparse
import hashlib
import json
import math
import os
import re
import zlib

import numpy as np
import scipy.stats
import torch

import checkpoint
import utils
from report import (DOMAINS, PAIRS, SCENARIOS, fmt_number, load_rloo, model_label, rloo_report, run_settings,
                    seed_groups, write_report)
from utils import DataError, print0

# SCENARIOS, PAIRS (the --pairs set prefix) and DOMAINS (RM-Bench's) are report.py's, which lays out the tables by them
FILES = {"id": "valid_id.jsonl", "prompt_ood": "valid_prompt_ood.jsonl", "response_ood": "valid_response_ood.jsonl",
         "mutual_ood": "valid_mutual_ood.jsonl", "train": "train.jsonl"}
# RewardBench-style `subset` names RM-Bench items were built from -> RM-Bench domain (prefix match)
SUBSET_DOMAIN = (("alpacaeval", "chat"), ("mt-bench", "chat"), ("llmbar", "chat"), ("hep-", "code"),
                 ("bigcode/humanevalpack", "code"), ("humanevalpack", "code"), ("math", "math"), ("xstest", "safety"),
                 ("refusals", "safety"), ("donotanswer", "safety"), ("do-not-answer", "safety"))
CACHE_VERSION = 3  # 2: hh-rlhf transcripts parsed into turns; 3: special tokens spelled in a text stay text

# ===================================================================================================
# ALGORITHM CORE: the metrics (each checked against scipy or a hand computation in tests/test_eval_rm.py)
# ===================================================================================================


def kendall_tau_b(rewards, gold):
    """Kendall's tau-b of each row of `rewards` against the same row of `gold` (arrays P x k).

    tau_b = (n_concordant - n_discordant) / sqrt((n0 - t_r) (n0 - t_g)), n0 = k(k-1)/2 pairs, t_r / t_g the
    pairs tied in rewards / gold. NaN where undefined (a row whose rewards or gold are all equal), as scipy.
    """
    r, g = np.asarray(rewards, dtype=float), np.asarray(gold, dtype=float)
    i, j = np.triu_indices(r.shape[1], 1)
    dr, dg = np.sign(r[:, i] - r[:, j]), np.sign(g[:, i] - g[:, j])
    denom = np.sqrt((len(i) - (dr == 0).sum(1)) * (len(i) - (dg == 0).sum(1)).astype(float))
    return np.where(denom > 0, (dr * dg).sum(1) / np.where(denom > 0, denom, 1.0), np.nan)


def pair_accuracy_counts(rewards, gold):
    """Per row: (correct, total) over the response pairs whose gold scores differ; a reward tie is wrong."""
    r, g = np.asarray(rewards, dtype=float), np.asarray(gold, dtype=float)
    i, j = np.triu_indices(r.shape[1], 1)
    dr, dg = np.sign(r[:, i] - r[:, j]), np.sign(g[:, i] - g[:, j])
    return ((dr == dg) & (dg != 0)).sum(1), (dg != 0).sum(1)


def bootstrap_ci(values, weights=None, n_boot=1000, seed=0, level=0.95):
    """Percentile bootstrap interval over prompts of sum(values) / sum(weights) (weights=None: the mean)."""
    v = np.asarray(values, dtype=float)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    if len(v) == 0 or n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, n_boot, 256):  # chunks keep the index matrix small for large sets
        idx = rng.integers(0, len(v), size=(min(256, n_boot - start), len(v)))
        stats.append(v[idx].sum(1) / w[idx].sum(1))
    lo, hi = np.percentile(np.concatenate(stats), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def effective_rank(hidden):
    """Paper eq. 32 (Roy & Vetterli 2007): exp of the entropy of the singular values normalised to sum 1.

    As in the paper, the rows are NOT mean-centred: the common offset of the hidden states counts as a direction.
    """
    s = torch.linalg.svdvals(torch.as_tensor(np.asarray(hidden), dtype=torch.float64))
    p = s[s > 0] / s.sum()
    return float(torch.exp(-(p * p.log()).sum())) if len(p) else float("nan")


def rm_bench_scores(score_chosen, score_rejected, domains):
    """RM-Bench accuracies from per-item rewards of 3 chosen and 3 rejected responses (styles: concise,
    detailed plain, detailed markdown), as RM-Bench's own scoring defines them (THU-KEG/RM-Bench README
    "how to compute the accuracy" and scripts/utils.py `compute_accuracy`):
    M[i][j] = mean over the domain's items of 1[r(chosen_i) > r(rejected_j)]; hard = mean of the upper
    triangle (i < j: chosen in a plainer style than rejected), normal = mean of the diagonal, easy = mean of
    the lower triangle; domain accuracy = mean(hard, normal, easy); hard/normal/easy/overall = means over the
    domains present ('safety-refuse' and 'safety-response' are one 'safety' domain, as there).
    """
    wins = (np.asarray(score_chosen)[:, :, None] > np.asarray(score_rejected)[:, None, :]).astype(float)
    domains = np.asarray(domains)
    out, present = {}, [d for d in DOMAINS if (domains == d).any()]
    for d in present:
        m = wins[domains == d].mean(0)
        acc = {"hard": m[np.triu_indices(3, 1)].mean(), "normal": np.diag(m).mean(),
               "easy": m[np.tril_indices(3, -1)].mean()}
        out[d] = float(np.mean(list(acc.values())))
        out.update({f"{d}/{k}": float(v) for k, v in acc.items()})
        out[f"matrix/{d}"] = m.tolist()
    for k in ("hard", "normal", "easy"):
        out[k] = float(np.mean([out[f"{d}/{k}"] for d in present])) if present else float("nan")
    out["overall"] = float(np.mean([out[d] for d in present])) if present else float("nan")
    return out


def norm_summary(x):
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return dict.fromkeys(("mean", "std", "skew", "p5", "p50", "p95"), float("nan"))
    p5, p50, p95 = np.percentile(x, [5, 50, 95])
    skew = float(scipy.stats.skew(x)) if x.std() > 0 else 0.0
    return {"mean": float(x.mean()), "std": float(x.std()), "skew": skew,
            "p5": float(p5), "p50": float(p50), "p95": float(p95)}


def spearman(x, y):
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(x, y)[0])


# ===================================================================================================
# Arguments
# ===================================================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="reward model: train_rm.py output folder, any HF ...ForSequenceClassification (num_labels=1) "
                        "path or hub id; repeat for several models")
    p.add_argument("--name", action="append", default=None,
                   help="label for each --model in the tables and plots (default: the folder name); repeat in order")
    p.add_argument("--data-dir", default=None,
                   help="make_data.py output: valid_id / valid_prompt_ood / valid_response_ood / valid_mutual_ood / "
                        "train .jsonl (a missing file drops that scenario, with a note)")
    p.add_argument("--rm-bench", action="append", default=None,
                   help="RM-Bench in its native format: its data folder (chat_filtered.json, code_filtered.json, "
                        "math_filtered.json, safety-refuse_filtered.json, safety-response_filtered.json), one .json "
                        "list or .jsonl file, or a hub id (THU-KEG/RM-Bench); repeat for several; domain from the "
                        "row's 'domain', the file name, or its 'subset'")
    p.add_argument("--rm-bench-split", default="train", help="split, when --rm-bench is a hub dataset")
    p.add_argument("--pairs", action="append", default=None, metavar="NAME=FILE",
                   help="a preference test set, RewardBench-style: accuracy with a bootstrap interval, ||h|| "
                        "statistics and length bias under pairs/NAME/... keys; FILE is any pair format train_rm.py "
                        "reads (JSONL or JSON list of prompt/chosen/rejected, chosen/rejected conversations, Anthropic "
                        "hh-rlhf transcripts, a hub id); repeat per file, e.g. --pairs hh=hh_test.jsonl")
    p.add_argument("--pairs-split", default="train", help="split, when a --pairs FILE is a hub dataset")
    p.add_argument("--out", required=True, help="output folder for report.json, report.md, plots, cache")
    p.add_argument("--train-file", default=None,
                   help="pairs for erank/train, norms/train and train/accuracy: JSONL or hub id (e.g. "
                        "Skywork/Skywork-Reward-Preference-80K-v0.2 for the paper's Table 1); default DATA/train.jsonl")
    p.add_argument("--train-split", default="train", help="split, when --train-file is a hub dataset")
    p.add_argument("--train-pairs", type=utils.nonneg_int, default=1024,
                   help="train.jsonl pairs sampled (seeded) for erank/train, norms/train and train/accuracy (0 = off)")
    p.add_argument("--erank-rows", type=utils.positive_int, default=2048,
                   help="max hidden states per set for the effective rank; every set uses the same number of rows "
                        "n = min(this, smallest set), because erank grows with the row count while rows < hidden size")
    p.add_argument("--bootstrap", type=utils.nonneg_int, default=1000,
                   help="bootstrap resamples over prompts for the 95%% intervals (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed for the train sample, erank rows and the bootstrap")
    p.add_argument("--batch-size", type=utils.positive_int, default=16, help="sequences per device per forward")
    p.add_argument("--max-length", type=utils.positive_int, default=2048,
                   help="tokens per (prompt, response); longer ones are truncated keeping the end of the response "
                        "(counted in report.json as <set>/n_truncated)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights/activations (default: on with a GPU, off (fp32) on CPU)")
    p.add_argument("--attn-implementation", default="sdpa", help="sdpa | eager | flash_attention_2")
    p.add_argument("--cache-dir", default=None, help="score cache (default: OUT/cache); keyed by model files, data "
                                                      "files and scoring flags")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the score cache")
    p.add_argument("--rloo", action="append", default=None, metavar="NAME=DIR",
                   help="an rloo.py output folder to add to the report (paper Table 3 layout, Figure 5 plots); "
                        "repeat per policy, e.g. --rloo pi_bt=runs/toy/rloo/bt")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher (LOCAL_RANK is used)")
    args = p.parse_args(argv)
    for spec in args.rloo or []:
        name, _, folder = spec.partition("=")
        if not name or not os.path.isfile(os.path.join(folder, "summary.json")):
            p.error(f"--rloo {spec!r}: expected NAME=DIR with DIR/summary.json (an rloo.py output folder)")
    names = []
    for spec in args.pairs or []:
        name, _, source = spec.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not source:
            p.error(f"--pairs {spec!r}: expected NAME=FILE, NAME of letters, digits, '_', '.', '-' "
                    "(it names report keys)")
        if name in names:
            p.error(f"--pairs: the name {name!r} is given twice")
        names.append(name)
    if not args.data_dir and not args.rm_bench and not args.pairs:
        p.error("give --data-dir, --rm-bench and/or --pairs")
    if args.name and len(args.name) != len(args.model):
        p.error(f"{len(args.name)} --name for {len(args.model)} --model")
    return args


# ===================================================================================================
# Data: every set flattened to prompts x responses, with counted skips
# ===================================================================================================


class EvalSet:
    """Responses of prompt p are rows offsets[p]:offsets[p + 1]; pairs are (preferred row, other row)."""

    def __init__(self, name, sources):
        self.name, self.sources = name, list(sources)
        self.source = " + ".join(self.sources)
        self.prompts, self.responses, self.gold, self.group, self.domain, self.sizes = [], [], [], [], [], []
        self.pairs, self.skipped, self.rows_read, self.has_gold = [], {}, 0, True

    def add(self, prompt, responses, gold, group, pairs=None, domain=None):
        base = len(self.responses)
        if pairs is None:  # every pair of responses whose gold scores differ, preferred first
            pairs = [(a, b) if gold[a] > gold[b] else (b, a) for a in range(len(gold))
                     for b in range(a + 1, len(gold)) if gold[a] != gold[b]]
        self.pairs += [(base + a, base + b) for a, b in pairs]
        self.prompts.append(prompt)
        self.responses += responses
        self.gold.append(gold)
        self.group.append(group)
        self.domain.append(domain)
        self.sizes.append(len(responses))

    def skip(self, reason):
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def offsets(self):
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)

    def lengths(self):  # response length in characters (tokenizer-independent, so comparable across models)
        return np.array([sum(len(m["content"]) for m in r) for r in self.responses], dtype=float)


def finite_number(value, where, field):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field '{field}' must be a finite number, got {value!r}")
    return float(value)


def read_rows(source, split):
    """(where, row) from a JSON list file (RM-Bench's native format), a JSONL file or a hub dataset id."""
    try:
        yield from utils.iter_rows(source, split)
    except DataError:
        raise
    except Exception as e:  # hub / dataset loading problems: one clear line, not a deep traceback
        raise DataError(f"{source}: cannot load as a file or hub dataset ({type(e).__name__}: {e})") from None


def load_pair_set(name, path, max_pairs=None, seed=0, split="train"):
    """{prompt, chosen, rejected[, prompt_id, chosen_score, rejected_score]} rows -> EvalSet (chosen preferred)."""
    s, rows = EvalSet(name, [path]), []
    for where, row in read_rows(path, split):
        s.rows_read += 1
        parsed = utils.parse_pair(row, where)
        if parsed[0] == "skip":
            s.skip(parsed[1])
            continue
        scored = row.get("chosen_score") is not None and row.get("rejected_score") is not None
        gold, s.has_gold = [1.0, 0.0], s.has_gold and scored  # [1, 0]: the label alone, no gold scale
        if scored:
            gold = [finite_number(row[f], where, f) for f in ("chosen_score", "rejected_score")]
            if gold[0] == gold[1]:
                s.skip("chosen_score == rejected_score (no preference)")
                continue
        rows.append((parsed, gold, row.get("prompt_id", where)))
    if max_pairs and len(rows) > max_pairs:
        keep = np.random.default_rng(seed).choice(len(rows), max_pairs, replace=False)
        rows = [rows[i] for i in sorted(keep)]
    for (prompt, chosen, rejected), gold, group in rows:
        s.add(prompt, [chosen, rejected], gold, str(group), pairs=[(0, 1)])
    return s


def load_ranked_set(name, path):
    """{prompt, responses: [k], gold_scores: [k][, prompt_id]} rows -> EvalSet. k < 2: counted skip."""
    s = EvalSet(name, [path])
    for where, row in read_rows(path, "train"):
        s.rows_read += 1
        for field in ("prompt", "responses", "gold_scores"):
            if field not in row:
                raise DataError(f"{where}: missing field '{field}'")
        responses, gold = row["responses"], row["gold_scores"]
        if not isinstance(responses, list) or not isinstance(gold, list):
            raise DataError(f"{where}: fields 'responses' and 'gold_scores' must be lists")
        if len(gold) != len(responses):
            raise DataError(f"{where}: field 'gold_scores' has {len(gold)} values for {len(responses)} responses")
        if len(responses) < 2:
            s.skip("fewer than 2 responses")
            continue
        prompt = utils.as_messages(row["prompt"], "user", where, "prompt")
        msgs = [utils.as_messages(r, "assistant", where, f"responses[{j}]") for j, r in enumerate(responses)]
        gold = [finite_number(v, where, f"gold_scores[{j}]") for j, v in enumerate(gold)]
        if len(set(gold)) == 1:  # still scored for the norms / erank, but no ranking to compare with
            s.skip("all gold scores equal (tau undefined; kept for norms only)")
        s.add(prompt, msgs, gold, str(row.get("prompt_id", where)))
    return s


def rm_bench_domain(row, source):
    for value in (row.get("domain"), os.path.basename(source)):
        if isinstance(value, str) and value.lower().startswith(DOMAINS):
            return next(d for d in DOMAINS if value.lower().startswith(d))
    subset = str(row.get("subset", "")).lower()
    return next((d for prefix, d in SUBSET_DOMAIN if subset.startswith(prefix)), None)


# RM-Bench's own data folder (github.com/THU-KEG/RM-Bench, data/): one file per domain, the domain in the file name.
# Its total_dataset.json holds all of them in one file, so a folder is read as exactly these files (no item twice).
RM_BENCH_FILES = ("chat_filtered.json", "code_filtered.json", "math_filtered.json", "safety-refuse_filtered.json",
                  "safety-response_filtered.json")


def rm_bench_files(sources):
    """--rm-bench values -> files: a folder becomes the RM_BENCH_FILES it holds; a file or hub id stays as is."""
    files = []
    for source in sources:
        if not os.path.isdir(source):
            files.append(source)
            continue
        found = [os.path.join(source, f) for f in RM_BENCH_FILES if os.path.isfile(os.path.join(source, f))]
        if not found:
            raise DataError(f"{source}: a folder without RM-Bench's native files ({', '.join(RM_BENCH_FILES)}); "
                            "pass the folder that holds them, a single .json/.jsonl file, or a hub id")
        missing = [f for f in RM_BENCH_FILES if not os.path.isfile(os.path.join(source, f))]
        if missing:
            print0(f"[data] {source}: no {', '.join(missing)}; RM-Bench is averaged over the domains present")
        files += found
    return files


def load_rm_bench(sources, split):
    """RM-Bench items {prompt, chosen: [3], rejected: [3], domain | subset} -> EvalSet of 6 responses each."""
    sources = rm_bench_files(sources)
    s = EvalSet("rm_bench", sources)
    s.has_gold = False
    for source in sources:
        for where, row in read_rows(source, split):
            s.rows_read += 1
            for field in ("prompt", "chosen", "rejected"):
                if field not in row:
                    raise DataError(f"{where}: missing field '{field}'")
                if field != "prompt" and not (isinstance(row[field], list) and len(row[field]) == 3):
                    raise DataError(f"{where}: field '{field}' must be a list of 3 responses "
                                    "(concise, detailed, markdown)")
            domain = rm_bench_domain(row, source)
            if domain is None:
                s.skip(f"unknown domain (domain={row.get('domain')!r}, subset={row.get('subset')!r})")
                continue
            prompt = utils.as_messages(row["prompt"], "user", where, "prompt")
            msgs = [utils.as_messages(r, "assistant", where, f"{f}[{j}]")
                    for f in ("chosen", "rejected") for j, r in enumerate(row[f])]
            s.add(prompt, msgs, [1.0] * 3 + [0.0] * 3, str(row.get("id", where)),
                  pairs=[(i, 3 + j) for i in range(3) for j in range(3)], domain=domain)
    return s


def load_sets(args):
    sets = []
    for name in SCENARIOS if args.data_dir else ():
        path = os.path.join(args.data_dir, FILES[name])
        if not os.path.exists(path):
            print0(f"[data] {path} not found: '{name}' left out (its keys are null in report.json)")
        else:
            sets.append(load_pair_set(name, path) if name == "id" else load_ranked_set(name, path))
    train = args.train_file or (args.data_dir and os.path.join(args.data_dir, FILES["train"]))
    if train and args.train_pairs > 0:
        if args.train_file or os.path.exists(train):  # --train-file may be a hub id
            sets.append(load_pair_set("train", train, args.train_pairs, args.seed, args.train_split))
        else:
            print0(f"[data] {train} not found: 'train' left out (erank/train and erank/gap/* are null)")
    if args.rm_bench:
        sets.append(load_rm_bench(args.rm_bench, args.rm_bench_split))
    for spec in args.pairs or []:
        name, _, source = spec.partition("=")
        sets.append(load_pair_set(PAIRS + name, source, split=args.pairs_split))
    for s in sets:
        print0(f"[data] {s.name}: {len(s.sizes)} prompts, {len(s.responses)} responses from {s.rows_read} rows"
               + "".join(f"; skipped {n} ({reason})" for reason, n in s.skipped.items()))
    if not any(s.sizes for s in sets):
        raise SystemExit("no evaluation data: every set is missing or empty")
    return sets


# ===================================================================================================
# Model: head check, scoring (hidden states through utils), cache
# ===================================================================================================


def encode_set(tokenizer, s, max_length):
    """Token ids of every (prompt, response) row through utils.encode_prompt_response, and how many were truncated."""
    seqs, truncated, offsets = [], 0, s.offsets
    for p, prompt in enumerate(s.prompts):
        for response in s.responses[offsets[p]: offsets[p + 1]]:
            ids = utils.encode_prompt_response(tokenizer, prompt, response)
            if len(ids) > max_length:
                truncated += 1
                ids = utils.encode_prompt_response(tokenizer, prompt, response, max_length, truncate=True)
            seqs.append(ids)
    return seqs, truncated


def score_set(forward, tokenizer, s, args, max_length, device, desc):
    """Rewards, ||h||, ||h_w - h_l|| per pair, and a seeded sample of hidden states (for erank), scored in chunks
    of whole prompts so memory stays bounded on large sets."""
    seqs, truncated = encode_set(tokenizer, s, max_length)
    n, offsets = len(seqs), s.offsets
    sample = np.random.default_rng([args.seed, zlib.crc32(s.name.encode())]).permutation(n)[: args.erank_rows]
    sample_pos = np.full(n, -1)
    sample_pos[sample] = np.arange(len(sample))
    pairs = np.array(s.pairs, dtype=int).reshape(-1, 2)
    rewards, hnorm, diff = torch.zeros(n), torch.zeros(n), torch.zeros(len(pairs))
    hidden_sample = None
    bounds = [0]
    for o in offsets[1:]:  # chunk ends on prompt boundaries, >= 4096 rows each
        if o - bounds[-1] >= 4096 or o == n:
            bounds.append(int(o))
    for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        r, h = utils.score_sequences(forward, seqs[a:b], tokenizer.pad_token_id, device, args.batch_size,
                                     desc=f"{desc} {c + 1}/{len(bounds) - 1}")
        rewards[a:b], hnorm[a:b] = r, h.norm(dim=1)
        if hidden_sample is None:
            hidden_sample = torch.zeros(len(sample), h.shape[1])
        rows = np.nonzero(sample_pos[a:b] >= 0)[0]
        hidden_sample[sample_pos[a + rows]] = h[rows]
        sel = np.nonzero((pairs[:, 0] >= a) & (pairs[:, 0] < b))[0]
        diff[sel] = (h[pairs[sel, 0] - a] - h[pairs[sel, 1] - a]).norm(dim=1)
    return {"rewards": rewards, "hidden_norm": hnorm, "diff_norm": diff, "n_truncated": truncated,
            "hidden_sample": hidden_sample if hidden_sample is not None else torch.zeros(0, 0)}


def fingerprint(args, model, s):
    """Cache key: the model's files (or hub id), the data files, and every flag that changes the scores."""
    def files(path):
        if not os.path.exists(path):
            return path  # a hub id
        paths = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
        return [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in paths if os.path.isfile(f)]

    only = {"train": (args.train_pairs, args.train_split), "rm_bench": args.rm_bench_split}.get(
        s.name, args.pairs_split if s.name.startswith(PAIRS) else None)
    key = [CACHE_VERSION, files(model), [files(x) for x in s.sources], s.name, only, args.max_length, args.bf16,
           args.attn_implementation, args.erank_rows, args.seed]
    return hashlib.sha1(json.dumps(key, default=str).encode()).hexdigest()[:16]


def cache_plan(model, label, sets, args):
    """({set name: cache file}, the set names that every rank finds in the cache)."""
    cache_dir = args.cache_dir or os.path.join(args.out, "cache")
    name = label.replace("/", "_").replace(os.sep, "_")  # labels like bt/seed1 name a file, not a folder
    paths = {s.name: os.path.join(cache_dir, f"{name}-{s.name.replace('/', '-')}-{fingerprint(args, model, s)}.pt")
             for s in sets}
    cached = [] if args.no_cache else [n for n, p in paths.items() if os.path.exists(p)]
    return paths, sorted(set.intersection(*map(set, utils.gather_objects(cached))))


def score_model(model, label, sets, args, device, paths, cached):
    """{set name: scores} and ||Wp|| for one model: cached sets are read, the others scored (and cached) now."""
    scores = {n: torch.load(paths[n], weights_only=True) for n in cached}
    if cached:
        utils.print0(f"[cache] {label}: {len(cached)}/{len(sets)} sets read from the cache"
                     + ("; model not loaded" if len(cached) == len(sets) else ""))
    if len(cached) == len(sets):
        return scores, float(next(iter(scores.values()))["wp_norm"])
    tokenizer = utils.load_tokenizer(model)
    tokenizer.model_max_length = 10**9  # we truncate ourselves (encode_set); silences the tokenizer's length warning
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    hf_model = utils.load_reward_model(model, tokenizer, dtype, args.attn_implementation).to(device).eval()
    rm = utils.RewardModel(hf_model)
    wp_norm = utils.head_weight_norm(hf_model)
    max_length = min(args.max_length, getattr(hf_model.config, "max_position_embeddings", None) or args.max_length)
    for s in (s for s in sets if s.name not in scores):
        scores[s.name] = score_set(rm, tokenizer, s, args, max_length, device, f"{label}/{s.name}")
        scores[s.name]["wp_norm"] = wp_norm
        if not args.no_cache and utils.is_rank0():
            with checkpoint.atomic_path(paths[s.name]) as tmp:
                torch.save(scores[s.name], tmp)
        if scores[s.name]["n_truncated"]:  # only when it happened (a shorter model limit alone truncates nothing)
            limit = (f"the model's {max_length} positions (< --max-length {args.max_length})"
                     if max_length < args.max_length else f"--max-length {max_length}")
            utils.print0(f"[model] {label}/{s.name}: {scores[s.name]['n_truncated']} sequences truncated at {limit}, "
                         "keeping the end of the response")
    del rm, hf_model
    return scores, wp_norm


# ===================================================================================================
# Metrics per model: one flat dict of fixed, namespaced keys
# ===================================================================================================


def fixed_keys():
    keys = ["wp_norm", "id/accuracy", "id/accuracy_ci_low", "id/accuracy_ci_high", "train/accuracy", "erank/n_rows"]
    for sc in SCENARIOS[1:]:
        keys += [f"{sc}/{m}{ci}" for m in ("kendall_tau", "pair_accuracy") for ci in ("", "_ci_low", "_ci_high")]
        keys.append(f"{sc}/tau_undefined")
    for sc in SCENARIOS + ("train", "rm_bench"):
        keys += [f"norms/{sc}/{k}" for k in ("mean", "std", "skew", "p5", "p50", "p95")]
        keys += [f"diff_norms/{sc}/{k}" for k in ("mean", "std", "skew", "p50")]
        keys += [f"length_corr/{sc}", f"{sc}/n_truncated", f"erank/{sc}"] + [f"erank/gap/{sc}"] * (sc != "train")
    return keys + [f"rm_bench/{k}" for k in ("hard", "normal", "easy", "overall") + DOMAINS]


def pairs_keys(name):
    """The keys of one --pairs set (always present, null when the set is empty)."""
    keys = [f"{name}/{k}" for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "n_pairs", "longer_preferred",
                                     "n_truncated")]
    keys += [f"norms/{name}/{k}" for k in ("mean", "std", "skew", "p5", "p50", "p95")]
    return keys + [f"diff_norms/{name}/{k}" for k in ("mean", "std", "skew", "p50")] + [f"length_corr/{name}"]


def longer_share(first_wins, len_first, len_second):
    """Share of pairs, among those whose two responses differ in length, where the longer one 'wins'.

    first_wins: bool per pair (e.g. r(chosen) > r(rejected), or simply True for the data's own labels).
    """
    differ = len_first != len_second
    if not differ.any():
        return float("nan")
    return float((first_wins == (len_first > len_second))[differ].mean())


def pair_set_metrics(s, rewards, boot):
    """id, train and --pairs sets: accuracy pooled per prompt_id, bootstrap over prompts; --pairs: the length bias."""
    n, out = s.name, {}
    pairs = np.array(s.pairs).reshape(-1, 2)
    correct = (rewards[pairs[:, 0]] > rewards[pairs[:, 1]]).astype(float)
    groups, inv = np.unique(np.array(s.group), return_inverse=True)
    c, t = np.bincount(inv, correct, len(groups)), np.bincount(inv, minlength=len(groups)).astype(float)
    out[f"{n}/accuracy"] = float(correct.mean()) if len(correct) else float("nan")
    if n != "train":
        out[f"{n}/accuracy_ci_low"], out[f"{n}/accuracy_ci_high"] = bootstrap_ci(c, t, **boot)
    if n.startswith(PAIRS):  # length bias: how often the longer response gets the higher reward
        lengths = s.lengths()
        out[f"{n}/n_pairs"] = len(pairs)
        out[f"{n}/longer_preferred"] = longer_share(correct > 0, lengths[pairs[:, 0]], lengths[pairs[:, 1]])
    return out


def ranked_set_metrics(s, rewards, boot):
    """The OOD scenarios: Kendall's tau-b per prompt (rows grouped by response count), NaN-safe mean, and the
    accuracy over every response pair with different gold scores."""
    n, out, offsets = s.name, {}, s.offsets
    taus, correct, total = [], [], []
    for k in sorted(set(s.sizes)):
        rows = [p for p, size in enumerate(s.sizes) if size == k]
        r = np.stack([rewards[offsets[p]: offsets[p + 1]] for p in rows])
        g = np.array([s.gold[p] for p in rows])
        c, t = pair_accuracy_counts(r, g)
        keep = t > 0  # prompts with all-equal gold: no ranking (counted skip when loading)
        taus.append(kendall_tau_b(r, g)[keep])
        correct.append(c[keep])
        total.append(t[keep])
    taus, correct, total = np.concatenate(taus), np.concatenate(correct), np.concatenate(total)
    defined = taus[~np.isnan(taus)]
    out[f"{n}/tau_undefined"] = int(np.isnan(taus).sum())  # rewards all tied within a prompt
    out[f"{n}/kendall_tau"] = float(defined.mean()) if len(defined) else float("nan")
    out[f"{n}/kendall_tau_ci_low"], out[f"{n}/kendall_tau_ci_high"] = bootstrap_ci(defined, **boot)
    out[f"{n}/pair_accuracy"] = float(correct.sum() / total.sum()) if total.sum() else float("nan")
    out[f"{n}/pair_accuracy_ci_low"], out[f"{n}/pair_accuracy_ci_high"] = bootstrap_ci(correct, total, **boot)
    return out


def erank_metrics(sets, scores, erank_rows):
    """Effective rank on the same number of rows for every set (erank is bounded by the row count); --pairs sets are
    left out, so that a small test file does not cut the rows of the paper's sets."""
    ranked = [s for s in sets if s.sizes and not s.name.startswith(PAIRS)]
    n_rows = min([erank_rows] + [len(scores[s.name]["hidden_sample"]) for s in ranked])
    erank = {s.name: effective_rank(scores[s.name]["hidden_sample"][:n_rows]) for s in ranked}
    out = {"erank/n_rows": n_rows, **{f"erank/{k}": v for k, v in erank.items()}}
    if "train" in erank:
        out.update({f"erank/gap/{k}": v - erank["train"] for k, v in erank.items() if k != "train"})
    return out


def model_metrics(sets, scores, wp_norm, args):
    """One model's report.json block: every key of fixed_keys() (and pairs_keys()), null where a set is missing."""
    out = dict.fromkeys(fixed_keys())
    for s in sets:
        if s.name.startswith(PAIRS):
            out.update(dict.fromkeys(pairs_keys(s.name)))
    out["wp_norm"] = wp_norm
    boot = dict(n_boot=args.bootstrap, seed=args.seed)
    for s in (s for s in sets if s.sizes):
        sc, n = scores[s.name], s.name
        rewards = sc["rewards"].numpy().astype(float)
        out.update({f"norms/{n}/{k}": v for k, v in norm_summary(sc["hidden_norm"].numpy()).items()})
        diff = norm_summary(sc["diff_norm"].numpy())
        out.update({f"diff_norms/{n}/{k}": diff[k] for k in ("mean", "std", "skew", "p50")})
        out[f"length_corr/{n}"] = spearman(rewards, s.lengths())
        out[f"{n}/n_truncated"] = int(sc["n_truncated"])
        if n in ("id", "train") or n.startswith(PAIRS):
            out.update(pair_set_metrics(s, rewards, boot))
        elif n in SCENARIOS:
            out.update(ranked_set_metrics(s, rewards, boot))
        elif n == "rm_bench":
            r = rewards.reshape(-1, 6)  # every item: 3 chosen then 3 rejected
            out.update({f"rm_bench/{k}": v for k, v in rm_bench_scores(r[:, :3], r[:, 3:], s.domain).items()})
    out.update(erank_metrics(sets, scores, args.erank_rows))
    return out


# ===================================================================================================
# Main: args -> data -> models (score or read the cache) -> metrics -> report.json -> report.md and figures
# ===================================================================================================


def nan_to_null(obj):
    """NaN -> null, so report.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_to_null(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def unique_labels(args):
    """--name, or each model's short folder name; a repeat gets #2, #3, ... (labels key the report's rows and cache
    files, so they must all differ: a label that is taken already, a --name included, gets the next number)."""
    labels = []
    for label in args.name or [model_label(m) for m in args.model]:
        unique, k = label, 1
        while unique in labels:
            k += 1
            unique = f"{label}#{k}"
        labels.append(unique)
    return labels


def log_model(label, m, sets):
    print0(f"[eval] {label}: id/accuracy {fmt_number(m['id/accuracy'])}, "
           + ", ".join(f"{s} tau {fmt_number(m[f'{s}/kendall_tau'])}" for s in SCENARIOS[1:])
           + f", rm_bench/overall {fmt_number(m['rm_bench/overall'])}, wp_norm {fmt_number(m['wp_norm'], 3)}"
           + "".join(f", {n}/accuracy {fmt_number(m[f'{n}/accuracy'])}" for n in (s.name for s in sets)
                     if n.startswith(PAIRS)))


def data_report(sets):
    """The report.json blocks "gold" (the gold scores' own length bias, the reference) and "data" (what was read)."""
    gold, data = {}, {}
    for s in sets:
        if s.sizes and s.has_gold:  # the four scenarios and train (when its rows carry chosen/rejected_score)
            gold[f"length_corr/{s.name}"] = spearman(np.concatenate(s.gold), s.lengths())
        if s.name.startswith(PAIRS):  # the data's own length bias, the reference for {name}/longer_preferred
            pairs, lengths = np.array(s.pairs, dtype=int).reshape(-1, 2), s.lengths()
            gold[f"{s.name}/chosen_longer"] = longer_share(np.ones(len(pairs), bool), lengths[pairs[:, 0]],
                                                          lengths[pairs[:, 1]])
        data[s.name] = {"source": s.source, "rows_read": s.rows_read, "prompts": len(s.sizes),
                        "responses": len(s.responses), "pairs": len(s.pairs), "skipped": s.skipped}
    return gold, data


def main(argv=None):
    args = parse_args(argv)
    inputs = [("--model", m) for m in args.model] + [("--data-dir", args.data_dir), ("--train-file", args.train_file)]
    inputs += [("--rm-bench", x) for x in args.rm_bench or []]
    inputs += [("--rloo", x.partition("=")[2]) for x in args.rloo or []]
    checkpoint.claim_out_dir(args.out, "eval_rm.py", inputs, legacy=("eval_config.json", ("args", "models")),
                             create=False)
    for flag, path in inputs if args.cache_dir else ():  # cache files in a model or data folder would change it
        if path and os.path.exists(path) and checkpoint.within(os.path.realpath(args.cache_dir),
                                                               os.path.realpath(path)):
            raise SystemExit(f"--cache-dir {args.cache_dir} is inside the input {flag} {path}; a stage never writes "
                             "into its inputs: choose another --cache-dir")
    utils.quiet_libraries()
    _, world, _, device = utils.init_distributed()
    checkpoint.claim_out_dir(args.out, "eval_rm.py", legacy=("eval_config.json", ("args", "models")))
    checkpoint.remove_leftovers(args.out, recurse=("cache",))  # OUT/cache is ours; another --cache-dir is not touched
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"

    # ---------------------------------------------------------------- data
    try:
        sets = load_sets(args)
    except DataError as e:
        raise SystemExit(f"data error: {e}") from None
    labels = unique_labels(args)
    plans = [cache_plan(model, label, sets, args) for model, label in zip(args.model, labels)]
    for model, (_, cached) in zip(args.model, plans):  # fail before hours of scoring, not after
        if len(cached) < len(sets):
            checkpoint.check_reward_model(model, "--model")

    # ---------------------------------------------------------------- score (or read the cache) and measure
    report = {"models": {}, "gold": {}, "data": {}}
    scores_all = {}
    for model, label, plan in zip(args.model, labels, plans):
        scores, wp_norm = score_model(model, label, sets, args, device, *plan)
        scores_all[label] = scores
        report["models"][label] = {"model": model, **model_metrics(sets, scores, wp_norm, args)}
        log_model(label, report["models"][label], sets)
    report["gold"], report["data"] = data_report(sets)
    report["groups"] = seed_groups(report["models"])
    rloo_runs = load_rloo(args.rloo)
    if rloo_runs:
        report["rloo"] = rloo_report(rloo_runs, {label: m["model"] for label, m in report["models"].items()})
    report["settings"] = run_settings(report)

    # ---------------------------------------------------------------- save: report.md and figures, report.json last
    if utils.is_rank0():  # report.json is written last, so where it exists the whole report is complete and current
        os.makedirs(args.out, exist_ok=True)
        report_path = os.path.join(args.out, "report.json")
        if os.path.exists(report_path):  # an earlier run's (this folder is ours): it must not outlive a failed rerun
            os.remove(report_path)
        report = nan_to_null(report)
        checkpoint.write_json(os.path.join(args.out, "eval_config.json"),
                              {"args": vars(args), "world_size": world, "device": str(device),
                               "models": dict(zip(labels, args.model)), "data": report["data"]})
        figures = write_report(args.out, report, sets, scores_all, rloo_runs)
        checkpoint.write_json(report_path, report)
        print0(f"[done] {os.path.join(args.out, 'report.md')}, report.json, {', '.join(figures)}")
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
