"""Runs rloo.py's main() in this process (under python, torchrun or the deepspeed launcher) and then
looks inside the colocated vLLM engine it used. Written for tests/test_vllm.py.

    python tests/vllm_probe.py REPORT.json [--no-sync] -- <rloo.py arguments>

After training, each rank writes REPORT.json.rank<r>: the log-probs its engine gives a few fixed
sequences (vLLM prompt_logprobs), the same from the saved final policy (HF forward, fp32), and the
lengths of every batch of responses the engine generated. --no-sync replaces generation.sync_vllm_weights
with a no-op (the engine keeps the initial weights): the check must then fail.
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import generation  # noqa: E402
import rloo  # noqa: E402

SEQUENCES = [[5, 17, 40, 9, 33, 60, 2, 71, 8, 12], [3, 4, 90, 91, 92, 11, 1], [100, 7, 7, 7, 50, 22, 130, 140]]


def main():
    mine = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    report, rest = mine[0], mine[1:]
    no_sync = "--no-sync" in rest[: rest.index("--")]
    argv = rest[rest.index("--") + 1:]
    engines, generated = [], []
    make_engine, generate_vllm = generation.vllm_engine, generation.generate_vllm

    def capture_engine(*args, **kwargs):
        engines.append(make_engine(*args, **kwargs))
        return engines[-1]

    def record_generation(llm, prompt_ids, args, stop_ids, seed):
        out = generate_vllm(llm, prompt_ids, args, stop_ids, seed)
        generated.append([len(tokens) for tokens, _ in out])
        return out

    generation.vllm_engine, generation.generate_vllm = capture_engine, record_generation
    if no_sync:
        generation.sync_vllm_weights = lambda llm, module, zero3: None
    rloo.main(argv)

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    from vllm import SamplingParams

    unset_hf_deepspeed_config()  # rloo.main's ZeRO-3 setting would partition the model loaded below

    out_dir = argv[argv.index("--out") + 1]
    (llm,) = engines
    outs = llm.generate([{"prompt_token_ids": s} for s in SEQUENCES],
                        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)
    vllm_lp = [[o.prompt_logprobs[t][s[t]].logprob for t in range(1, len(s))] for o, s in zip(outs, SEQUENCES)]
    hf = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    hf_lp = []
    with torch.no_grad():
        for s in SEQUENCES:
            lp = torch.log_softmax(hf(input_ids=torch.tensor([s])).logits[0].float(), -1)
            hf_lp.append([lp[t - 1, s[t]].item() for t in range(1, len(s))])
    rank = torch.distributed.get_rank()
    with open(f"{report}.rank{rank}", "w") as f:
        json.dump({"rank": rank, "vllm_logprobs": vllm_lp, "hf_logprobs": hf_lp, "generated_lengths": generated}, f)


if __name__ == "__main__":
    main()
