"""common.py plumbing: data loading and its errors, prompts, batching invariances, checkpoints."""

import json

import pytest
import torch

import common
from conftest import SHARED_DATA

CPU = torch.device("cpu")


def test_load_problems_normalises_gsm8k_math_and_svamp_rows(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "Q1?", "answer": "3 + 4 = <<3+4=7>>7\n#### 1,007"}) + "\n\n")
    assert common.load_problems(str(gsm)) == [{"question": "Q1?", "answer": "1007"}]
    math_file = tmp_path / "math.jsonl"
    math_file.write_text(json.dumps({"problem": "P?", "solution": "... \\boxed{\\frac12}", "answer": "\\frac{1}{2}"}) + "\n")
    assert common.load_problems(str(math_file)) == [{"question": "P?", "answer": "\\frac{1}{2}"}]
    svamp = tmp_path / "svamp.json"
    svamp.write_text(json.dumps([{"Body": "Dan has 5 apples.", "Question": "How many?", "Answer": 5.0},
                                 {"Body": "A ", "Question": "B", "Answer": 2.5}]))
    assert common.load_problems(str(svamp)) == [{"question": "Dan has 5 apples. How many?", "answer": "5"}, {"question": "A B", "answer": "2.5"}]


@pytest.mark.parametrize("content, message", [
    ('{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n', "line 2 is not valid JSON"),
    ('{"question": "a", "answer": "1"}\n{"prompt": "b"}\n', "line 2 is not a problem"),
    ("\n", "holds no problems"),
])
def test_malformed_dataset_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit, match=message):
        common.load_problems(str(path))


def test_unknown_dataset_and_model_paths_fail_early(tmp_path):
    with pytest.raises(SystemExit, match="neither a known name"):
        common.load_problems(str(tmp_path / "missing.jsonl"))
    with pytest.raises(SystemExit, match="must end in .jsonl or .json"):
        (tmp_path / "data.csv").write_text("a,b\n")
        common.load_problems(str(tmp_path / "data.csv"))
    with pytest.raises(SystemExit, match="does not exist"):
        common.check_model_path(str(tmp_path / "nope"), "--model")
    with pytest.raises(SystemExit, match="does not exist"):
        common.check_model_path("nope.gguf", "--model")
    common.check_model_path("Qwen/Qwen2.5-Math-1.5B-Instruct", "--model")  # a hub id passes (checked at load)
    common.check_model_path(str(tmp_path), "--model")


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data (GSM8K, MATH-500, SVAMP copies) is not beside this checkout")
def test_real_data_files_load():
    assert len(common.load_problems(str(SHARED_DATA / "gsm8k_test.jsonl"))) == 1319
    assert len(common.load_problems(str(SHARED_DATA / "gsm8k_train.jsonl"))) == 7473
    assert len(common.load_problems(str(SHARED_DATA / "math500_test.jsonl"))) == 500
    assert len(common.load_problems(str(SHARED_DATA / "SVAMP.json"))) == 1000


def test_plain_and_chat_prompts(tiny_toy):
    tokenizer = common.load_tokenizer(str(tiny_toy / "student"))
    assert common.render_prompt(tokenizer, "Q?") == "Question: Q?\nAnswer:"
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert common.render_prompt(tokenizer, "Q?") == f"<system>{common.SYSTEM_PROMPT}<user>Q?<assistant>"


def test_padding_and_batching_do_not_change_kl_or_logprobs(tiny_toy):
    tokenizer = common.load_tokenizer(str(tiny_toy / "student"))
    student = common.load_model(str(tiny_toy / "student"), CPU, torch.float32)
    teacher = common.load_model(str(tiny_toy / "teacher"), CPU, torch.float32)
    problems = common.load_problems(str(tiny_toy / "test.jsonl"))[:6]
    prompts = [common.render_prompt(tokenizer, p["question"]) for p in problems]
    torch.manual_seed(0)
    pairs = common.generate(student, tokenizer, prompts, max_new_tokens=10, temperature=1.0, batch_size=6)
    assert len({len(p) for p, _ in pairs}) > 1  # prompts of different lengths: real left padding
    batch = common.pad_sequences(pairs, tokenizer.pad_token_id, CPU)
    kl, logprobs, teacher_logprobs = common.score(student, teacher, batch, chunk_size=7)
    for i, pair in enumerate(pairs):  # each sequence alone, unpadded
        single = common.pad_sequences([pair], tokenizer.pad_token_id, CPU)
        kl1, lp1, tlp1 = common.score(student, teacher, single, chunk_size=1024)
        n = len(pair[1])
        rows = batch["response_mask"][i].bool()
        assert rows.sum() == n == single["response_mask"].sum()
        torch.testing.assert_close(kl[i][rows], kl1[0][single["response_mask"][0].bool()], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logprobs[i][rows], lp1[0][single["response_mask"][0].bool()], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(teacher_logprobs[i][rows], tlp1[0][single["response_mask"][0].bool()], atol=1e-5, rtol=1e-4)
    # the sampled-token log-probs equal a plain forward pass with full logits
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    naive = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["response_mask"].bool()
    torch.testing.assert_close(logprobs[mask].double(), naive[mask], atol=1e-5, rtol=1e-5)


def test_generation_is_greedy_at_temperature_zero_and_stops_at_eos(tiny_toy):
    tokenizer = common.load_tokenizer(str(tiny_toy / "teacher"))
    model = common.load_model(str(tiny_toy / "teacher"), CPU, torch.float32)
    prompts = [common.render_prompt(tokenizer, p["question"]) for p in common.load_problems(str(tiny_toy / "test.jsonl"))[:4]]
    a = common.generate(model, tokenizer, prompts, 8, 0.0, batch_size=4)
    b = common.generate(model, tokenizer, prompts, 8, 0.0, batch_size=1)
    assert a == b
    for prompt_ids, response_ids in a:
        assert 1 <= len(response_ids) <= 8
        assert tokenizer.eos_token_id not in response_ids[:-1] and tokenizer.pad_token_id not in response_ids
    model.train()
    common.generate(model, tokenizer, prompts[:1], 2, 1.0, batch_size=1)
    assert model.training  # the mode is restored


def test_checkpoint_save_is_atomic_and_reloads(tiny_toy, tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Args:
        lr: float = 0.1

    tokenizer = common.load_tokenizer(str(tiny_toy / "student"))
    model = common.load_model(str(tiny_toy / "student"), CPU, torch.float32)
    state = {"step": 7, "torch_rng": torch.get_rng_state()}
    path = tmp_path / "checkpoint-7"
    common.save_checkpoint(path, model, tokenizer, state, Args())
    common.save_checkpoint(path, model, tokenizer, state, Args(lr=0.2))  # overwriting an existing one works too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]  # no .tmp / .old left behind
    assert json.loads((path / "args.json").read_text()) == {"lr": 0.2}
    assert common.load_trainer_state(path)["step"] == 7
    reloaded = common.load_model(str(path), CPU, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


def test_truncate_jsonl_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    common.append_jsonl(path, [{"step": s} for s in range(6)])
    common.truncate_jsonl(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
