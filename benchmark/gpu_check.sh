#!/usr/bin/env bash
# The GPU check, for the day a CUDA GPU is available (at most 8 minutes on one H100/H200: the stages' time limits add
# up to 450 s, plus the wheel install; no hub access needed):
#   0. the samplers (benchmark/bench_sampler.py): a random-initialised Qwen2.5-Math-1.5B-shaped student (fp32 weights,
#      bf16 autocast), full fine-tuning then LoRA r16, batches of 8 and 64 rows (8 copies per prompt), 256 new tokens:
#      ms per decode step after warm-up, compile / first-call time, greedy token agreement between the dynamic and the
#      static (compiled) sampler, and the share of a step spent generating (generate vs one update on the samples);
#   1. the CUDA-only tests (tests/test_kl.py's cuda cases);
#   2. one step of each training script at the paper's widths and vocabulary: random-initialised
#      Qwen2.5-Math-1.5B-shaped student (fp32 weights, bf16 autocast) and Qwen2.5-Math-7B-shaped teacher (bf16),
#      1 prompt x 8 responses of up to $MAX_NEW_TOKENS tokens (64 here to fit the time; the docs' figures used 256
#      and 512), full fine-tuning and LoRA r16: time per phase and peak torch.cuda.max_memory_allocated per phase
#      (benchmark/bench_real_size.py); its configurations run in order until its time limit, the first one at least;
#   3. the exact-KL benchmark's CUDA columns at the paper's sizes (benchmark/bench_kl.py, bf16, 2,048 and 8,192 tokens).
# Everything goes to ${OUT:-gpu_check_out}/: gpu_check.json (all figures), gpu_check.log, sampler.json, real_size.json,
# bench_kl.md. Each stage has its own time limit, and each measurement is written as soon as it exists, so a stage cut
# short keeps what it measured.
#
# Needs python3 with torch (CUDA), transformers, numpy, peft, accelerate and pytest. What the scripts import beyond
# those (tyro, math-verify and their dependencies) comes from wheels in .whl/ at the repository root, made on a
# machine with internet by benchmark/fetch_gpu_wheels.sh; they are installed into /tmp/site, nothing else changes.
# The static sampler compiles with inductor when the machine has a C compiler and Python's headers, else with the
# cudagraphs backend (common.static_compile_config); sampler.json records which.
#
#   bash benchmark/gpu_check.sh                 # on the GPU machine, from the repository root
#   CPU_SMOKE=1 bash benchmark/gpu_check.sh     # the same flow on CPU with 1-layer models and tiny sizes (~6 min)
# Settings (environment): OUT, PYTHON (python3), MAX_NEW_TOKENS (64), TEACHER_LAYERS (28: the 7B's; fewer keeps
# the width and vocabulary but cuts build and load time), SAMPLER_BATCH_SIZES ("8 64"), SAMPLER_CONFIGS ("full lora"),
# GIT_COMMIT (recorded when .git is absent).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
START=$(date +%s)
log() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$LOG"; }

if compgen -G ".whl/*.whl" > /dev/null; then
  log "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
  "$PYTHON" -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 || log "wheel install failed (see above)"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" - >> "$LOG" 2>&1 <<'EOF'
import importlib.metadata, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "huggingface_hub", "tokenizers", "peft", "tyro", "math-verify", "numpy", "pytest"):
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:  # reported; the stage that needs it fails with its own message
        print(name, "MISSING")
EOF

if [ "${CPU_SMOKE:-0}" = 1 ]; then
  DEVICE=cpu; DTYPE=float32; SIZE="--student-shape tiny --teacher-shape tiny-teacher"; MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-8}
  KL="--tokens 128 --vocab 8192 --student-hidden 64 --teacher-hidden 96 --chunk-size 64 --repeats 1"
  CONFIGS=("cmdp LoRA r16" "lagrangian full")
  # the compile path traced by dynamo, run eagerly (no C compiler needed)
  SAMPLER="--shape tiny --batch-sizes ${SAMPLER_BATCH_SIZES:-2 4} --group-size 2 --prompt-tokens 16 --max-new-tokens 8 --compile eager"
  LIMITS=(300 90 360 120)  # seconds per stage: a slow CPU gets room, the flow is what is checked
else
  DEVICE=cuda; DTYPE=bfloat16; SIZE="--student-shape qwen2.5-math-1.5b --teacher-shape qwen2.5-7b --teacher-layers ${TEACHER_LAYERS:-28}"; MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
  KL="--tokens 2048 8192 --repeats 3"
  CONFIGS=("cmdp LoRA r16" "cmdp full" "lagrangian LoRA r16" "lagrangian full" "cmdp full + grad ckpt")
  SAMPLER="--shape qwen2.5-math-1.5b --batch-sizes ${SAMPLER_BATCH_SIZES:-8 64} --group-size 8 --prompt-tokens 128 --max-new-tokens 256"
  LIMITS=(240 40 120 50)  # seconds per stage 0-3: 450 s, so that the whole check fits in 8 minutes
fi

log "0. samplers: dynamic vs static ($DEVICE, $DTYPE autocast over fp32 weights)"
# shellcheck disable=SC2086
timeout "${LIMITS[0]}" "$PYTHON" benchmark/bench_sampler.py $SAMPLER --configs ${SAMPLER_CONFIGS:-full lora} \
    --device $DEVICE --dtype $DTYPE --out "$OUT/sampler.json" 2>&1 | grep -v "Loading weights" | tee -a "$LOG"
SAMPLER_RC=${PIPESTATUS[0]}

log "1. CUDA-only tests"
timeout "${LIMITS[1]}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kl.py -k cuda > "$OUT/tests.txt" 2>&1
TESTS_RC=$?
tail -3 "$OUT/tests.txt" | tee -a "$LOG"

log "2. one step of each training script at the paper's widths ($DEVICE, $DTYPE, $MAX_NEW_TOKENS new tokens)"
# shellcheck disable=SC2086
timeout "${LIMITS[2]}" "$PYTHON" benchmark/bench_real_size.py $SIZE \
    --device $DEVICE --dtype $DTYPE --group-size 8 --micro-batch-size 8 --max-new-tokens "$MAX_NEW_TOKENS" \
    --configs "${CONFIGS[@]}" --work-dir /tmp/gpu_check_models --out "$OUT/real_size.json" 2>&1 \
    | grep -v "Loading weights\|Writing model" | tee -a "$LOG"
STEP_RC=${PIPESTATUS[0]}
rm -rf /tmp/gpu_check_models

log "3. exact-KL benchmark ($DEVICE)"
# shellcheck disable=SC2086
timeout "${LIMITS[3]}" "$PYTHON" benchmark/bench_kl.py --device $DEVICE $KL > "$OUT/bench_kl.md" 2>> "$LOG"
KL_RC=$?
cat "$OUT/bench_kl.md" | tee -a "$LOG"

SAMPLER_RC=$SAMPLER_RC TESTS_RC=$TESTS_RC STEP_RC=$STEP_RC KL_RC=$KL_RC ELAPSED=$(( $(date +%s) - START )) OUT="$OUT" "$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, subprocess
out = os.environ["OUT"]
def read(name):
    path = os.path.join(out, name)
    return open(path).read() if os.path.exists(path) else ""
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or os.environ.get("GIT_COMMIT")
kl_rows = []
for line in read("bench_kl.md").splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 4 and cells[1].isdigit():
        kl_rows.append(dict(zip(("method", "tokens", "peak_extra_mib", "median_ms"), cells)))
report = {"commit": commit, "elapsed_s": int(os.environ["ELAPSED"]),
          "sampler": json.loads(read("sampler.json") or "null"), "sampler_rc": int(os.environ["SAMPLER_RC"]),
          "tests": {"rc": int(os.environ["TESTS_RC"]), "summary": (read("tests.txt").strip().splitlines() or [""])[-1]},
          "real_size": json.loads(read("real_size.json") or "null"), "real_size_rc": int(os.environ["STEP_RC"]),
          "bench_kl": {"rc": int(os.environ["KL_RC"]), "header": (read("bench_kl.md").splitlines() or [""])[0], "rows": kl_rows}}
json.dump(report, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print(f"wrote {out}/gpu_check.json: sampler rc {report['sampler_rc']}, tests rc {report['tests']['rc']}, real-size rc {report['real_size_rc']}, bench_kl rc {report['bench_kl']['rc']}, {report['elapsed_s']} s")
EOF
