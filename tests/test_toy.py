"""The toy task: generator, splits, tokenizer, and a tiny build that loads like a real model."""

import json
import random

import common
import toy_math


def test_generator_is_deterministic_and_splits_are_disjoint():
    train_a, test_a = toy_math.make_splits(seed=3, num_train=2000, num_test=200)
    train_b, test_b = toy_math.make_splits(seed=3, num_train=2000, num_test=200)
    assert train_a == train_b and test_a == test_b
    assert toy_math.make_splits(seed=4, num_train=50, num_test=10)[0] != train_a[:50]
    train_questions = {p["question"] for p in train_a}
    assert len(train_questions) == 2000 and len({p["question"] for p in test_a}) == 200
    assert not train_questions & {p["question"] for p in test_a}


def test_every_solution_is_graded_correct_and_results_are_non_negative():
    rng = random.Random(0)
    num_ops = set()
    for _ in range(3000):
        p = toy_math.make_problem(rng)
        assert common.is_correct(p["solution"], p["answer"]), p
        assert not common.is_correct(p["solution"], str(int(p["answer"]) + 1)), p
        assert int(p["answer"]) >= 0
        # every intermediate equation is true arithmetic
        for step in p["solution"].split(" #### ")[0].split(". "):
            sentence, equation = step.rstrip(".").split(", so ")
            assert sentence + "." in p["question"]  # each step restates the sentence it computes
            lhs, rhs = equation.split(" = ")
            a, op, b = lhs.split()
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(rhs) >= 0
        num_ops.add(p["solution"].count(" = "))
    assert num_ops == {1, 2, 3}


def test_tokenizer_round_trips_every_problem_without_unknown_tokens():
    tokenizer = toy_math.build_tokenizer()
    for p in toy_math.make_splits(seed=0, num_train=500, num_test=10)[0]:
        text = common.render_prompt(tokenizer, p["question"]) + " " + p["solution"]
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_tiny_build_loads_through_the_real_model_path(tiny_toy):
    report = json.loads((tiny_toy / "report.json").read_text())
    assert {"teacher", "student", "build_seconds"} <= set(report)
    assert 0.0 <= report["student"]["accuracy"] <= 1.0 and report["student"]["mean_kl"] >= 0.0
    assert report["teacher"]["mean_kl"] < 1e-5  # the teacher scored against itself
    tokenizer = common.load_tokenizer(str(tiny_toy / "student"))
    common.check_same_tokenizer(tokenizer, common.load_tokenizer(str(tiny_toy / "teacher")))
    for role in ("teacher", "student"):
        assert (tiny_toy / role / "model.safetensors").is_file()
        model = common.load_model(str(tiny_toy / role), common.resolve_device("cpu"), common.resolve_dtype("auto", common.resolve_device("cpu")))
        assert model.config.model_type == "llama"
    problems = common.load_problems(str(tiny_toy / "test.jsonl"))
    assert len(problems) == 16 and all(common.is_correct(p["answer"], p["answer"]) for p in problems)


def test_build_is_reused_and_same_seed_gives_same_models(tiny_toy, tmp_path):
    import safetensors.torch

    assert toy_math.build(toy_math.Args(cache_dir=str(tiny_toy))) == tiny_toy  # cached: no rebuild
    args = json.loads((tiny_toy / "report.json").read_text())["args"]
    rebuilt = toy_math.build(toy_math.Args(**{**args, "cache_dir": str(tmp_path / "again")}))
    for role in ("teacher", "student"):
        a = safetensors.torch.load_file(tiny_toy / role / "model.safetensors")
        b = safetensors.torch.load_file(rebuilt / role / "model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
