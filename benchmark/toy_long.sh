#!/usr/bin/env bash
# Follow-up to toy_sweep.sh: can the budget be reached, and what does each method do once it binds?
# In the 120-step sweep the mean KL stays above every budget, so each KL-weighted method acts as on-policy
# KD. Here: 3x the steps, budget 0.1, CMDP vs dual ascent; one seed (CPU time). (3x the learning rate
# instead, 3e-4, destabilises the student: training accuracy 0.6 -> 0.25 within 16 steps.)
#
#   bash benchmark/toy_long.sh                                   # about 15 minutes on 2 CPU cores
#   python benchmark/toy_results.py runs/long runs/long/plots    # table in runs/long/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1"}
OUT=${OUT:-runs/long}
COMMON="--budget 0.1 --num-steps 360 --eval-interval 60 --save-interval 360 --output-dir $OUT"
for seed in $SEEDS; do
  python cmdp_distill.py --seed "$seed" $COMMON --exp-name cmdp_long_d0.1
  python lagrangian_distill.py --seed "$seed" $COMMON --exp-name dual_long_d0.1
done
