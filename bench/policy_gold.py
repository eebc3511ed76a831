"""Gold reward r*, length and win rate of toy-world policies on many fresh prompts (Table 3 with tight intervals).

rloo.py scores its policy on --gold-prompts (16 in the smol preset, one sample each): enough to see a trend, too few
for a verdict. This script samples K responses for each of P fresh in-distribution toy prompts (toy_world.make_prompts
with a seed the data did not use; any prompt that is in the data folder is dropped) from each policy, with the RLOO
run's own sampling (generation.generate_vllm with the temperature, top-p, --max-new-tokens and stop tokens of its
rloo_config.json), on vLLM (CPU or GPU), and scores them with toy_world.gold_reward. It reports, per policy, gold r*
(mean ± s.e. over prompts), the paired difference to each other policy (mean ± s.e. over prompts), the win rate
against the SFT policy (sample j of a prompt against the SFT policy's sample j; ties count one half) and the length.

    python bench/policy_gold.py --data-dir runs/smol/data --sft runs/smol/sft \
        --policy pi_bt=runs/smol/rloo/bt --policy pi_bsr=runs/smol/rloo/bsr --out runs/smol/policy_gold

Writes OUT/policy_gold.md (the table, printed too), OUT/policy_gold.json and OUT/samples.jsonl.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import generation  # noqa: E402  (generate_vllm: the RLOO run's own sampling, by construction)
import utils  # noqa: E402
from toy_world import gold_reward, make_prompts  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--data-dir", required=True, help="make_data.py --out (its prompts are excluded)")
    p.add_argument("--sft", required=True, help="the SFT policy folder (the RLOO runs' start)")
    p.add_argument("--policy", action="append", default=[], metavar="NAME=RLOO_OUT", required=True,
                   help="an rloo.py --out folder (its final policy and rloo_config.json); repeat")
    p.add_argument("--prompts", type=utils.positive_int, default=200, help="fresh prompts P")
    p.add_argument("--samples", type=utils.positive_int, default=4, help="samples per prompt K")
    p.add_argument("--prompt-seed", type=int, default=12345, help="toy_world.make_prompts seed of the fresh prompts")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same for every policy)")
    p.add_argument("--out", required=True, help="output folder (new, or one this script wrote)")
    return p.parse_args()


def data_prompts(data_dir):
    """Every prompt string in the data folder's JSONL files."""
    seen = set()
    for name in sorted(os.listdir(data_dir)):
        if name.endswith(".jsonl"):
            for _, row in utils.read_jsonl(os.path.join(data_dir, name)):
                if isinstance(row.get("prompt"), str):
                    seen.add(row["prompt"])
    return seen


def sample(policy_dir, prompts, cfg, samples, seed):
    """[[(text, n_tokens, finished) x samples] per prompt] from one policy: generation.generate_vllm itself, with the
    RLOO run's sampling flags and stop ids (its rloo_config.json). n_tokens does not count the stop token."""
    tokenizer = utils.load_tokenizer(policy_dir)
    stop_ids = set(cfg["stop_token_ids"])
    prompt_ids = [tokenizer(utils.render_chat(tokenizer, [{"role": "user", "content": p}], True),
                            add_special_tokens=False)["input_ids"] for p in prompts]
    run_args = argparse.Namespace(**cfg["args"])
    llm = generation.vllm_engine(policy_dir, max_model_len=max(map(len, prompt_ids)) + run_args.max_new_tokens,
                                 dtype=None, seed=seed, colocated=False, generation_config="vllm")
    outs = generation.generate_vllm(llm, [ids for ids in prompt_ids for _ in range(samples)], run_args, stop_ids, seed)
    result = []
    for tokens, finished in outs:
        response = tokens[:-1] if finished else tokens  # generate_vllm keeps the stop token that ended it
        result.append((tokenizer.decode(response, skip_special_tokens=True), len(response), finished))
    del llm
    return [result[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def mean_sem(values):
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, sd / math.sqrt(n)


def main():
    args = parse_args()
    utils.quiet_libraries()
    ours = {"samples.jsonl", "policy_gold.md", "policy_gold.json"}
    if os.path.isdir(args.out) and set(os.listdir(args.out)) - ours:
        raise SystemExit(f"--out {args.out}: a folder with files this script did not write; choose another --out")
    os.makedirs(args.out, exist_ok=True)
    runs = {}
    for spec in args.policy:
        name, sep, path = spec.partition("=")
        if not sep or not os.path.exists(os.path.join(path, "rloo_config.json")):
            raise SystemExit(f"--policy {spec}: expected NAME=FOLDER with FOLDER an rloo.py --out (rloo_config.json)")
        runs[name] = path
    cfgs = {name: json.load(open(os.path.join(path, "rloo_config.json"))) for name, path in runs.items()}
    settings = {json.dumps({k: c["args"][k] for k in ("temperature", "top_p", "max_new_tokens")} | {
        "stop": sorted(c["stop_token_ids"])}) for c in cfgs.values()}
    if len(settings) != 1:
        raise SystemExit(f"the RLOO runs sampled with different settings: {sorted(settings)}")
    cfg = next(iter(cfgs.values()))

    exclude = data_prompts(args.data_dir)
    candidates = make_prompts(args.prompts + len(exclude), args.prompt_seed)
    fresh = [p for p in candidates if p not in exclude]
    prompts = fresh[: args.prompts]
    print(f"[prompts] {len(prompts)} fresh toy prompts (seed {args.prompt_seed}; "
          f"{len(candidates) - len(fresh)} in the data folder dropped)")

    gold, length, done = {}, {}, {}
    with open(os.path.join(args.out, "samples.jsonl"), "w") as f:
        for name, path in [("SFT", args.sft)] + list(runs.items()):
            outs = sample(path, prompts, cfg, args.samples, args.seed)
            gold[name] = [[gold_reward(p, t) for t, _, _ in o] for p, o in zip(prompts, outs)]
            length[name] = [n for o in outs for _, n, _ in o]
            done[name] = [fin for o in outs for _, _, fin in o]
            for p, o, g in zip(prompts, outs, gold[name]):
                for (t, n, fin), s in zip(o, g):
                    f.write(json.dumps({"policy": name, "prompt": p, "response": t, "gold_reward": s, "length": n,
                                        "eos": fin}) + "\n")
            print(f"[{name}] gold r* {mean_sem([sum(g) / len(g) for g in gold[name]])[0]:.4f}")

    names = list(gold)
    per_prompt = {n: [sum(g) / len(g) for g in gold[n]] for n in names}
    rows, summary = [], {}
    for n in names:
        m, se = mean_sem(per_prompt[n])
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for ga, gb in zip(gold[n], gold["SFT"]) for a, b in zip(ga, gb)]
        diffs = {o: mean_sem([a - b for a, b in zip(per_prompt[n], per_prompt[o])]) for o in names if o != n}
        summary[n] = {"gold_reward": m, "gold_reward_sem": se, "win_rate_vs_sft": sum(wins) / len(wins),
                      "length_tokens": sum(length[n]) / len(length[n]),
                      "no_eos_share": 1 - sum(done[n]) / len(done[n]), "paired_diff": diffs}
        rows.append(f"| {n} | {m:.4f} ± {se:.4f} | {summary[n]['win_rate_vs_sft']:.3f} | "
                    f"{summary[n]['length_tokens']:.1f} | {summary[n]['no_eos_share']:.2f} | "
                    + "; ".join(f"vs {o}: {d:+.4f} ± {s:.4f}" for o, (d, s) in diffs.items()) * (n != "SFT") + " |")
    table = "\n".join([
        f"{len(prompts)} fresh toy prompts x {args.samples} samples per policy (temperature "
        f"{cfg['args']['temperature']}, top-p {cfg['args']['top_p']}, {cfg['args']['max_new_tokens']} new tokens), "
        "gold r* = toy_world.gold_reward; ± = standard error over prompts; paired differences per prompt.", "",
        "| Policy | Gold r* (mean ± s.e.) | Win rate vs SFT | Length (tokens) | no-EOS share | Paired gold difference |",
        "|---|---|---|---|---|---|", *rows])
    print(table)
    with open(os.path.join(args.out, "policy_gold.md"), "w") as f:
        f.write(f"# Policy gold\n\nCommand: `python {' '.join(sys.argv)}`\n\n{table}\n")
    with open(os.path.join(args.out, "policy_gold.json"), "w") as f:
        json.dump({"prompts": len(prompts), "samples": args.samples, "policies": {"SFT": args.sft, **runs},
                   "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
