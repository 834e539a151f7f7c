#!/bin/bash
# tiny trained 3,000 steps, pruned every way, scored on 131,072 held-out tokens; recovery and
# distillation at the schedule's final rate; the pruned shapes trained from scratch for 3,100 steps.
set -uo pipefail
cd "$(dirname "$0")/../.."
P=${1:-/tmp/pr}; OUT=$P/results.jsonl; T=131072
TR="python scripts/train.py --config=configs/tiny.py"
ev() {  # ev RUN STAGE [extra eval flags]: one scored line, tagged
  local run=$1 stage=$2; shift 2
  python scripts/eval.py --workdir=$P/$run --max_tokens=$T "$@" 2>>$P/err.log | tail -1 | \
    python -c "import json,sys; r=json.loads(sys.stdin.read()); r.update(run='$run', stage='$stage', system='2-core CPU, jax 0.10.2', config='tiny, 3000 steps'); print(json.dumps(r))" >> $OUT
}
log() { echo "$(date +%T) $*" >> $P/progress.log; }
FINAL="--config.optimizer.lr=3e-4 --config.optimizer.muon_lr=0.002 --config.optimizer.schedule=constant --config.optimizer.warmup_steps=0 --config.steps=100"
log start
[ -d $P/tiny3k/checkpoints/3000 ] || $TR --config.steps=3000 --config.eval_every=500 --config.checkpoint_every=500 --config.workdir=$P/tiny3k > $P/tiny3k.log 2>&1
log trained
python scripts/eval.py --workdir=$P/tiny3k 2>>$P/err.log | tail -1 >> $P/dense_default_eval.jsonl
ev tiny3k dense
for m in magnitude wanda sparsegpt; do
  python scripts/prune.py --workdir=$P/tiny3k --out=$P/tiny3k_$m --method=$m --sparsity=0.5 > /dev/null 2>>$P/err.log
  python scripts/prune.py --workdir=$P/tiny3k --out=$P/tiny3k_${m}_24 --method=$m --pattern=2:4 > /dev/null 2>>$P/err.log
  ev tiny3k_$m pruned; ev tiny3k_${m}_24 pruned
done
python scripts/prune.py --workdir=$P/tiny3k --out=$P/tiny3k_mlp_half --method=structured --d_ff=384 > /dev/null 2>>$P/err.log
python scripts/prune.py --workdir=$P/tiny3k --out=$P/tiny3k_depth_3 --method=structured --num_layers=3 > /dev/null 2>>$P/err.log
ev tiny3k_mlp_half structured; ev tiny3k_depth_3 structured
log pruned
$TR --config.init_from=$P/tiny3k --config.workdir=$P/rec_tiny3k $FINAL > $P/rec_tiny3k.log 2>&1
ev rec_tiny3k 'dense, 100 more steps at the final rate'
for r in magnitude wanda sparsegpt magnitude_24 wanda_24 sparsegpt_24; do
  $TR --config.init_from=$P/tiny3k_$r --config.workdir=$P/rec_$r --config.optimizer.hold_zeros=true $FINAL > $P/rec_$r.log 2>&1
  ev rec_$r 'after 100 recovery steps at the final rate (hold_zeros)'
done
log recovered
$TR --config.init_from=$P/tiny3k_mlp_half --config.model.d_ff=384 --config.workdir=$P/kd_mlp_half --config.distill.teacher=$P/tiny3k --config.distill.ce_weight=0 $FINAL > $P/kd_mlp_half.log 2>&1
ev kd_mlp_half 'after 100 steps of distillation at the final rate'
$TR --config.init_from=$P/tiny3k_depth_3 --config.model.num_layers=3 --config.workdir=$P/kd_depth_3 --config.distill.teacher=$P/tiny3k --config.distill.ce_weight=0 $FINAL > $P/kd_depth_3.log 2>&1
ev kd_depth_3 'after 100 steps of distillation at the final rate'
log distilled
$TR --config.steps=3100 --config.eval_every=0 --config.checkpoint_every=500 --config.model.d_ff=384 --config.workdir=$P/scratch_mlp_half > $P/scratch_mlp_half.log 2>&1
ev scratch_mlp_half 'scratch, 3,100 steps'
log scratch1
$TR --config.steps=3100 --config.eval_every=0 --config.checkpoint_every=500 --config.model.num_layers=3 --config.workdir=$P/scratch_depth_3 > $P/scratch_depth_3.log 2>&1
ev scratch_depth_3 'scratch, 3,100 steps'
log done
