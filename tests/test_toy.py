"""The toy task: generator, the two corpora's styles and the teacher's misreading, tokenizer, and a tiny build."""

import json
import random
from collections import Counter

import pytest

import common
import toy_math

CORRECT = dict(connective_probs=(1.0, 0.0, 0.0, 0.0), misread_rate=0.0)


def test_generator_is_deterministic_and_splits_are_disjoint():
    train_a, test_a = toy_math.make_splits(seed=3, num_train=2000, num_test=200)
    train_b, test_b = toy_math.make_splits(seed=3, num_train=2000, num_test=200)
    assert train_a == train_b and test_a == test_b
    assert toy_math.make_splits(seed=4, num_train=50, num_test=10)[0] != train_a[:50]
    train_questions = {p["question"] for p in train_a}
    assert len(train_questions) == 2000 and len({p["question"] for p in test_a}) == 200
    assert not train_questions & {p["question"] for p in test_a}


def test_correct_solutions_grade_correct_and_every_equation_is_true():
    rng = random.Random(0)
    num_steps = Counter()
    for _ in range(3000):
        p = toy_math.make_problem(rng)
        solution = toy_math.write_solution(p, rng, **CORRECT)
        assert common.is_correct(solution, p["answer"]), (p, solution)
        assert not common.is_correct(solution, str(int(p["answer"]) + 1))
        assert int(p["answer"]) >= 0
        steps = solution.split(" #### ")[0].split(". ")
        num_steps[len(steps)] += 1
        for k, step in enumerate(steps):
            words = step.rstrip(".").split()
            if k:  # every step after the first opens with a connective
                assert words.pop(0) in toy_math.CONNECTIVES
            a, op, b, equals, result = words
            assert (
                equals == "="
                and {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result) >= 0
            )
    assert set(num_steps) == {1, 2, 3}


def test_the_two_styles_and_the_shared_misreading():
    """The teacher's corpus spreads its connectives, the student's nearly always says "So"; both write a "sells"
    step as an addition 75% of the time, which makes the final answer wrong."""
    rng = random.Random(1)
    problems = [toy_math.make_problem(rng) for _ in range(4000)]
    sells = [p for p in problems if " sells " in p["question"]]
    assert 0.1 < len(sells) / len(problems) < 0.25  # a minority of the problems
    for probs, expected in (((0.25,) * 4, 0.25), ((0.97, 0.01, 0.01, 0.01), 0.97)):
        text = " ".join(toy_math.write_solution(p, rng, probs, 0.75) for p in problems)
        connectives = Counter(w for w in text.split() if w in toy_math.CONNECTIVES)
        assert connectives["So"] / sum(connectives.values()) == pytest.approx(expected, abs=0.03)
    wrong = [not common.is_correct(toy_math.write_solution(p, rng, (1, 0, 0, 0), 0.75), p["answer"]) for p in sells]
    expected = sum(1 - 0.25 ** sum(misreadable for _, _, misreadable in p["steps"]) for p in sells) / len(sells)
    assert sum(wrong) / len(wrong) == pytest.approx(expected, abs=0.03)  # any misread step makes the answer wrong
    assert all(
        common.is_correct(toy_math.write_solution(p, rng, (1, 0, 0, 0), 0.75), p["answer"])
        for p in problems
        if " sells " not in p["question"]
    )


def test_tokenizer_round_trips_every_problem_without_unknown_tokens():
    tokenizer = toy_math.build_tokenizer()
    rng = random.Random(2)
    for p in toy_math.make_splits(seed=0, num_train=500, num_test=10)[0]:
        text = common.render_prompt(tokenizer, p["question"]) + " " + toy_math.write_solution(p, rng, (0.25,) * 4, 0.75)
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_tiny_build_loads_through_the_real_model_path(tiny_toy):
    report = json.loads((tiny_toy / "report.json").read_text())
    assert {"teacher_greedy", "teacher_sampled", "student_greedy", "student_sampled", "build_seconds"} <= set(report)
    assert 0.0 <= report["student_greedy"]["accuracy"] <= 1.0 and report["student_greedy"]["mean_kl"] >= 0.0
    assert report["teacher_greedy"]["mean_kl"] < 1e-5  # the teacher scored against itself
    tokenizer = common.load_tokenizer(str(tiny_toy / "student"))
    common.check_same_tokenizer(tokenizer, common.load_tokenizer(str(tiny_toy / "teacher")))
    for role in ("teacher", "student"):
        assert (tiny_toy / role / "model.safetensors").is_file()
        model = common.load_model(
            str(tiny_toy / role),
            common.resolve_device("cpu"),
            common.resolve_dtype("auto", common.resolve_device("cpu")),
        )
        assert model.config.model_type == "llama"
    problems = common.load_problems(str(tiny_toy / "test.jsonl"))
    assert len(problems) == 16 and all(common.is_correct(f"#### {p['answer']}", p["answer"]) for p in problems)


def test_build_is_reused_and_same_seed_gives_same_models(tiny_toy, tmp_path):
    import safetensors.torch

    assert toy_math.build(toy_math.Args(cache_dir=str(tiny_toy))) == tiny_toy  # cached: no rebuild
    args = json.loads((tiny_toy / "report.json").read_text())["args"]
    rebuilt = toy_math.build(toy_math.Args(**{**args, "cache_dir": str(tmp_path / "again")}))
    for role in ("teacher", "student"):
        a = safetensors.torch.load_file(tiny_toy / role / "model.safetensors")
        b = safetensors.torch.load_file(rebuilt / role / "model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
