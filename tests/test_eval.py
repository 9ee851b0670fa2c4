"""eval_math.py end to end on the tiny toy models, and its input checks."""

import json
import os
import re
import subprocess
import sys

import pytest

import eval_math
from conftest import ROOT, run_script


@pytest.mark.slow
def test_help_exits_zero(tmp_path):
    proc = run_script("eval_math.py", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "--max-new-tokens" in proc.stdout and "--teacher" in proc.stdout


@pytest.mark.slow
def test_eval_end_to_end_with_teacher(tiny_toy, tmp_path):
    data = tmp_path / "problems.jsonl"
    rows = [
        {
            "question": "Mia has 2 apples. She finds 3 more. How many apples does she have now?",
            "answer": "2 + 3 = 5. #### 5",
        },
        {"problem": "A box holds 4 cards. Tom adds 1 more. How many cards are in the box now?", "answer": "5"},
        {"question": "Sam has 9 coins. He loses 4. How many coins does he have now?", "answer": "#### 5"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    proc = run_script(
        "eval_math.py",
        "--model",
        str(tiny_toy / "student"),
        "--teacher",
        str(tiny_toy / "teacher"),
        "--dataset",
        str(data),
        "--max-new-tokens",
        "8",
        "--batch-size",
        "2",
        "--budget",
        "0.01",
        "--output-dir",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(records) == 3 and summary["n"] == 3
    assert summary["dataset"] == str(data) and summary["split"] is None  # --split is ignored for a file: not recorded
    assert [r["gold"] for r in records] == ["5", "5", "5"]
    assert [r["question"] for r in records] == [
        row.get("question") or row["problem"] for row in rows
    ]  # what --compare matches on
    for r in records:
        assert set(r) >= {"prompt", "response", "extracted", "gold", "correct", "mean_kl"}
        assert r["prompt"].startswith("Question: ") and r["prompt"].endswith("\nAnswer:")
        assert r["mean_kl"] >= 0 and 1 <= r["response_tokens"] <= 8
    assert summary["accuracy"] == sum(r["correct"] for r in records) / 3
    assert summary["mean_kl"] == pytest.approx(sum(r["mean_kl"] for r in records) / 3)
    assert summary["csr"] == sum(r["mean_kl"] <= 0.01 for r in records) / 3
    assert "accuracy" in proc.stdout and "csr" in proc.stdout


@pytest.mark.slow
def test_eval_of_the_teacher_against_itself_has_zero_kl(tiny_toy, tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        "eval_math.py",
        "--model",
        str(tiny_toy / "teacher"),
        "--teacher",
        str(tiny_toy / "teacher"),
        "--dataset",
        str(tiny_toy / "test.jsonl"),
        "--limit",
        "5",
        "--max-new-tokens",
        "6",
        "--output-dir",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 5 and summary["max_kl"] < 1e-5 and summary["csr"] == 1.0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--budget", "0"], "--budget must be > 0"),
        (["--budget", "nan"], "--budget must be a finite number, got nan"),
        (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
        (["--limit", "0"], "--limit must be a positive number"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--model", "/no/such/dir"], "does not exist"),
        (["--model", "missing.gguf"], "does not exist"),
        (["--dataset", "nope.jsonl"], "neither a known name"),
    ],
)
def test_bad_input_is_one_sentence_before_loading(flags, message):
    import tyro

    import common
    import eval_math

    with pytest.raises(common.InputError, match=re.escape(message)):
        eval_math.check_args(tyro.cli(eval_math.Args, args=flags))


@pytest.mark.parametrize("script", ["eval_math", "cmdp_distill", "lagrangian_distill"])
@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"question": "q7", "answer": ', "line 7 is not valid JSON"),
        ('{"prompt": "q7", "answer": "7"}', "line 7 is not a problem: expected fields question/answer"),
    ],
)
def test_bad_dataset_file_is_named_by_check_args(tmp_path, script, bad_line, message):
    """A malformed --dataset file is reported by check_args, which main() runs before the toy models could be built."""
    import importlib

    import tyro

    import common

    module = importlib.import_module(script)
    data = tmp_path / "bad.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(1, 7)) + bad_line + "\n"
    )
    with pytest.raises(common.InputError, match=re.escape(f"{data}: {message}")):
        module.check_args(tyro.cli(module.Args, args=["--dataset", str(data)]))


@pytest.mark.slow
def test_bad_dataset_file_fails_before_the_toy_build(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q1", "answer": "#### 1"}\n{"question": "q2", "answer": \n')
    cache = tmp_path / "toy_cache"
    cache.mkdir()
    env = dict(os.environ, CMDP_DISTILL_CACHE=str(cache))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cmdp_distill.py"), "--dataset", str(data)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and proc.stderr.strip() == f"{data}: line 2 is not valid JSON (Expecting value)."
    assert not any(cache.iterdir()), "a toy build started before the dataset was checked"


def test_write_jsonl_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.jsonl"
    eval_math.write_jsonl(path, [{"a": 1}, {"a": 2}, {"a": 3}])
    eval_math.write_jsonl(path, [{"a": 4}])  # a second evaluation into the same folder replaces, never appends
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 4}]
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]
