"""Evaluate reward models as the paper does: robustness in four scenarios, hidden-state norm dispersion,
effective rank, RM-Bench, and length bias. Works on train_rm.py checkpoints and on any HF
sequence-classification reward model (hub id or path).

Hong et al., "On the Robustness of Reward Models for Language Model Alignment" (ICML 2025): Sec. 2.2 (the
four scenarios), Figures 1-3 (||Wp||, ||h_w - h_l|| per epoch, ||h|| per scenario), Table 1 (effective
rank, eq. 32), Table 2 (RM-Bench), Table 5 (accuracy / Kendall's tau).

    # one process, CPU or one GPU; one or several models, each scored once and cached in OUT/cache
    python eval_rm.py --model runs/toy/rm/bt/seed1 --model runs/toy/rm/bsr/seed1 --data-dir runs/toy/data \
        --out runs/toy/eval
    # add RM-Bench (native JSON list, JSONL, or a hub id); a third-party RM needs no --data-dir
    python eval_rm.py --model Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 --rm-bench THU-KEG/RM-Bench --out eval_sky
    # RM-Bench's own data folder (chat_filtered.json, ...), and plain preference test sets (any train_rm.py format)
    python eval_rm.py --model runs/toy/rm/bsr/seed1 --rm-bench RM-Bench/data --pairs hh=hh_test.jsonl --out eval_hh
    # several GPUs: sequences are sharded over ranks (each rank holds a full copy of the model)
    deepspeed --num_gpus 8 eval_rm.py --model runs/rm_bt --model runs/rm_bsr --data-dir data --out runs/eval
    torchrun --nproc_per_node 8 eval_rm.py ...same flags...

--out must be a new folder or one eval_rm.py wrote (never a --model, data or --rloo folder, nor inside one).
--out receives report.json (one block of fixed, namespaced keys per model), report.md (paper Table 5 / Table 1 /
Table 2 layouts), eval_config.json, fig1_wp_norm.png, fig2_hidden_diff_per_epoch.png (when a model folder has
train_rm.py's metrics.jsonl), fig3_hidden_norms.png and cache/ (scores per model and set).
"""

import argparse
import hashlib
import json
import math
import os
import re
import zlib

import numpy as np
import torch

SCENARIOS = ("id", "prompt_ood", "response_ood", "mutual_ood")
FILES = {"id": "valid_id.jsonl", "prompt_ood": "valid_prompt_ood.jsonl", "response_ood": "valid_response_ood.jsonl",
         "mutual_ood": "valid_mutual_ood.jsonl", "train": "train.jsonl"}
TITLES = {"id": "In-Domain", "prompt_ood": "Prompt OOD", "response_ood": "Response OOD", "mutual_ood": "Mutual OOD",
          "train": "Train sample", "rm_bench": "RM-Bench"}
PAIRS = "pairs/"  # set name prefix of --pairs NAME=FILE: keys read pairs/NAME/accuracy, norms/pairs/NAME/...
DOMAINS = ("chat", "math", "code", "safety")  # RM-Bench's domains, in the paper's Table 2 order
# RewardBench-style `subset` names RM-Bench items were built from -> RM-Bench domain (prefix match)
SUBSET_DOMAIN = (("alpacaeval", "chat"), ("mt-bench", "chat"), ("llmbar", "chat"), ("hep-", "code"),
                 ("bigcode/humanevalpack", "code"), ("humanevalpack", "code"), ("math", "math"), ("xstest", "safety"),
                 ("refusals", "safety"), ("donotanswer", "safety"), ("do-not-answer", "safety"))
CACHE_VERSION = 2  # 2: hh-rlhf transcripts parsed into turns (scores of such files changed)

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
    import scipy.stats

    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return dict.fromkeys(("mean", "std", "skew", "p5", "p50", "p95"), float("nan"))
    p5, p50, p95 = np.percentile(x, [5, 50, 95])
    skew = float(scipy.stats.skew(x)) if x.std() > 0 else 0.0
    return {"mean": float(x.mean()), "std": float(x.std()), "skew": skew,
            "p5": float(p5), "p50": float(p50), "p95": float(p95)}


def spearman(x, y):
    import scipy.stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(x, y)[0])


# ===================================================================================================
# Arguments
# ===================================================================================================


def parse_args(argv=None):
    import utils
    from utils import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
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


def _number(value, where, field):
    from utils import DataError

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field '{field}' must be a finite number, got {value!r}")
    return float(value)


def _rows(source, split):
    """(where, row) from a JSON list file (RM-Bench's native format), a JSONL file or a hub dataset id."""
    from utils import DataError, iter_rows

    try:
        yield from iter_rows(source, split)
    except DataError:
        raise
    except Exception as e:  # hub / dataset loading problems: one clear line, not a deep traceback
        raise DataError(f"{source}: cannot load as a file or hub dataset ({type(e).__name__}: {e})") from None


def load_pair_set(name, path, max_pairs=None, seed=0, split="train"):
    """{prompt, chosen, rejected[, prompt_id, chosen_score, rejected_score]} rows -> EvalSet (chosen preferred)."""
    from utils import parse_pair

    s, rows = EvalSet(name, [path]), []
    for where, row in _rows(path, split):
        s.rows_read += 1
        parsed = parse_pair(row, where)
        if parsed[0] == "skip":
            s.skip(parsed[1])
            continue
        gold, s.has_gold = [1.0, 0.0], s.has_gold and row.get("chosen_score") is not None
        if row.get("chosen_score") is not None and row.get("rejected_score") is not None:
            gold = [_number(row[f], where, f) for f in ("chosen_score", "rejected_score")]
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
    from utils import DataError, as_messages

    s = EvalSet(name, [path])
    for where, row in _rows(path, "train"):
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
        prompt = as_messages(row["prompt"], "user", where, "prompt")
        msgs = [as_messages(r, "assistant", where, f"responses[{j}]") for j, r in enumerate(responses)]
        gold = [_number(v, where, f"gold_scores[{j}]") for j, v in enumerate(gold)]
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
    from utils import DataError, print0

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
    from utils import DataError, as_messages

    sources = rm_bench_files(sources)
    s = EvalSet("rm_bench", sources)
    s.has_gold = False
    for source in sources:
        for where, row in _rows(source, split):
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
            prompt = as_messages(row["prompt"], "user", where, "prompt")
            msgs = [as_messages(r, "assistant", where, f"{f}[{j}]")
                    for f in ("chosen", "rejected") for j, r in enumerate(row[f])]
            s.add(prompt, msgs, [1.0] * 3 + [0.0] * 3, str(row.get("id", where)),
                  pairs=[(i, 3 + j) for i in range(3) for j in range(3)], domain=domain)
    return s


def load_sets(args):
    from utils import print0

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


def check_reward_checkpoint(name):
    """Refuse checkpoints without a trained Linear(H, 1) head (the check every reward-model loader shares)."""
    import utils

    utils.check_reward_model(name, "--model")


def encode_set(tokenizer, s, max_length):
    """Token ids of every (prompt, response) row through utils.encode_prompt_response, and how many were truncated."""
    from utils import encode_prompt_response

    seqs, truncated, offsets = [], 0, s.offsets
    for p, prompt in enumerate(s.prompts):
        for response in s.responses[offsets[p]: offsets[p + 1]]:
            ids = encode_prompt_response(tokenizer, prompt, response)
            if len(ids) > max_length:
                truncated += 1
                ids = encode_prompt_response(tokenizer, prompt, response, max_length, truncate=True)
            seqs.append(ids)
    return seqs, truncated


def score_set(forward, tokenizer, s, args, max_length, device, desc):
    """Rewards, ||h||, ||h_w - h_l|| per pair, and a seeded sample of hidden states (for erank), scored in chunks
    of whole prompts so memory stays bounded on large sets."""
    from utils import score_sequences

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
        r, h = score_sequences(forward, seqs[a:b], tokenizer.pad_token_id, device, args.batch_size,
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
    import utils

    cache_dir = args.cache_dir or os.path.join(args.out, "cache")
    name = label.replace("/", "_").replace(os.sep, "_")  # labels like bt/seed1 name a file, not a folder
    paths = {s.name: os.path.join(cache_dir, f"{name}-{s.name.replace('/', '-')}-{fingerprint(args, model, s)}.pt")
             for s in sets}
    cached = [] if args.no_cache else [n for n, p in paths.items() if os.path.exists(p)]
    return paths, sorted(set.intersection(*map(set, utils.gather_objects(cached))))


def score_model(model, label, sets, args, device, paths, cached):
    """{set name: scores} and ||Wp|| for one model: cached sets are read, the others scored (and cached) now."""
    import utils

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
            with utils.atomic_path(paths[s.name]) as tmp:
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


def model_metrics(sets, scores, wp_norm, args):
    out = dict.fromkeys(fixed_keys())
    for s in sets:
        if s.name.startswith(PAIRS):
            out.update(dict.fromkeys(pairs_keys(s.name)))
    out["wp_norm"] = wp_norm
    boot = dict(n_boot=args.bootstrap, seed=args.seed)
    for s in (s for s in sets if s.sizes):
        sc, n = scores[s.name], s.name
        rewards, offsets = sc["rewards"].numpy().astype(float), s.offsets
        out.update({f"norms/{n}/{k}": v for k, v in norm_summary(sc["hidden_norm"].numpy()).items()})
        diff = norm_summary(sc["diff_norm"].numpy())
        out.update({f"diff_norms/{n}/{k}": diff[k] for k in ("mean", "std", "skew", "p50")})
        out[f"length_corr/{n}"] = spearman(rewards, s.lengths())
        out[f"{n}/n_truncated"] = int(sc["n_truncated"])
        if n in ("id", "train") or n.startswith(PAIRS):  # pairs: accuracy pooled per prompt_id, bootstrap over prompts
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
        elif n in SCENARIOS:  # ranked: tau-b per prompt (rows grouped by response count), NaN-safe mean
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
        elif n == "rm_bench":
            r = rewards.reshape(-1, 6)  # every item: 3 chosen then 3 rejected
            out.update({f"rm_bench/{k}": v for k, v in rm_bench_scores(r[:, :3], r[:, 3:], s.domain).items()})
    # effective rank on the same number of rows for every set (erank is bounded by the row count); --pairs sets are
    # left out, so that a small test file does not cut the rows of the paper's sets
    ranked = [s for s in sets if s.sizes and not s.name.startswith(PAIRS)]
    sizes = [len(scores[s.name]["hidden_sample"]) for s in ranked]
    n_rows = min([args.erank_rows] + sizes)
    out["erank/n_rows"] = n_rows
    erank = {s.name: effective_rank(scores[s.name]["hidden_sample"][:n_rows]) for s in ranked}
    out.update({f"erank/{k}": v for k, v in erank.items()})
    if "train" in erank:
        out.update({f"erank/gap/{k}": v - erank["train"] for k, v in erank.items() if k != "train"})
    return out


# ===================================================================================================
# Report: report.json, report.md, plots
# ===================================================================================================


def _title(name):  # a set's column title; --pairs sets are "Pairs NAME"
    return TITLES.get(name) or f"Pairs {name[len(PAIRS):]}"


def _f(v, digits=4, scale=1.0, sign=""):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{scale * v:{sign}.{digits}f}"


def _cell(m, key, digits=4, ci=False):  # "value [ci_low, ci_high]"
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return _f(m.get(key), digits) + (f" [{lo:.3f}, {hi:.3f}]" if ci and lo is not None and not math.isnan(lo) else "")


def _pm(value, spread):  # "value ± spread"
    return f"{_f(value)} ± {_f(spread)}"


def _mean_std(stat):  # a std over one seed would read as "no spread"; show the value alone
    return _pm(stat["mean"], stat["std"]) if stat["n"] > 1 else _f(stat["mean"])


def _dist(m, prefix):  # "mean ± std (skew)"
    return f"{_f(m[prefix + '/mean'], 3)} ± {_f(m[prefix + '/std'], 3)} ({_f(m[prefix + '/skew'], 2)})"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def _fmt_setting(v):
    return "—" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _settings_md(report):
    """The settings each run was made with, so the report reads on its own."""
    settings, md = report.get("settings") or {}, []
    if settings.get("models"):
        md += ["\n## Settings\n\nReward models (train_rm.py, from each model's train_config.json; λ applies to "
               "bsr and center):\n\n",
               _table(["Model"] + [name for name, _ in RM_SETTINGS] + ["train pairs"],
                      [[label] + [_fmt_setting(v.get(key)) if key != "lam" or v.get("loss") in ("bsr", "center")
                                  else "—" for _, key in RM_SETTINGS] + [_fmt_setting(v.get("train_pairs"))]
                       for label, v in settings["models"].items()])]
    if settings.get("rloo"):
        rm = {name: r.get("reward_model_label") for name, r in (report.get("rloo") or {}).items()}
        md += ["\nRLOO policies (rloo.py, from each run's rloo_config.json):\n\n",
               _table(["Policy", "Reward model"] + [name for name, _ in RLOO_SETTINGS] + ["steps"],
                      [[name, f"`{rm.get(name)}`"] + [_fmt_setting(v.get(key)) for _, key in RLOO_SETTINGS]
                       + [_fmt_setting(v.get("steps"))] for name, v in settings["rloo"].items()])]
    return md


def _differences_md(report):
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
        line = [title, _f(bt)]
        for g in others:
            value = (groups[g].get(key) or {}).get("mean")
            diff = value - bt if value is not None and bt is not None else None
            line += [_f(value), _f(diff, sign="+")]
        lines.append(line)
    seeds = sorted({len(v["members"]) for v in groups.values()})
    over = "one seed each" if seeds == [1] else "means over seeds (" + ", ".join(
        f"{g}: {len(v['members'])}" for g, v in groups.items()) + ")"
    return [f"\n## Each method against BT ({over}; difference = method − BT)\n\n", _table(header, lines)]


def _pinned_norms(models, names, threshold=1e-3):
    """{label: largest std/mean of ||h|| over the sets} for models whose ||h|| is pinned (below threshold)."""
    out = {}
    for label, m in models.items():
        rel = [m[f"norms/{n}/std"] / m[f"norms/{n}/mean"] for n in names
               if m.get(f"norms/{n}/mean") and m.get(f"norms/{n}/std") is not None]
        if rel and max(rel) < threshold:
            out[label] = max(rel)
    return out


def _pinned_note(pinned):
    if not pinned:
        return []
    worst = max(pinned.values())
    return [f"\nNote: ‖h‖ is pinned for {', '.join(pinned)}: its relative spread (std / mean) is at most "
            f"{100 * worst:.2g}% in every set (below 0.1%), so differences between models in its std are tiny in "
            "absolute terms; fig3's x-axes are zoomed to the data and make them look large.\n"]


def write_report_md(path, report, sets, figures):
    models, names = report["models"], [s.name for s in sets if s.sizes]
    evals, ood = [n for n in names if n != "train" and not n.startswith(PAIRS)], SCENARIOS[1:]
    pair_sets = [n for n in names if n.startswith(PAIRS)]

    def rows(cells):  # one row per model
        return [[label] + cells(m) for label, m in models.items()]

    md = ["# Reward model evaluation\n\n", _table(["Model", "Path"], rows(lambda m: [f"`{m['model']}`"]))]
    md += _settings_md(report) + _differences_md(report)
    if set(SCENARIOS) & set(names):
        md += ["\n## Robustness (paper Table 5 layout; 95% bootstrap intervals over prompts)\n\n",
               _table(["Model", "In-Domain (Accuracy ↑)"] + [f"{TITLES[s]} (Kendall's τ ↑)" for s in ood],
                      rows(lambda m: [_cell(m, "id/accuracy", ci=True)]
                           + [_cell(m, f"{s}/kendall_tau", ci=True) for s in ood])),
               "\nPair accuracy over every response pair with different gold scores (a reward tie is wrong):\n\n",
               _table(["Model", "Train sample"] + [TITLES[s] for s in ood],
                      rows(lambda m: [_cell(m, "train/accuracy")]
                           + [_cell(m, f"{s}/pair_accuracy", ci=True) for s in ood]))]
    if pair_sets:
        md += ["\n## Preference test sets (--pairs; 95% bootstrap intervals over prompts)\n\n"
               "Accuracy = share of pairs with r(chosen) > r(rejected) (a tie is wrong). Longer preferred = share of "
               "pairs, among those whose responses differ in length, where the longer response gets the higher reward; "
               "the data's own share (chosen is the longer) is the reference.\n\n",
               _table(["Model", "Set", "Pairs", "Accuracy ↑", "‖h‖ mean ± std (skew)",
                       "‖h_w − h_l‖ mean ± std (skew)", "Length corr.", "Longer preferred (data: chosen longer)"],
                      [[label, n[len(PAIRS):], _f(m[f"{n}/n_pairs"], 0), _cell(m, f"{n}/accuracy", ci=True),
                        _dist(m, f"norms/{n}"), _dist(m, f"diff_norms/{n}"), _f(m[f"length_corr/{n}"], 3),
                        f"{_f(m[f'{n}/longer_preferred'], 3)} ({_f(report['gold'].get(f'{n}/chosen_longer'), 3)})"]
                       for label, m in models.items() for n in pair_sets])]
    n_rows = next(iter(models.values()))["erank/n_rows"]
    md += ["\n## Hidden states (paper Figures 1-3, Table 1)\n\n||h(x, y)||, mean ± std (skew):\n\n",
           _table(["Model", "‖Wp‖"] + [_title(n) for n in names],
                  rows(lambda m: [_f(m["wp_norm"], 3)] + [_dist(m, f"norms/{n}") for n in names])),
           *_pinned_note(_pinned_norms(models, names)),
           "\n||h(x, y_w) - h(x, y_l)|| over preference pairs, mean ± std (skew):\n\n",
           _table(["Model"] + [_title(n) for n in names], rows(lambda m: [_dist(m, f"diff_norms/{n}") for n in names])),
           f"\nEffective rank (eq. 32; rows not mean-centred; {n_rows} rows per set), Δ = erank_eval - erank_train:"
           "\n\n", _table(["Model", "erank train"] + [f"{TITLES[n]} (Δ ↓)" for n in evals],
                          rows(lambda m: [_f(m["erank/train"], 2)] + [
                              f"{_f(m[f'erank/{n}'], 2)} ({_f(m[f'erank/gap/{n}'], 2, sign='+')})" for n in evals])),
           "\n## Length bias: Spearman correlation of reward with response length in characters\n\n",
           _table(["Model"] + [_title(n) for n in names], rows(lambda m: [_f(m[f"length_corr/{n}"], 3) for n in names])
                  + [["gold r* (reference)"] + [_f(report["gold"].get(f"length_corr/{n}"), 3) for n in names]])]
    if "rm_bench" in names:
        styles = ("concise", "detailed", "markdown")
        cols = DOMAINS + ("hard", "normal", "easy", "overall")
        md += ["\n## RM-Bench (paper Table 2 layout, accuracy %)\n\n",
               _table(["Model", "Chat", "Math", "Code", "Safety", "Hard Acc", "Normal Acc", "Easy Acc", "Overall"],
                      rows(lambda m: [_f(m[f"rm_bench/{c}"], 1, 100) for c in cols])),
               "\n3x3 accuracy matrix (%), mean over domains; row = chosen style, column = rejected style "
               "(hard = above the diagonal, easy = below):\n\n"]
        matrix = {k: np.mean([m[f"rm_bench/matrix/{d}"] for d in DOMAINS if m.get(f"rm_bench/matrix/{d}")], axis=0)
                  for k, m in models.items()}
        md += [_table(["Model", "chosen \\ rejected"] + list(styles),
                      [[k if i == 0 else "", style] + [_f(v, 1, 100) for v in matrix[k][i]] for k in models
                       for i, style in enumerate(styles)])]
    if report.get("groups") and all(len(v["members"]) == 1 for v in report["groups"].values()):
        md += ["\n## Mean ± std over seeds\n\nOne seed per method: nothing to average (the rows above are the "
               "methods; SEEDS=\"1 2 3\" bash run_all.sh gives the spread over seeds).\n"]
    elif report.get("groups"):
        md += ["\n## Mean ± std over seeds\n\n",
               _table(["Method", "Seeds"] + [title for _, title in SEED_TABLE],
                      [[g, str(len(v["members"]))] + [_mean_std(v[k]) if k in v else "n/a" for k, _ in SEED_TABLE]
                       for g, v in report["groups"].items()])]
    if report.get("rloo"):
        runs = report["rloo"]
        sft = next((r["sft"] for r in runs.values() if r.get("sft")), None)
        lines = [["SFT (step 0)", _pm(sft["gold_reward"], sft["gold_reward_sem"]),
                  _f(sft["length_tokens"], 1), _f(sft["length_chars"], 1), "", "", ""]] if sft else []
        for name, r in runs.items():
            fin = r.get("final") or {}
            lines.append([f"{name} (RM {r.get('reward_model_label') or r['reward_model']}, step {fin.get('step')})",
                          _pm(fin.get("gold_reward"), fin.get("gold_reward_sem")),
                          _f(fin.get("length_tokens"), 1), _f(fin.get("length_chars"), 1),
                          _f(r["train/proxy_reward"]), _f(r["train/kl"]), _f(r["train/response_length"], 1)])
        md += ["\n## RLHF with each reward model (paper Table 3 layout; held-out prompts, gold r*, mean ± s.e.)\n\n",
               _table(["Policy", "Gold reward r*", "Length (tokens)", "Length (chars)", "Proxy reward (last step)",
                       "KL (last step)", "Train length (last step)"], lines)]
    md += ["\n## Data\n\n", _table(["Set", "Source", "Rows read", "Prompts", "Responses", "Skipped"],
                                   [[s.name, f"`{s.source}`", s.rows_read, len(s.sizes), len(s.responses),
                                     "; ".join(f"{v} {k}" for k, v in s.skipped.items()) or "0"] for s in sets])]
    md += ["\n## Plots\n\n"] + [f"![{f}]({f})\n" for f in figures]
    with open(path, "w") as f:
        f.write("".join(md))


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


def plot_all(out, report, sets, scores_all):
    """Figure 1 (||Wp|| per model), Figure 2 (||h_w - h_l|| per epoch), Figure 3 (||h|| per scenario).

    With seed groups (labels "<method>/seed<N>") colours follow the method, Figure 3 pools each method's seeds,
    and legends name methods, so 5 methods x 3 seeds stay readable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, labels, figures = report["models"], list(report["models"]), []
    method = {m: g for g, v in report.get("groups", {}).items() for m in v["members"]}
    method = {label: method.get(label, label) for label in labels}
    series = list(dict.fromkeys(method[label] for label in labels))  # one colour and legend entry each
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {m: colors[i % len(colors)] for i, m in enumerate(series)}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=120)
        plt.close(fig)
        figures.append(name)

    # Figure 3: ||h(x, y)|| distribution per scenario, models (or methods, seeds pooled) overlaid
    names = [s.name for s in sets if s.sizes]
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.6 * nrows), squeeze=False)
    for ax, n in zip(axes.flat, names):
        data = {m: np.concatenate([scores_all[label][n]["hidden_norm"].numpy() for label in labels
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
        ax.set(title=_title(n), xlabel=xlabel, ylabel="density")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    pooled = " (each method's seeds pooled)" if len(series) < len(labels) else ""
    fig.suptitle(f"Hidden-state norm per scenario (paper Fig. 3){pooled}: legend = mean ± std")
    save(fig, "fig3_hidden_norms.png")

    # Figure 2: ||h_w - h_l|| per epoch from train_rm.py's metrics.jsonl (mean, band = ± std)
    curves = {label: metrics_rows(models[label]["model"]) for label in labels}
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(7.5 if len(series) > 1 else 6, 4))
        seen = set()
        for label, rows in curves.items():
            if rows:
                m = method[label]
                e = np.array([r["epoch"] for r in rows])
                mu, sd = (np.array([r[f"epoch/hidden_diff_norm_{k}"] for r in rows]) for k in ("mean", "std"))
                ax.plot(e, mu, "o-", color=color[m], label=None if m in seen else m)
                ax.fill_between(e, mu - sd, mu + sd, color=color[m], alpha=0.08 if len(labels) > len(series) else 0.2)
                seen.add(m)
        ax.set(xlabel="epoch (0 = before training)", ylabel="||h(x, y_w) - h(x, y_l)||",
               title="Hidden-state difference per epoch (paper Fig. 2): mean, band ± std")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        save(fig, "fig2_hidden_diff_per_epoch.png")

    # Figure 1: ||Wp|| per model; the N(0, 1/(H+1)) initialisation gives E||Wp|| close to 1
    fig = wp_norm_figure(labels, [models[label]["wp_norm"] for label in labels],
                         [color[method[label]] for label in labels])
    save(fig, "fig1_wp_norm.png")

    return figures


def wp_norm_figure(labels, values, colors):
    """Figure 1: ||Wp|| per model as bars, the initialisation's E||Wp|| ~ 1 as a dashed line.

    The values are written inside the bars, at half height: trained norms sit near 1, so a value on top of a bar
    would sit on the dashed line. The figure is wide enough for its title (tight_layout cannot shrink a title).
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.75 * len(labels) + 2)), 3.8))
    bars = ax.bar(range(len(labels)), values, color=colors)
    ax.bar_label(bars, labels=[_f(v, 3) for v in values], label_type="center", fontsize=7, color="white",
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
# Seeds and RLHF: mean ± std over seeds (labels "<method>/seed<N>"), RLOO summaries (Table 3, Figure 5)
# ===================================================================================================

SEED_TABLE = (("id/accuracy", "In-Domain (Acc ↑)"), ("prompt_ood/kendall_tau", "Prompt OOD (τ ↑)"),
              ("response_ood/kendall_tau", "Response OOD (τ ↑)"), ("mutual_ood/kendall_tau", "Mutual OOD (τ ↑)"),
              ("wp_norm", "‖Wp‖"), ("norms/mutual_ood/std", "std ‖h‖ mutual OOD"),
              ("erank/gap/mutual_ood", "erank Δ mutual OOD"), ("length_corr/response_ood", "length corr. resp. OOD"))


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


def load_rloo(specs):
    """--rloo NAME=DIR -> {name: {"dir", "summary", "train": per-step rows, "gold": gold rows}}."""
    runs = {}
    for spec in specs or []:
        name, _, folder = spec.partition("=")
        rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        runs[name] = {"dir": folder, "summary": json.load(open(os.path.join(folder, "summary.json"))),
                      "train": [r for r in rows if "train/kl" in r], "gold": [r for r in rows if "gold/reward" in r]}
    return runs


def rloo_report(runs, model_paths=None):
    """report.json block: the SFT row and each policy's final row (Table 3), plus its last training step.

    reward_model_label: the RM's label among the evaluated models (e.g. bsr/seed1), so tables name it by method.
    """
    from utils import model_label

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


# the flags that say how each run was made: (report name, key in the run's *_config.json "args")
RM_SETTINGS = (("loss", "loss"), ("λ", "lam"), ("lr", "lr"), ("epochs", "epochs"), ("global batch", "global_batch_size"),
               ("micro batch", "micro_batch_size"), ("max length", "max_length"), ("seed", "seed"))
RLOO_SETTINGS = (("β (KL)", "beta"), ("lr", "lr"), ("epochs", "epochs"), ("global batch", "global_batch_size"),
                 ("k", "k"), ("max new tokens", "max_new_tokens"), ("seed", "seed"))


def run_settings(report):
    """{"models": {label: {...}}, "rloo": {name: {...}}}: the training flags read from each run's own config file
    (train_rm.py's train_config.json, rloo.py's rloo_config.json); a model without one (hub RM) is left out."""
    def read(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

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


def plot_rloo(out, runs):
    """Figure 5: proxy reward vs KL (a-b), gold reward vs step (c-d), and held-out response length, overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import utils

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    cmaps = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
    for i, (name, run) in enumerate(runs.items()):
        t, g = run["train"], run["gold"]
        cmap = plt.get_cmap(cmaps[i % len(cmaps)])
        # points coloured by step (light = early), the smoothed trend in the policy's colour: KL is not monotone
        # in the step, so a line through the points in step order would zigzag across the panel
        axes[0].scatter([r["train/kl"] for r in t], [r["train/proxy_reward"] for r in t], c=[r["step"] for r in t],
                        cmap=cmap, vmin=-0.3 * max([r["step"] for r in t] or [1]), s=10, alpha=0.8)
        if t:
            axes[0].plot(*utils.reward_vs_kl_trend(t), color=cmap(0.85), lw=2, label=f"{name} (trend)")
        axes[1].errorbar([r["step"] for r in g], [r["gold/reward"] for r in g],
                         yerr=[r.get("gold/reward_sem", 0) for r in g], marker="o", capsize=3, label=name)
        axes[2].plot([r["step"] for r in g], [r["gold/response_length"] for r in g], "o-", label=name)
    axes[0].set(xlabel="KL(π || π_ref), per sequence", ylabel="proxy reward (each policy's own RM)",
                title="Proxy reward vs KL (paper Fig. 5a-b)\npoints: steps, darker = later; line: moving average")
    axes[0].locator_params(axis="x", nbins=5)  # long tick labels such as -0.075 overlapped at the default count
    axes[1].set(xlabel="RLOO step", ylabel="gold reward r* (held-out prompts)", title="Gold reward (paper Fig. 5c-d)")
    axes[2].set(xlabel="RLOO step", ylabel="response length (tokens)", title="Held-out response length")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fig5_rloo.png"), dpi=120)
    plt.close(fig)
    return ["fig5_rloo.png"]


# ===================================================================================================
# Main
# ===================================================================================================


def _clean(obj):  # NaN -> null, so report.json is strict JSON
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def model_label(model):
    from utils import model_label as label

    return label(model)


def main(argv=None):
    args = parse_args(argv)
    import utils
    from utils import DataError, print0

    inputs = [("--model", m) for m in args.model] + [("--data-dir", args.data_dir), ("--train-file", args.train_file)]
    inputs += [("--rm-bench", x) for x in args.rm_bench or []]
    inputs += [("--rloo", x.partition("=")[2]) for x in args.rloo or []]
    utils.claim_out_dir(args.out, "eval_rm.py", inputs, legacy=("eval_config.json", ("args", "models")), create=False)
    utils.quiet_libraries()
    _, world, _, device = utils.init_distributed()
    utils.claim_out_dir(args.out, "eval_rm.py", legacy=("eval_config.json", ("args", "models")))
    utils.remove_leftovers(args.out, recurse=("cache",))  # OUT/cache is ours; a --cache-dir elsewhere is not touched
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"

    # ---------------------------------------------------------------- data
    try:
        sets = load_sets(args)
    except DataError as e:
        raise SystemExit(f"data error: {e}") from None
    labels = list(args.name or [model_label(m) for m in args.model])
    for i, label in enumerate(labels):  # unique labels: they name cache files and table rows
        if labels.count(label) > 1:
            labels[i] = f"{label}#{labels[:i].count(label) + 1}"
    plans = [cache_plan(model, label, sets, args) for model, label in zip(args.model, labels)]
    for model, (_, cached) in zip(args.model, plans):  # fail before hours of scoring, not after
        if len(cached) < len(sets):
            check_reward_checkpoint(model)

    # ---------------------------------------------------------------- score (or read the cache) and measure
    report = {"models": {}, "gold": {}, "data": {}}
    scores_all = {}
    for model, label, plan in zip(args.model, labels, plans):
        scores, wp_norm = score_model(model, label, sets, args, device, *plan)
        scores_all[label] = scores
        report["models"][label] = {"model": model, **model_metrics(sets, scores, wp_norm, args)}
        m = report["models"][label]
        print0(f"[eval] {label}: id/accuracy {_f(m['id/accuracy'])}, "
               + ", ".join(f"{s} tau {_f(m[f'{s}/kendall_tau'])}" for s in SCENARIOS[1:])
               + f", rm_bench/overall {_f(m['rm_bench/overall'])}, wp_norm {_f(wp_norm, 3)}"
               + "".join(f", {n}/accuracy {_f(m[f'{n}/accuracy'])}" for n in (s.name for s in sets)
                         if n.startswith(PAIRS)))
    for s in sets:
        if s.sizes and s.has_gold:  # the four scenarios and train (when its rows carry chosen/rejected_score)
            report["gold"][f"length_corr/{s.name}"] = spearman(np.concatenate(s.gold), s.lengths())
        if s.name.startswith(PAIRS):  # the data's own length bias, the reference for {name}/longer_preferred
            pairs, lengths = np.array(s.pairs, dtype=int).reshape(-1, 2), s.lengths()
            report["gold"][f"{s.name}/chosen_longer"] = longer_share(np.ones(len(pairs), bool), lengths[pairs[:, 0]],
                                                                    lengths[pairs[:, 1]])
        report["data"][s.name] = {"source": s.source, "rows_read": s.rows_read, "prompts": len(s.sizes),
                                  "responses": len(s.responses), "pairs": len(s.pairs), "skipped": s.skipped}

    report["groups"] = seed_groups(report["models"])
    runs = load_rloo(args.rloo)
    if runs:
        report["rloo"] = rloo_report(runs, {label: m["model"] for label, m in report["models"].items()})
    report["settings"] = run_settings(report)

    # ---------------------------------------------------------------- save
    if utils.is_rank0():
        os.makedirs(args.out, exist_ok=True)
        report = _clean(report)
        utils.write_json(os.path.join(args.out, "report.json"), report)
        utils.write_json(os.path.join(args.out, "eval_config.json"),
                         {"args": vars(args), "world_size": world, "device": str(device),
                          "models": dict(zip(labels, args.model)), "data": report["data"]})
        figures = plot_all(args.out, report, sets, scores_all) + (plot_rloo(args.out, runs) if runs else [])
        write_report_md(os.path.join(args.out, "report.md"), report, sets, figures)
        print0(f"[done] {os.path.join(args.out, 'report.md')}, report.json, {', '.join(figures)}")
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
