#!/usr/bin/env bash
# "GPU speed, measured": this project's train step against nanoGPT's on one GPU.
#
#   NANOGPT=.nanogpt bash scripts/gpu_bench.sh                       # GPU
#   SMALL=1 JAX_PLATFORMS=cpu NANOGPT=.nanogpt bash scripts/gpu_bench.sh   # CPU dry run
#
# NANOGPT: a checkout of nanoGPT (git-ignored, never committed), made by whoever
# prepares the call and carried with it:
#   git clone --depth 1 https://github.com/karpathy/nanoGPT .nanogpt && rm -rf .nanogpt/.git
# Unset or missing: the nanoGPT runs are skipped with a message.
#
# In order, each under a timeout cut to end by DEADLINE_S (later parts are skipped):
#  1. headline: nanoGPT's own bench.py for GPT-2 124M (--real_data=False --compile=True)
#     at batch 12 and 32, block 1024; then scripts/bench.py --config=configs/gpt2_small.py
#     at the same batches and T=1024;
#  2. levers (docs/performance.md), each alone from gpt2_small at batch 32: attention xla
#     (against auto = cuDNN), loss.chunk 0/256/1024, batch 16/48/64, scan_layers, remat;
#  3. sizes: gpt2_medium; llama_1b (its scan and remat, and remat_policy nothing_saveable);
#  4. XLA flags, one process each: latency-hiding scheduler on, Triton GEMM off.
# Every JSON line ("system": "lm" or "nanoGPT", "config", "batch_size", "seq_len",
# "tokens_per_sec", "mfu", "compile_s", "device", ...) is appended to $OUT/bench.jsonl;
# the table (scripts/gpu/bench_table.py) goes to stdout and $OUT/bench_table.txt, every
# command's output to $OUT/bench.log. Exits 1 if a part failed or was skipped.
#
# Env: OUT (default ./gpu_out), NANOGPT, DEADLINE_S (GPU 560, SMALL none), PARTS (default
# "headline levers sizes xla_flags").
set -uo pipefail
cd "$(dirname "$0")/.."
SMALL=${SMALL:-0}
OUT=${OUT:-./gpu_out}
NANOGPT=${NANOGPT:-}
PARTS=${PARTS:-headline levers sizes xla_flags}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
JSONL=$OUT/bench.jsonl
LOG=$OUT/bench.log
TABLE=$OUT/bench_table.txt
touch "$JSONL"
FAILED=0

if [[ $SMALL == 1 ]]; then
  B1=2 B2=4 T=64
  DEADLINE_S=${DEADLINE_S:-0}
  # The same toy width for both systems: 2 layers, d=64, vocab 50304.
  TINY=(--config.model.num_layers=2 --config.model.d_model=64 --config.model.num_heads=2
        --config.model.num_kv_heads=2 --config.model.d_ff=176 --config.seq_len=$T
        --config.loss.chunk=32)
  STEPS=(--steps=3 --warmup=1)
  NANO=(--cpu --tiny)
  LEVERS=(--vary=model.attention=xla --vary=loss.chunk=0,16 --vary=batch_size=8
          --vary=model.scan_layers=True --vary=model.remat=True)
  DATA=(--data_seconds=1 --data_batches=2)
else
  B1=12 B2=32 T=1024
  DEADLINE_S=${DEADLINE_S:-560}
  TINY=()
  STEPS=()
  NANO=()
  LEVERS=(--vary=model.attention=xla --vary=loss.chunk=0,256,1024
          --vary=batch_size=16,48,64 --vary=model.scan_layers=True --vary=model.remat=True)
  DATA=()
fi

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
T_START=$(now)
say() { echo "[$(since "$T_START") s] $*" | tee -a "$LOG"; }
left() {
  [[ $DEADLINE_S == 0 ]] && { echo 100000; return; }
  awk -v a="$T_START" -v b="$(now)" -v d="$DEADLINE_S" 'BEGIN { printf "%d", d - (b - a) }'
}
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }
lines() { wc -l <"$JSONL"; }
note_rc() {  # NAME RC T0 BEFORE: one line on how a measurement went.
  local added=$(($(lines) - $4))
  if (($2 == 0)); then
    say "OK $1: $added lines in $(since "$3") s"
  else
    FAILED=1
    say "FAILED $1: rc $2$( (($2 == 124 || $2 == 137)) && echo ' (timed out)') after $(since "$3") s, $added lines"
  fi
}
nanogpt() {  # BATCH SECONDS
  local t0 before rc limit
  t0=$(now) before=$(lines) limit=$(cap "$2")
  if [[ -z $NANOGPT || ! -f $NANOGPT/bench.py ]]; then
    say "SKIPPED nanoGPT batch $1: no nanoGPT checkout (set NANOGPT to one: git clone" \
      "--depth 1 https://github.com/karpathy/nanoGPT .nanogpt)"
    return
  fi
  ((limit < 10)) && { FAILED=1; say "SKIPPED nanoGPT batch $1: deadline"; return; }
  echo "=== nanoGPT bench.py batch $1 block $T" >>"$LOG"
  timeout -k 10 "$limit" python3 scripts/gpu/bench_table.py nanogpt --dir="$NANOGPT" \
    --batch_size="$1" --block_size=$T "${NANO[@]}" 2>>"$LOG" >>"$JSONL"
  rc=$?
  note_rc "nanoGPT batch $1" $rc "$t0" "$before"
}
lm_bench() {  # NAME SECONDS BATCH SEQ ARGS...: scripts/bench.py, its lines normalised.
  # ENV=(VAR=VALUE ...) and PREFIX (a label for every line's variant) may be set.
  local name=$1 batch=$3 seq=$4 t0 before rc limit
  t0=$(now) before=$(lines) limit=$(cap "$2")
  shift 4
  ((limit < 10)) && { FAILED=1; say "SKIPPED $name: deadline"; return; }
  echo "=== $name: ${ENV[*]} scripts/bench.py $* --config.batch_size=$batch" >>"$LOG"
  timeout -k 10 "$limit" env "${ENV[@]}" python3 scripts/bench.py "$@" \
    --config.batch_size="$batch" 2>>"$LOG" | tee -a "$LOG" \
    | python3 scripts/gpu/bench_table.py lm --batch_size="$batch" --seq_len="$seq" \
      --prefix="$PREFIX" >>"$JSONL"
  rc=${PIPESTATUS[0]}
  note_rc "$name" "$rc" "$t0" "$before"
}
ENV=(PYTHONUNBUFFERED=1)
PREFIX=''

source scripts/gpu/setup.sh >>"$LOG" 2>&1 || { echo 'setup failed; see bench.log' >&2; exit 1; }
grep '^setup:' "$LOG" | tail -3
say "mode $([[ $SMALL == 1 ]] && echo SMALL || echo full); parts: $PARTS; deadline ${DEADLINE_S} s"

for part in $PARTS; do
  t=$(now)
  case $part in
    headline)
      nanogpt $B1 240
      nanogpt $B2 240
      lm_bench gpt2_small 300 $B1 $T --config=configs/gpt2_small.py "${TINY[@]}" "${STEPS[@]}" \
        "${DATA[@]}" --vary=batch_size=$B2
      ;;
    levers)
      lm_bench gpt2_small_levers 420 $B2 $T --config=configs/gpt2_small.py "${TINY[@]}" \
        "${STEPS[@]}" --data_batches=0 "${LEVERS[@]}"
      ;;
    sizes)
      if [[ $SMALL == 1 ]]; then b_medium=$B1 b_llama=$B1 t_llama=$T; else b_medium=32 b_llama=16 t_llama=2048; fi
      lm_bench gpt2_medium 240 $b_medium $T --config=configs/gpt2_medium.py "${TINY[@]}" \
        "${STEPS[@]}" --data_batches=0
      lm_bench llama_1b 300 $b_llama $t_llama --config=configs/llama_1b.py "${TINY[@]}" \
        "${STEPS[@]}" --data_batches=0 --vary=model.remat_policy=nothing_saveable
      ;;
    xla_flags)
      # XLA reads its flags once per process: one process per setting.
      for f in latency_hiding_scheduler=true triton_gemm=false; do
        if [[ $SMALL == 1 ]]; then
          say "SKIPPED XLA flag $f: GPU-only (dry run)"
          continue
        fi
        flag=--xla_gpu_enable_$f
        ENV=(PYTHONUNBUFFERED=1 "XLA_FLAGS=$flag") PREFIX=$f
        lm_bench "gpt2_small $flag" 150 $B2 $T --config=configs/gpt2_small.py --data_batches=0
      done
      ENV=(PYTHONUNBUFFERED=1) PREFIX=''
      ;;
    *) say "unknown part $part"; FAILED=1 ;;
  esac
  say "part $part took $(since "$t") s"
done

python3 scripts/gpu/bench_table.py table "$JSONL" | tee "$TABLE"
if [[ $SMALL == 1 ]]; then
  echo 'dry run: every model at a toy width (2 layers, d=64, T=64) on the CPU; the config' \
    'names say which file the other keys came from.' | tee -a "$TABLE"
fi
say "total $(since "$T_START") s; $(lines) lines in $JSONL"
exit $FAILED
