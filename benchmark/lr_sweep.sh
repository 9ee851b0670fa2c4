#!/usr/bin/env bash
# Learning-rate sweep on the toy task: every method gets the same tuning, 3 learning rates x 3 seeds.
# CMDP (paper form, budget 0.05), GRPO (lambda 0), fixed lambda 1 (GKD-GRPO), dual ascent (budget 0.05) and on-policy
# KD, each at every learning rate and seed, STEPS steps, the in-run greedy eval (200 test problems) every 50 steps.
# benchmark/lr_results.py reads the runs' metrics.jsonl and prints the table that chose the default learning rate.
#
#   bash benchmark/lr_sweep.sh                      # 45 runs, one at a time
#   JOBS=2 bash benchmark/lr_sweep.sh               # two at a time, one thread each (what the README's figures used)
#   python benchmark/lr_results.py runs/lr_sweep
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2 3"}
LRS=${LRS:-"1e-4 3e-4 1e-3"}
STEPS=${STEPS:-150}
OUT=${OUT:-runs/lr_sweep}
JOBS=${JOBS:-1}
# several processes on a few cores must not oversubscribe them (OpenMP busy-waits): one thread each
if [ "$JOBS" -gt 1 ]; then export OMP_NUM_THREADS=1; fi
python toy_math.py > /dev/null  # build the toy task once, before any parallel run needs it
COMMON="--num-steps $STEPS --eval-interval 50 --save-interval 0 --output-dir $OUT"
for seed in $SEEDS; do
  for lr in $LRS; do
    A="--seed $seed --learning-rate $lr $COMMON"
    echo "python cmdp_distill.py $A --budget 0.05 --exp-name cmdp_lr$lr"
    echo "python lagrangian_distill.py $A --method grpo --exp-name grpo_lr$lr"
    echo "python lagrangian_distill.py $A --method fixed --lambda-init 1 --exp-name fixed1_lr$lr"
    echo "python lagrangian_distill.py $A --budget 0.05 --exp-name dual_lr$lr"
    echo "python lagrangian_distill.py $A --method kd --exp-name kd_lr$lr"
  done
done | OUT="$OUT" xargs -P "$JOBS" -I{} sh -c 'mkdir -p "$OUT/logs"; log="$OUT/logs/$(echo "{}" | md5sum | cut -c1-12).log"; {} > "$log" 2>&1 || echo "failed ($log): {}"'
