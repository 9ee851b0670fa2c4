#!/usr/bin/env bash
# The paper's comparison on the toy task: CMDP (Sauté-style reward) vs soft-Lagrangian baselines.
# CleanRL-style benchmark script: every run is a plain command; results land in $OUT, then
# benchmark/toy_results.py evaluates every final student with eval_math.py and aggregates.
#
#   bash benchmark/toy_sweep.sh                 # 3 seeds x 12 runs (about 90 minutes on 2 CPU cores)
#   SEEDS="1" bash benchmark/toy_sweep.sh       # one seed; run the others in later sessions, same $OUT
#   python benchmark/toy_results.py runs/sweep  # eval + table + plots (docs/*.png)
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2 3"}
STEPS=${STEPS:-120}
OUT=${OUT:-runs/sweep}
COMMON="--num-steps $STEPS --eval-interval 20 --save-interval $STEPS --output-dir $OUT"
for seed in $SEEDS; do
  for budget in 0.02 0.05 0.1; do
    python cmdp_distill.py --seed "$seed" --budget "$budget" $COMMON --exp-name "cmdp_d$budget"
    python lagrangian_distill.py --seed "$seed" --budget "$budget" $COMMON --exp-name "dual_d$budget"
  done
  for lambda in 0.1 1.0; do
    python lagrangian_distill.py --seed "$seed" --lambda-init "$lambda" --lambda-lr 0 $COMMON --exp-name "fixed_l$lambda"
  done
  # a 10x slower dual ascent at the middle budget: is the default dual step size (10) what decides the comparison?
  python lagrangian_distill.py --seed "$seed" --budget 0.05 --lambda-lr 1 $COMMON --exp-name dual_lr1_d0.05
  python lagrangian_distill.py --seed "$seed" --lambda-init 0 --lambda-lr 0 $COMMON --exp-name grpo
  python lagrangian_distill.py --seed "$seed" --kd-only --lambda-init 1 --lambda-lr 0 $COMMON --exp-name kd
done
