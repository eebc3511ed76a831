#!/usr/bin/env bash
# Results 3 (README): the toy world on SmolLM2-135M-Instruct, beyond the smol preset's single seed.
# After `PRESET=smol bash run_all.sh` (RUNS=runs/smol): BT and BSR (lambda 1e-3) with a second seed, and BSR with a
# large lambda (1e-1, so that train/loss_reg is not negligible next to train/loss_bt), same flags as the preset;
# RLOO of the SFT policy against the lambda 1e-1 RM (the preset's flags, vLLM generation); one evaluation of all
# five reward models with the three RLOO runs (the preset's pi_bt and pi_bsr use the seed-1 RMs); RLOO seed 2 of the
# three; bench/policy_gold.py on the seven policies.
# A stage whose config.json exists is skipped; an interrupted training resumes (--resume; a resume state every 2
# steps: --save-steps may differ from the preset, it changes no weight).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
R=${RUNS:-runs/smol}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
RM_ARGS=(--lr 5e-6 --epochs 1 --global-batch-size 16 --micro-batch-size 16 --max-length 256
         --max-tokens-per-forward 1024 --norm-stats-pairs 64 --eval-batch-size 32 --save-steps 2)
train() {  # name loss lam seed
  local out=$R/rm/$1/seed$4 extra=()
  if [[ -e $out/config.json ]]; then echo "[science] $1 seed $4: done"; return; fi
  if [[ -e $out/resume/latest ]]; then extra=(--resume); fi
  echo "[science] $1 seed $4"; local t0=$SECONDS
  "$PY" train_rm.py --model "$R/sft" --train-file "$R/data/train.jsonl" --out "$out" --loss "$2" --lam "$3" \
    --seed "$4" "${RM_ARGS[@]}" "${extra[@]}"
  echo "[science] $1 seed $4: finished in $((SECONDS - t0)) s"
}
train bt bt 1e-3 2
train bsr bsr 1e-3 2
train bsr_lam1e-1 bsr 1e-1 1
rloo() {  # name rm seed out: the preset's RLOO flags, vLLM generation
  local extra=()
  if [[ -e $4/summary.json ]]; then echo "[science] rloo $1 seed $3: done"; return; fi
  if [[ -e $4/resume/latest ]]; then extra=(--resume); fi
  echo "[science] rloo $1 seed $3"; local t0=$SECONDS
  "$PY" rloo.py --policy "$R/sft" --reward-model "$2" --prompts "$R/data/rl_prompts.jsonl" \
    --gold-prompts "$R/data/rl_eval_prompts.jsonl" --out "$4" --seed "$3" --lr 1e-5 --epochs 1 --global-batch-size 16 \
    --micro-batch-size 8 --max-new-tokens 64 --gold synthetic --gold-every 2 --max-prompts 40 --rm-max-length 256 \
    --rm-batch-size 32 --vllm --save-steps 1 "${extra[@]}"
  echo "[science] rloo $1 seed $3: finished in $((SECONDS - t0)) s"
}
rloo bsr_lam1e-1 "$R/rm/bsr_lam1e-1/seed1" 1 "$R/rloo/bsr_lam1e-1"
MODELS=()
for m in bt/seed1 bt/seed2 bsr/seed1 bsr/seed2 bsr_lam1e-1/seed1; do MODELS+=(--model "$R/rm/$m" --name "$m"); done
BENCH=(); [[ -f ../shared/data/rm_bench/sample.json ]] && BENCH=(--rm-bench ../shared/data/rm_bench/sample.json)
if [[ ! -e $R/results_science/report.json ]]; then
  t0=$SECONDS
  "$PY" eval_rm.py "${MODELS[@]}" --data-dir "$R/data" "${BENCH[@]}" --max-length 256 --train-pairs 128 \
    --batch-size 32 --rloo "pi_bt=$R/rloo/bt" --rloo "pi_bsr=$R/rloo/bsr" \
    --rloo "pi_bsr_lam1e-1=$R/rloo/bsr_lam1e-1" --cache-dir "$R/eval_cache" \
    --out "$R/results_science"
  echo "[science] eval: finished in $((SECONDS - t0)) s"
fi
# RLHF training noise: RLOO seed 2 against the same (seed-1) reward models; then every policy's gold r*, win rate and
# length on 200 fresh prompts x 4 samples (bench/policy_gold.py; rloo.py's own check has 16 prompts x 1 sample)
POLICIES=()
for m in bt bsr bsr_lam1e-1; do
  rloo "$m" "$R/rm/$m/seed1" 2 "$R/rloo_seed2/$m"
  POLICIES+=(--policy "pi_$m=$R/rloo/$m" --policy "pi_$m/seed2=$R/rloo_seed2/$m")
done
if [[ ! -e $R/policy_gold/policy_gold.json ]]; then
  t0=$SECONDS
  "$PY" bench/policy_gold.py --data-dir "$R/data" --sft "$R/sft" "${POLICIES[@]}" --out "$R/policy_gold"
  echo "[science] policy gold: finished in $((SECONDS - t0)) s"
fi
echo "[science] done: $R/results_science/report.md, $R/policy_gold/policy_gold.md"
