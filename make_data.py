"""Build the four-scenario robustness data (train / in-domain / prompt-OOD / response-OOD / mutual-OOD).

Hong et al., "On the Robustness of Reward Models for Language Model Alignment" (ICML 2025), Sec. 2.2 and
Appendix B. One folder per run; every later stage needs only its path.

    # the built-in toy world (default; offline, CPU, seconds): data + the tiny base model in DATA/base
    python make_data.py --source synthetic --out runs/toy/data --num-prompts 3000 --seed 0
    # the paper's Part 1: UltraFeedback + 4 new response models + ArmoRM as gold r* (GPUs; vLLM if installed)
    python make_data.py --source ultrafeedback --out data/uf --trust-remote-code
    # the paper's Part 3 training pairs
    python make_data.py --source skywork --out data/skywork
    # a real gold-labelled benchmark with no labelling compute: AlpacaEval annotations (GPT-4-turbo preference)
    python make_data.py --source alpaca_eval --alpaca-eval-dir ../alpaca_eval --out data/ae
    # your own pairs (and, optionally, ranking files), validated and written in the same layout
    python make_data.py --source jsonl --train-file my_pairs.jsonl --valid-file my_valid.jsonl --out data/mine

--out receives train.jsonl, valid_id.jsonl, valid_{prompt,response,mutual}_ood.jsonl, rl_prompts.jsonl,
rl_eval_prompts.jsonl, sft.jsonl and base/ (synthetic only), manifest.json: whatever the source has.
The folder is written atomically: a crash leaves the previous folder (or none), never a half-written one.
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil

import torch

import checkpoint
import generation
import toy_world
import utils
from utils import DataError, progress

# transformers, tokenizers and vLLM are imported inside the functions that use them: the jsonl and alpaca_eval
# sources need none of them, transformers alone takes seconds to import, and vLLM is optional.

STAGE = "make_data.py"
SCENARIO_FILES = ("train.jsonl", "valid_id.jsonl", "valid_prompt_ood.jsonl", "valid_response_ood.jsonl",
                  "valid_mutual_ood.jsonl")
MANIFEST_KEYS = ("source", "seed", "counts", "splits", "checks", "args")  # how an older make_data's folder is known

# ===================================================================================================
# Arguments
# ===================================================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--source", choices=sorted(SOURCES), default="synthetic", help="where the data comes from")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (same seed -> same files)")
    p.add_argument("--train-prompts", type=utils.positive_int, default=None,
                   help="|X_train| (default: 51200 for ultrafeedback as in the paper, else 80%% of the prompts)")
    p.add_argument("--pairs-per-prompt", type=utils.positive_int, default=1,
                   help="train pairs per X_train prompt (paper: 1; needs 2k+2 distinct M_train responses)")
    p.add_argument("--rl-eval-prompts", type=utils.nonneg_int, default=64,
                   help="X_valid prompts held out of rl_prompts.jsonl for gold-reward tracking (at most half)")
    g = p.add_argument_group("synthetic")
    g.add_argument("--num-prompts", type=utils.positive_int, default=3000, help="distinct toy prompts (split 80/20)")
    g.add_argument("--vocab-size", type=utils.positive_int, default=1024, help="BPE vocabulary of the tiny base model")
    g.add_argument("--hidden-size", type=utils.positive_int, default=64, help="hidden size of the tiny Llama")
    g.add_argument("--num-layers", type=utils.positive_int, default=2, help="layers of the tiny Llama")
    g.add_argument("--num-heads", type=utils.positive_int, default=4, help="attention heads of the tiny Llama")
    g.add_argument("--intermediate-size", type=utils.positive_int, default=None, help="MLP size (default 4 x hidden)")
    g.add_argument("--max-position-embeddings", type=utils.positive_int, default=512,
                   help="context length of the tiny Llama")
    g = p.add_argument_group("real sources")
    g.add_argument("--dataset", default=None, help="hub id or local JSONL/folder (default: openbmb/UltraFeedback or "
                                                   "Skywork/Skywork-Reward-Preference-80K-v0.2)")
    g.add_argument("--split", default="train", help="dataset split")
    g.add_argument("--gold-model", default=None,
                   help="gold RM r* (ultrafeedback default: RLHFlow/ArmoRM-Llama3-8B-v0.1; skywork: optional)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the gold/new models' own code (ArmoRM needs it)")
    g.add_argument("--gold-batch-size", type=utils.positive_int, default=16, help="sequences per gold-RM forward")
    g.add_argument("--gold-max-length", type=utils.positive_int, default=4096,
                   help="tokens per gold-RM input (longer: keep the end)")
    g.add_argument("--new-models", default="google/gemma-2-2b-it,allenai/OLMo-2-1124-7B-Instruct,"
                                           "HuggingFaceTB/SmolLM2-1.7B-Instruct,mistralai/Mistral-7B-Instruct-v0.2",
                   help="comma-separated M_valid generators for response-/mutual-OOD (ultrafeedback)")
    g.add_argument("--samples-per-model", type=utils.positive_int, default=1,
                   help="responses per prompt from each new model")
    g.add_argument("--ood-prompts", type=utils.positive_int, default=None,
                   help="cap on prompts of each generated OOD file (default all)")
    g.add_argument("--generator", choices=("auto", "vllm", "hf"), default="auto",
                   help="auto: vLLM if installed and a GPU, else transformers")
    g.add_argument("--tensor-parallel-size", type=utils.positive_int, default=1, help="vLLM tensor parallel GPUs")
    g.add_argument("--temperature", type=utils.nonneg_float, default=0.7, help="sampling temperature (0 = greedy)")
    g.add_argument("--top-p", type=utils.number_type(float, 0, 1, low_open=True), default=0.95, help="nucleus sampling")
    g.add_argument("--max-new-tokens", type=utils.positive_int, default=1024, help="generation length")
    g.add_argument("--gen-batch-size", type=utils.positive_int, default=16,
                   help="prompts per transformers generate call")
    g.add_argument("--alpaca-eval-dir", default=None, help="AlpacaEval results folder (or the folder holding results/)")
    g.add_argument("--annotator", default="weighted_alpaca_eval_gpt4_turbo", help="AlpacaEval annotator folder")
    g.add_argument("--reference-model", default="gpt4_1106_preview", help="AlpacaEval reference (excluded)")
    g.add_argument("--valid-families", default="gemma,mistral,phi", help="AlpacaEval: model families forming M_valid")
    g.add_argument("--valid-models", default=None, help="AlpacaEval: exact M_valid model names (overrides families)")
    g = p.add_argument_group("jsonl (your own data)")
    g.add_argument("--train-file", default=None, help="pairs {prompt, chosen, rejected[, *_score, *_model]}")
    g.add_argument("--valid-file", default=None, help="in-domain validation pairs -> valid_id.jsonl")
    g.add_argument("--prompt-ood-file", default=None, help="ranking rows {prompt, responses, gold_scores[, models]}")
    g.add_argument("--response-ood-file", default=None, help="ranking rows for valid_response_ood.jsonl")
    g.add_argument("--mutual-ood-file", default=None, help="ranking rows for valid_mutual_ood.jsonl")
    g.add_argument("--rl-prompts-file", default=None, help="{prompt} rows -> rl_prompts.jsonl")
    g.add_argument("--rl-eval-prompts-file", default=None, help="{prompt} rows -> rl_eval_prompts.jsonl")
    return p.parse_args(argv)


# ===================================================================================================
# Sources. Each returns (files {name: rows}, M_train, M_valid, splits, extra manifest fields) and counts
# what it drops in `skipped` {file: {reason: n}}.
# ===================================================================================================


def source_synthetic(args, skipped):
    """The toy world (toy_world.py): its prompts, its ten response models scored by its gold r*, and sft.jsonl."""
    if args.pairs_per_prompt * 2 + 2 > len(toy_world.M_TRAIN):
        raise SystemExit(f"--pairs-per-prompt {args.pairs_per_prompt}: the toy world has {len(toy_world.M_TRAIN)} "
                         f"M_train models, enough for at most {(len(toy_world.M_TRAIN) - 2) // 2} pairs per prompt")
    prompts = {f"syn-{i:06d}": p for i, p in enumerate(toy_world.make_prompts(args.num_prompts, args.seed))}
    train_ids, valid_ids = split_prompts(prompts, args.train_prompts or round(0.8 * len(prompts)), args.seed)
    cand_train, cand_valid, sft, train_set = {}, {}, [], set(train_ids)
    for pid in progress(sorted(prompts), desc="toy responses", disable=len(prompts) < 5000):
        in_train = pid in train_set
        cand_train[pid], cand_valid[pid], answer = toy_world.candidate_responses(
            prompts[pid], random.Random(f"{args.seed}-{pid}"), 2 * args.pairs_per_prompt + 2 if in_train else 4,
            sft_answer=in_train)
        if in_train:  # the SFT corpus uses X_train prompts only
            sft.append({"messages": [{"role": "user", "content": prompts[pid]},
                                     {"role": "assistant", "content": answer}]})
    files = build_scenarios(prompts, train_ids, valid_ids, cand_train, cand_valid, args, skipped)
    # Prompts are distinct as strings, not as tasks: `Add 7 and 12.` in X_valid is `What is 12 + 7?` of X_train
    # reworded. Such rows would make the prompt-shifted sets partly in-domain, so they go (counted).
    train_tasks = {toy_world.task_key(prompts[pid]) for pid in train_ids}
    for name in ("valid_prompt_ood.jsonl", "valid_mutual_ood.jsonl", "rl_prompts.jsonl", "rl_eval_prompts.jsonl"):
        files[name] = keep_counted(files[name], lambda r: toy_world.task_key(r["prompt"]) not in train_tasks,
                                   skipped, name, "the task of an X_train prompt, reworded")
    files["sft.jsonl"] = sft
    responses = [(r["prompt"], y, m) for name in SCENARIO_FILES for r in files[name]
                 for y, m in zip(responses_of(r), models_of(r))]
    world = {"families": sorted(toy_world.FAMILIES), "spurious": toy_world.spurious_stats(responses)}
    splits = {"train_prompts": len(train_ids), "valid_prompts": len(valid_ids)}
    return files, toy_world.M_TRAIN, toy_world.M_VALID, splits, world


def string_field(row, key, where):
    if key not in row:
        raise DataError(f"{where}: missing field '{key}'")
    if not isinstance(row[key], str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(row[key]).__name__}")
    return row[key]


def source_ultrafeedback(args, skipped):
    """Appendix B: dedupe prompts, drop rows with 2+ identical responses, 51,200 train prompts (2 responses
    for train, 2 for D_ID), the rest prompt-OOD; 4 new models answer for response-/mutual-OOD; gold labels all."""
    dataset = args.dataset or "openbmb/UltraFeedback"
    prompts, cand_train, seen = {}, {}, set()
    n_rows = 0
    for where, row in progress(utils.iter_rows(dataset, args.split), desc="read UltraFeedback", unit=" rows"):
        n_rows += 1
        instruction = string_field(row, "instruction", where)
        completions = row.get("completions")
        if not isinstance(completions, list):
            raise DataError(f"{where}: field 'completions' must be a list of {{model, response}} objects")
        cands = []
        for j, c in enumerate(completions):
            if not isinstance(c, dict):
                raise DataError(f"{where}: field 'completions'[{j}] must be an object")
            for key in ("response", "model"):
                if not isinstance(c.get(key), str):
                    raise DataError(f"{where}: field 'completions'[{j}].{key} must be a string, "
                                    f"got {type(c.get(key)).__name__}")
            cands.append({"model": c["model"], "response": c["response"]})
        if not instruction.strip():
            count_skip(skipped, "source", "empty prompt")
        elif instruction in seen:
            count_skip(skipped, "source", "duplicate prompt")
        elif len(cands) < 4:
            count_skip(skipped, "source", "fewer than 4 responses")
        elif any(not c["response"].strip() for c in cands):
            count_skip(skipped, "source", "empty response")
        elif len({c["response"].strip() for c in cands}) < len(cands):
            count_skip(skipped, "source", "2 or more identical responses")
        else:
            pid = prompt_id("uf", instruction)
            prompts[pid], cand_train[pid] = instruction, cands
        seen.add(instruction)
    n_train = args.train_prompts or 51200
    if n_train >= len(prompts):
        raise SystemExit(f"{dataset}: {len(prompts)} usable prompts of {n_rows} rows; --train-prompts {n_train} leaves "
                         "none for prompt-OOD (lower --train-prompts)")
    train_ids, valid_ids = split_prompts(prompts, n_train, args.seed)
    rng = random.Random(f"{args.seed}-ood")
    ood_train = sorted(rng.sample(train_ids, min(len(train_ids), args.ood_prompts or len(train_ids))))
    ood_valid = sorted(rng.sample(valid_ids, min(len(valid_ids), args.ood_prompts or len(valid_ids))))
    cand_valid = generate_responses(args, {pid: prompts[pid] for pid in ood_train + ood_valid}, skipped)
    m_valid = sorted({c["model"] for cs in cand_valid.values() for c in cs})
    m_train = sorted({c["model"] for cs in cand_train.values() for c in cs})
    label_with_gold(args, prompts, [cand_train, cand_valid], skipped)
    files = build_scenarios(prompts, train_ids, valid_ids, cand_train, cand_valid, args, skipped)
    return files, m_train, m_valid, {"source_rows": n_rows, "usable_prompts": len(prompts),
                                     "train_prompts": len(train_ids), "valid_prompts": len(valid_ids)}, {}


def text_if_single(msgs, role):
    """A single message of this role -> its text; anything longer stays a message list."""
    return msgs[0]["content"] if len(msgs) == 1 and msgs[0]["role"] == role else msgs


def source_skywork(args, skipped):
    """Skywork-Reward-Preference-80K-v0.2 (chosen/rejected conversations) -> train.jsonl with the dataset's labels.
    With --gold-model the pairs are also scored (scores written, labels kept; agreement in the manifest)."""
    dataset = args.dataset or "Skywork/Skywork-Reward-Preference-80K-v0.2"
    rows = []
    for where, row in progress(utils.iter_rows(dataset, args.split), desc="read Skywork", unit=" rows"):
        parsed = utils.parse_pair(row, where)
        if parsed[0] == "skip":
            count_skip(skipped, "train.jsonl", parsed[1])
            continue
        prompt, chosen, rejected = parsed
        if not prompt:
            count_skip(skipped, "train.jsonl", "no prompt (no shared leading message)")
            continue
        prompt = text_if_single(prompt, "user")
        rows.append({"prompt_id": prompt_id("sky", prompt), "prompt": prompt,
                     "chosen": text_if_single(chosen, "assistant"), "rejected": text_if_single(rejected, "assistant"),
                     "chosen_score": None, "rejected_score": None, "chosen_model": None, "rejected_model": None})
    extra = {}
    if args.gold_model:
        scores = gold_scorer(args)([(r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")])
        for i, r in enumerate(rows):
            r["chosen_score"], r["rejected_score"] = scores[2 * i], scores[2 * i + 1]
        rows = keep_counted(rows, lambda r: math.isfinite(r["chosen_score"]) and math.isfinite(r["rejected_score"]),
                            skipped, "train.jsonl", "non-finite gold score")  # the gold model overflowed
        agree = sum(r["chosen_score"] > r["rejected_score"] for r in rows)
        extra["gold_agrees_with_labels"] = round(agree / max(1, len(rows)), 4)
    return {"train.jsonl": rows}, [], [], {"train_prompts": len({r["prompt_id"] for r in rows})}, extra


AE_FAMILIES = [  # first match wins: 'oasst-sft-pythia-12b' is pythia, 'alpaca-farm-ppo-sim-gpt4-20k' is llama
    ("pythia", r"pythia"), ("falcon", r"falcon"), ("gemma", r"gemma"), ("phi", r"^phi"), ("qwen", r"qwen"),
    ("mistral", r"mistral|mixtral|zephyr"), ("chatglm", r"chatglm"), ("claude", r"claude"),
    ("llama", r"llama|alpaca|vicuna|wizardlm|ultralm|baize|minotaur|nous-hermes|humpback|guanaco|koala|tulu"),
    ("gpt", r"^gpt|davinci")]


def model_family(name):
    return next((fam for fam, rx in AE_FAMILIES if re.search(rx, name.lower())), name)


def source_alpaca_eval(args, skipped):
    """AlpacaEval results/<model>/<annotator>/annotations.json: gold r* = preference - 1 for (instruction, output_2)."""
    if not args.alpaca_eval_dir:
        raise SystemExit("--source alpaca_eval needs --alpaca-eval-dir DIR (laid out like AlpacaEval's results/)")
    root = os.path.join(args.alpaca_eval_dir, "results")
    root = root if os.path.isdir(root) else args.alpaca_eval_dir
    if not os.path.isdir(root):
        raise SystemExit(f"--alpaca-eval-dir {args.alpaca_eval_dir}: not a folder")
    by_prompt = {}  # instruction -> {model: (response, score)}
    models = []
    for model in sorted(os.listdir(root)):
        path = os.path.join(root, model, args.annotator, "annotations.json")
        if model == args.reference_model or not os.path.isdir(os.path.join(root, model)):
            continue
        if not os.path.exists(path):
            count_skip(skipped, "source", f"model folder without {args.annotator}/annotations.json")
            continue
        records = utils.read_json(path)  # UTF-8 (BOM allowed); bad bytes or JSON name file:line
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a list of annotation records, got {type(records).__name__}")
        models.append(model)
        for i, rec in enumerate(records):
            where = f"{path} record {i}"
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected an object")
            instruction, output = string_field(rec, "instruction", where), rec.get("output_2")
            if not isinstance(output, str):
                raise DataError(f"{where}: field 'output_2' must be a string, got {type(output).__name__}")
            if rec.get("preference") is None:  # the annotator's call failed (AlpacaEval writes null)
                count_skip(skipped, "source", "preference is null (annotation failed)")
                continue
            try:
                preference = float(rec["preference"])
            except (TypeError, ValueError):
                raise DataError(f"{where}: field 'preference' must be a number, "
                                f"got {rec.get('preference')!r}") from None
            if not math.isfinite(preference):
                count_skip(skipped, "source", "preference is not finite (NaN or infinite)")
            elif not output.strip():
                count_skip(skipped, "source", "empty response")
            elif model in by_prompt.setdefault(instruction, {}):
                count_skip(skipped, "source", "instruction repeated within one model's file")
            else:
                by_prompt[instruction][model] = (output, round(preference - 1.0, 6))
    if not models:
        raise SystemExit(f"{root}: no <model>/{args.annotator}/annotations.json found")
    if args.valid_models:
        m_valid = [m.strip() for m in args.valid_models.split(",") if m.strip()]
        unknown = [m for m in m_valid if m not in models]
        if unknown:
            raise SystemExit(f"--valid-models: unknown model(s) {unknown}; models present: {', '.join(models)}")
    else:
        families = {f.strip() for f in args.valid_families.split(",")}
        m_valid = [m for m in models if model_family(m) in families]
    m_train = [m for m in models if m not in m_valid]
    if len(m_valid) < 4 or len(m_train) < 4:
        raise SystemExit(f"need at least 4 models on each side: M_train {m_train}, M_valid {m_valid} "
                         "(change --valid-families or --valid-models)")
    prompts = {prompt_id("ae", p): p for p in by_prompt}
    cand_train, cand_valid = {}, {}
    for pid, p in prompts.items():
        cands = [{"model": m, "response": r, "score": s} for m, (r, s) in sorted(by_prompt[p].items())]
        cand_train[pid] = [c for c in cands if c["model"] in m_train]
        cand_valid[pid] = [c for c in cands if c["model"] in m_valid]
    train_ids, valid_ids = split_prompts(prompts, args.train_prompts or round(0.8 * len(prompts)), args.seed)
    files = build_scenarios(prompts, train_ids, valid_ids, cand_train, cand_valid, args, skipped)
    splits = {"train_prompts": len(train_ids), "valid_prompts": len(valid_ids)}
    return files, m_train, m_valid, splits, {"families": {m: model_family(m) for m in models}}


def read_pair_file(path, skipped, name):
    rows = []
    for where, row in utils.iter_rows(path):
        parsed = utils.parse_pair(row, where)
        if parsed[0] == "skip":
            count_skip(skipped, name, parsed[1])
            continue
        scores = [row.get("chosen_score"), row.get("rejected_score")]
        for k, s in zip(("chosen_score", "rejected_score"), scores):
            if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)):
                raise DataError(f"{where}: field '{k}' must be a finite number or null, got {s!r}")
        if None not in scores and scores[0] <= scores[1]:
            raise DataError(f"{where}: field 'chosen_score' ({scores[0]}) must be higher than "
                            f"'rejected_score' ({scores[1]})")
        out = {k: row[k] for k in ("prompt", "chosen", "rejected")} if row.get("prompt") is not None else {
            "prompt": parsed[0], "chosen": parsed[1], "rejected": parsed[2]}  # conversations: write the split form
        utils.as_messages(out["prompt"], "user", where, "prompt")
        rows.append({"prompt_id": row.get("prompt_id") or prompt_id("own", out["prompt"]), **out,
                     "chosen_score": scores[0], "rejected_score": scores[1],
                     "chosen_model": row.get("chosen_model"), "rejected_model": row.get("rejected_model")})
    return rows


def read_ranking_file(path, skipped, name):
    rows = []
    for where, row in utils.iter_rows(path):
        if "prompt" not in row:
            raise DataError(f"{where}: missing field 'prompt'")
        utils.as_messages(row["prompt"], "user", where, "prompt")
        responses, gold = row.get("responses"), row.get("gold_scores")
        if not isinstance(responses, list) or any(not isinstance(x, str) for x in responses):
            raise DataError(f"{where}: field 'responses' must be a list of strings")
        if not isinstance(gold, list) or len(gold) != len(responses) or any(
                isinstance(g, bool) or not isinstance(g, (int, float)) for g in gold):
            raise DataError(f"{where}: field 'gold_scores' must be a list of {len(responses)} numbers "
                            "(one per response)")
        bad = [j for j, g in enumerate(gold) if not math.isfinite(g)]
        if bad:
            raise DataError(f"{where}: field 'gold_scores'[{bad[0]}] is {gold[bad[0]]!r}; gold scores must be finite")
        models = row.get("models") or [None] * len(responses)
        if not isinstance(models, list) or len(models) != len(responses):
            raise DataError(f"{where}: field 'models' must be a list of {len(responses)} names (one per response)")
        if len(responses) < 2:
            count_skip(skipped, name, "fewer than 2 responses")
            continue
        rows.append({"prompt_id": row.get("prompt_id") or prompt_id("own", row["prompt"]), "prompt": row["prompt"],
                     "responses": responses, "gold_scores": gold, "models": models})
    return rows


def read_prompt_file(path):
    rows = []
    for where, row in utils.iter_rows(path):
        prompt = string_field(row, "prompt", where)
        rows.append({"prompt_id": row.get("prompt_id") or prompt_id("own", prompt), "prompt": prompt})
    return rows


def source_jsonl(args, skipped):
    """Your own files, validated (a bad row: an error naming file, line and field) and copied in the same layout."""
    if not args.train_file:
        raise SystemExit("--source jsonl needs --train-file F (pairs: prompt/chosen/rejected)")
    files = {"train.jsonl": read_pair_file(args.train_file, skipped, "train.jsonl")}
    if args.valid_file:
        files["valid_id.jsonl"] = read_pair_file(args.valid_file, skipped, "valid_id.jsonl")
    for path, name in ((args.prompt_ood_file, "valid_prompt_ood.jsonl"),
                       (args.response_ood_file, "valid_response_ood.jsonl"),
                       (args.mutual_ood_file, "valid_mutual_ood.jsonl")):
        if path:
            files[name] = read_ranking_file(path, skipped, name)
    for path, name in ((args.rl_prompts_file, "rl_prompts.jsonl"),
                       (args.rl_eval_prompts_file, "rl_eval_prompts.jsonl")):
        if path:
            files[name] = read_prompt_file(path)
    return files, [], [], {"train_prompts": len({r["prompt_id"] for r in files["train.jsonl"]})}, {}


SOURCES = {"synthetic": source_synthetic, "ultrafeedback": source_ultrafeedback, "skywork": source_skywork,
           "alpaca_eval": source_alpaca_eval, "jsonl": source_jsonl}

# ===================================================================================================
# Real-source compute: new-model generation (vLLM or transformers) and gold labelling
# ===================================================================================================


def short_model_name(path):
    """A local model folder -> its folder name; a hub id stays as it is."""
    return os.path.basename(os.path.normpath(path)) if os.path.isdir(path) else path


def model_seed(seed, name):
    """Each new model's sampling seed, from --seed and its name: one seed for all would feed every model the same
    random draws, and models whose next-token distributions are alike would then write alike texts."""
    return int(hashlib.sha256(f"{seed}-{short_model_name(name)}".encode()).hexdigest()[:8], 16)


def new_model_names(args):
    """--new-models as a list. Each writes its responses under its short name, which also seeds its sampling, so two
    local folders of one name ('final', 'base') would be one model of M_valid: refused."""
    models = [m.strip() for m in args.new_models.split(",") if m.strip()]
    names = [short_model_name(m) for m in models]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise SystemExit(f"--new-models: {models[names.index(name)]} and {models[i]} are both named {name!r} "
                             "(a local model is named by its folder, the name its responses carry); rename a folder")
    return models


def generate_responses(args, prompts, skipped):
    """pid -> [{model, response}] from --new-models, --samples-per-model each (4 per prompt are used)."""
    models = new_model_names(args)
    if len(models) * args.samples_per_model < 4:
        raise SystemExit(f"--new-models x --samples-per-model = {len(models)} x {args.samples_per_model}: "
                         "fewer than 4 responses per prompt")
    use_vllm = args.generator == "vllm" or (args.generator == "auto" and generation.vllm_importable()
                                            and torch.cuda.is_available())
    pids = sorted(prompts, key=lambda p: (len(prompts[p]), p))  # similar lengths share a batch: less padding
    conversations = [[{"role": "user", "content": prompts[pid]}] for pid in pids]
    out = {pid: [] for pid in pids}
    for name in models:
        seed = model_seed(args.seed, name)
        if use_vllm:
            texts = generation.chat_samples_vllm(name, conversations, args.samples_per_model, args, seed,
                                                 args.tensor_parallel_size, args.trust_remote_code)
        else:
            texts = generation.chat_samples_hf(name, conversations, args.samples_per_model, args, seed,
                                               args.gen_batch_size, args.trust_remote_code,
                                               desc=f"generate {short_model_name(name)}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for pid, ts in zip(pids, texts):
            out[pid] += [{"model": short_model_name(name), "response": t.strip()} for t in ts]
    for pid in pids:  # an empty generation cannot be ranked (repeated texts: see build_scenarios)
        out[pid] = keep_counted(out[pid], lambda c: c["response"], skipped, "source", "empty generated response")
    return out


def gold_scorer(args):
    """A function [(prompt, response)] -> [float]: --gold-model's reward (generation.gold_scorer)."""
    return generation.gold_scorer(args.gold_model, args.trust_remote_code, args.gold_batch_size, args.gold_max_length,
                                  desc=f"gold r* ({short_model_name(args.gold_model)})")


def label_with_gold(args, prompts, cand_dicts, skipped):
    """Add 'score' (the gold RM's reward) to every candidate, each distinct (prompt, response) scored once.
    A non-finite score (the gold model overflowed) drops that candidate, counted."""
    if not args.gold_model:
        args.gold_model = "RLHFlow/ArmoRM-Llama3-8B-v0.1"
    keys = sorted({(pid, c["response"]) for cands in cand_dicts for pid, cs in cands.items() for c in cs})
    scores = dict(zip(keys, gold_scorer(args)([(prompts[pid], y) for pid, y in keys])))
    for cands in cand_dicts:
        for pid, cs in cands.items():
            for c in cs:
                c["score"] = scores[(pid, c["response"])]
            cands[pid] = keep_counted(cs, lambda c: math.isfinite(c["score"]), skipped, "source",
                                      "non-finite gold score")


# ===================================================================================================
# Building the scenarios from scored candidates: prompt split, pairs (D_train, D_ID), ranking rows
# (the three OOD sets), RL prompts, and the checks the manifest reports
# ===================================================================================================


def prompt_id(source, prompt):
    return f"{source}-{hashlib.sha1(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:12]}"


def count_skip(skipped, file, reason, n=1):
    skipped.setdefault(file, {})
    skipped[file][reason] = skipped[file].get(reason, 0) + n


def keep_counted(rows, keep, skipped, file, reason):
    """The rows for which keep(row) is true; the others are counted as skipped for this reason."""
    kept = [r for r in rows if keep(r)]
    if len(kept) < len(rows):
        count_skip(skipped, file, reason, len(rows) - len(kept))
    return kept


def responses_of(row):
    return [row["chosen"], row["rejected"]] if "chosen" in row else row.get("responses", [])


def models_of(row):
    return [row["chosen_model"], row["rejected_model"]] if "chosen" in row else row.get("models", [])


def prompt_response_keys(row):
    """One (prompt, response) key per response of a row, comparable across files (a prompt may be a message list)."""
    return [(json.dumps(row["prompt"]), json.dumps(y)) for y in responses_of(row)]


def train_prompt_responses(files):
    return {key for r in files.get("train.jsonl", []) for key in prompt_response_keys(r)}


def split_prompts(pids, n_train, seed):
    if not 0 < n_train < len(pids):
        raise SystemExit(f"--train-prompts {n_train}: need 0 < X_train < {len(pids)} prompts (the rest is X_valid)")
    order = sorted(pids)
    random.Random(f"{seed}-split").shuffle(order)
    return order[:n_train], order[n_train:]


def pair_up(cands, n_pairs, rng):
    """Random disjoint pairs of candidates {model, response, score} whose gold scores differ.

    The paper draws two random responses of four for train and keeps the other two for D_ID; a pair
    whose gold scores tie carries no label, so a response is paired with the next one that does not tie
    (trying a few random orders when ties leave too few pairs).
    """
    best = []
    for _ in range(10):  # a few random orders: keep the first that yields n_pairs untied pairs
        pool, pairs = list(cands), []
        rng.shuffle(pool)
        while pool and len(pairs) < n_pairs:
            a = pool.pop(0)
            j = next((i for i, b in enumerate(pool) if b["score"] != a["score"]), None)
            if j is not None:
                pairs.append((a, pool.pop(j)))
        if len(pairs) > len(best):
            best = pairs
        if len(best) == n_pairs:
            break
    return best


def pair_row(pid, prompt, a, b):
    c, r = (a, b) if a["score"] > b["score"] else (b, a)
    return {"prompt_id": pid, "prompt": prompt, "chosen": c["response"], "rejected": r["response"],
            "chosen_score": c["score"], "rejected_score": r["score"], "chosen_model": c["model"],
            "rejected_model": r["model"]}


def ranking_row(pid, prompt, cands, rng, file, skipped):
    if len(cands) < 4:
        return count_skip(skipped, file, "fewer than 4 responses")
    pick = rng.sample(list(cands), 4)
    if len({c["score"] for c in pick}) == 1:
        return count_skip(skipped, file, "all 4 gold scores tied")
    return {"prompt_id": pid, "prompt": prompt, "responses": [c["response"] for c in pick],
            "gold_scores": [c["score"] for c in pick], "models": [c["model"] for c in pick]}


def build_scenarios(prompts, train_ids, valid_ids, cand_train, cand_valid, args, skipped):
    """The four scenarios and the RL prompt files. prompts: pid -> prompt; cand_*: pid -> [{model, response, score}]
    from M_train / M_valid. Returns {file name: rows}."""
    files = {name: [] for name in SCENARIO_FILES}
    for pid in prompts:  # identical texts from two models: keep the first (M_train before M_valid), count the rest
        seen = set()  # this prompt's response texts so far (the test below adds each text it keeps)
        for cands, name in ((cand_train, "M_train"), (cand_valid, "M_valid")):
            if pid in cands:
                cands[pid] = keep_counted(
                    cands[pid], lambda c: c["response"] not in seen and not seen.add(c["response"]),
                    skipped, "source", f"{name} response identical to another model's")
    rng = random.Random(f"{args.seed}-scenarios")
    k = args.pairs_per_prompt
    for pid in train_ids:
        pairs = pair_up(cand_train.get(pid, []), k + 1, rng)  # k train pairs, then one for D_ID
        for a, b in pairs[:k]:
            files["train.jsonl"].append(pair_row(pid, prompts[pid], a, b))
        if len(pairs) <= k:
            count_skip(skipped, "valid_id.jsonl", "gold ties or too few responses")
            if len(pairs) < k:
                count_skip(skipped, "train.jsonl", "gold ties or too few responses", k - len(pairs))
        else:
            files["valid_id.jsonl"].append(pair_row(pid, prompts[pid], *pairs[-1]))
    for name, ids, cands in (("valid_prompt_ood.jsonl", valid_ids, cand_train),
                             ("valid_response_ood.jsonl", train_ids, cand_valid),
                             ("valid_mutual_ood.jsonl", valid_ids, cand_valid)):
        for pid in ids:
            if pid in cands:
                row = ranking_row(pid, prompts[pid], cands[pid], rng, name, skipped)
                if row:
                    files[name].append(row)
    # RLOO prompts come from X_valid (as in the paper), with a disjoint held-out subset for gold-reward tracking
    ids = list(valid_ids)
    random.Random(f"{args.seed}-rl").shuffle(ids)
    n_eval = min(args.rl_eval_prompts, len(ids) // 2)
    rows = [{"prompt_id": pid, "prompt": prompts[pid]} for pid in ids]
    files["rl_prompts.jsonl"] = sorted(rows[n_eval:], key=lambda r: r["prompt_id"])
    files["rl_eval_prompts.jsonl"] = sorted(rows[:n_eval], key=lambda r: r["prompt_id"])
    return files


def drop_train_overlap(files, skipped):
    """No (prompt, response) of a validation file may also appear in train.jsonl: such rows are dropped (counted)."""
    in_train = train_prompt_responses(files)
    for name in [n for n in files if n.startswith("valid_")]:
        files[name] = keep_counted(files[name], lambda r: not any(k in in_train for k in prompt_response_keys(r)),
                                   skipped, name, "a response also in train.jsonl for the same prompt")


def split_checks(files, m_train, m_valid):
    """The manifest's checks, computed from the rows that are written."""
    def prompts(name):
        return {json.dumps(r["prompt"]) for r in files.get(name, [])}

    def models(name):
        return {m for r in files.get(name, []) for m in models_of(r)}

    train_p = prompts("train.jsonl") | prompts("valid_id.jsonl")
    unseen = prompts("valid_prompt_ood.jsonl") | prompts("valid_mutual_ood.jsonl")
    rl = prompts("rl_prompts.jsonl")
    in_train = train_prompt_responses(files)
    overlap = sum(k in in_train for name in files if name.startswith("valid_") for r in files[name]
                  for k in prompt_response_keys(r))
    seen_m = models("train.jsonl") | models("valid_id.jsonl") | models("valid_prompt_ood.jsonl")
    new_m = models("valid_response_ood.jsonl") | models("valid_mutual_ood.jsonl")
    checks = {
        "train_and_prompt_ood_prompts_disjoint": not (train_p & unseen),
        "train_and_rl_prompts_disjoint": not (train_p & (rl | prompts("rl_eval_prompts.jsonl"))),
        "rl_prompts_and_rl_eval_prompts_disjoint": not (rl & prompts("rl_eval_prompts.jsonl")),
        "m_train_and_m_valid_disjoint": not (set(m_train) & set(m_valid)),
        "seen_files_use_only_m_train": seen_m <= set(m_train),
        "ood_response_files_use_only_m_valid": new_m <= set(m_valid),
        "no_validation_pair_in_train": overlap == 0,
    }
    if not m_train and not m_valid:  # --source jsonl declares no model sets: the rows' model names are all there is
        checks.update(m_train_and_m_valid_disjoint=not (seen_m & new_m) if seen_m and new_m else None,
                      seen_files_use_only_m_train=None, ood_response_files_use_only_m_valid=None)  # None: unknown
    return checks


# ===================================================================================================
# The tiny base model of the toy world (byte-level BPE tokenizer + random-init Llama), HF format
# ===================================================================================================

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def base_model_corpus(files):
    """Every text the run writes: the tokenizer is trained on them."""
    texts = [r["prompt"] for r in files["rl_prompts.jsonl"] + files["rl_eval_prompts.jsonl"]] + [
        m["content"] for r in files["sft.jsonl"] for m in r["messages"]]
    for rows in files.values():
        for r in rows:
            texts += [r[k] for k in ("prompt", "chosen", "rejected") if k in r] + r.get("responses", [])
    return texts


def build_base_model(path, texts, args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, show_progress=False,
                                  special_tokens=["<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>", "<|system|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   model_max_length=args.max_position_embeddings)
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(fast), hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                         intermediate_size=args.intermediate_size or 4 * args.hidden_size,
                         num_attention_heads=args.num_heads, num_key_value_heads=args.num_heads,
                         max_position_embeddings=args.max_position_embeddings, tie_word_embeddings=True,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return {"vocab_size": len(fast), "parameters": sum(p.numel() for p in model.parameters()),
            "hidden_size": args.hidden_size, "num_layers": args.num_layers}


# ===================================================================================================
# Main: claim --out, read the source, build, check, write atomically
# ===================================================================================================


def remove_stale_tmp(out):
    """Clean what a crashed make_data.py left next to --out (folders marked as ours by .written_by, whose process is
    gone): '<out>.tmp-<pid>' is deleted; the backup '<out>.old-<pid>' is put back when --out is missing (the crash
    fell between atomic_path's two renames), else deleted. Anything else of those names is left alone.
    (checkpoint.remove_leftovers cleans inside a folder the stage owns; the parent of --out is not ours.)"""
    parent, base = os.path.split(os.path.abspath(out))
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        m = checkpoint.LEFTOVER.match(name)  # atomic_path's '<out>.tmp-<pid>' / '<out>.old-<pid>'
        path = os.path.join(parent, name)
        if (m and m["name"] == base and os.path.isdir(path) and checkpoint.folder_owner(path) == STAGE
                and not checkpoint.pid_alive(int(m["pid"]))):
            if m["kind"] == "old" and not os.path.exists(out):
                os.replace(path, out)
                print(f"[start] put back {out} from {path}, left by a crashed make_data.py")
            else:
                shutil.rmtree(path, ignore_errors=True)
                print(f"[start] removed {path}, left by a crashed make_data.py")


def main(argv=None):
    args = parse_args(argv)
    # --out is replaced as a whole, so it must be a new folder or one make_data.py wrote (its .written_by, or for an
    # older version's folder, a manifest with make_data's own keys): never a folder that merely holds a manifest.json
    inputs = [(f"--{k.replace('_', '-')}", getattr(args, k)) for k in (
        "train_file", "valid_file", "prompt_ood_file", "response_ood_file", "mutual_ood_file", "rl_prompts_file",
        "rl_eval_prompts_file", "dataset", "alpaca_eval_dir", "gold_model")]
    if args.source == "ultrafeedback":  # the one source that samples --new-models: local folders are inputs too
        inputs += [("--new-models", m) for m in new_model_names(args)]
    checkpoint.claim_out_dir(args.out, STAGE, inputs, legacy=("manifest.json", MANIFEST_KEYS), create=False)
    remove_stale_tmp(args.out)
    utils.quiet_libraries()
    skipped = {}
    try:
        files, m_train, m_valid, splits, extra = SOURCES[args.source](args, skipped)
    except DataError as e:
        raise SystemExit(f"data error: {e}") from None
    drop_train_overlap(files, skipped)
    checks = split_checks(files, m_train, m_valid)
    if args.source != "jsonl" and False in checks.values():  # by construction; a model in both sets fails here
        failed = [k for k, v in checks.items() if v is False]
        raise SystemExit(f"split checks failed: {failed}; M_train {m_train}, M_valid {m_valid}")
    for name, ok in checks.items():
        if ok is False:
            print(f"[warning] check failed: {name}")
    counts = {name: len(rows) for name, rows in files.items()}
    manifest = {"source": args.source, "seed": args.seed, "counts": counts, "splits": splits,
                "models": {"m_train": m_train, "m_valid": m_valid}, "skipped": skipped, "checks": checks,
                "args": vars(args), **extra}
    with checkpoint.atomic_path(args.out) as tmp:
        os.makedirs(tmp)
        checkpoint.write_owner(tmp, STAGE)  # first: a crash leaves a temporary folder recognisably ours
        for name, rows in files.items():
            checkpoint.write_jsonl(os.path.join(tmp, name), rows)
        if args.source == "synthetic":
            manifest["base_model"] = build_base_model(os.path.join(tmp, "base"), base_model_corpus(files), args)
        checkpoint.write_json(os.path.join(tmp, "manifest.json"), manifest)
    print_summary(args, files, manifest)
    return manifest


def print_summary(args, files, manifest):
    print(f"\n[make_data] source={args.source} seed={args.seed} -> {args.out}")
    print(f"| {'file':<26} | {'rows':>7} | {'prompts':>7} | models")
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 9}|-------")
    for name, rows in files.items():
        models = sorted({str(m) for r in rows for m in models_of(r) if m is not None})
        n_prompts = len({r.get("prompt_id", i) for i, r in enumerate(rows)})
        print(f"| {name:<26} | {len(rows):>7} | {n_prompts:>7} | {', '.join(models)[:70]}")
    for name, reasons in manifest["skipped"].items():
        for reason, n in reasons.items():
            print(f"[skipped] {name}: {n} ({reason})")
    print(f"[checks] {', '.join(k for k, v in manifest['checks'].items() if v)} passed"
          + "".join(f"; FAILED {k}" for k, v in manifest["checks"].items() if v is False)
          + "".join(f"; {k} not checkable (no model names)" for k, v in manifest["checks"].items() if v is None))
    if "spurious" in manifest:
        s = manifest["spurious"]
        print(f"[toy world] corr(words, r*) within M_train {s.get('corr_words_gold_m_train')}, "
              f"within M_valid {s.get('corr_words_gold_m_valid')}")
    if "base_model" in manifest:
        print(f"[base] {args.out}/base: {manifest['base_model']}")


if __name__ == "__main__":
    main()
