"""eval_rm.py: metrics against scipy / hand computations, bad input, and end to end on tiny RMs trained here."""

import argparse
import functools
import json
import math
import os
import random

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import REPO, random_text, run_script

import checkpoint
import eval_rm
import utils
from report import figure5, load_rloo, mean_pm_std, rloo_report, seed_groups
from utils import DataError

SCENARIOS = ("prompt_ood", "response_ood", "mutual_ood")


# ---------------------------------------------------------------------------------------------------
# Fixture data in make_data.py's exact format (gold r* = #yes - #no in the response: ties happen)
# ---------------------------------------------------------------------------------------------------


def gold(response):
    words = response.split()
    return float(words.count("yes") - words.count("no"))


def make_response(rng, new_style):
    words = random_text(rng, 1, 6).split()
    for _ in range(rng.randint(0, 3)):
        words.insert(rng.randint(0, len(words)), rng.choice(["yes", "no"]))
    return " ".join((["please"] + words + ["answer"]) if new_style else words)


def write_data_dir(path, n_prompts=30, seed=0):
    """train / valid_id pairs and three 4-response sets; prompt_ood gets one all-equal-gold prompt and one
    prompt with a single response (both must be counted skips)."""
    rng = random.Random(seed)
    os.makedirs(path, exist_ok=True)

    def ranked(tag, n, new_style, prompts=None):
        rows = []
        for i in range(n):
            prompt = prompts[i] if prompts else random_text(rng)
            responses = [make_response(rng, new_style) for _ in range(4)]
            rows.append({"prompt_id": f"{tag}{i}", "prompt": prompt, "responses": responses,
                         "gold_scores": [gold(r) for r in responses], "models": ["m0", "m1", "m2", "m3"]})
        return rows

    seen, unseen = ranked("s", n_prompts, False), ranked("u", n_prompts, False)
    train, valid_id = [], []
    for row in seen:
        order = sorted(range(4), key=lambda j: -row["gold_scores"][j])
        for dst, (a, b) in ((train, (order[0], order[3])), (valid_id, (order[1], order[2]))):
            if row["gold_scores"][a] != row["gold_scores"][b]:
                dst.append({"prompt_id": row["prompt_id"], "prompt": row["prompt"], "chosen": row["responses"][a],
                            "rejected": row["responses"][b], "chosen_score": row["gold_scores"][a],
                            "rejected_score": row["gold_scores"][b], "chosen_model": "m0", "rejected_model": "m1"})
    prompt_ood = unseen + [{"prompt_id": "tie", "prompt": "sort the list", "responses": ["yes", "no yes", "one", "two"],
                            "gold_scores": [1.0] * 4, "models": ["m0"] * 4},
                           {"prompt_id": "one", "prompt": "count", "responses": ["yes"], "gold_scores": [1.0],
                            "models": ["m0"]}]
    files = {"train": train, "valid_id": valid_id, "valid_prompt_ood": prompt_ood,
             "valid_response_ood": ranked("s", n_prompts, True, [r["prompt"] for r in seen]),
             "valid_mutual_ood": ranked("u", n_prompts, True, [r["prompt"] for r in unseen])}
    for name, rows in files.items():
        with open(os.path.join(path, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def write_rm_bench(path):
    """Native RM-Bench JSON list: short items, domain given by 'domain', or by RewardBench 'subset' names."""
    rng = random.Random(1)
    items = []
    fields = [("domain", "chat"), ("domain", "math"), ("domain", "code"), ("domain", "safety-refuse"),
              ("subset", "alpacaeval-easy"), ("subset", "xstest-should-respond"), ("subset", "bigcode/humanevalpack"),
              ("subset", "math-prm")]
    for i, (key, value) in enumerate(fields):
        base = random_text(rng, 2, 5)
        items.append({"id": i, key: value, "prompt": random_text(rng),
                      "chosen": [f"yes {base}", f"yes {base} and more", f"**yes** {base} and more"],
                      "rejected": [f"no {base}", f"no {base} and more", f"**no** {base} and more"]})
    with open(path, "w") as f:
        json.dump(items, f, indent=1)
    return path


# ---------------------------------------------------------------------------------------------------
# Metric core against scipy and hand computations
# ---------------------------------------------------------------------------------------------------


def test_kendall_tau_b_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    r = rng.integers(0, 3, size=(300, 4)).astype(float)  # small ranges: many ties, some all-equal rows
    g = rng.integers(0, 3, size=(300, 4)).astype(float)
    ours = eval_rm.kendall_tau_b(r, g)
    ref = np.array([scipy.stats.kendalltau(a, b).statistic for a, b in zip(r, g)])
    assert np.isnan(ours).sum() > 0 and np.array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours[~np.isnan(ref)], ref[~np.isnan(ref)], atol=1e-12)
    # hand: 5 concordant pairs, the gold tie (0,1) counts in neither; tau_b = 5 / sqrt(6 * 5)
    assert eval_rm.kendall_tau_b([[1, 2, 3, 4]], [[1, 1, 2, 3]])[0] == pytest.approx(5 / math.sqrt(30))
    assert eval_rm.kendall_tau_b([[4, 3, 2, 1]], [[1, 2, 3, 4]])[0] == pytest.approx(-1.0)


def test_pair_accuracy_hand_counts():
    # gold tie (2,3) is not a pair; every other pair is ordered right
    c, t = eval_rm.pair_accuracy_counts([[3, 1, 2, 2]], [[2, 0, 1, 1]])
    assert (c[0], t[0]) == (5, 5)
    # a reward tie on a pair with a gold preference counts as wrong
    c, t = eval_rm.pair_accuracy_counts([[1, 1, 0], [0, 1, 2]], [[2, 1, 0], [5, 5, 5]])
    assert (c.tolist(), t.tolist()) == ([2, 0], [3, 0])


def test_bootstrap_ci():
    assert eval_rm.bootstrap_ci(np.full(50, 0.3)) == pytest.approx((0.3, 0.3))
    x = (np.random.default_rng(1).random(400) < 0.7).astype(float)
    lo, hi = eval_rm.bootstrap_ci(x, n_boot=2000, seed=3)
    assert lo < x.mean() < hi
    half = 1.96 * math.sqrt(x.mean() * (1 - x.mean()) / len(x))  # normal approximation of a proportion
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert eval_rm.bootstrap_ci(x, n_boot=2000, seed=3) == (lo, hi)  # seeded
    # ratio of sums: two pairs per prompt, one right -> 0.5 everywhere
    assert eval_rm.bootstrap_ci(np.ones(30), np.full(30, 2.0)) == pytest.approx((0.5, 0.5))


def test_effective_rank_known_singular_values():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(10, 4)))
    v, _ = np.linalg.qr(rng.normal(size=(6, 4)))
    h = u @ np.diag([4.0, 2.0, 1.0, 1.0]) @ v.T  # p = (1/2, 1/4, 1/8, 1/8): entropy 1.75 ln 2
    assert eval_rm.effective_rank(h) == pytest.approx(2 ** 1.75)
    assert eval_rm.effective_rank(np.eye(5)) == pytest.approx(5.0)
    # no mean-centring (paper eq. 32): a constant offset is one direction, erank 1 (centring would leave nothing)
    assert eval_rm.effective_rank(np.ones((8, 3)) * 2.5) == pytest.approx(1.0)


def reference_rm_bench(items):
    """RM-Bench's own loops (THU-KEG/RM-Bench compute_accuracy), written independently for the check."""
    out, per = {}, {}
    for d in ("chat", "math", "code", "safety"):
        its = [x for x in items if x["domain"] == d]
        if not its:
            continue
        acc = [[0.0] * 3 for _ in range(3)]
        for x in its:
            for i in range(3):
                for j in range(3):
                    acc[i][j] += (x["sc"][i] > x["sr"][j]) / len(its)
        per[d] = {"hard": (acc[0][1] + acc[0][2] + acc[1][2]) / 3, "normal": (acc[0][0] + acc[1][1] + acc[2][2]) / 3,
                  "easy": (acc[1][0] + acc[2][0] + acc[2][1]) / 3}
        out[d] = sum(per[d].values()) / 3
    for k in ("hard", "normal", "easy"):
        out[k] = sum(p[k] for p in per.values()) / len(per)
    out["overall"] = sum(out[d] for d in per) / len(per)
    return out


def test_rm_bench_hand_items():
    # chat item: M = [[0,0,0],[1,0,0],[1,1,1]] -> hard 0, normal 1/3, easy 1, domain 4/9
    # code item with reward ties (ties are wrong): M rows all [0,1,0] -> hard = normal = easy = 1/3
    out = eval_rm.rm_bench_scores([[1, 5, 9], [2, 2, 2]], [[4, 6, 8], [2, 1, 3]], ["chat", "code"])
    assert out["matrix/chat"] == [[0, 0, 0], [1, 0, 0], [1, 1, 1]]
    assert (out["chat/hard"], out["chat/normal"], out["chat/easy"]) == pytest.approx((0, 1 / 3, 1))
    assert out["chat"] == pytest.approx(4 / 9) and out["code"] == pytest.approx(1 / 3)
    assert out["hard"] == pytest.approx(1 / 6) and out["easy"] == pytest.approx(2 / 3)
    assert out["overall"] == pytest.approx(7 / 18) and "math" not in out
    rng = np.random.default_rng(0)
    items = [{"sc": rng.integers(0, 4, 3).tolist(), "sr": rng.integers(0, 4, 3).tolist(),
              "domain": ["chat", "math", "code", "safety"][i % 4]} for i in range(41)]
    ours = eval_rm.rm_bench_scores([x["sc"] for x in items], [x["sr"] for x in items], [x["domain"] for x in items])
    for k, v in reference_rm_bench(items).items():
        assert ours[k] == pytest.approx(v), k


def test_rm_bench_domain_resolution():
    dom = eval_rm.rm_bench_domain
    assert dom({"domain": "safety-refuse"}, "x.json") == "safety"
    assert dom({}, "/data/code_filtered.json") == "code"
    assert dom({"subset": "alpacaeval-hard"}, "total_dataset.json") == "chat"
    assert dom({"subset": "xstest-should-refuse"}, "sample.json") == "safety"
    assert dom({"subset": "hep-python"}, "sample.json") == "code"
    assert dom({"subset": "mystery"}, "sample.json") is None


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


def _write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_loaders_bad_input(tmp_path):
    ok = {"prompt": "p", "responses": ["a", "b"], "gold_scores": [1, 0]}
    path = _write(tmp_path / "r.jsonl", [ok, {"prompt": "p", "responses": ["a", "b"]}])
    with pytest.raises(DataError, match=r"r\.jsonl:2: missing field 'gold_scores'"):
        eval_rm.load_ranked_set("prompt_ood", path)
    path = _write(tmp_path / "r.jsonl", [ok, dict(ok, gold_scores=[1, 2, 3])])
    with pytest.raises(DataError, match=r"r\.jsonl:2: field 'gold_scores' has 3 values for 2 responses"):
        eval_rm.load_ranked_set("prompt_ood", path)
    path = _write(tmp_path / "r.jsonl", [dict(ok, gold_scores=[1, "high"])])
    with pytest.raises(DataError, match=r"r\.jsonl:1: field 'gold_scores\[1\]' must be a finite number"):
        eval_rm.load_ranked_set("prompt_ood", path)
    path = _write(tmp_path / "r.jsonl", [ok, dict(ok, responses=["a"], gold_scores=[1]), dict(ok, gold_scores=[2, 2])])
    s = eval_rm.load_ranked_set("prompt_ood", path)
    assert len(s.sizes) == 2 and s.skipped == {"fewer than 2 responses": 1,
                                              "all gold scores equal (tau undefined; kept for norms only)": 1}
    path = _write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"},
                                         {"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing field 'rejected'"):
        eval_rm.load_pair_set("id", path)
    scored = {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 2.0, "rejected_score": 1.0}
    assert eval_rm.load_pair_set("id", _write(tmp_path / "p.jsonl", [scored, dict(scored, prompt="q")])).has_gold
    half = dict(scored, prompt="q", rejected_score=None)  # a label without both scores: no gold scale for the set
    assert not eval_rm.load_pair_set("id", _write(tmp_path / "p.jsonl", [scored, half])).has_gold
    bench = tmp_path / "chat_filtered.json"
    bench.write_text(json.dumps([{"prompt": "p", "chosen": ["a", "b", "c"], "rejected": ["d", "e", "f"]},
                                 {"prompt": "p", "chosen": ["a", "b"], "rejected": ["d", "e", "f"]}]))
    with pytest.raises(DataError, match=r"chat_filtered\.json\[1\]: field 'chosen' must be a list of 3"):
        eval_rm.load_rm_bench([str(bench)], "train")


def test_rm_bench_native_folder_reads_its_files_with_the_domain_from_each_name(tmp_path):
    """RM-Bench's data/ folder: files with different columns (which `datasets` refuses to join), domain by file name."""
    def item(i, **extra):
        return {"id": i, "prompt": f"p{i}", "chosen": ["a", "b", "c"], "rejected": ["d", "e", "f"], **extra}

    folder = tmp_path / "rm_bench_data"
    folder.mkdir()
    files = {"chat_filtered.json": [item(0, subset="xstest-should-respond"), item(1)],  # the file name wins
             "code_filtered.json": [item(2, language="python", task_id="t2")],
             "safety-response_filtered.json": [item(3, subset="donotanswer")],
             "total_dataset.json": [item(9)] * 4}  # the same items again in RM-Bench's repo: not read
    for name, rows in files.items():
        (folder / name).write_text(json.dumps(rows, indent=1))
    s = eval_rm.load_rm_bench([str(folder)], "train")
    assert s.sources == [str(folder / n) for n in ("chat_filtered.json", "code_filtered.json",
                                                   "safety-response_filtered.json")]
    assert s.rows_read == 4 and s.domain == ["chat", "chat", "code", "safety"] and s.group == ["0", "1", "2", "3"]
    one = eval_rm.load_rm_bench([str(folder / "code_filtered.json")], "train")  # a single file still works
    assert one.domain == ["code"] and one.prompts == [[{"role": "user", "content": "p2"}]]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "total_dataset.json").write_text("[]")
    with pytest.raises(DataError, match=r"empty: a folder without RM-Bench's native files \(chat_filtered\.json"):
        eval_rm.load_rm_bench([str(tmp_path / "empty")], "train")


HH_PREFIX = "\n\nHuman: What is two plus two?\n\nAssistant: Four.\n\nHuman: And three plus three?"


def test_pairs_accuracy_interval_norms_and_length_bias_by_hand(tmp_path, capsys):
    rows = [{"chosen": HH_PREFIX + "\n\nAssistant: Six, as three plus three is six.",  # hh-rlhf: 32 vs 23 chars
             "rejected": HH_PREFIX + "\n\nAssistant: I would rather not say."},
            {"prompt": "q1", "chosen": "long answer here", "rejected": "no"},
            {"prompt": "q2", "chosen": "a", "rejected": "much longer reply"},
            {"prompt": "q3", "chosen": "same", "rejected": "same"}]
    path = _write(tmp_path / "mine.jsonl", rows)
    args = eval_rm.parse_args(["--model", "m", "--pairs", f"mine={path}", "--out", str(tmp_path / "o"),
                               "--bootstrap", "300"])
    (s,) = eval_rm.load_sets(args)
    assert s.name == "pairs/mine" and s.pairs == [(0, 1), (2, 3), (4, 5)] and s.skipped == {"chosen == rejected": 1}
    assert s.prompts[0][-1] == {"role": "user", "content": "And three plus three?"} and len(s.prompts[0]) == 3
    assert s.lengths().tolist() == [32, 23, 16, 2, 1, 17]
    # rewards: pair 1 right, pair 2 wrong, pair 3 right; hidden states with norms 5, 1, 1, 2, 10, 0
    rewards = torch.tensor([1.0, 0.0, 0.2, 0.5, 3.0, -1.0])
    hidden = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [6.0, 8.0], [0.0, 0.0]])
    scores = {"pairs/mine": {"rewards": rewards, "hidden_norm": hidden.norm(dim=1), "n_truncated": 0,
                             "diff_norm": (hidden[0::2] - hidden[1::2]).norm(dim=1), "hidden_sample": hidden}}
    m = eval_rm.model_metrics([s], scores, 1.0, args)
    assert set(eval_rm.pairs_keys("pairs/mine")) <= set(m)
    assert m["pairs/mine/accuracy"] == pytest.approx(2 / 3) and m["pairs/mine/n_pairs"] == 3
    lo, hi = m["pairs/mine/accuracy_ci_low"], m["pairs/mine/accuracy_ci_high"]
    assert 0 <= lo < 2 / 3 < hi <= 1 and {lo * 3, hi * 3} <= {0.0, 1.0, 2.0, 3.0}  # 3 pairs: a share of 3
    # longer response wins in pair 1 only (pair 2: the longer loses; pair 3: the shorter, chosen, wins)
    assert m["pairs/mine/longer_preferred"] == pytest.approx(1 / 3)
    assert m["norms/pairs/mine/mean"] == pytest.approx(19 / 6) and m["norms/pairs/mine/p50"] == pytest.approx(1.5)
    assert m["diff_norms/pairs/mine/mean"] == pytest.approx((np.sqrt(18) + np.sqrt(5) + 10) / 3)
    assert m["length_corr/pairs/mine"] == pytest.approx(scipy.stats.spearmanr(rewards, s.lengths())[0])
    assert "erank/pairs/mine" not in m and m["erank/n_rows"] == args.erank_rows  # pairs sets do not cut erank rows
    assert eval_rm.longer_share(np.ones(3, bool), np.array([32, 16, 1]), np.array([23, 2, 17])) == pytest.approx(2 / 3)
    for bad, says in ((["--pairs", "mine"], "--pairs 'mine': expected NAME=FILE"),
                      (["--pairs", "a/b=f"], "--pairs 'a/b=f': expected NAME=FILE"),
                      (["--pairs", "a=f", "--pairs", "a=g"], "--pairs: the name 'a' is given twice")):
        with pytest.raises(SystemExit):
            eval_rm.parse_args(["--model", "m", "--out", "o"] + bad)
        assert says in capsys.readouterr().err


def test_model_without_head_is_refused(tmp_path, tiny_llama):
    from transformers import BertConfig, BertModel

    with pytest.raises(SystemExit, match=r"not a reward model \(config.architectures = \['LlamaForCausalLM'\]\)"):
        eval_rm.main(["--model", tiny_llama, "--data-dir", write_data_dir(str(tmp_path / "data"), n_prompts=4),
                      "--out", str(tmp_path / "eval")])
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(SystemExit, match=r"not a reward model \(config.architectures = \['BertModel'\]\)"):
        checkpoint.check_reward_model(str(tmp_path / "bert"), "--model")


# ---------------------------------------------------------------------------------------------------
# End to end: two tiny RMs trained with train_rm.py, scored by eval_rm.py
# ---------------------------------------------------------------------------------------------------

EVAL_FLAGS = ["--max-length", "128", "--bootstrap", "200", "--train-pairs", "16", "--batch-size", "32"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("eval_e2e")
    data = write_data_dir(str(root / "data"))
    bench = write_rm_bench(str(root / "rm_bench_sample.json"))
    models = []
    for loss in ("bt", "bsr"):
        out = str(root / f"rm_{loss}")
        run_script(["train_rm.py", "--model", tiny_llama, "--train-file", f"{data}/train.jsonl", "--out", out,
                    "--loss", loss, "--global-batch-size", "8", "--micro-batch-size", "8", "--epochs", "2",
                    "--lr", "1e-3", "--max-length", "128", "--save-steps", "0"])
        models.append(out)
    args = ["eval_rm.py", "--model", models[0], "--model", models[1], "--data-dir", data, "--rm-bench", bench]
    args += EVAL_FLAGS
    assert args[5] == "--data-dir"  # test_two_processes_match_one reuses args[5:]
    proc = run_script(args + ["--out", str(root / "eval")])
    return {"root": root, "data": data, "bench": bench, "models": models, "args": args, "out": str(root / "eval"),
            "stdout": proc.stdout}


@functools.lru_cache(maxsize=2)
def _plain_hf(model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    return AutoTokenizer.from_pretrained(model_dir), model


def plain_hf_rewards(model_dir, prompt, responses):
    """Rewards from a plain AutoModelForSequenceClassification, one unpadded sequence at a time."""
    tok, model = _plain_hf(model_dir)
    out = []
    with torch.no_grad():
        for r in responses:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": r}],
                                           tokenize=False)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out.append(model(input_ids=ids).logits[0, 0].item())
    return out


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_end_to_end_report_matches_independent_scoring(world):
    with open(os.path.join(world["out"], "report.json")) as f:
        report = json.load(f)
    labels = ["rm_bt", "rm_bsr"]
    assert list(report["models"]) == labels
    for label in labels:
        assert set(eval_rm.fixed_keys()) <= set(report["models"][label])
    m = report["models"]["rm_bt"]
    model_dir = world["models"][0]
    # in-domain accuracy from a plain HF forward of every pair
    rows = read_jsonl(f"{world['data']}/valid_id.jsonl")
    wins = [np.subtract(*plain_hf_rewards(model_dir, r["prompt"], [r["chosen"], r["rejected"]])) > 0 for r in rows]
    assert m["id/accuracy"] == pytest.approx(np.mean(wins), abs=1e-9)
    assert m["id/accuracy_ci_low"] <= m["id/accuracy"] <= m["id/accuracy_ci_high"]
    # prompt-OOD tau: scipy's tau-b on the plain HF rewards, prompts with a ranking only
    taus = []
    for r in read_jsonl(f"{world['data']}/valid_prompt_ood.jsonl"):
        if len(r["responses"]) >= 2 and len(set(r["gold_scores"])) > 1:
            rewards = plain_hf_rewards(model_dir, r["prompt"], r["responses"])
            taus.append(scipy.stats.kendalltau(rewards, r["gold_scores"]).statistic)
    assert m["prompt_ood/kendall_tau"] == pytest.approx(np.nanmean(taus), abs=1e-6)
    assert m["prompt_ood/tau_undefined"] == int(np.isnan(taus).sum())
    # RM-Bench with RM-Bench's own loops on plain HF rewards
    items = json.load(open(world["bench"]))
    ref_items = []
    for it in items:
        r = plain_hf_rewards(model_dir, it["prompt"], it["chosen"] + it["rejected"])
        ref_items.append({"sc": r[:3], "sr": r[3:], "domain": eval_rm.rm_bench_domain(it, world["bench"])})
    for k, v in reference_rm_bench(ref_items).items():
        assert m[f"rm_bench/{k}"] == pytest.approx(v), k
    # internal consistency
    for sc in SCENARIOS + ("id", "rm_bench"):
        assert m[f"erank/gap/{sc}"] == pytest.approx(m[f"erank/{sc}"] - m["erank/train"])
        assert 1.0 <= m[f"erank/{sc}"] <= m["erank/n_rows"]
        assert m[f"norms/{sc}/p5"] <= m[f"norms/{sc}/p50"] <= m[f"norms/{sc}/p95"]
    assert m["erank/n_rows"] == min(d["responses"] for d in report["data"].values())  # same rows for every set
    assert report["data"]["train"]["pairs"] == 16
    assert report["data"]["prompt_ood"]["skipped"] == {"all gold scores equal (tau undefined; kept for norms only)": 1,
                                                       "fewer than 2 responses": 1}
    last_epoch = [r for r in read_jsonl(f"{model_dir}/metrics.jsonl") if "epoch/wp_norm" in r][-1]
    assert last_epoch["epoch"] == 2 and m["wp_norm"] == pytest.approx(last_epoch["epoch/wp_norm"], rel=1e-5)


def test_end_to_end_outputs_and_plots(world):
    out = world["out"]
    for name in ("fig1_wp_norm.png", "fig2_hidden_diff_per_epoch.png", "fig3_hidden_norms.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        assert os.path.getsize(os.path.join(out, name)) > 10_000
    md = open(os.path.join(out, "report.md")).read()
    for text in ("In-Domain (Accuracy ↑)", "Mutual OOD (Kendall's τ ↑)",
                 "| Chat | Math | Code | Safety | Hard Acc |",
                 "| rm_bt |", "| rm_bsr |", "chosen \\ rejected", "fig3_hidden_norms.png"):
        assert text in md
    config = json.load(open(os.path.join(out, "eval_config.json")))
    assert config["args"]["max_length"] == 128 and config["models"]["rm_bsr"] == world["models"][1]


def test_cache_makes_second_run_skip_the_models(world):
    with open(os.path.join(world["out"], "report.json")) as f:
        first = f.read()
    assert len(os.listdir(os.path.join(world["out"], "cache"))) == 2 * 6  # 2 models x 6 sets
    proc = run_script(world["args"] + ["--out", world["out"]])
    assert proc.stdout.count("6/6 sets read from the cache; model not loaded") == 2
    assert open(os.path.join(world["out"], "report.json")).read() == first


def test_a_rerun_that_fails_while_drawing_leaves_no_report_json(world, tmp_path, monkeypatch):
    """report.json is written last: where it exists the report is complete. A rerun into the same folder that dies
    while writing report.md or the figures leaves no report.json, not the earlier run's posing as this one's."""
    out = str(tmp_path / "eval")
    argv = world["args"][1:] + ["--cache-dir", os.path.join(world["out"], "cache"), "--out", out]
    eval_rm.main(argv)  # every score from the world's cache
    assert os.path.exists(os.path.join(out, "report.json")) and os.path.exists(os.path.join(out, "report.md"))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_rm, "write_report", crash)
    with pytest.raises(KeyboardInterrupt):
        eval_rm.main(argv)
    assert not os.path.exists(os.path.join(out, "report.json"))


def test_two_processes_match_one(world):
    """Sequences sharded over 2 ranks (gloo): the same report up to float noise from different batch padding."""
    out2 = str(world["root"] / "eval_2proc")
    run_script(["eval_rm.py", "--model", world["models"][0]] + world["args"][5:] + ["--out", out2, "--no-cache"],
               nproc=2)
    one = json.load(open(os.path.join(world["out"], "report.json")))["models"]["rm_bt"]
    two = json.load(open(os.path.join(out2, "report.json")))["models"]
    assert list(two) == ["rm_bt"]
    assert two["rm_bt"].keys() == one.keys()
    for key, value in one.items():
        if isinstance(value, float):  # a skew of norms with std ~0.02 amplifies 1e-7 noise
            assert two["rm_bt"][key] == pytest.approx(value, rel=1e-4, abs=1e-2 if "skew" in key else 1e-5), key
        else:  # counts (pairs, undefined taus, truncations, rows) and names: exactly
            assert two["rm_bt"][key] == value, key


def test_end_to_end_on_make_data_folder(tmp_path):
    if not os.path.exists(os.path.join(REPO, "make_data.py")):
        pytest.skip("make_data.py is not in the repo yet (data stage, built in parallel); runs once merged")
    data = str(tmp_path / "data")
    run_script(["make_data.py", "--source", "synthetic", "--out", data, "--num-prompts", "200", "--seed", "0"])
    rm = str(tmp_path / "rm")
    run_script(["train_rm.py", "--model", f"{data}/base", "--train-file", f"{data}/train.jsonl", "--out", rm,
                "--loss", "bsr", "--global-batch-size", "8", "--micro-batch-size", "8", "--epochs", "1", "--lr", "1e-3",
                "--max-length", "256", "--truncate", "--max-train-pairs", "48", "--save-steps", "0"])
    out = str(tmp_path / "eval")
    run_script(["eval_rm.py", "--model", rm, "--data-dir", data, "--out", out, "--max-length", "256",
                "--bootstrap", "100", "--train-pairs", "32"])
    m = json.load(open(os.path.join(out, "report.json")))["models"]["rm"]
    assert 0.0 <= m["id/accuracy"] <= 1.0
    for sc in SCENARIOS:
        assert -1.0 <= m[f"{sc}/kendall_tau"] <= 1.0 and m[f"erank/{sc}"] >= 1.0
    assert os.path.exists(os.path.join(out, "fig3_hidden_norms.png"))


def test_pairs_files_end_to_end_match_a_plain_hf_forward(tmp_path, tiny_llama):
    """eval_rm.py --pairs hh=... --pairs plain=... on a random-head RM: accuracy from a plain HF forward of the
    parsed turns, every pairs key present, the report.md section, the cache; and --rm-bench given RM-Bench's folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = str(tmp_path / "rm")
    AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1).save_pretrained(rm)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.save_pretrained(rm)
    rng = random.Random(3)
    hh, plain = [], []
    for i in range(8):
        prefix = f"\n\nHuman: {random_text(rng)}\n\nAssistant: {random_text(rng)}\n\nHuman: {random_text(rng)}"
        hh.append({"chosen": f"{prefix}\n\nAssistant: {random_text(rng)}",
                   "rejected": f"{prefix}\n\nAssistant: {random_text(rng)}"})
        plain.append({"prompt": random_text(rng), "chosen": random_text(rng), "rejected": random_text(rng)})
    hh_path = _write(tmp_path / "hh_test.jsonl", hh)
    plain_path = tmp_path / "plain.json"  # a JSON list
    plain_path.write_text(json.dumps(plain))
    bench = tmp_path / "rm_bench_data"
    bench.mkdir()
    items = json.load(open(write_rm_bench(str(tmp_path / "items.json"))))
    (bench / "math_filtered.json").write_text(json.dumps([{k: v for k, v in it.items() if k not in ("domain", "subset")}
                                                          for it in items]))
    out = str(tmp_path / "eval")
    run_script(["eval_rm.py", "--model", rm, "--pairs", f"hh={hh_path}", "--pairs", f"plain={plain_path}",
                "--rm-bench", str(bench), "--out", out, "--bootstrap", "100", "--max-length", "256"])
    report = json.load(open(os.path.join(out, "report.json")))
    m = report["models"]["rm"]
    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    for name, rows in (("hh", hh), ("plain", plain)):
        assert set(eval_rm.pairs_keys(f"pairs/{name}")) <= set(m)
        wins = []
        for where, row in enumerate(rows):
            prompt, chosen, rejected = utils.parse_pair(row, str(where))
            r = []
            for response in (chosen, rejected):
                text = tok.apply_chat_template(prompt + response, tokenize=False)
                with torch.no_grad():
                    r.append(model(**tok(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item())
            wins.append(r[0] > r[1])
        assert m[f"pairs/{name}/accuracy"] == pytest.approx(np.mean(wins), abs=1e-9)
        assert m[f"pairs/{name}/n_pairs"] == 8 and report["data"][f"pairs/{name}"]["pairs"] == 8
        assert 0 <= m[f"pairs/{name}/longer_preferred"] <= 1 and m[f"norms/pairs/{name}/mean"] > 0
        assert 0 <= report["gold"][f"pairs/{name}/chosen_longer"] <= 1
    assert utils.parse_pair(hh[0], "0")[0][0]["role"] == "user" and len(utils.parse_pair(hh[0], "0")[0]) == 3
    assert m["rm_bench/math"] is not None and m["rm_bench/chat"] is None  # every item: the domain of its file
    md = open(os.path.join(out, "report.md")).read()
    assert "## Preference test sets (--pairs" in md and "| rm | hh | 8 | " in md and "| rm | plain | 8 | " in md
    assert sorted(f.split("-")[1] for f in os.listdir(os.path.join(out, "cache"))) == ["pairs", "pairs", "rm_bench"]


def test_seed_groups_mean_and_std_by_hand():
    models = {"bt/seed1": {"id/accuracy": 0.6, "wp_norm": 1.0, "model": "a"},
              "bt/seed2": {"id/accuracy": 0.8, "wp_norm": 1.2, "model": "b"},
              "bsr_seed1": {"id/accuracy": 0.7, "wp_norm": float("nan"), "model": "c"},
              "bsr_seed2": {"id/accuracy": 0.9, "wp_norm": 1.1, "model": "d"},
              "third_party": {"id/accuracy": 0.5, "model": "e"}}
    groups = seed_groups(models)
    assert sorted(groups) == ["bsr", "bt"]  # an unseeded label is not grouped
    assert groups["bt"]["members"] == ["bt/seed1", "bt/seed2"]
    assert groups["bt"]["id/accuracy"]["mean"] == pytest.approx(0.7)
    assert groups["bt"]["id/accuracy"]["std"] == pytest.approx(0.1414213562, rel=1e-6)  # sample std, ddof=1
    assert groups["bsr"]["wp_norm"] == {"mean": pytest.approx(1.1), "std": 0.0, "n": 1}  # NaN seed left out
    assert mean_pm_std(groups["bt"]["id/accuracy"]) == "0.7000 ± 0.1414"
    assert mean_pm_std(groups["bsr"]["wp_norm"]) == "1.1000"  # one seed: no "± 0"


def test_rloo_runs_enter_the_report_in_table3_layout(tmp_path, capsys):
    folder = tmp_path / "rloo_bt"
    folder.mkdir()
    sft = {"step": 0, "gold_reward": 0.25, "gold_reward_sem": 0.05, "length_tokens": 20.0, "length_chars": 80.0}
    final = {"step": 4, "gold_reward": 0.5, "gold_reward_sem": 0.04, "length_tokens": 12.0, "length_chars": 50.0}
    (folder / "summary.json").write_text(json.dumps({"reward_model": "rm_bt", "steps": 4, "sft": sft, "rloo": final}))
    rows = [{"step": 0, "gold/reward": 0.25, "gold/reward_sem": 0.05, "gold/response_length": 20.0}] + [
        {"step": s, "train/kl": 0.1 * s, "train/proxy_reward": 0.2 * s, "train/response_length": 15.0} for s in (1, 2, 3, 4)
    ] + [{"step": 4, "gold/reward": 0.5, "gold/reward_sem": 0.04, "gold/response_length": 12.0}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = load_rloo([f"pi_bt={folder}"])
    block = rloo_report(runs)["pi_bt"]
    assert block["sft"] == sft and block["final"] == final
    assert block["train/kl"] == pytest.approx(0.4) and block["train/proxy_reward"] == pytest.approx(0.8)
    assert figure5(str(tmp_path), runs) == ["fig5_rloo.png"]
    assert os.path.getsize(tmp_path / "fig5_rloo.png") > 10000
    with pytest.raises(SystemExit):
        eval_rm.parse_args(["--model", "m", "--data-dir", "d", "--out", "o", "--rloo", f"pi={tmp_path}"])
    assert f"--rloo 'pi={tmp_path}': expected NAME=DIR with DIR/summary.json" in capsys.readouterr().err


def test_repeated_model_labels_all_differ():
    """Three models whose folders end alike (x/rm/bt/seed1, y/rm/bt/seed1, ...) keep three rows: labels key the report."""
    models = [f"/runs/{r}/rm/bt/seed1" for r in "xyz"]
    assert eval_rm.unique_labels(argparse.Namespace(name=None, model=models)) == ["bt/seed1", "bt/seed1#2",
                                                                                  "bt/seed1#3"]
    names = ["a", "a#2", "a", "a"]  # a --name that is already a repeat's label is not handed out twice
    assert eval_rm.unique_labels(argparse.Namespace(name=names, model=models + ["w"])) == ["a", "a#2", "a#3", "a#4"]


def test_cache_dir_inside_a_model_folder_is_refused(tmp_path):
    """Score files written into a --model folder would change that model folder (and its fingerprint): refused
    before anything is loaded or written."""
    model = tmp_path / "rm"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=f"--cache-dir {model}/cache is inside the input --model {model}"):
        eval_rm.main(["--model", str(model), "--pairs", f"hh={tmp_path}/hh.jsonl", "--cache-dir", str(model / "cache"),
                      "--out", str(tmp_path / "out")])
    assert os.listdir(model) == ["config.json"] and not (tmp_path / "out").exists()
