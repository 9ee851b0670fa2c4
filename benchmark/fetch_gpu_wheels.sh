#!/usr/bin/env bash
# Wheels that benchmark/gpu_check.sh installs on a GPU machine without internet (Python 3.12, x86_64 Linux), into
# .whl/ at the repository root (git-ignored): what the scripts import that such a machine (torch, transformers,
# numpy, peft, accelerate, pytest) may lack, at the versions of requirements.txt, with their own dependencies, and
# transformers 5.23.0 itself: the scripts call its activation_checkpointing_enable / is_activation_checkpointing,
# which transformers 5.17 lacks (with huggingface_hub 1.33.0, which both accept, so that an older hub cannot block
# it; its own dependencies, httpx and hf-xet, come with any hub 1.x). tokenizers and safetensors of transformers
# 5.17 suit 5.23. datasets is left out: it is imported only to fetch hub datasets, which that machine cannot reach.
# All pure Python (~15 MB). Run it here, on a machine with PyPI access:  bash benchmark/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
            antlr4-python3-runtime==4.13.2 peft==0.21.2 transformers==5.23.0 huggingface_hub==1.33.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls -l .whl
du -sh .whl
