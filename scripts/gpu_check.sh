#!/usr/bin/env bash
# "A real run on a GPU": the whole life of a run on one GPU, compared with the CPU.
#
#   bash scripts/gpu_check.sh                               # GPU: configs/gpt2_small.py
#   SMALL=1 JAX_PLATFORMS=cpu bash scripts/gpu_check.sh     # dry run: a tiny model, CPU
#
# (a) a packed run (segment ids) with in-loop eval; the same run sent SIGTERM once
#     KILL_AT train lines exist must exit 0 with a committed checkpoint and, resumed,
#     give the uninterrupted run's losses bit for bit. If they differ (or FORCE_DET=1),
#     the pair runs again under deterministic XLA flags, reported as a_det_*.
# (b) the same run with model.attention=xla against auto (cuDNN on a GPU in bf16): losses
#     within BF16_TOL; scripts/gpu/boundary_check.py: document 2 of a packed row does not
#     depend on document 1, and (its control) does once the segment ids are dropped.
# (c) scripts/eval.py and scripts/generate.py --temperature=0 on the device checkpoint and
#     with JAX_PLATFORMS=cpu: perplexity within 1%; greedy ids identical where the
#     compute is float32 (bf16: reported, not required).
# (d) the device checkpoint resumed one step on the CPU; a CPU run's checkpoint (the
#     plain config, no segment ids) resumed on the device.
# One line per check, `OK name figure` or `FAILED name figure`, in $OUT/summary.txt with
# how long each part took; every command's output in $OUT/check.log; metrics, configs
# and logs in $OUT/check_runs.tgz. Exits 1 if any check failed or was skipped for time.
#
# After (a)'s first run, (a)'s SIGTERM pair, (b), (c), (d) and the CPU jobs run side by
# side (GPU memory allocated on demand; CPU jobs pinned to the upper half of the cores
# when there are 8 or more). No compilation cache, except for the deterministic rerun
# (autotuning off, so compiling is deterministic too), whose three runs share one.
#
# Env: OUT (default ./gpu_out), WORK (run folders, default /tmp/gpu_check, emptied),
# BUDGET_S (the deterministic rerun is skipped when started later; GPU 420, SMALL none),
# DEADLINE_S (every command's timeout is cut to end by then; GPU 570, SMALL none),
# FORCE_DET=1, DET_FLAGS (XLA flag sets tried in order, ';'-separated).
set -uo pipefail
cd "$(dirname "$0")/.."
SMALL=${SMALL:-0}
OUT=${OUT:-./gpu_out}
WORK=${WORK:-/tmp/gpu_check}
FORCE_DET=${FORCE_DET:-0}
DET_FLAGS=${DET_FLAGS:-'--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0;--xla_gpu_deterministic_ops=true;--xla_gpu_exclude_nondeterministic_ops=true'}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$WORK"
mkdir -p "$WORK/logs" "$WORK/jobs"
SUMMARY=$OUT/summary.txt
LOG=$OUT/check.log
: >"$SUMMARY"
: >"$LOG"
SUMFILE=$SUMMARY  # A background job writes its own pair, merged when it is joined.
LOGFILE=$LOG
JOB=main

if [[ $SMALL == 1 ]]; then
  CFG=configs/tiny.py
  MODEL=(--config.model.d_model=64 --config.model.num_layers=2 --config.model.num_heads=4
         --config.model.num_kv_heads=2 --config.model.d_ff=192 --config.model.vocab_size=512
         --config.batch_size=4 --config.seq_len=64)
  TOK_VOCAB=512 STEPS=40 KILL_AT=8 EVAL_EVERY=10 EVAL_TOKENS=1024 GEN_TOKENS=16 CPU_BATCH=2
  BUDGET_S=${BUDGET_S:-0} DEADLINE_S=${DEADLINE_S:-0} T_TRAIN=400 T_EVAL=300 T_CPU=400
else
  CFG=configs/gpt2_small.py  # bf16 compute, float32 state, as the config says.
  MODEL=(--config.batch_size=16)
  TOK_VOCAB=50304 STEPS=50 KILL_AT=25 EVAL_EVERY=20 EVAL_TOKENS=8192 GEN_TOKENS=32 CPU_BATCH=1
  BUDGET_S=${BUDGET_S:-420} DEADLINE_S=${DEADLINE_S:-570} T_TRAIN=240 T_EVAL=150 T_CPU=400
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # Several processes share the GPU.
fi
BF16_TOL=${BF16_TOL:-0.02}
TOK=$WORK/tokenizer.model
TRAIN=(python3 scripts/train.py --config="$CFG" "${MODEL[@]}" --config.log_every=1
       --config.eval_every=$EVAL_EVERY --config.eval_batches=2 --config.checkpoint_every=100000
       --config.optimizer.warmup_steps=10 --config.data.tokenizer="$TOK")
PACKED=(--config.data.segment_ids=True --config.steps=$STEPS)
CPU=(env JAX_PLATFORMS=cpu)
NPROC=$(nproc)
if ((NPROC >= 8)) && command -v taskset >/dev/null; then
  CPU=(taskset -c "$((NPROC / 2))-$((NPROC - 1))" "${CPU[@]}")
fi
A1=$WORK/a_packed_auto

# --- Helpers ------------------------------------------------------------------------
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
T_START=$(now)
say() { echo "[$(since "$T_START") s $JOB] $*" | tee -a "$LOGFILE"; }
record() {  # STATUS NAME FIGURE...
  echo "$1 $2 ${*:3}" >>"$SUMFILE"
  say "$1 $2 ${*:3}"
}
check() {  # NAME TOOL ARGS...: the figure of scripts/gpu/check_tools.py, OK or FAILED.
  local name=$1 figure status=OK
  shift
  figure=$(python3 scripts/gpu/check_tools.py "$@" 2>&1) || status=FAILED
  record "$status" "$name" "$(tail -1 <<<"$figure")${NOTE:+ $NOTE}"
}
left() {  # Seconds to DEADLINE_S (a large number when there is none).
  [[ $DEADLINE_S == 0 ]] && { echo 100000; return; }
  awk -v a="$T_START" -v b="$(now)" -v d="$DEADLINE_S" 'BEGIN { printf "%d", d - (b - a) }'
}
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }
log_step() {  # NAME RC T0 CMD...: the step's output into the log.
  local name=$1 rc=$2 t0=$3
  shift 3
  { echo "=== $name (rc $rc, $(since "$t0") s): $*"; cat "$WORK/logs/$name.log"; } >>"$LOGFILE"
  say "$name: rc $rc in $(since "$t0") s$( ((rc == 124 || rc == 137)) && echo ', timed out')"
}
run_step() {  # NAME SECONDS CMD...: CMD under a timeout, its output in logs/NAME.log.
  local name=$1 limit t0 rc
  limit=$(cap "$2")
  shift 2
  t0=$(now)
  if ((limit < 5)); then
    echo "not run: the deadline ($DEADLINE_S s) is reached" >"$WORK/logs/$name.log"
    rc=124
  else
    timeout -k 10 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
    rc=$?
  fi
  log_step "$name" $rc "$t0" "$@"
  return $rc
}
interrupted_run() {  # NAME WORKDIR [CMD-PREFIX...]: the packed run, SIGTERM at KILL_AT lines.
  local name=$1 wd=$2 tpid pid rc limit t0
  shift 2
  local pidfile=$WORK/$name.pid
  limit=$(cap "$T_TRAIN")
  t0=$(now)
  timeout -k 10 "$limit" bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" "${TRAIN[@]}" \
    "${PACKED[@]}" --config.workdir="$wd" >"$WORK/logs/$name.log" 2>&1 &
  tpid=$!
  while [[ ! -s $pidfile ]] && kill -0 $tpid 2>/dev/null; do sleep 0.05; done
  pid=$(cat "$pidfile" 2>/dev/null)
  local sent='no SIGTERM sent'
  if [[ -n $pid ]] && python3 scripts/gpu/check_tools.py wait_lines "$wd/metrics.jsonl" \
      "$KILL_AT" "$limit" "$pid" >"$WORK/$name.wait" 2>&1; then
    kill -TERM "$pid" && sent="SIGTERM sent to $pid"
  fi
  wait $tpid
  rc=$?
  say "$name: $(cat "$WORK/$name.wait" 2>/dev/null); $sent"
  log_step "$name" $rc "$t0" "${TRAIN[@]}" "${PACKED[@]}" --config.workdir="$wd"
  return $rc
}
resume_pair() {  # TAG REFERENCE [CMD-PREFIX...]: SIGTERM, resume, compare with REFERENCE.
  local tag=$1 ref=$2 wd=$WORK/${1}_resumed rc
  shift 2
  interrupted_run "${tag}_sigterm" "$wd" "$@"
  rc=$?
  if ((rc == 0)); then
    check "${tag}_sigterm" stopped "$wd" "$WORK/logs/${tag}_sigterm.log"
  else
    record FAILED "${tag}_sigterm" "exit code $rc after SIGTERM (0 expected)"
  fi
  run_step "${tag}_resume" "$T_TRAIN" "$@" "${TRAIN[@]}" "${PACKED[@]}" --config.workdir="$wd"
  check "${tag}_bitwise" same_losses "$ref" "$wd"
}
declare -A PIDS=()
start_job() {  # NAME FUNCTION: in the background, with its own summary and log.
  (
    JOB=$1 SUMFILE=$WORK/jobs/$1.summary LOGFILE=$WORK/jobs/$1.log
    : >"$SUMFILE"
    t0=$(now)
    "$2"
    echo "# time $1 $(since "$t0") s" >>"$SUMFILE"
  ) &
  PIDS[$1]=$!
}
join_jobs() {  # NAME...: wait, then merge their summaries and logs in this order.
  local j
  for j in "$@"; do wait "${PIDS[$j]}"; done
  for j in "$@"; do
    cat "$WORK/jobs/$j.log" >>"$LOG" 2>/dev/null
    grep -v '^# time' "$WORK/jobs/$j.summary" >>"$SUMMARY" 2>/dev/null
    grep '^# time' "$WORK/jobs/$j.summary" >>"$WORK/times" 2>/dev/null
  done
}
part_done() { echo "# time $1 $(since "$2") s" >>"$WORK/times"; say "part $1 took $(since "$2") s"; }

# --- The jobs -----------------------------------------------------------------------
job_cpu_run() {  # (d) a CPU run of the plain config, resumed on the device later.
  run_step d_cpu_run "$T_CPU" "${CPU[@]}" "${TRAIN[@]}" --config.steps=2 \
    --config.batch_size=$CPU_BATCH --config.eval_batches=1 --config.workdir="$WORK/cpu_run"
}
job_a() { resume_pair a "$A1"; }
job_b() {
  run_step b_packed_xla "$T_TRAIN" "${TRAIN[@]}" "${PACKED[@]}" --config.model.attention=xla \
    --config.workdir="$WORK/b_packed_xla"
  local impl
  impl=$(python3 -c "import jax.numpy as jnp, importlib; from lm.model.transformer import attention_impl; c = importlib.import_module('${CFG%.py}'.replace('/', '.')).get_config(); print(attention_impl('auto', jnp.dtype(c.model.dtype)))" 2>/dev/null)
  NOTE="(auto = ${impl:-?} here)" check b_attention close_losses "$A1" "$WORK/b_packed_xla" "$BF16_TOL"
}
job_c() {
  run_step c_eval_device "$T_EVAL" python3 scripts/eval.py --workdir="$A1" --max_tokens=$EVAL_TOKENS
  run_step c_generate_device "$T_EVAL" python3 scripts/generate.py --workdir="$A1" \
    --prompt='def main():' --temperature=0 --max_new_tokens=$GEN_TOKENS
  run_step b_boundary "$T_EVAL" python3 scripts/gpu/boundary_check.py --workdir="$A1" \
    --attention=auto,xla
  local status name figure
  python3 - "$WORK/logs/b_boundary.log" >"$WORK/boundary.lines" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{"check"')]
if not lines:
  print('FAILED b_boundary no result (see check.log)')
for r in lines:
  want = 'no dependence' if r['check'] == 'boundary' else 'dependence expected'
  print(f"{'OK' if r['ok'] else 'FAILED'} b_{r['check']}_{r['attention']} {want}: leak "
        f"{r['leak']:.2e} of max|logit| {r['scale']:.3g} (doc-1 effect {r['effect']:.2e}, "
        f"doc 2 alone vs packed {r['alone']:.2e}) impl={r['impl']} {r['dtype']} on {r['backend']}")
EOF
  while read -r status name figure; do record "$status" "$name" "$figure"; done <"$WORK/boundary.lines"
}
job_d() {
  wait_for_file "$WORK/jobs/cpu_run.done"
  if [[ -d $WORK/cpu_run/checkpoints/2 ]]; then
    run_step d_cpu_to_device "$T_TRAIN" "${TRAIN[@]}" --config.steps=3 \
      --config.batch_size=$CPU_BATCH --config.eval_batches=1 --config.workdir="$WORK/cpu_run"
    check d_cpu_to_device resumed "$WORK/logs/d_cpu_to_device.log" 2 3
  else
    record FAILED d_cpu_to_device "the CPU run left no checkpoint at step 2 (see d_cpu_run)"
  fi
}
job_cpu() {  # The CPU side of (c) and (d), on the device run's checkpoint.
  run_step c_eval_cpu "$T_CPU" "${CPU[@]}" python3 scripts/eval.py --workdir="$A1" \
    --max_tokens=$EVAL_TOKENS
  run_step c_generate_cpu "$T_CPU" "${CPU[@]}" python3 scripts/generate.py --workdir="$A1" \
    --prompt='def main():' --temperature=0 --max_new_tokens=$GEN_TOKENS
  cp -r "$A1" "$WORK/gpu_to_cpu" && rm -f "$WORK/gpu_to_cpu/.lock"
  run_step d_device_to_cpu "$T_CPU" "${CPU[@]}" "${TRAIN[@]}" "${PACKED[@]}" \
    --config.steps=$((STEPS + 1)) --config.batch_size=$CPU_BATCH --config.eval_batches=1 \
    --config.workdir="$WORK/gpu_to_cpu"
}
job_cpu_run_and_mark() { job_cpu_run; touch "$WORK/jobs/cpu_run.done"; }
wait_for_file() { while [[ ! -e $1 ]]; do sleep 0.5; done; }

# --- Setup --------------------------------------------------------------------------
t=$(now)
source scripts/gpu/setup.sh >"$WORK/logs/setup.log" 2>&1
rc=$?
tee -a "$LOG" <"$WORK/logs/setup.log"
if ((rc != 0)); then
  record FAILED setup "scripts/gpu/setup.sh returned $rc (see check.log)"
  exit 1
fi
# Greedy ids must agree exactly between devices only where the compute is float32.
STRICT_GEN=$(python3 -c "import importlib; c = importlib.import_module('${CFG%.py}'.replace('/', '.')).get_config(); print(int(c.model.dtype == 'float32'))")
BACKEND=$(python3 -c 'import jax; print(jax.default_backend(), jax.devices()[0].device_kind)' 2>/dev/null)
say "mode $([[ $SMALL == 1 ]] && echo SMALL || echo full) on $BACKEND: $CFG ${MODEL[*]}; $STEPS steps, SIGTERM at $KILL_AT"
run_step tokenizer 120 python3 scripts/train_tokenizer.py --config="$CFG" \
  --vocab_size="$TOK_VOCAB" --out="$TOK" || { record FAILED tokenizer 'see check.log'; exit 1; }
start_job cpu_run job_cpu_run_and_mark
part_done setup "$t"

# --- (a) the reference run ----------------------------------------------------------
t=$(now)
run_step a_uninterrupted "$T_TRAIN" "${TRAIN[@]}" "${PACKED[@]}" --config.workdir="$A1"
check a_train trained "$A1"
part_done a_reference "$t"

# --- (a) SIGTERM and resume, (b), (c), (d): side by side -------------------------------
t=$(now)
start_job a job_a
start_job b job_b
start_job c job_c
start_job d job_d
start_job cpu job_cpu
join_jobs a b c d cpu_run cpu
part_done side_by_side "$t"

# --- (a, again) deterministic XLA, when the losses differed ---------------------------
t=$(now)
if [[ $FORCE_DET == 1 ]] || grep -q '^FAILED a_bitwise' "$SUMMARY"; then
  if [[ $BUDGET_S != 0 ]] && (($(since "$T_START" | cut -d. -f1) > BUDGET_S)); then
    record FAILED a_det_bitwise "skipped: started after BUDGET_S=$BUDGET_S s"
  else
    FLAGS=''
    IFS=';' read -ra candidates <<<"$DET_FLAGS"
    for f in "${candidates[@]}"; do
      if XLA_FLAGS="$f" timeout 120 python3 -c 'import jax.numpy as j; j.zeros(1).block_until_ready()' \
          >>"$LOG" 2>&1; then FLAGS=$f; break; fi
      say "XLA_FLAGS=$f: not accepted here"
    done
    if [[ -z $FLAGS ]]; then
      record FAILED a_det_bitwise "none of the deterministic flag sets was accepted: $DET_FLAGS"
    else
      say "deterministic rerun with XLA_FLAGS=$FLAGS"
      DET_ENV=(env "XLA_FLAGS=$FLAGS" "JAX_COMPILATION_CACHE_DIR=$WORK/jax_cache_det")
      run_step a_det_uninterrupted "$T_TRAIN" "${DET_ENV[@]}" "${TRAIN[@]}" "${PACKED[@]}" \
        --config.workdir="$WORK/a_det"
      NOTE="(XLA_FLAGS=$FLAGS)" resume_pair a_det "$WORK/a_det" "${DET_ENV[@]}"
    fi
  fi
  if grep -q '^FAILED a_bitwise' "$SUMMARY"; then
    say "a_bitwise: resumed losses differ without deterministic XLA; for bit-for-bit resumes" \
      "on this device set XLA_FLAGS='${FLAGS:-${DET_FLAGS%%;*}}' (see a_det_bitwise)"
  fi
fi
part_done a_det "$t"

# --- (c) and (d) compared -----------------------------------------------------------
check c_eval_device_vs_cpu eval_close "$WORK/logs/c_eval_device.log" "$WORK/logs/c_eval_cpu.log" 0.01
check c_generate_device_vs_cpu same_generation "$WORK/logs/c_generate_device.log" \
  "$WORK/logs/c_generate_cpu.log" "$STRICT_GEN"
check d_device_to_cpu resumed "$WORK/logs/d_device_to_cpu.log" "$STEPS" "$((STEPS + 1))"

# --- Summary ------------------------------------------------------------------------
cat "$WORK/times" >>"$SUMMARY"
echo "# total $(since "$T_START") s; mode $([[ $SMALL == 1 ]] && echo SMALL || echo full);" \
  "$BACKEND; $CFG; $(date -u +%FT%TZ)" >>"$SUMMARY"
(cd "$WORK" && tar -czf "$OUT/check_runs.tgz" logs */metrics.jsonl */config.json 2>/dev/null)
echo "===== summary ($SUMMARY)"
cat "$SUMMARY"
! grep -q '^FAILED' "$SUMMARY"
