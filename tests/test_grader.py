import json
import random
from pathlib import Path

import pytest

from common import extract_answer, is_correct

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"offline data copies not found at {DATA}")


def _jsonl(name):
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------


@needs_data
def test_gsm8k_solutions_grade_against_their_own_answer():
    rows = _jsonl("gsm8k_test.jsonl")
    assert len(rows) == 1319
    right = wrong = 0
    for row in rows:
        gold = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        right += is_correct(row["answer"], gold)
        wrong += not is_correct(row["answer"], str(int(gold) + 1))
    assert (right, wrong) == (1319, 1319)


# Pairs (solution of row i, answer of row i+1) whose answer strings differ but are equivalent.
MATH500_EQUIVALENT_NEIGHBOURS = {"test/algebra/1837.json"}  # answer `5`, next answer `x=5`


@needs_data
def test_math500_solutions_grade_against_their_answer():
    rows = _jsonl("math500_test.jsonl")
    assert len(rows) == 500
    failed = [row["unique_id"] for row in rows if not is_correct(row["solution"], row["answer"])]
    assert failed == []  # no exceptions needed: every boxed solution matches its `answer` field
    # And the grader is not simply saying yes: against the next problem's answer almost all fail.
    accepted = {row["unique_id"] for row, nxt in zip(rows, rows[1:] + rows[:1])
                if row["answer"] != nxt["answer"] and is_correct(row["solution"], nxt["answer"])}
    assert accepted == MATH500_EQUIVALENT_NEIGHBOURS


@needs_data
def test_svamp_answers():
    rows = json.loads((DATA / "SVAMP.json").read_text(encoding="utf-8"))
    assert len(rows) == 1000
    assert sum(is_correct(f"#### {row['Answer']}", str(row["Answer"])) for row in rows) == 1000
    assert sum(is_correct(f"#### {row['Answer'] + 1}", str(row["Answer"])) for row in rows) == 0


# ----------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------

MATCHES = [
    ("1,000", "1000"),
    ("#### 1,234", "1234"),
    ("#### 18.00", "18"),
    ("The total is 18.", "18"),
    ("It costs $18", "18"),
    (r"\boxed{\$18}", "18"),
    (r"\boxed{18}", "18"),
    (r"\boxed{18}", r"The work. \boxed{18}"),
    ("step 1\n#### 18", "18"),
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\tfrac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\frac12}", r"\frac{1}{2}"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{.5}", r"\frac{1}{2}"),
    (r"\boxed{1/2}", r"\frac{1}{2}"),
    (r"\boxed{-\frac{3}{8}}", "-0.375"),
    (r"\boxed{\frac{-3}{8}}", r"-\frac38"),
    (r"\boxed{50\%}", "50"),
    ("#### 50%", "50"),
    (r"\boxed{10 \text{ cm}}", "10"),
    (r"\boxed{15\mbox{ cm}^2}", "15"),
    (r"\boxed{x=3}", "3"),
    (r"\boxed{y = 3}", "3"),
    (r"\boxed{90^\circ}", "90"),
    (r"\boxed{90^{\circ}}", "90"),
    (r"\boxed{90°}", "90"),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{(3, 0.5)}", r"\left( 3, \frac{1}{2} \right)"),
    (r"first \boxed{7}, then \boxed{8}", "8"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\sqrt2}", r"\sqrt{2}"),
    (r"\fbox{7}", "7"),
    (r"so \boxed 7", "7"),
    ("The answer is $\\frac{3}{4}$. Then 9 more.", "0.75"),
    ("the final answer is: **42**", "42"),
    (r"\boxed{1,-2}", "-2,1"),
    (r"\boxed{\{1, 2\}}", r"\{2,1\}"),
    (r"\boxed{(0,9) \cup (9,36)}", r"(0,9) \cup (9,36)"),
    (r"\boxed{\$32,\!348}", "32348"),
    (r"\boxed{1\frac{4}{5}}", r"\frac95"),
    (r"\boxed{\begin{pmatrix} \frac15 \\ -\frac{18}{5} \end{pmatrix}}", r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}"),
    (r"\boxed{\text{(B)}}", "B"),
    (r"\boxed{4210_5}", "4210_{5}"),
    ("−7", "-7"),
]

MISMATCHES = [
    ("-5", "5"),
    ("5000", "50"),
    ("0.5", "50"),
    (r"\boxed{0.5}", r"50\%"),
    ("#### 1234568", "1234567"),
    (r"\boxed{18.01}", "18"),
    (r"first \boxed{7}, then \boxed{8}", "7"),
    (r"\boxed{[3, \frac{\pi}{2}]}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{(3,4)}", "(3,4]"),
    (r"\boxed{(\frac{\pi}{2}, 3)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{5, 6}", "5"),
    (r"\boxed{5 \text{ or } 6}", "5"),
    (r"\boxed{5 \text{ or 6}}", "5"),
    (r"\boxed{1, 2, 2}", "1, 2"),
    (r"\boxed{\frac{1}{3}}", "0.33"),
    (r"\boxed{\frac{1}{0}}", "0"),
    (r"\boxed{1 2}", "1, 2"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{2}}{3}"),
]


@pytest.mark.parametrize("response,gold", MATCHES)
def test_matches(response, gold):
    assert is_correct(response, gold) is True


@pytest.mark.parametrize("response,gold", MISMATCHES)
def test_mismatches(response, gold):
    assert is_correct(response, gold) is False


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{\frac{1}{2}} and done", r"\frac{1}{2}"),
    (r"\boxed{1} \boxed{\left(2, {3}\right)}", r"\left(2, {3}\right)"),
    (r"\boxed{2} then \boxed{3", "2"),  # an unclosed last box falls back to the last closed one
    ("#### 1 \n#### 2\nbye", "2"),
    ("#### 1,234", "1,234"),
    ("The answer is 3.5. Other 4.", "3.5"),
    ("We get 3 apples and -4.25 pears, total 1,000.", "1,000"),
    ("from 3-5", "5"),
    ("nothing here", None),
    ("", None),
    ("####   \n", None),
    (r"\boxed{}", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("response", ["", "no numbers at all", r"\boxed{}", "####"])
def test_no_answer_is_false(response):
    assert extract_answer(response) is None
    assert is_correct(response, "5") is False
    assert is_correct(response, "") is False


def test_empty_gold_is_false():
    assert is_correct(r"\boxed{5}", "") is False
    assert is_correct("", "") is False


def test_non_string_inputs():
    assert is_correct(None, "5") is False  # a failed generation scores zero instead of crashing
    assert is_correct("#### 51", 51.0) is True  # SVAMP stores answers as floats


# ----------------------------------------------------------------------------------------------
# Fuzz and adversarial inputs: no exception, right types, bounded time (a catastrophic regex
# would hang here instead of failing; there is deliberately no timing assertion).
# ----------------------------------------------------------------------------------------------

PIECES = ["0", "1", "7", "9", "{", "}", "\\", "\\boxed{", "\\fbox", "####", "\\frac", "\\text{", "$", "%",
          ",", ".", "-", "/", " ", "\n", "(", ")", "[", "]", "=", "x", "the answer is ", "\\left", "^\\circ",
          "½", "−", "°", "é", "\u200b", "😀", "\\{", "&", "\\cup", "\\begin{pmatrix}", "\\end{pmatrix}"]


def _check(response, gold):
    extracted = extract_answer(response)
    assert extracted is None or isinstance(extracted, str)
    verdict = is_correct(response, gold)
    assert isinstance(verdict, bool)
    if extracted is None:
        assert verdict is False


def test_fuzz_random_strings():
    rng = random.Random(1234)
    for _ in range(3000):
        response = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40)))
        gold = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 8)))
        _check(response, gold)
        _check(gold, response)


def test_fuzz_integers_in_every_format():
    rng = random.Random(99)
    formats = ["#### {c}", "\\boxed{{{c}}}", "The answer is {c}.", "so we get {c}", "\\boxed{{\\${c}}}", "#### {p}.00"]
    for _ in range(2000):
        n = rng.choice([rng.randint(-10**7, 10**7), rng.randint(0, 100)])
        m = n if rng.random() < 0.5 else n + rng.choice([-1, 1, 10, -100, 1000])
        response = rng.choice(formats).format(c=f"{n:,}", p=n)
        assert is_correct(response, str(m)) is (n == m), (response, m)


ADVERSARIAL = [
    "{" * 100_000,
    "}" * 100_000,
    "7" * 100_000,
    "\\boxed{" * 15_000,
    "1," * 50_000,
    "#### " * 20_000,
    "(" * 50_000 + ")" * 50_000,
    "the answer is " * 7_000,
    "the" + " " * 100_000 + "x",
    "\\text{" * 15_000,
    "1." * 50_000,
    "-" * 100_000,
    "\\" * 100_000,
    "1" + ",000" * 25_000,
    "\\boxed{" + "9" * 100_000 + "}",
    "\\begin{pmatrix}" + "1&" * 50_000 + "\\end{pmatrix}",
    "x=" * 50_000,
    "\\frac{1}{" * 10_000,
    "1/" * 50_000,
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_inputs(text):
    _check(text, "5")
    _check("\\boxed{5}", text)
    _check("\\boxed{" + text + "}", text + "1")
    if not any(ch.isdigit() for ch in text):
        assert extract_answer(text) is None
