#!/usr/bin/env bash
# The paper's comparison on the toy task: CMDP (the paper's reward) vs GRPO, GKD-GRPO (3 fixed lambdas), dual
# ascent and on-policy KD, at 3 budgets, 5 seeds. CleanRL-style benchmark script: every run is a plain command.
# 1. The pilot (the paper's budget protocol): on-policy KD, seed 1 (it doubles as the KD cell's seed 1); the 90th
#    percentile of its sampled responses' costs on 1,000 training prompts is the budget d_pilot.
# 2. CMDP and dual ascent at d_pilot, 0.05 (the default) and 0.1; GRPO, fixed lambda 0.1 / 1 / 10 and KD are
#    budget-free and are scored at every budget.
# Then benchmark/toy_results.py evaluates every final student (greedy and sampled) and writes the tables and plots.
#
#   bash benchmark/toy_sweep.sh                 # 55 runs, one at a time; re-run it to resume (finished runs are skipped)
#   JOBS=2 bash benchmark/toy_sweep.sh          # two at a time, one thread each: what the README's tables used
#   SEEDS="1 2 3" JOBS=2 bash benchmark/toy_sweep.sh  # 33 runs: seeds 1-3 only (seeds 4-5 can follow later)
#   python benchmark/toy_results.py runs/sweep
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2 3 4 5"}
STEPS=${STEPS:-200}
OUT=${OUT:-runs/sweep}
JOBS=${JOBS:-1}
if [ "$JOBS" -gt 1 ]; then export OMP_NUM_THREADS=1; fi  # several processes must not oversubscribe the cores (OpenMP busy-waits)
COMMON="--num-steps $STEPS --eval-interval 50 --save-interval 0 --output-dir $OUT"
python toy_math.py > /dev/null  # build the toy task once, before any parallel run needs it
mkdir -p "$OUT/logs"

# 1. the pilot KD run and the budget it gives
if [ ! -f "$OUT/pilot_budget.txt" ]; then
  python lagrangian_distill.py --seed 1 --method kd $COMMON --exp-name kd > "$OUT/logs/pilot_kd.log" 2>&1
  python eval_math.py --model "$(ls -d "$OUT"/kd__1__*/checkpoint-"$STEPS" | head -1)" --teacher toy --dataset toy --split train \
      --limit 1000 --temperature 1 --max-new-tokens 64 --output-dir "$OUT/pilot_eval" > "$OUT/logs/pilot_eval.log" 2>&1
  python -c "import json; print(round(json.load(open('$OUT/pilot_eval/summary.json'))['cost_p90'], 3))" > "$OUT/pilot_budget.txt"
fi
D_PILOT=$(cat "$OUT/pilot_budget.txt")
echo "pilot budget (90th percentile of the KD pilot's sampled costs): $D_PILOT"

# 2. every other run, JOBS at a time
for seed in $SEEDS; do
  A="--seed $seed $COMMON"
  for budget in "$D_PILOT" 0.05 0.1; do
    echo "python cmdp_distill.py $A --budget $budget --exp-name cmdp_d$budget"
    echo "python lagrangian_distill.py $A --budget $budget --exp-name dual_d$budget"
  done
  for lambda in 0.1 1 10; do
    echo "python lagrangian_distill.py $A --method fixed --lambda-init $lambda --exp-name fixed_l$lambda"
  done
  echo "python lagrangian_distill.py $A --method grpo --exp-name grpo"
  if [ "$seed" != 1 ]; then echo "python lagrangian_distill.py $A --method kd --exp-name kd"; fi
done | while read -r cmd; do  # a run whose final checkpoint exists is done: re-running the script resumes a sweep
  name=$(echo "$cmd" | sed 's/.*--exp-name //'); seed=$(echo "$cmd" | sed 's/.*--seed \([0-9]*\).*/\1/')
  ls -d "$OUT/${name}__${seed}__"*/checkpoint-"$STEPS" > /dev/null 2>&1 || echo "$cmd"
done | OUT="$OUT" xargs -P "$JOBS" -I{} sh -c 'log="$OUT/logs/$(echo "{}" | md5sum | cut -c1-12).log"; {} > "$log" 2>&1 || echo "failed ($log): {}"'
