"""make_data.py: the toy world, the four-scenario construction, real-source paths on local fixtures, bad input."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_tiny_lm, make_tokenizer, run_script

import generation
import make_data as md
import toy_world

CONTRACT_PAIR = {"prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "chosen_model",
                 "rejected_model"}
CONTRACT_RANK = {"prompt_id", "prompt", "responses", "gold_scores", "models"}
RANK_FILES = ("valid_prompt_ood.jsonl", "valid_response_ood.jsonl", "valid_mutual_ood.jsonl")


def rows(folder, name):
    with open(os.path.join(folder, name)) as f:
        return [json.loads(line) for line in f]


def items(row):
    """(response, model, gold score) of a pair row or a ranking row."""
    if "chosen" in row:
        return [(row["chosen"], row["chosen_model"], row["chosen_score"]),
                (row["rejected"], row["rejected_model"], row["rejected_score"])]
    return list(zip(row["responses"], row["models"], row["gold_scores"]))


# ---------------------------------------------------------------------------------------------------
# the toy world
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """The documented command, in a subprocess, exactly as a user runs it."""
    out = str(tmp_path_factory.mktemp("syn") / "data")
    proc = run_script(["make_data.py", "--source", "synthetic", "--out", out, "--num-prompts", "200", "--seed", "0"])
    assert "train.jsonl" in proc.stdout  # the summary table
    return out


def test_synthetic_files_follow_the_contract(syn):
    manifest = json.load(open(os.path.join(syn, "manifest.json")))
    for name, n in manifest["counts"].items():
        assert len(rows(syn, name)) == n
    for name in ("train.jsonl", "valid_id.jsonl"):
        for r in rows(syn, name):
            assert set(r) == CONTRACT_PAIR
            assert r["chosen_score"] > r["rejected_score"]
            # stored scores are r* recomputed from the text
            assert r["chosen_score"] == toy_world.gold_reward(r["prompt"], r["chosen"])
            assert r["rejected_score"] == toy_world.gold_reward(r["prompt"], r["rejected"])
    for name in RANK_FILES:
        for r in rows(syn, name):
            assert set(r) == CONTRACT_RANK
            assert len(r["responses"]) == len(r["gold_scores"]) == len(r["models"]) == 4
            assert len(set(r["responses"])) == 4 and len(set(r["models"])) == 4
            assert r["gold_scores"] == [toy_world.gold_reward(r["prompt"], y) for y in r["responses"]]
    # 200 distinct prompts split 160 / 40; every train prompt yields a pair or a counted skip
    train_p = {r["prompt"] for r in rows(syn, "train.jsonl")}
    skipped_train = manifest["skipped"].get("train.jsonl", {}).get("gold ties or too few responses", 0)
    assert len(train_p) + skipped_train == 160 == manifest["splits"]["train_prompts"]
    skipped_id = manifest["skipped"].get("valid_id.jsonl", {}).get("gold ties or too few responses", 0)
    assert len(rows(syn, "valid_id.jsonl")) + skipped_id == 160
    assert manifest["splits"]["valid_prompts"] == 40
    assert all(manifest["checks"].values()) and len(manifest["checks"]) == 7
    for r in rows(syn, "rl_prompts.jsonl") + rows(syn, "rl_eval_prompts.jsonl"):
        assert set(r) == {"prompt_id", "prompt"}


def test_synthetic_splits_are_disjoint(syn):
    """Recomputed from the files, independently of the manifest's checks."""
    train = rows(syn, "train.jsonl")
    x_train = {r["messages"][0]["content"] for r in rows(syn, "sft.jsonl")}  # SFT: one row per X_train prompt
    rl = {r["prompt"] for r in rows(syn, "rl_prompts.jsonl")}
    rl_eval = {r["prompt"] for r in rows(syn, "rl_eval_prompts.jsonl")}
    x_valid = rl | rl_eval  # RLOO prompts: X_valid, split in two, less the X_train tasks reworded (below)
    skipped = json.load(open(os.path.join(syn, "manifest.json")))["skipped"]
    reworded = {name: skipped.get(name, {}).get("the task of an X_train prompt, reworded", 0) for name in
                ("valid_prompt_ood.jsonl", "valid_mutual_ood.jsonl", "rl_prompts.jsonl", "rl_eval_prompts.jsonl")}
    assert len(x_train) == 160 and not x_train & x_valid
    assert len(x_valid) + reworded["rl_prompts.jsonl"] + reworded["rl_eval_prompts.jsonl"] == 40
    # disjoint as tasks too: `What is 12 + 7?` in X_train and `Add 7 and 12.` in X_valid is one task (this world
    # draws such a pair: its rows went, counted)
    assert sum(reworded.values()) > 0
    train_tasks = {toy_world.task_key(p) for p in x_train}
    for name in ("valid_prompt_ood.jsonl", "valid_mutual_ood.jsonl", "rl_prompts.jsonl", "rl_eval_prompts.jsonl"):
        assert not {toy_world.task_key(r["prompt"]) for r in rows(syn, name)} & train_tasks, name
    assert rl and rl_eval and not rl & rl_eval
    for name, x in (("train.jsonl", x_train), ("valid_id.jsonl", x_train), ("valid_response_ood.jsonl", x_train),
                    ("valid_prompt_ood.jsonl", x_valid), ("valid_mutual_ood.jsonl", x_valid)):
        prompts = {r["prompt"] for r in rows(syn, name)}
        assert prompts <= x and len(prompts) > 0.7 * len(x), name  # the rest: counted gold ties
    seen = {m for name in ("train.jsonl", "valid_id.jsonl", "valid_prompt_ood.jsonl") for r in rows(syn, name)
            for _, m, _ in items(r)}
    new = {m for name in ("valid_response_ood.jsonl", "valid_mutual_ood.jsonl") for r in rows(syn, name)
           for _, m, _ in items(r)}
    assert len(seen) >= 5 and len(new) >= 3 and not seen & new
    in_train = {(r["prompt"], y) for r in train for y in (r["chosen"], r["rejected"])}
    for name in ("valid_id.jsonl",) + RANK_FILES:
        for r in rows(syn, name):
            assert not any((r["prompt"], y) in in_train for y, _, _ in items(r))
    # SFT answers: X_train prompts only, and all correct by r*
    sft = rows(syn, "sft.jsonl")
    assert len(sft) == 160
    for r in sft:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant" and user["content"] in x_train
        assert toy_world.gold_details(user["content"], assistant["content"])["correct"] == 1.0


def test_synthetic_is_deterministic(syn, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    md.main(["--source", "synthetic", "--out", again, "--num-prompts", "200", "--seed", "0"])
    md.main(["--source", "synthetic", "--out", other, "--num-prompts", "200", "--seed", "1"])
    names = [n for n in os.listdir(syn) if n.endswith(".jsonl")] + ["base/tokenizer.json", "base/model.safetensors"]
    assert len(names) == 10
    for name in names:
        assert open(os.path.join(syn, name), "rb").read() == open(os.path.join(again, name), "rb").read(), name
    assert rows(syn, "train.jsonl") != rows(other, "train.jsonl")
    m1, m2 = (json.load(open(os.path.join(d, "manifest.json"))) for d in (syn, again))
    m1["args"].pop("out"), m2["args"].pop("out")
    assert m1 == m2


@pytest.mark.parametrize("prompt,response,expected", [
    ("What is 12 + 30?", "The answer is 42.", 1.0 + 0.1 + 0.1),         # correct, marked, canonical
    ("What is 12 + 30?", "42", 1.0 + 0.1),                              # not marked
    ("What is 12 + 30?", "The answer is 43.", 0.4 * 0.5 + 0.2),         # wrong: 0.4 x similarity('43', '42')
    ("What is 12 + 30?", "The answer is 42. The answer is 42.", 1.2 - 0.1),   # one repeated sentence
    ("What is 12 + 30?", " ".join(f"w{i}" for i in range(58)) + " The answer is 42.", 1.2 - 0.01 * 32 - 0.02 * 12),
    ("What is 12 + 30?", "Well. " * 20 + "The answer is 42.", 1.2 - 1.5),  # 19 repeats: penalty capped at 1.5
    ("What is 12 + 30?", "", 0.0),
    ("Multiply 7 by 8.", "Sure! First 7.\nResult: 56", 1.2),            # the LAST marker holds the answer
    ("Sort these numbers from smallest to largest: 5, 3, 9.", "Answer:\n- 3\n- 5\n- 9", 1.1),  # bullets: not canonical
    ("Sort these numbers from smallest to largest: 5, 3, 9.", "The answer is 3, 5, 9. Bye!", 1.2),
    ("Sort these numbers from smallest to largest: 5, 3, 9.", "=> [3, 5, 9]", 1.1),
    ("Reverse the letters of the word 'lomi'.", "The answer is imol.", 1.2),
    ("How many times does the letter 'a' appear in 'banana'?", "Answer: 3", 1.2),
    ("Write 'red fox' in capital letters.", "RED FOX", 1.1),
    ("Write 'red fox' in capital letters.", "red fox", 0.4 * 2 / 14 + 0.1),  # similarity: only the space matches
    ("Tell me a joke.", "The answer is 42.", 0.0),                       # not a toy task: no correctness term
])
def test_gold_reward_by_hand(prompt, response, expected):
    assert toy_world.gold_reward(prompt, response) == pytest.approx(expected, abs=1e-4)


def test_task_key_is_the_task_whatever_the_wording():
    assert toy_world.task_key("What is 12 + 7?") == toy_world.task_key("Add 7 and 12.")
    assert toy_world.task_key("Multiply 3 by 14.") == toy_world.task_key("What is 14 times 3?")
    assert toy_world.task_key("Spell 'kola' backwards.") == \
        toy_world.task_key("Reverse the letters of the word 'kola'.")
    assert toy_world.task_key("What is 12 + 7?") != toy_world.task_key("What is 12 times 7?")
    assert toy_world.task_key("Sort these numbers from smallest to largest: 3, 1.") != toy_world.task_key(
        "Sort these numbers from smallest to largest: 1, 3.")  # another input list (same answer) is another task
    assert toy_world.task_key("What is the capital of France?") is None


def test_gold_reward_imports_only_stdlib():
    code = "import sys, toy_world; toy_world.gold_reward('What is 1 + 2?', '3'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _pearson(pairs):
    from scipy.stats import pearsonr

    return pearsonr([p[0] for p in pairs], [p[1] for p in pairs])[0]


def test_spurious_correlation_in_m_train_not_in_m_valid(syn):
    """Measured on the written files: within M_train wordier responses have higher r* (the wordier models are
    more accurate), within M_valid they do not."""
    seen, new = [], []
    acc = {}
    for name, bucket in (("train.jsonl", seen), ("valid_id.jsonl", seen), ("valid_prompt_ood.jsonl", seen),
                         ("valid_response_ood.jsonl", new), ("valid_mutual_ood.jsonl", new)):
        for r in rows(syn, name):
            for y, m, g in items(r):
                bucket.append((len(y.split()), g))
                acc.setdefault(m, []).append(toy_world.gold_details(r["prompt"], y)["correct"] == 1.0)
    corr_train, corr_valid = _pearson(seen), _pearson(new)
    assert corr_train > 0.25 and corr_valid < 0.1 and corr_train - corr_valid > 0.25
    manifest = json.load(open(os.path.join(syn, "manifest.json")))
    assert manifest["spurious"]["corr_words_gold_m_train"] == pytest.approx(corr_train, abs=1e-3)
    assert manifest["spurious"]["corr_words_gold_m_valid"] == pytest.approx(corr_valid, abs=1e-3)
    accuracy = {m: sum(v) / len(v) for m, v in acc.items()}
    assert accuracy["lecturer"] - accuracy["snap"] > 0.3          # M_train: wordiest vs tersest
    assert abs(accuracy["storyteller"] - accuracy["quiet"]) < 0.15  # M_valid: no such gap
    # the pairs an RM trains on: the longer response is usually the chosen one
    train = rows(syn, "train.jsonl")
    longer = [len(r["chosen"].split()) > len(r["rejected"].split()) for r in train
              if len(r["chosen"].split()) != len(r["rejected"].split())]
    assert sum(longer) / len(longer) > 0.55


def test_base_model_loads_and_fits(syn):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import utils

    base = os.path.join(syn, "base")
    tok = AutoTokenizer.from_pretrained(base)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.config.vocab_size == len(tok) and model.config.hidden_size == 64
    r = rows(syn, "train.jsonl")[0]
    ids = utils.encode_prompt_response(utils.load_tokenizer(base), r["prompt"], r["chosen"])
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).replace("user", "").strip().startswith(r["prompt"][:10])
    lengths = [len(utils.encode_prompt_response(tok, r["prompt"], y)) for name in ("train.jsonl",) + RANK_FILES
               for r in rows(syn, name) for y, _, _ in items(r)]
    assert sorted(lengths)[int(0.95 * len(lengths))] < 100
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))


# ---------------------------------------------------------------------------------------------------
# real sources on local fixtures in their real schemas
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gold_rm(tmp_path_factory):
    """A tiny AutoModelForSequenceClassification (random head) as the gold model."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = str(tmp_path_factory.mktemp("gold_rm"))
    tok = make_tokenizer(path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    return path


def reference_gold(path, prompt, response):
    """One unpadded forward of the gold model on its chat-template ids: independent of the batched scorer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, 0].item()


def uf_row(i, responses, instruction=None):
    return {"source": "evol_instruct", "instruction": instruction or f"question number {i} about the cat and dog",
            "models": [f"uf-model-{j}" for j in range(len(responses))], "correct_answers": ["none"],
            "incorrect_answers": ["none"],
            "completions": [{"annotations": {"helpfulness": {"Rating": "4"}}, "critique": "ok",
                             "custom_system_prompt": "", "fine-grained_score": 4.0, "model": f"uf-model-{j}",
                             "overall_score": 7.0, "principle": "helpfulness", "response": r}
                            for j, r in enumerate(responses)]}


def test_ultrafeedback_path(tmp_path, gold_rm):
    data = tmp_path / "uf.jsonl"
    good = [uf_row(i, [f"answer {k} to {i}: the cat sat on mat {k}" for k in range(4)]) for i in range(12)]
    bad = [uf_row(0, ["x", "y", "z", "w"]),                       # duplicate prompt of row 0
           uf_row(20, ["same", "same", "other", "more"]),          # 2 identical responses
           uf_row(21, ["one", "two", "three"])]                    # fewer than 4
    with open(data, "w") as f:
        for r in good[:3] + bad + good[3:]:
            f.write(json.dumps(r) + "\n")
    gens = [make_tiny_lm(str(tmp_path / f"gen{k}"), seed=k) for k in range(2)]
    out = str(tmp_path / "out")
    manifest = md.main(["--source", "ultrafeedback", "--dataset", str(data), "--out", out, "--train-prompts", "8",
                        "--gold-model", gold_rm, "--new-models", ",".join(gens), "--samples-per-model", "2",
                        "--max-new-tokens", "6", "--generator", "hf", "--rl-eval-prompts", "1"])
    src = dict(manifest["skipped"]["source"])
    src.pop("empty generated response", None)  # a tiny random LM may sample eos first: dropped, counted
    assert src == {"duplicate prompt": 1, "2 or more identical responses": 1, "fewer than 4 responses": 1}
    assert manifest["splits"] == {"source_rows": 15, "usable_prompts": 12, "train_prompts": 8, "valid_prompts": 4}
    assert manifest["models"]["m_valid"] == ["gen0", "gen1"] and all(manifest["checks"].values())
    train, valid_id = rows(out, "train.jsonl"), rows(out, "valid_id.jsonl")
    assert len(train) == len(valid_id) == 8
    for a, b in zip(train, valid_id):  # the four UF responses of a train prompt: two for train, two for D_ID
        assert a["prompt"] == b["prompt"]
        assert len({a["chosen"], a["rejected"], b["chosen"], b["rejected"]}) == 4
    r = train[0]
    assert r["chosen_score"] == pytest.approx(reference_gold(gold_rm, r["prompt"], r["chosen"]), abs=1e-4)
    assert r["rejected_score"] == pytest.approx(reference_gold(gold_rm, r["prompt"], r["rejected"]), abs=1e-4)
    assert len(rows(out, "valid_prompt_ood.jsonl")) == 4
    resp_ood = rows(out, "valid_response_ood.jsonl")
    assert {x["prompt"] for x in resp_ood} <= {x["prompt"] for x in train} and len(resp_ood) > 0
    assert len(resp_ood) + sum(manifest["skipped"].get("valid_response_ood.jsonl", {}).values()) == 8
    for x in resp_ood + rows(out, "valid_mutual_ood.jsonl"):
        assert set(x["models"]) <= {"gen0", "gen1"} and len(x["responses"]) == 4
    g = resp_ood[0]
    assert g["gold_scores"][1] == pytest.approx(reference_gold(gold_rm, g["prompt"], g["responses"][1]), abs=1e-4)
    assert len(rows(out, "rl_prompts.jsonl")) == 3 and len(rows(out, "rl_eval_prompts.jsonl")) == 1


def test_skywork_path(tmp_path, gold_rm):
    def conv(user, answer, more=()):
        return [{"role": "user", "content": user}, *more, {"role": "assistant", "content": answer}]

    data = tmp_path / "sky.jsonl"
    turns = [{"role": "assistant", "content": "first answer"}, {"role": "user", "content": "and now?"}]
    raw = [{"chosen": conv("hi there", "good answer"), "rejected": conv("hi there", "bad"), "source": "helpsteer2"},
           {"chosen": conv("q2", "yes", turns), "rejected": conv("q2", "no", turns), "source": "offsetbias"},
           {"chosen": conv("q3", "same"), "rejected": conv("q3", "same"), "source": "wildguard"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in raw))
    out = str(tmp_path / "out")
    manifest = md.main(["--source", "skywork", "--dataset", str(data), "--out", out, "--gold-model", gold_rm])
    train = rows(out, "train.jsonl")
    assert manifest["skipped"] == {"train.jsonl": {"chosen == rejected": 1}}
    assert [r["prompt"] for r in train][0] == "hi there" and train[0]["chosen"] == "good answer"
    assert train[1]["prompt"] == [{"role": "user", "content": "q2"}] + turns and train[1]["chosen"] == "yes"
    assert train[0]["chosen_score"] == pytest.approx(reference_gold(gold_rm, "hi there", "good answer"), abs=1e-4)
    agree = sum(r["chosen_score"] > r["rejected_score"] for r in train) / 2
    assert manifest["gold_agrees_with_labels"] == agree
    assert sorted(os.listdir(out)) == [".written_by", "manifest.json", "train.jsonl"]  # .written_by: the owner


AE_MODELS = ["gpt-3.5-turbo-0301", "claude-2", "vicuna-7b", "alpaca-7b", "falcon-7b-instruct",
             "gemma-2b-it", "gemma-7b-it", "phi-2", "OpenHermes-2.5-Mistral-7B"]


def write_alpaca_eval(root, n_prompts=10):
    for k, model in enumerate(AE_MODELS + ["gpt4_1106_preview"]):
        folder = os.path.join(root, "results", model, "weighted_alpaca_eval_gpt4_turbo")
        os.makedirs(folder)
        recs = []
        for i in range(n_prompts):
            if model == "phi-2" and i == 3:
                continue  # a file missing a record
            pref = 1.0 + ((i * 7 + k * 3) % 10) / 10
            output = "" if (model == "gemma-2b-it" and i == 5) else f"{model} says {i}"
            if model == "vicuna-7b" and i == 0:
                output = "claude-2 says 0"  # the same text as another model's: kept once
            recs.append({"instruction": f"instruction {i}", "dataset": "helpful_base", "output_1": "reference",
                         "generator_1": "gpt4_1106_preview", "output_2": output, "generator_2": model,
                         "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": str(pref) if k % 2 else pref})
        json.dump(recs, open(os.path.join(folder, "annotations.json"), "w"))


def test_alpaca_eval_path(tmp_path):
    write_alpaca_eval(str(tmp_path / "ae"))
    out = str(tmp_path / "out")
    manifest = md.main(["--source", "alpaca_eval", "--alpaca-eval-dir", str(tmp_path / "ae"), "--out", out])
    assert manifest["models"]["m_valid"] == ["OpenHermes-2.5-Mistral-7B", "gemma-2b-it", "gemma-7b-it", "phi-2"]
    assert manifest["models"]["m_train"] == sorted(set(AE_MODELS) - set(manifest["models"]["m_valid"]), key=str)
    assert manifest["skipped"]["source"] == {"empty response": 1, "M_train response identical to another model's": 1}
    assert manifest["splits"] == {"train_prompts": 8, "valid_prompts": 2} and all(manifest["checks"].values())
    # gold r* = preference - 1 for exactly that (instruction, model) response
    k_of = {m: k for k, m in enumerate(AE_MODELS)}
    for name in ("train.jsonl", "valid_id.jsonl") + RANK_FILES:
        for r in rows(out, name):
            for y, m, g in items(r):
                i = int(r["prompt"].split()[-1])
                assert y == f"{m} says {i}" and g == pytest.approx(((i * 7 + k_of[m] * 3) % 10) / 10)
    assert len(rows(out, "train.jsonl")) + manifest["skipped"].get("train.jsonl", {}).get(
        "gold ties or too few responses", 0) == 8
    # prompts 3 (no phi-2) and 5 (empty gemma-2b-it) have only 3 M_valid responses
    n_short = sum(p in {"instruction 3", "instruction 5"} for p in {r["prompt"] for r in rows(out, "train.jsonl")} |
                  {r["prompt"] for r in rows(out, "valid_prompt_ood.jsonl")})
    short = sum(manifest["skipped"].get(n, {}).get("fewer than 4 responses", 0) for n in RANK_FILES)
    assert short == n_short
    # override the split by name; an unknown name is an error naming the flag and the models present
    out2 = str(tmp_path / "out2")
    m2 = md.main(["--source", "alpaca_eval", "--alpaca-eval-dir", str(tmp_path / "ae" / "results"), "--out", out2,
                  "--valid-models", "claude-2,vicuna-7b,alpaca-7b,falcon-7b-instruct", "--pairs-per-prompt", "2"])
    assert m2["models"]["m_valid"] == ["claude-2", "vicuna-7b", "alpaca-7b", "falcon-7b-instruct"]
    assert len(rows(out2, "train.jsonl")) + m2["skipped"].get("train.jsonl", {}).get(
        "gold ties or too few responses", 0) == 16
    with pytest.raises(SystemExit, match=r"--valid-models: unknown model\(s\) \['gpt-5'\].*claude-2"):
        md.main(["--source", "alpaca_eval", "--alpaca-eval-dir", str(tmp_path / "ae"), "--out", out2,
                 "--valid-models", "gpt-5,claude-2"])


def test_alpaca_eval_failed_annotation_is_a_counted_skip(tmp_path):
    """A record whose annotator call failed carries preference null: skipped and counted, the run goes on."""
    write_alpaca_eval(str(tmp_path / "ae"))
    path = next(p for p in glob.glob(str(tmp_path / "ae" / "**" / "annotations.json"), recursive=True))
    recs = json.load(open(path))
    recs[0]["preference"] = None
    json.dump(recs, open(path, "w"))
    m = md.main(["--source", "alpaca_eval", "--alpaca-eval-dir", str(tmp_path / "ae"), "--out", str(tmp_path / "o")])
    assert m["skipped"]["source"]["preference is null (annotation failed)"] == 1


def test_real_alpaca_eval_layout_when_present(tmp_path):
    """The shared copy of the real data, when this machine has it (never required)."""
    root = os.path.join(REPO, "..", "shared", "data", "alpaca_eval")
    if not os.path.isdir(root):
        pytest.skip("no ../shared/data/alpaca_eval here")
    m = md.main(["--source", "alpaca_eval", "--alpaca-eval-dir", root, "--out", str(tmp_path / "ae")])
    assert m["splits"] == {"train_prompts": 644, "valid_prompts": 161} and all(m["checks"].values())


# ---------------------------------------------------------------------------------------------------
# your own JSONL, and bad input: an error naming file, row and field, or a counted skip
# ---------------------------------------------------------------------------------------------------


def write(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return str(path)


def test_jsonl_source_validates_and_copies(tmp_path):
    train = write(tmp_path / "t.jsonl", [{"prompt": "p1", "chosen": "a", "rejected": "b", "chosen_score": 2,
                                          "rejected_score": 1}, {"prompt": "p2", "chosen": "c", "rejected": "c"}])
    rank = write(tmp_path / "r.jsonl", [{"prompt": "p3", "responses": ["x", "y", "z"], "gold_scores": [1, 2, 3]},
                                        {"prompt": "p4", "responses": ["only"], "gold_scores": [1]}])
    out = str(tmp_path / "out")
    m = md.main(["--source", "jsonl", "--train-file", train, "--prompt-ood-file", rank, "--out", out])
    assert m["skipped"] == {"train.jsonl": {"chosen == rejected": 1},
                            "valid_prompt_ood.jsonl": {"fewer than 2 responses": 1}}
    t = rows(out, "train.jsonl")
    assert len(t) == 1 and set(t[0]) == CONTRACT_PAIR and t[0]["chosen_score"] == 2
    assert rows(out, "valid_prompt_ood.jsonl")[0]["gold_scores"] == [1, 2, 3]
    model_checks = ("m_train_and_m_valid_disjoint", "seen_files_use_only_m_train", "ood_response_files_use_only_m_valid")
    assert all(m["checks"][k] is None for k in model_checks)  # no model sets declared, no model names: not checkable
    assert all(v for k, v in m["checks"].items() if k not in model_checks)


def test_jsonl_model_check_reads_the_model_names_of_the_rows(tmp_path):
    """--source jsonl declares no M_train / M_valid: a response-OOD file whose models also wrote the training pairs
    fails m_train_and_m_valid_disjoint (a warning), instead of every model check passing on empty sets."""
    def write(path, objs):
        path.write_text("".join(json.dumps(o) + "\n" for o in objs))
        return str(path)

    train = write(tmp_path / "t.jsonl", [{"prompt": "p1", "chosen": "a", "rejected": "b", "chosen_model": "gpt-4",
                                          "rejected_model": "llama"}])
    ood = write(tmp_path / "r.jsonl", [{"prompt": "p1", "responses": ["x", "y"], "gold_scores": [1, 2],
                                        "models": ["gpt-4", "llama"]}])
    m = md.main(["--source", "jsonl", "--train-file", train, "--response-ood-file", ood, "--out", str(tmp_path / "o")])
    assert m["checks"]["m_train_and_m_valid_disjoint"] is False
    ood = write(tmp_path / "r.jsonl", [{"prompt": "p1", "responses": ["x", "y"], "gold_scores": [1, 2],
                                        "models": ["new-a", "new-b"]}])
    m = md.main(["--source", "jsonl", "--train-file", train, "--response-ood-file", ood, "--out", str(tmp_path / "o2")])
    assert m["checks"]["m_train_and_m_valid_disjoint"] is True


@pytest.mark.parametrize("objs,match", [
    ([{"prompt": "p", "chosen": "a"}], r"t\.jsonl:1: missing field 'rejected'"),
    (["{not json"], r"t\.jsonl:1: not valid JSON"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": 3, "rejected": "b"}],
     r"t\.jsonl:2: field 'chosen' must be a string"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 0.1, "rejected_score": 0.5}],
     r"t\.jsonl:1: field 'chosen_score' \(0\.1\) must be higher"),
])
def test_jsonl_bad_input_names_file_line_field(tmp_path, objs, match):
    train = write(tmp_path / "t.jsonl", objs)
    with pytest.raises(SystemExit, match=r"data error: .*" + match):
        md.main(["--source", "jsonl", "--train-file", train, "--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")  # nothing half-written


def test_invalid_utf8_names_file_and_line_and_a_bom_is_read(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
    train = tmp_path / "t.jsonl"
    train.write_bytes(b"\xef\xbb\xbf" + good + b"\n")  # a UTF-8 BOM: simply read
    m = md.main(["--source", "jsonl", "--train-file", str(train), "--out", str(tmp_path / "out")])
    assert m["counts"]["train.jsonl"] == 1 and rows(tmp_path / "out", "train.jsonl")[0]["prompt"] == "p"
    train.write_bytes(good + b"\n" + good.replace(b'"b"', b'"\xff"') + b"\n")
    with pytest.raises(SystemExit, match=r"data error: .*t\.jsonl:2: invalid UTF-8 \(byte 0xff"):
        md.main(["--source", "jsonl", "--train-file", str(train), "--out", str(tmp_path / "out2")])
    write_alpaca_eval(str(tmp_path / "ae"), n_prompts=2)  # AlpacaEval's annotations.json: a JSON list
    path = tmp_path / "ae" / "results" / "claude-2" / "weighted_alpaca_eval_gpt4_turbo" / "annotations.json"
    path.write_bytes(path.read_bytes().replace(b"claude-2 says 1", b"claude-2 says \xc3("))
    with pytest.raises(SystemExit, match=r"data error: .*claude-2/weighted_alpaca_eval_gpt4_turbo/annotations\.json:1: "
                                         r"invalid UTF-8"):
        md.main(["--source", "alpaca_eval", "--alpaca-eval-dir", str(tmp_path / "ae"), "--out", str(tmp_path / "o3")])


def test_out_folder_of_something_else_is_not_replaced(tmp_path):
    (tmp_path / "keep.txt").write_text("a run of another stage")
    with pytest.raises(SystemExit, match="non-empty folder not written by make_data.py"):
        md.main(["--out", str(tmp_path), "--num-prompts", "50"])
    assert (tmp_path / "keep.txt").read_text() == "a run of another stage"


def test_real_sources_bad_input(tmp_path):
    bad_uf = write(tmp_path / "uf.jsonl", [uf_row(0, ["a", "b", "c", "d"]), uf_row(1, ["a", "b", "c", "d"])])
    lines = open(bad_uf).read().splitlines()
    row = json.loads(lines[1])
    row["completions"][2]["response"] = None
    write(tmp_path / "uf.jsonl", [lines[0], row])
    with pytest.raises(SystemExit, match=r"uf\.jsonl:2: field 'completions'\[2\]\.response must be a string"):
        md.main(["--source", "ultrafeedback", "--dataset", bad_uf, "--out", str(tmp_path / "o")])
    write(tmp_path / "uf.jsonl", [{"instruction": 5, "completions": []}])
    with pytest.raises(SystemExit, match=r"uf\.jsonl:1: field 'instruction' must be a string"):
        md.main(["--source", "ultrafeedback", "--dataset", bad_uf, "--out", str(tmp_path / "o")])
    ae = tmp_path / "ae"
    write_alpaca_eval(str(ae), n_prompts=5)
    path = ae / "results" / "claude-2" / "weighted_alpaca_eval_gpt4_turbo" / "annotations.json"
    recs = json.load(open(path))
    recs[2]["preference"] = "n/a"
    json.dump(recs, open(path, "w"))
    with pytest.raises(SystemExit, match=r"claude-2/weighted_alpaca_eval_gpt4_turbo/annotations\.json record 2: "
                                         r"field 'preference' must be a number"):
        md.main(["--source", "alpaca_eval", "--alpaca-eval-dir", str(ae), "--out", str(tmp_path / "o")])


CUSTOM_RM = """
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING  # noqa: F401  (ArmoRM's code does this)
from transformers.utils import ModelOutput


@dataclass
class GatedOutput(ModelOutput):
    score: Optional[torch.FloatTensor] = None
    rewards: Optional[torch.FloatTensor] = None


class TinyGatedRM(LlamaPreTrainedModel):
    # ArmoRM's interface: several objective rewards read before the first pad, a preference `score`

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = torch.nn.Linear(config.hidden_size, 3, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        h = self.model(input_ids, attention_mask=attention_mask).last_hidden_state
        last = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1) % input_ids.shape[-1]
        rewards = self.regression_layer(h[torch.arange(len(h)), last])
        return GatedOutput(score=rewards @ torch.tensor([1.0, -0.5, 2.0]), rewards=rewards)
"""


@pytest.fixture(scope="module")
def custom_rm(tmp_path_factory):
    """A gold RM that ships its own code (auto_map), like RLHFlow/ArmoRM-Llama3-8B-v0.1."""
    import importlib.util

    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("custom_rm")
    (path / "modeling_tiny_gated.py").write_text(CUSTOM_RM)
    tok = make_tokenizer(str(path))
    spec = importlib.util.spec_from_file_location("modeling_tiny_gated", path / "modeling_tiny_gated.py")
    from transformers.models.llama import modeling_llama

    modeling_llama.LLAMA_INPUTS_DOCSTRING = ""  # only to build the weights here; make_data must do this itself
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    del modeling_llama.LLAMA_INPUTS_DOCSTRING
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = module.TinyGatedRM(config).eval()
    model.save_pretrained(str(path))
    cfg = json.load(open(path / "config.json"))
    cfg["auto_map"] = {"AutoModelForSequenceClassification": "modeling_tiny_gated.TinyGatedRM"}
    json.dump(cfg, open(path / "config.json", "w"))
    return str(path), model, tok


def test_gold_model_with_custom_code(tmp_path, custom_rm):
    path, model, tok = custom_rm
    data = write(tmp_path / "sky.jsonl", [{"chosen": [{"role": "user", "content": f"q {i}"},
                                                      {"role": "assistant", "content": "yes " * (i + 1)}],
                                           "rejected": [{"role": "user", "content": f"q {i}"},
                                                        {"role": "assistant", "content": "no"}]} for i in range(5)])
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match="--trust-remote-code"):  # without the flag: a wrong head, so refused
        md.main(["--source", "skywork", "--dataset", data, "--out", out, "--gold-model", path])
    md.main(["--source", "skywork", "--dataset", data, "--out", out, "--gold-model", path, "--trust-remote-code",
             "--gold-batch-size", "2"])
    for r in rows(out, "train.jsonl"):  # batched, padded scoring == one unpadded forward of the model's own code
        for key, response in (("chosen_score", r["chosen"]), ("rejected_score", r["rejected"])):
            msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": response}]
            ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                expected = model(torch.tensor([ids])).score[0].item()
            assert r[key] == pytest.approx(expected, abs=1e-4)


def test_reward_from_armorm_style_output():
    from types import SimpleNamespace as Out

    score = torch.tensor([0.5, -1.0])
    out = Out(score=score, rewards=torch.randn(2, 19))  # ArmoRM: 19 objective rewards + the gated preference score
    assert torch.equal(generation.gold_rewards(out, 2), score)
    assert torch.equal(generation.gold_rewards(Out(logits=torch.tensor([[1.0], [2.0]])), 2), torch.tensor([1.0, 2.0]))
    with pytest.raises(SystemExit, match="3 logits"):
        generation.gold_rewards(Out(logits=torch.zeros(2, 3)), 2)


def test_new_model_sampling_takes_our_settings_and_the_models_stop_tokens(tmp_path):
    """make_data's transformers path samples with --temperature / --top-p only, as its vLLM path does (explicit
    SamplingParams): a generation_config.json asking for top_k=1 (greedy in disguise) is not applied, while its
    eos_token_id list still ends a response (vLLM stops there too)."""
    import types

    from transformers import GenerationConfig

    path = str(tmp_path / "lm")
    make_tiny_lm(path)
    chat = [[{"role": "user", "content": "tell me about the cat"}]]
    sampling = types.SimpleNamespace(temperature=1.0, top_p=1.0, max_new_tokens=6)
    GenerationConfig(do_sample=True, top_k=1, repetition_penalty=3.0).save_pretrained(path)
    (texts,) = generation.chat_samples_hf(path, chat, 8, sampling, seed=0, batch_size=1)
    assert len(texts) == 8 and len(set(texts)) > 1  # with top_k=1 applied, all 8 samples would be the same

    tok = generation.utils.load_tokenizer(path)
    GenerationConfig(eos_token_id=list(range(len(tok)))).save_pretrained(path)  # every token ends a response
    (texts,) = generation.chat_samples_hf(path, chat, 8, sampling, seed=0, batch_size=1)
    one_token = {tok.decode([i], skip_special_tokens=True) for i in range(len(tok))}
    assert all(t in one_token for t in texts), texts  # each response stopped after its first token


def test_new_model_sampling_also_stops_at_the_templates_end_of_turn(tmp_path, monkeypatch):
    """A model whose chat template ends a turn with a special token that neither eos nor generation_config.json names
    stops there too, on both engines, as rloo.py's sampling does (else it writes on into invented turns)."""
    import types

    path = str(tmp_path / "lm")
    make_tiny_lm(path)
    tok = generation.utils.load_tokenizer(path)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|system|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(path)
    end_of_turn = tok.convert_tokens_to_ids("<|system|>")
    assert generation.utils.turn_end_ids(tok) == [end_of_turn] and end_of_turn != tok.eos_token_id
    seen = {}
    real = generation.hf_sampling_config
    monkeypatch.setattr(generation, "hf_sampling_config",
                        lambda sampling, eos, *a, **k: seen.setdefault("hf", list(eos)) and real(sampling, eos, *a, **k))
    sampling = types.SimpleNamespace(temperature=1.0, top_p=1.0, max_new_tokens=3)
    generation.chat_samples_hf(path, [[{"role": "user", "content": "hi"}]], 1, sampling, seed=0, batch_size=1)
    assert end_of_turn in seen["hf"] and tok.eos_token_id in seen["hf"]
    pytest.importorskip("vllm")

    class Engine:  # the engine itself is tested in test_vllm.py; here only what chat_samples_vllm asks of it
        def generate(self, prompts, params, use_tqdm=None):
            seen["vllm"] = params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[end_of_turn])]) for _ in prompts]

    monkeypatch.setattr(generation, "vllm_engine", lambda *a, **k: Engine())
    generation.chat_samples_vllm(path, [[{"role": "user", "content": "hi"}]], 1, sampling, seed=0)
    assert set(seen["vllm"][0].stop_token_ids) >= {end_of_turn, tok.eos_token_id}


def test_each_new_model_samples_with_its_own_seed(monkeypatch):
    """Every --new-models model gets its own seed, fixed by --seed and its name (one shared seed would feed all models
    the same random draws: alike texts from alike models)."""
    import argparse

    seeds = []

    def fake_samples(name, conversations, n, sampling, seed, *args, **kwargs):
        seeds.append((name, seed))
        return [[f"{name} answer {j}" for j in range(n)] for _ in conversations]

    monkeypatch.setattr(generation, "chat_samples_hf", fake_samples)
    args = argparse.Namespace(new_models="org/a,org/b", samples_per_model=2, generator="hf", seed=3,
                              gen_batch_size=4, trust_remote_code=False, tensor_parallel_size=1)
    for seed in (3, 3, 4):
        args.seed = seed
        out = md.generate_responses(args, {"p1": "hi"}, {})
    assert [c["model"] for c in out["p1"]] == ["org/a", "org/a", "org/b", "org/b"]
    (a3, b3), (a3_again, b3_again), (a4, b4) = (seeds[i: i + 2] for i in (0, 2, 4))
    assert (a3, b3) == (a3_again, b3_again)  # the same flags give the same samples
    assert a3[1] != b3[1] and a4[1] != b4[1] and a3[1] != a4[1]
