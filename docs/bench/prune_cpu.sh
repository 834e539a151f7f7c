#!/bin/bash
# One config trained STEPS steps, pruned every way, scored on T held-out tokens; recovery and
# distillation for REC steps at the schedule's final rate; the structured shapes timed (train
# step, 64-token greedy decode, newest checkpoint's state on disk); last, those shapes trained from
# scratch for SCRATCH steps (STEPS + REC unless given).
#   docs/bench/prune_cpu.sh DIR                      tiny, 3,000 steps (prune_tiny3k_131k_cpu.jsonl)
#   CONFIG=small STEPS=2000 T=65536 DFF=768 LAYERS=4 SCRATCH=100 \
#     FINAL_LR='--config.optimizer.lr=2e-4' docs/bench/prune_cpu.sh DIR    (prune_small2k_cpu.jsonl)
set -uo pipefail
cd "$(dirname "$0")/../.."
P=${1:-/tmp/pr}; OUT=$P/results.jsonl
CONFIG=${CONFIG:-tiny}; STEPS=${STEPS:-3000}; T=${T:-131072}; REC=${REC:-100}
DFF=${DFF:-384}; LAYERS=${LAYERS:-3}
FINAL_LR=${FINAL_LR:---config.optimizer.lr=3e-4 --config.optimizer.muon_lr=0.002}
SCRATCH=${SCRATCH:-$((STEPS + REC))}; mkdir -p $P
R=${CONFIG}${STEPS}
TR="python scripts/train.py --config=configs/$CONFIG.py"
ev() {  # ev RUN STAGE [extra eval flags]: one scored line, tagged
  local run=$1 stage=$2; shift 2
  python scripts/eval.py --workdir=$P/$run --max_tokens=$T "$@" 2>>$P/err.log | tail -1 | \
    python -c "import json,sys; r=json.loads(sys.stdin.read()); r.update(run='$run', stage='$stage', system='2-core CPU, jax 0.10.2', config='$CONFIG, $STEPS steps'); print(json.dumps(r))" >> $OUT
}
log() { echo "$(date +%T) $*" >> $P/progress.log; }
SHAPES="mlp_half:--config.model.d_ff=$DFF depth:--config.model.num_layers=$LAYERS"  # run:flag
FINAL="$FINAL_LR --config.optimizer.schedule=constant --config.optimizer.warmup_steps=0 --config.steps=$REC"
log start
[ -d $P/$R/checkpoints/$STEPS ] || $TR --config.steps=$STEPS --config.eval_every=500 --config.checkpoint_every=500 --config.workdir=$P/$R > $P/$R.log 2>&1
log trained
ev $R dense
for m in magnitude wanda sparsegpt; do
  python scripts/prune.py --workdir=$P/$R --out=$P/${R}_$m --method=$m --sparsity=0.5 > /dev/null 2>>$P/err.log
  python scripts/prune.py --workdir=$P/$R --out=$P/${R}_${m}_24 --method=$m --pattern=2:4 > /dev/null 2>>$P/err.log
  ev ${R}_$m pruned; ev ${R}_${m}_24 pruned
done
python scripts/prune.py --workdir=$P/$R --out=$P/${R}_mlp_half --method=structured --d_ff=$DFF > /dev/null 2>>$P/err.log
python scripts/prune.py --workdir=$P/$R --out=$P/${R}_depth --method=structured --num_layers=$LAYERS > /dev/null 2>>$P/err.log
ev ${R}_mlp_half structured; ev ${R}_depth structured
log pruned
for run in $R ${R}_mlp_half ${R}_depth; do  # size and 64-token greedy decode, tagged
  python scripts/generate.py --workdir=$P/$run --prompt='def ' --max_new_tokens=64 --temperature=0 \
    --benchmark 2>>$P/err.log | tail -1 | python -c "import json,os,sys; r=json.loads(sys.stdin.read()); d='$P/$run/checkpoints'; d=os.path.join(d, max(os.listdir(d), key=int), 'state'); r=dict(run='$run', stage='decode, 64 tokens', tokens_per_sec=r.get('tokens_per_sec'), state_bytes=sum(os.path.getsize(os.path.join(a, f)) for a, _, fs in os.walk(d) for f in fs)); print(json.dumps(r))" >> $OUT
done
python scripts/bench.py --config=configs/$CONFIG.py --steps=10 --data_batches=0 --vary=model.d_ff=$DFF \
  --vary=model.num_layers=$LAYERS 2>>$P/err.log | grep '^{' | python -c "import json,sys; [print(json.dumps(dict(json.loads(l), stage='train step'))) for l in sys.stdin]" >> $OUT
log timed
for s in $SHAPES; do
  run=${s%%:*}; $TR --config.init_from=$P/${R}_$run ${s#*:} --config.workdir=$P/kd_$run --config.distill.teacher=$P/$R --config.distill.ce_weight=0 $FINAL > $P/kd_$run.log 2>&1
  ev kd_$run "after $REC steps of distillation at the final rate"
done
log distilled
$TR --config.init_from=$P/$R --config.workdir=$P/rec_$R $FINAL > $P/rec_$R.log 2>&1
ev rec_$R "dense, $REC more steps at the final rate"
for r in magnitude wanda sparsegpt magnitude_24 wanda_24 sparsegpt_24; do
  $TR --config.init_from=$P/${R}_$r --config.workdir=$P/rec_$r --config.optimizer.hold_zeros=true $FINAL > $P/rec_$r.log 2>&1
  ev rec_$r "after $REC recovery steps at the final rate (hold_zeros)"
done
log recovered
for s in $SHAPES; do
  run=${s%%:*}; $TR --config.steps=$SCRATCH --config.eval_every=0 --config.checkpoint_every=500 ${s#*:} --config.workdir=$P/scratch_$run > $P/scratch_$run.log 2>&1
  ev scratch_$run "scratch, $SCRATCH steps"; log scratch_$run
done
log done
