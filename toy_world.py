"""The toy world of `make_data.py --source synthetic`: task families, response models, the gold reward r*(x, y),
and the statistics of its spurious feature (wordier M_train models are more accurate).

Standard library only, so that any stage (make_data.py builds the data; rloo.py --gold synthetic and tests score
with gold_reward) imports it without torch. Hong et al. (ICML 2025) use ArmoRM as the gold r*; here r* is code.
"""

import math
import random
import re
from difflib import SequenceMatcher


SYLLABLES = ("ba be bi bo da de di do fa fe fi ka ke ki ko la le li lo lu ma me mi mo na ne ni no pa pe pi po "
             "ra re ri ro sa se si so ta te ti to va ve vi vo za zo").split()
WORDS = ("apple river stone green quick little happy cloud window garden silver yellow orange purple music paper "
         "winter summer bright gentle simple forest ocean mountain candle rabbit tiger pencil basket morning "
         "evening quiet golden planet rocket button mirror ladder castle dragon honey lemon").split()


def _pseudo_word(rng, lo, hi):
    w = ""
    while len(w) < lo:
        w += rng.choice(SYLLABLES)
    return w[:hi]


def _num_list(rng):
    return ", ".join(str(n) for n in rng.sample(range(100), rng.randint(3, 6)))


def _ints(s):
    return [int(x) for x in s.split(", ")]


def _near(n, rng, lo=0):
    return str(max(lo, n + rng.choice((-10, -3, -2, -1, 1, 2, 3, 10))))


def _swap_adjacent(items, rng):
    items = list(items)
    if len(items) > 1:
        i = rng.randrange(len(items) - 1)
        items[i], items[i + 1] = items[i + 1], items[i]
    return items


# Each family: answer kind, prompt templates, random content, the solver, a restatement some response
# models use, and the typical mistakes (copying the input, off-by-one, ...).
FAMILIES = {
    "add": dict(kind="int", templates=["What is {a} + {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}."],
                fields=lambda r: {"a": str(r.randint(2, 99)), "b": str(r.randint(2, 99))},
                solve=lambda f: str(int(f["a"]) + int(f["b"])), restate="We need to add {a} and {b}.",
                wrong=lambda f, ans, r: [_near(int(ans), r), str(int(f["a"]) * int(f["b"]))]),
    "multiply": dict(kind="int", templates=["What is {a} times {b}?", "Multiply {a} by {b}.",
                                            "Compute the product of {a} and {b}."],
                     fields=lambda r: {"a": str(r.randint(2, 19)), "b": str(r.randint(2, 19))},
                     solve=lambda f: str(int(f["a"]) * int(f["b"])), restate="We need to multiply {a} by {b}.",
                     wrong=lambda f, ans, r: [_near(int(ans), r), str(int(f["a"]) + int(f["b"])),
                                              str(int(ans) + int(f["b"]))]),
    "sort": dict(kind="list", templates=["Sort these numbers from smallest to largest: {nums}.",
                                         "Put these numbers in ascending order: {nums}."],
                 fields=lambda r: {"nums": _num_list(r)}, solve=lambda f: ", ".join(map(str, sorted(_ints(f["nums"])))),
                 restate="We need to order {nums} from small to large.",
                 wrong=lambda f, ans, r: [f["nums"], ", ".join(map(str, sorted(_ints(f["nums"]), reverse=True))),
                                          ", ".join(map(str, _swap_adjacent(_ints(ans), r)))]),
    "reverse": dict(kind="word", templates=["Reverse the letters of the word '{w}'.", "Spell '{w}' backwards."],
                    fields=lambda r: {"w": _pseudo_word(r, 4, 9)}, solve=lambda f: f["w"][::-1],
                    restate="We need to read '{w}' from the end.",
                    wrong=lambda f, ans, r: [f["w"], "".join(_swap_adjacent(ans, r)), ans[1:]]),
    "count": dict(kind="int", templates=["How many times does the letter '{c}' appear in '{w}'?",
                                         "Count the letter '{c}' in the word '{w}'."],
                  fields=lambda r: (lambda w: {"c": r.choice(w) if r.random() < 0.85 else r.choice("aeiou"), "w": w})(
                      _pseudo_word(r, 6, 12)),
                  solve=lambda f: str(f["w"].count(f["c"])), restate="We need to find each '{c}' in '{w}'.",
                  wrong=lambda f, ans, r: [_near(int(ans), r), str(len(f["w"]))]),
    "max": dict(kind="int", templates=["What is the largest number in this list: {nums}?",
                                       "Which number is the biggest: {nums}?"],
                fields=lambda r: {"nums": _num_list(r)}, solve=lambda f: str(max(_ints(f["nums"]))),
                restate="We need the biggest of {nums}.",
                wrong=lambda f, ans, r: [str(min(_ints(f["nums"]))), str(sorted(_ints(f["nums"]))[-2]),
                                         f["nums"].split(", ")[0]]),
    "upper": dict(kind="text", templates=["Write '{p}' in capital letters.", "Convert '{p}' to uppercase."],
                  fields=lambda r: {"p": " ".join(r.sample(WORDS, r.randint(2, 3)))}, solve=lambda f: f["p"].upper(),
                  restate="Every letter of '{p}' becomes a capital.",
                  wrong=lambda f, ans, r: [f["p"], f["p"].title(),
                                           " ".join([ans.split(" ")[0]] + f["p"].split(" ")[1:])]),
    "wordcount": dict(kind="int", templates=["How many words are in the sentence '{s}'?", "Count the words in '{s}'."],
                      fields=lambda r: {"s": " ".join(r.choice(WORDS) for _ in range(r.randint(3, 8)))},
                      solve=lambda f: str(len(f["s"].split())), restate="We need to count the words of '{s}'.",
                      wrong=lambda f, ans, r: [_near(int(ans), r, lo=1), str(len(f["s"].replace(" ", "")))]),
}
FIELD_RE = {"a": r"\d+", "b": r"\d+", "nums": r"\d+(?:, \d+)*", "w": r"[a-z]+", "c": r"[a-z]",
            "p": r"[a-z]+(?: [a-z]+)*", "s": r"[a-z]+(?: [a-z]+)*"}


def _template_regex(template):
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{FIELD_RE[p]})" for i, p in enumerate(parts)))


TEMPLATE_RES = [(fam, _template_regex(t)) for fam, spec in FAMILIES.items() for t in spec["templates"]]


def parse_task(prompt):
    """A toy-world prompt -> (family, fields, gold answer); None for any other text."""
    if not isinstance(prompt, str):
        return None
    for fam, rx in TEMPLATE_RES:
        m = rx.fullmatch(prompt.strip())
        if m:
            return fam, m.groupdict(), FAMILIES[fam]["solve"](m.groupdict())
    return None


def task_key(prompt):
    """The task a toy prompt asks, whatever its wording: (family, fields), the operands of add and multiply in
    order (`7 + 12` is `12 + 7`); None for any other text. Two prompts with one key are one task reworded."""
    task = parse_task(prompt)
    if task is None:
        return None
    family, fields = task[0], dict(task[1])
    if family in ("add", "multiply"):
        fields["a"], fields["b"] = sorted((fields["a"], fields["b"]), key=int)
    return family, tuple(sorted(fields.items()))


# Response models. M_train: the wordier the style, the more accurate it is (the spurious feature);
# M_valid: unseen prefixes, fillers and answer formats, and wordiness no longer tracks accuracy.
FILLERS = {
    "A": ["This is a simple one.", "I checked it carefully.", "It only takes a moment.", "Here is what I found.",
          "This kind of task is common."],
    "B": ["First, I read the question.", "Next, I apply the rule.", "Then I check every step.",
          "Careful work avoids mistakes.", "I go slowly and stay precise.", "Each step follows the last.",
          "Checking twice is wise."],
    "C": ["Honestly, puzzles like this are fun.", "People see these in different ways.", "These can be tricky.",
          "Let us not rush.", "It reminds me of school.", "Anyway, moving along."],
    "D": ["Quick one.", "No problem at all.", "I had a look.", "That was easy enough.", "Got it."],
}
# name: (set, error rate, prefixes, restate?, filler pool, (min, max) fillers, answer format, closers, bullet lists?)
STYLES = {
    "snap": ("train", 0.6, [""], False, None, (0, 0), "{a}", [], False),
    "brief": ("train", 0.5, [""], False, None, (0, 0), "Answer: {a}", [], False),
    "plain": ("train", 0.38, ["", "Okay."], False, "A", (0, 1), "The answer is {a}.", [], False),
    "helper": ("train", 0.25, ["Sure!", "Of course!", "Happy to help!"], False, "A", (1, 2), "The answer is {a}.",
               ["Hope this helps!", "Let me know if you need more."], False),
    "tutor": ("train", 0.12, ["Let me work through this.", "Let us solve this step by step."], True, "B", (1, 2),
              "So the answer is {a}.", [], False),
    "lecturer": ("train", 0.05, ["Great question!", "What a nice problem!"], True, "B", (2, 4),
                 "Therefore, the final answer is {a}.",
                 ["I hope this explanation is useful.", "Feel free to ask another question."], False),
    "storyteller": ("valid", 0.3, ["Well, well.", "Oh, this one is fun."], True, "C", (2, 3), "Result: {a}",
                    ["That is my take."], False),
    "listy": ("valid", 0.3, ["Here you go:"], False, "D", (0, 1), "Result: {a}", [], True),
    "chatty": ("valid", 0.3, ["Hmm, okay.", "Alright then."], False, "D", (2, 3), "I believe the answer is {a}.", [],
               False),
    "quiet": ("valid", 0.3, [""], False, None, (0, 0), "=> {a}", [], False),
}
NON_ANSWERS = ["unclear", "unknown", "not certain"]
NON_ANSWER_SHARE = 0.3  # of a model's errors: no real answer (a mistake any style makes, visible to an RM)
M_TRAIN = [m for m, s in STYLES.items() if s[0] == "train"]
M_VALID = [m for m, s in STYLES.items() if s[0] == "valid"]


def render_response(style_name, prompt, rng, correct=None):
    """Response of a response model to a toy prompt; correct=None draws an error with the model's error rate."""
    _, err, prefixes, restate, pool, (lo, hi), answer_fmt, closers, bullets = STYLES[style_name]
    fam, fields, answer = parse_task(prompt)
    spec = FAMILIES[fam]
    if correct is None:
        correct = rng.random() >= err
    non_answer = not correct and rng.random() < NON_ANSWER_SHARE
    if not correct:
        options = [w for w in spec["wrong"](fields, answer, rng) if w != answer] or [answer + "0"]
        answer = rng.choice(options)
    body = [rng.choice(prefixes)]
    if restate:
        body.append(spec["restate"].format(**fields))
    if pool:
        body += rng.sample(FILLERS[pool], rng.randint(lo, hi))
    shown = "\n" + "\n".join(f"- {x}" for x in answer.split(", ")) if bullets and spec["kind"] == "list" else answer
    line = answer_fmt.format(a=rng.choice(NON_ANSWERS) if non_answer else shown)
    if closers:  # after the answer's sentence, so extract_answer() still finds where the answer ends
        line += ("\n" if "\n" in line else " " if line.endswith((".", "!", "?")) else ". ") + rng.choice(closers)
    body = " ".join(b for b in body if b)
    return f"{body}\n{line}" if body else line


MARKER = re.compile(r"(?i)(?:\b(?:final\s+)?answer\s*(?:is|:|=)|\bresult\s*(?:is|:|=)|=>)")
BULLET = re.compile(r"^\s*[-*\u2022]\s+(.*\S)\s*$")


def extract_answer(response):
    """(the stated answer or None, marked). The answer follows the LAST marker ('answer is', 'Answer:',
    'Result:', '=>') up to the end of its sentence, or the bullet list right under it; without a marker it
    is the last line (or the trailing bullet list)."""
    text = response.strip()
    marks = list(MARKER.finditer(text))
    lines = (text[marks[-1].end():] if marks else text).split("\n")
    if marks and lines[0].strip():
        ans = re.split(r"[.!?](?=\s|$)", lines[0].strip())[0]
    else:
        if marks:  # 'Result:' then a bullet list below it
            rest = lines[1:]
            block = []
            for ln in rest:
                m = BULLET.match(ln)
                if not m:
                    break
                block.append(m.group(1))
        else:
            rest = [ln for ln in lines if ln.strip()]
            block = []
            for ln in reversed(rest):
                m = BULLET.match(ln)
                if not m:
                    break
                block.insert(0, m.group(1))
        ans = "\n".join(block) if block else ("" if marks or not rest else rest[-1])
    ans = ans.strip().strip("*`'\"").strip().rstrip(".!?").strip()
    return (ans or None), bool(marks)


def _canonical(kind, ans):
    """The canonical form of a stated answer of this kind, or None when it does not parse as one."""
    t = " ".join(ans.split())
    if kind == "int":
        return str(int(t)) if re.fullmatch(r"-?\d+", t) else None
    if kind == "list":
        if not re.fullmatch(r"[\[(]?\s*-?\d+(?:\s*[, ]\s*-?\d+)*\s*[\])]?", t):
            return None
        return ", ".join(str(int(x)) for x in re.findall(r"-?\d+", t))
    return t


def gold_details(prompt, response):
    """The terms of r*(x, y): correctness (dominant), format, rambling penalty; works for ANY text y."""
    task = parse_task(prompt)
    ans, marked = extract_answer(response) if isinstance(response, str) else (None, False)
    correct, fmt = 0.0, 0.0
    if task is not None and ans is not None:
        fam, _, gold = task
        canon = _canonical(FAMILIES[fam]["kind"], ans)
        correct = 1.0 if canon == gold else round(0.4 * SequenceMatcher(None, canon or ans, gold).ratio(), 4)
        fmt = 0.1 * marked + 0.1 * (canon is not None and " ".join(ans.split()) == canon)
    text = response if isinstance(response, str) else ""
    n_words = len(text.split())
    sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+|\n", text) if s.strip()]
    repeats = len(sentences) - len(set(sentences))
    ramble = min(1.5, 0.01 * max(0, n_words - 30) + 0.02 * max(0, n_words - 50) + 0.1 * repeats)
    return {"correct": correct, "format": fmt, "ramble": ramble, "words": n_words,
            "reward": round(correct + fmt - ramble, 4)}


def gold_reward(prompt: str, response: str) -> float:
    """r*(x, y) of the toy world, for ANY response text (RLOO samples included); deterministic.

    correct answer +1 (a wrong one: up to +0.4 by string similarity), +0.1 if the answer is marked
    ('The answer is', 'Answer:', 'Result:', '=>'), +0.1 if it is in canonical form (no bullets/brackets),
    minus a rambling penalty 0.01/word beyond 30 words + 0.02/word beyond 50 + 0.1 per repeated sentence (cap 1.5).
    A prompt that is not a toy task gets only the length/repetition terms.
    """
    return gold_details(prompt, response)["reward"]


def make_prompts(n, seed):
    """n distinct toy prompts, families drawn uniformly, content random."""
    rng = random.Random(f"{seed}-prompts")
    fams, seen, prompts = list(FAMILIES), set(), []
    tries = 0
    while len(prompts) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise SystemExit(f"--num-prompts {n}: the toy world ran out of distinct prompts")
        fam = rng.choice(fams)
        p = rng.choice(FAMILIES[fam]["templates"]).format(**FAMILIES[fam]["fields"](rng))
        if p not in seen:
            seen.add(p)
            prompts.append(p)
    return prompts


def candidate_responses(prompt, rng, n_train_models, sft_answer=False):
    """One prompt's candidates {model, response, score (r*)}: from n_train_models random M_train models and from
    every M_valid model; with sft_answer, also a correct answer in a random M_train style (the SFT target)."""
    models = rng.sample(M_TRAIN, n_train_models)
    from_train = [{"model": m, "response": render_response(m, prompt, rng)} for m in models]
    from_valid = [{"model": m, "response": render_response(m, prompt, rng)} for m in M_VALID]
    answer = render_response(rng.choice(M_TRAIN), prompt, rng, correct=True) if sft_answer else None
    for c in from_train + from_valid:
        c["score"] = gold_reward(prompt, c["response"])
    return from_train, from_valid, answer


def spurious_stats(responses):
    """The spurious feature, measured on (prompt, response, model) triples: per response model its set, accuracy,
    mean words and mean r*; corr(words, r*) within M_train and within M_valid."""
    per_model, per_set = {}, {"m_train": [], "m_valid": []}
    for prompt, response, model in responses:
        d = gold_details(prompt, response)
        per_model.setdefault(model, []).append(d)
        per_set["m_train" if STYLES[model][0] == "train" else "m_valid"].append(d)

    def mean(ds, key):
        return sum(d[key] == 1 if key == "correct" else d[key] for d in ds) / len(ds)

    def corr_words_reward(ds):  # Pearson; + 0.0 turns -0.0 into 0.0
        x, y = [d["words"] for d in ds], [d["reward"] for d in ds]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
        sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
        return round(sxy / math.sqrt(sxx * syy), 4) + 0.0 if sxx and syy else 0.0

    stats = {"models": {m: {"set": STYLES[m][0], "n": len(ds), "accuracy": round(mean(ds, "correct"), 4),
                            "mean_words": round(mean(ds, "words"), 2), "mean_gold": round(mean(ds, "reward"), 4)}
                        for m, ds in sorted(per_model.items())}}
    for name, ds in per_set.items():
        if ds:
            stats[f"corr_words_gold_{name}"] = corr_words_reward(ds)
    return stats
