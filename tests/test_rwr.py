"""Reasoning Win Rate (eval_math.py --compare): verdict parsing, the two-order rule, the bootstrap, file matching,
and the pipeline end to end with the tiny toy model and with SmolLM2-135M-Instruct (GGUF) as judges."""

import json
import re
from pathlib import Path

import pytest

import common
import eval_math
from conftest import run_script
from eval_math import bootstrap_rates, combine_verdicts, match_results, parse_verdict

QUESTIONS = [
    f"Ann has {a} apples and buys {b} more. How many apples does she have now?"
    for a, b in [(3, 4), (5, 2), (7, 1), (2, 6), (9, 3), (4, 4), (8, 5), (6, 7), (1, 9), (10, 2)]
]
GOLDS = [str(a + b) for a, b in [(3, 4), (5, 2), (7, 1), (2, 6), (9, 3), (4, 4), (8, 5), (6, 7), (1, 9), (10, 2)]]


def write_results(path: Path, questions: list[str], responses: list[str], golds: list[str]) -> Path:
    """A results.jsonl as eval_math.py writes it (question, prompt, response, gold, correct, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        dict(
            question=q,
            prompt=f"Question: {q}\nAnswer:",
            response=r,
            extracted=None,
            gold=g,
            correct=r.rstrip(".").endswith(g),
            mean_kl=None,
            response_tokens=len(r.split()),
        )
        for q, r, g in zip(questions, responses, golds)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Verdict: 1", "1"),
        ("Verdict: 2", "2"),
        ("Verdict: tie", "tie"),
        (
            "Solution 1 adds correctly; Solution 2 subtracts.\nSo the first one is right.\nVerdict: 1\n",
            "1",
        ),  # extra text before
        ("Verdict: 2. Solution 2 is complete, Solution 1 skips a step.", "2"),  # extra text after
        ("verdict: tie", "tie"),  # lowercase
        ("VERDICT: TIE", "tie"),
        ("**Verdict: 1**", "1"),  # markdown bold, around the whole line
        ("**Verdict:** 2", "2"),  # ... around the label
        ("### Verdict: **Tie**", "tie"),  # ... a header and the value
        ("Verdict: Solution 2", "2"),
        ("Verdict:\n1", "1"),
        ("Verdict: 1\nOn second thought, Solution 2 is clearer.\nVerdict: 2", "2"),  # two verdicts: the LAST counts
        ("Verdict: 2\nVerdict: tie", "tie"),
        ("Verdict: 1 ... then again ... Verdict: 3", None),  # the last one is not a valid verdict: not an earlier one
        ("Verdict: 3", None),
        ("Verdict: 12", None),
        ("Verdict: 1/2", None),
        ("Verdict: both", None),
        ("Both solutions are fine. I prefer the first one.", None),  # no verdict line
        ("", None),
        ("#$%^&* lorem ipsum 1 2 tie", None),  # garbage
        ("Solution 1 is better.\nVerdict:", None),  # truncated after the label
        ("Solution 1 is better.\nVerdict: ti", None),  # truncated inside the value
        ("Solution 1 is better.\nVerdi", None),  # truncated inside the label
        ("Verdict: 2\nLet me check once more... the verd", None),  # an earlier verdict, then a cut-off final one
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Verdict: 1\nSolution 1 is right, and that is my verdict", "1"),
        ("Verdict: 2. I stand by this verdict.", "2"),
        ("**Verdict: tie**\n\nBoth are equally good; a fair verdict\n", "tie"),
        ("Verdict: 1 verdict", "1"),
        ("Verdict: 2\nverdicts", "2"),
        ("Verdict: 1\n**Final Verdict**", None),  # a verdict line begun, then cut off: the last verdict is unknown
        ("Verdict: 1\n### Verdict\n", None),
        ("Verdict: 2\nVerdict", None),
        ("Verdict: 2\nVerdic", None),  # cut inside the word
    ],
)
def test_a_complete_verdict_counts_when_the_text_ends_with_the_word_verdict(text, expected):
    """The word 'verdict' ending a sentence is no cut-off: the complete verdict before it counts. A line that
    starts a verdict, or a word cut short, at the very end still is (a judge cut off mid-verdict)."""
    assert parse_verdict(text) == expected


@pytest.mark.parametrize(
    "verdict_ab, verdict_ba, outcome",
    [
        ("1", "2", "win"),  # A as Solution 1 preferred, and A as Solution 2 preferred: both orders prefer A
        ("2", "1", "loss"),  # both orders prefer B
        ("1", "1", "tie"),  # always the first position: position bias, not a preference
        ("2", "2", "tie"),
        ("tie", "tie", "tie"),
        ("1", "tie", "tie"),  # only one order prefers A
        ("tie", "2", "tie"),
        ("tie", "1", "tie"),
        (None, "2", "unparseable"),
        ("1", None, "unparseable"),
        (None, None, "unparseable"),
        ("tie", None, "unparseable"),
    ],
)
def test_combine_verdicts(verdict_ab, verdict_ba, outcome):
    assert combine_verdicts(verdict_ab, verdict_ba) == outcome


def test_bootstrap_on_a_fixed_input():
    outcomes = ["win", "loss", "tie", "win", "unparseable", "win", "tie", "loss", "win", "win"]
    rates = bootstrap_rates(outcomes, resamples=1000, seed=1)
    # 9 parseable pairs (the unparseable one is excluded): 5 wins, 2 losses, 2 ties; intervals from seed 1
    assert rates["win"] == pytest.approx((5 / 9, 2 / 9, 8 / 9))
    assert rates["loss"] == pytest.approx((2 / 9, 0.0, 5 / 9))
    assert rates["tie"] == pytest.approx((2 / 9, 0.0, 5 / 9))
    assert bootstrap_rates(outcomes, resamples=1000, seed=1) == rates  # seeded: the same intervals again
    for rate, low, high in rates.values():
        assert 0 <= low <= rate <= high <= 1


def test_bootstrap_degenerate_inputs():
    assert bootstrap_rates(["win"] * 4 + ["unparseable"]) == {
        "win": (1.0, 1.0, 1.0),
        "loss": (0.0, 0.0, 0.0),
        "tie": (0.0, 0.0, 0.0),
    }
    assert bootstrap_rates(["unparseable"] * 3) == {o: (None, None, None) for o in ("win", "loss", "tie")}


def test_match_results_refuses_different_problems():
    a = [dict(question=q, prompt=q, response="r") for q in QUESTIONS[:3]]
    match_results(a, [dict(r) for r in a], "a.jsonl", "b.jsonl")  # the same problems: no error
    with pytest.raises(
        common.InputError, match=r"a.jsonl and b.jsonl do not cover the same problems \(3 vs 2 results\)"
    ):
        match_results(a, a[:2], "a.jsonl", "b.jsonl")
    with pytest.raises(common.InputError, match=r"result 2 differs in its question"):
        match_results(a, [a[0], a[2], a[1]], "a.jsonl", "b.jsonl")  # the same problems in another order
    # files without a question field (older eval_math.py) are matched by their prompts
    old = [dict(prompt=f"<chat>{q}", response="r") for q in QUESTIONS[:3]]
    with pytest.raises(common.InputError, match=r"result 1 differs in its prompt"):
        match_results(old, [dict(prompt=q, response="r") for q in QUESTIONS[:3]], "a.jsonl", "b.jsonl")


def test_render_judge_prompt_without_chat_template():
    class Plain:
        chat_template = None

    prompt = eval_math.render_judge_prompt(Plain(), "What is 2 + 3?", "2 + 3 = 5. The answer is 5.", "")
    assert (
        prompt
        == eval_math.JUDGE_PROMPT.format(
            problem="What is 2 + 3?", solution_1="2 + 3 = 5. The answer is 5.", solution_2="(no solution)"
        )
        + "\n\n"
    )
    assert prompt.index("Solution 1:") < prompt.index("Solution 2:") and "Verdict: tie" in prompt


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--compare", "a.jsonl", "b.jsonl"], "--compare needs --judge"),
        (["--judge", "some/judge"], "--judge is used only with --compare"),
        (
            ["--compare", "missing_a.jsonl", "missing_b.jsonl", "--judge", "some/judge"],
            "--compare file 'missing_a.jsonl' does not exist",
        ),
        (["--compare", "a.jsonl", "b.jsonl", "--judge", "toy"], "--judge toy is not allowed"),
        (
            ["--compare", "a.jsonl", "b.jsonl", "--judge", "some/judge", "--judge-max-new-tokens", "0"],
            "--judge-max-new-tokens must be a positive integer",
        ),
    ],
)
def test_bad_compare_flags_are_one_sentence(tmp_path, monkeypatch, flags, message):
    import tyro

    write_results(tmp_path / "a.jsonl", QUESTIONS[:2], ["1", "2"], GOLDS[:2])
    write_results(tmp_path / "b.jsonl", QUESTIONS[:2], ["1", "2"], GOLDS[:2])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.InputError, match=re.escape(message)):
        eval_math.check_args(tyro.cli(eval_math.Args, args=flags))


@pytest.mark.slow
def test_mismatched_files_are_refused_before_the_judge_loads(tmp_path):
    a = write_results(tmp_path / "A" / "results.jsonl", QUESTIONS[:4], ["x"] * 4, GOLDS[:4])
    b = write_results(tmp_path / "B" / "results.jsonl", QUESTIONS[1:5], ["x"] * 4, GOLDS[1:5])
    judge = tmp_path / "not_a_model"  # a folder that passes check_args but holds no model: loading it would fail
    judge.mkdir()
    (judge / "config.json").write_text("{}")
    proc = run_script("eval_math.py", "--compare", str(a), str(b), "--judge", str(judge), cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        and "do not cover the same problems (result 1 differs in its question" in proc.stderr
    )
    c = write_results(tmp_path / "C" / "results.jsonl", QUESTIONS[:3], ["x"] * 3, GOLDS[:3])
    proc = run_script("eval_math.py", "--compare", str(a), str(c), "--judge", str(judge), cwd=tmp_path)
    assert proc.returncode != 0 and "(4 vs 3 results)" in proc.stderr and "Traceback" not in proc.stderr


def test_rwr_pipeline_with_a_scripted_judge(tmp_path, monkeypatch):
    """rwr() end to end with the judge's generation scripted: it prefers the solution that shows its work, so A
    must win in BOTH orders (this fails if the second order did not swap the solutions); problem 0 gets one
    garbage output, so it is unparseable and excluded."""
    good = [f"{g} apples: we add the two numbers, which gives {g}." for g in GOLDS]
    a = write_results(tmp_path / "A" / "results.jsonl", QUESTIONS, good, GOLDS)
    b = write_results(tmp_path / "B" / "results.jsonl", QUESTIONS, ["No idea."] * 10, GOLDS)
    texts: list[str] = []

    class Tokenizer:
        chat_template, eos_token_id = None, 0

        def decode(self, ids, skip_special_tokens=True):
            return texts[ids[0]]

    def generate(model, tokenizer, prompts, max_new_tokens, temperature, batch_size, sampler, max_prompt_tokens):
        assert temperature == 0.0 and max_new_tokens == 7  # greedy, at --judge-max-new-tokens
        assert sampler == "dynamic" and max_prompt_tokens is None  # the default sampler, which needs no cap
        pairs = []
        for prompt in prompts:
            first = prompt.split("Solution 1:")[1].split("Solution 2:")[0]
            texts.append(
                "I am not sure"
                if "Ann has 3 apples" in prompt and not texts
                else f"Solution {'1' if 'we add' in first else '2'} shows its work.\n"
                f"**Verdict: {'1' if 'we add' in first else '2'}**"
            )
            pairs.append(([], [len(texts) - 1, 0]))
        return pairs

    class Judge:
        class generation_config:
            eos_token_id = 0

    monkeypatch.setattr(eval_math.common, "load_tokenizer", lambda path, trust_remote_code=False: Tokenizer())
    monkeypatch.setattr(eval_math.common, "load_model", lambda *args, **kwargs: Judge())
    monkeypatch.setattr(eval_math.common, "generate", generate)
    args = eval_math.Args(
        compare=(str(a), str(b)),
        judge="some/judge",
        judge_max_new_tokens=7,
        batch_size=4,
        output_dir=str(tmp_path / "rwr"),
    )
    summary = eval_math.rwr(args)
    assert len(texts) == 20
    assert (summary["wins"], summary["losses"], summary["ties"], summary["unparseable"]) == (9, 0, 0, 1)
    assert summary["win_rate"] == 1.0 and summary["win_ci95"] == [1.0, 1.0] and summary["loss_ci95"] == [0.0, 0.0]
    assert summary["solution_1_preferred"] == pytest.approx(9 / 19) and summary["judge_truncated"] == 0
    assert summary["accuracy_a"] == 1.0 and summary["accuracy_b"] == 0.0
    _, verdicts = check_rwr_outputs(tmp_path / "rwr", 10)
    assert (
        verdicts[0]["verdict_ab"] is None
        and verdicts[0]["verdict_ba"] == "2"
        and verdicts[0]["outcome"] == "unparseable"
    )
    assert all((v["verdict_ab"], v["verdict_ba"], v["outcome"]) == ("1", "2", "win") for v in verdicts[1:])
    assert json.loads((tmp_path / "rwr" / "summary.json").read_text()) == summary


def check_rwr_outputs(out: Path, n: int) -> tuple[dict, list[dict]]:
    summary = json.loads((out / "summary.json").read_text())
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert summary["n"] == n == len(verdicts)
    assert summary["wins"] + summary["losses"] + summary["ties"] + summary["unparseable"] == n
    parseable = n - summary["unparseable"]
    for o, count in (("win", "wins"), ("loss", "losses"), ("tie", "ties")):
        rate, (low, high) = summary[f"{o}_rate"], summary[f"{o}_ci95"]
        if parseable:
            assert rate == summary[count] / parseable and 0 <= low <= rate <= high <= 1
        else:
            assert rate is None and low is None and high is None
    for i, v in enumerate(verdicts):
        assert v["index"] == i and set(v) >= {
            "question",
            "judge_output_ab",
            "judge_output_ba",
            "verdict_ab",
            "verdict_ba",
            "outcome",
        }
        assert v["verdict_ab"] == parse_verdict(v["judge_output_ab"]) and v["verdict_ba"] == parse_verdict(
            v["judge_output_ba"]
        )
        assert v["outcome"] == combine_verdicts(v["verdict_ab"], v["verdict_ba"])
    assert [v["outcome"] for v in verdicts].count("unparseable") == summary["unparseable"]
    return summary, verdicts


@pytest.mark.slow
def test_rwr_end_to_end_on_two_toy_evaluations(tiny_toy, tmp_path):
    """Two real eval_math.py outputs (tiny toy student and teacher), judged by the tiny toy teacher: a judge that
    cannot follow the prompt, so this checks the plumbing and the unparseable path, not the verdicts."""
    for name in ("student", "teacher"):
        proc = run_script(
            "eval_math.py",
            "--model",
            str(tiny_toy / name),
            "--dataset",
            str(tiny_toy / "test.jsonl"),
            "--limit",
            "4",
            "--max-new-tokens",
            "8",
            "--output-dir",
            str(tmp_path / name),
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "rwr"
    proc = run_script(
        "eval_math.py",
        "--compare",
        str(tmp_path / "student" / "results.jsonl"),
        str(tmp_path / "teacher" / "results.jsonl"),
        "--judge",
        str(tiny_toy / "teacher"),
        "--judge-max-new-tokens",
        "6",
        "--batch-size",
        "3",
        "--limit",
        "3",
        "--output-dir",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, verdicts = check_rwr_outputs(out, 3)
    assert summary["judge_truncated"] <= 6 and summary["accuracy_a"] is not None
    assert "unparseable" in proc.stdout and "excluded from the rates" in proc.stdout


@pytest.mark.slow
def test_rwr_with_smollm2_judge_on_four_problems(smollm2, tmp_path):
    """A real (weak) judge on 4 hand-written pairs, each judged in both orders: A shows its work and is right, B
    guesses wrong. The pipeline is checked (files, counts, rates), not the verdicts of a 135M model."""
    good = [
        f"She starts with {q.split()[2]} apples and buys {q.split()[6]} more, "
        f"so {q.split()[2]} + {q.split()[6]} = {g}. The answer is {g}."
        for q, g in zip(QUESTIONS[:4], GOLDS[:4])
    ]
    bad = [f"The answer is {int(g) + 3}." for g in GOLDS[:4]]
    a = write_results(tmp_path / "A" / "results.jsonl", QUESTIONS[:4], good, GOLDS[:4])
    b = write_results(tmp_path / "B" / "results.jsonl", QUESTIONS[:4], bad, GOLDS[:4])
    out = tmp_path / "rwr"
    proc = run_script(
        "eval_math.py",
        "--compare",
        str(a),
        str(b),
        "--judge",
        str(smollm2),
        "--judge-max-new-tokens",
        "48",
        "--batch-size",
        "20",
        "--output-dir",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"
    summary, verdicts = check_rwr_outputs(out, 4)
    assert summary["accuracy_a"] == 1.0 and summary["accuracy_b"] == 0.0
    assert all(v["judge_output_ab"].strip() and v["judge_output_ba"].strip() for v in verdicts)  # the judge did answer
    assert "Reasoning Win Rate" in proc.stdout and "| win" in proc.stdout
