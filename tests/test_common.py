"""common.py plumbing: data loading and its errors, prompts, batching invariances, checkpoints."""

import json
import re

import numpy as np
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
    math_file.write_text(
        json.dumps({"problem": "P?", "solution": "... \\boxed{\\frac12}", "answer": "\\frac{1}{2}"}) + "\n"
    )
    assert common.load_problems(str(math_file)) == [{"question": "P?", "answer": "\\frac{1}{2}"}]
    svamp = tmp_path / "svamp.json"
    svamp.write_text(
        json.dumps(
            [
                {"Body": "Dan has 5 apples.", "Question": "How many?", "Answer": 5.0},
                {"Body": "A ", "Question": "B", "Answer": 2.5},
            ]
        )
    )
    assert common.load_problems(str(svamp)) == [
        {"question": "Dan has 5 apples. How many?", "answer": "5"},
        {"question": "A B", "answer": "2.5"},
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n', "line 2 is not valid JSON"),
        ('{"question": "a", "answer": "1"}\n{"prompt": "b"}\n', "line 2 is not a problem"),
        ("\n", "holds no problems"),
    ],
)
def test_malformed_dataset_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(common.InputError, match=message):
        common.load_problems(str(path))


def test_unknown_dataset_and_model_paths_fail_early(tmp_path, monkeypatch):
    with pytest.raises(common.InputError, match="neither a known name"):
        common.load_problems(str(tmp_path / "missing.jsonl"))
    with pytest.raises(common.InputError, match="must end in .jsonl or .json"):
        (tmp_path / "data.csv").write_text("a,b\n")
        common.load_problems(str(tmp_path / "data.csv"))
    with pytest.raises(common.InputError, match="does not exist"):
        common.check_model_path(str(tmp_path / "nope"), "--model")
    with pytest.raises(common.InputError, match="does not exist"):
        common.check_model_path("nope.gguf", "--model")
    monkeypatch.setattr(common, "_hub_unreachable", lambda endpoint: None)  # the hub answers (tests/test_hub_errors.py)
    common.check_model_path("Qwen/Qwen2.5-Math-1.5B-Instruct", "--model")  # a hub id passes (checked at load)
    (tmp_path / "config.json").write_text("{}")
    common.check_model_path(str(tmp_path), "--model")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("number.json", "7", "number.json: the file is not a problem: it is a number, not an object with fields"),
        ("null.json", "null", "null.json: the file is not a problem: it is null, not an object"),
        (
            "items.json",
            '[{"question": "a", "answer": "1"}, [1, 2]]',
            "items.json: item 1 is not a problem: it is an array",
        ),
        (
            "rows.jsonl",
            '{"question": "a", "answer": "1"}\n"text"\n',
            "rows.jsonl: line 2 is not a problem: it is a string",
        ),
        (
            "nulls.jsonl",
            '{"question": null, "answer": "1"}\n',
            "line 1 is not a problem: its question is null, not a string",
        ),
        ("lists.jsonl", '{"problem": "p", "answer": [1]}\n', "its answer is an array, not a string or a number"),
        ("svamp.jsonl", '{"Body": "b", "Question": "q", "Answer": "many"}\n', "its Answer 'many' is not a number"),
        ("body.jsonl", '{"Body": 5, "Question": "q", "Answer": 1}\n', "its Body is a number, not a string"),
        ("fields.jsonl", '{"prompt": "p"}\n', "line 1 is not a problem: expected fields question/answer (GSM8K)"),
        ("latin.jsonl", b'{"question": "caf\xe9", "answer": "1"}\n', "latin.jsonl is not UTF-8 text (byte 17)"),
    ],
)
def test_dataset_rows_that_are_no_problem_are_one_sentence(tmp_path, name, content, message):
    """Each bad row is named with what it is and what was expected, never with a Python error's text."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(common.InputError) as info:
        common.check_dataset(str(path), "train")
    sentence = common.one_sentence(info.value)
    assert message in sentence and "\n" not in sentence and "'expected" not in sentence
    assert not re.search(r"object has no attribute|not iterable|could not convert|codec", sentence)


def test_model_paths_that_are_not_models_fail_early(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "garbage.gguf").write_bytes(b"\x00" * 64)
    (tmp_path / "real.gguf").write_bytes(b"GGUF" + b"\x00" * 60)
    (tmp_path / "empty").mkdir()
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"r": 4, "base_model_name_or_path": str(tmp_path / "gone")}))
    for path, message in (
        ("notes.txt", "is a file but not a .gguf file"),
        ("garbage.gguf", "is not a GGUF file (it does not start with the bytes GGUF)"),
        ("empty", "is a folder without config.json (nor a LoRA adapter's adapter_config.json), not a saved model"),
        ("lora", f"adapter_config.json's base_model_name_or_path {str(tmp_path / 'gone')!r} does not exist"),
    ):
        with pytest.raises(common.InputError, match=re.escape(f"--model {str(tmp_path / path)!r}")) as info:
            common.check_model_path(str(tmp_path / path), "--model")
        assert message in str(info.value)
    common.check_model_path(str(tmp_path / "real.gguf"), "--model")  # the magic bytes are all that is checked here
    (tmp_path / "gone").mkdir()
    common.check_model_path(str(lora), "--model")  # the adapter's base is back


def test_seed_device_and_output_dir_are_checked(tmp_path):
    for bad, message in ((-1, "got -1"), (2**32, "got 4294967296")):
        with pytest.raises(
            common.InputError, match=re.escape(f"--seed must be between 0 and 2**32 - 1 (numpy's range), {message}")
        ):
            common.check_seed(bad)
    common.check_seed(0), common.check_seed(2**32 - 1)
    with pytest.raises(common.InputError, match="--device 'tpu0' is not a device"):
        common.check_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(common.InputError, match="--device cuda: torch sees no CUDA GPU here"):
            common.check_device("cuda")
    else:
        with pytest.raises(common.InputError, match=f"--device cuda:{torch.cuda.device_count()}: torch sees"):
            common.check_device(f"cuda:{torch.cuda.device_count()}")
    common.check_device("auto"), common.check_device("cpu")
    (tmp_path / "file").write_text("")
    for path in (tmp_path / "file", tmp_path / "file" / "runs"):
        with pytest.raises(common.InputError, match=re.escape(f"{tmp_path / 'file'} is a file, not a folder")):
            common.check_output_dir(str(path))
    common.check_output_dir(str(tmp_path / "new" / "runs"))  # made when the run starts


@pytest.mark.skipif(
    not SHARED_DATA.exists(), reason="../shared/data (GSM8K, MATH-500, SVAMP copies) is not beside this checkout"
)
def test_real_data_files_load():
    assert len(common.load_problems(str(SHARED_DATA / "gsm8k_test.jsonl"))) == 1319
    assert len(common.load_problems(str(SHARED_DATA / "gsm8k_train.jsonl"))) == 7473
    assert len(common.load_problems(str(SHARED_DATA / "math500_test.jsonl"))) == 500
    assert len(common.load_problems(str(SHARED_DATA / "SVAMP.json"))) == 1000


def test_plain_and_chat_prompts(tiny_toy):
    tokenizer = common.load_tokenizer(str(tiny_toy / "student"))
    assert common.render_prompt(tokenizer, "Q?") == "Question: Q?\nAnswer:"
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
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
    vocab = len(tokenizer)
    head = teacher.get_output_embeddings().weight
    teacher_hidden = common.final_hidden(teacher, batch)
    kl, logprobs = common.score(student, batch, teacher_hidden, head, chunk_size=7, vocab_size=vocab)
    for i, pair in enumerate(pairs):  # each sequence alone, unpadded
        single = common.pad_sequences([pair], tokenizer.pad_token_id, CPU)
        single_hidden = common.final_hidden(teacher, single)
        kl1, lp1 = common.score(student, single, single_hidden, head, chunk_size=1024, vocab_size=vocab)
        n = len(pair[1])
        rows = batch["response_mask"][i].bool()
        assert rows.sum() == n == single["response_mask"].sum()
        torch.testing.assert_close(kl[i][rows], kl1[0][single["response_mask"][0].bool()], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logprobs[i][rows], lp1[0][single["response_mask"][0].bool()], atol=1e-5, rtol=1e-4)
    # the sampled-token log-probs equal a plain forward pass with full logits
    logits = student(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits
    naive = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["response_mask"].bool()
    torch.testing.assert_close(logprobs[mask].double(), naive[mask], atol=1e-5, rtol=1e-5)


def test_generation_is_greedy_at_temperature_zero_and_stops_at_eos(tiny_toy):
    tokenizer = common.load_tokenizer(str(tiny_toy / "teacher"))
    model = common.load_model(str(tiny_toy / "teacher"), CPU, torch.float32)
    prompts = [
        common.render_prompt(tokenizer, p["question"]) for p in common.load_problems(str(tiny_toy / "test.jsonl"))[:4]
    ]
    a = common.generate(model, tokenizer, prompts, 8, 0.0, batch_size=4)
    b = common.generate(model, tokenizer, prompts, 8, 0.0, batch_size=1)
    assert a == b
    for prompt_ids, response_ids in a:
        assert 1 <= len(response_ids) <= 8
        assert tokenizer.eos_token_id not in response_ids[:-1] and tokenizer.pad_token_id not in response_ids
    model.train()
    common.generate(model, tokenizer, prompts[:1], 2, 1.0, batch_size=1)
    assert model.training  # the mode is restored


def test_group_copies_share_one_prefill_and_sample_what_plain_generate_samples(tiny_toy):
    from transformers import GenerationConfig

    tokenizer = common.load_tokenizer(str(tiny_toy / "student"))
    model = common.load_model(str(tiny_toy / "student"), CPU, torch.float32)
    questions = [p["question"] for p in common.load_problems(str(tiny_toy / "test.jsonl"))[:3]]
    prompts = [common.render_prompt(tokenizer, q) for q in questions for _ in range(4)]  # 3 groups of 4, as in training
    prefill_rows = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: prefill_rows.append(kw["input_ids"].shape), with_kwargs=True
    )
    for temperature in (1.0, 0.0):
        prefill_rows.clear()
        torch.manual_seed(3)
        shared = common.generate(model, tokenizer, prompts, 12, temperature, batch_size=12)
        assert prefill_rows[0][0] == 3 and all(
            rows == 12 and length == 1 for rows, length in prefill_rows[1:]
        )  # then one token per step
        # reference: transformers' generate on the 12 rows as given (each copy prefilled on its own), same seed
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        sampling = (
            dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            if temperature > 0
            else dict(do_sample=False)
        )
        config = GenerationConfig(
            max_new_tokens=12,
            repetition_penalty=1.0,
            eos_token_id=common.eos_token_ids(model, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        torch.manual_seed(3)
        out = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1] :].tolist()
        for (prompt_ids, response), row, ids, mask in zip(shared, out, enc["input_ids"], enc["attention_mask"]):
            assert prompt_ids == ids[mask.bool()].tolist()
            assert response == row[: len(response)] and (len(response) == 12 or response[-1] == tokenizer.eos_token_id)
        assert len({tuple(r) for _, r in shared[:4]}) > 1 or temperature == 0  # copies are sampled independently
    hook.remove()


def test_shared_prompt_forward_equals_one_plain_pass_in_values_and_gradients(tiny_toy):
    tokenizer = common.load_tokenizer(str(tiny_toy / "student"))
    model = common.load_model(str(tiny_toy / "student"), CPU, torch.float32)
    questions = [p["question"] for p in common.load_problems(str(tiny_toy / "test.jsonl"))[:3]]
    prompts = [common.render_prompt(tokenizer, q) for q in questions for _ in range(4)]
    torch.manual_seed(0)
    batch = common.pad_sequences(common.generate(model, tokenizer, prompts, 12, 1.0, 12), tokenizer.pad_token_id, CPU)
    assert len({len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}) > 1  # real left padding
    rows = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    shared = common.final_hidden(model, batch)
    assert rows == [3, 12]  # the prompts once, then the 12 responses on their prompt's cache
    hook.remove()
    plain = model.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state[:, :-1][batch["response_mask"].bool()]
    assert shared.shape == plain.shape == (int(batch["response_mask"].sum()), model.config.hidden_size)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(plain)
    grads = [torch.autograd.grad((h * weights).sum(), list(model.get_decoder().parameters())) for h in (shared, plain)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    distinct = common.pad_sequences(
        common.generate(model, tokenizer, prompts[::4], 12, 1.0, 3), tokenizer.pad_token_id, CPU
    )
    rows.clear()
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    common.final_hidden(model, distinct)
    assert rows == [3]  # nothing to share: one plain pass
    model.activation_checkpointing_enable()
    model.train()  # checkpointed layers drop the KV cache in training: one plain pass, the same values
    rows.clear()
    torch.testing.assert_close(common.final_hidden(model, batch), plain, atol=1e-5, rtol=1e-5)
    assert rows == [12]
    hook.remove()


def test_checkpoint_save_is_atomic_and_reloads(tiny_toy, tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Args:
        lr: float = 0.1

    tokenizer = common.load_tokenizer(str(tiny_toy / "student"))
    model = common.load_model(str(tiny_toy / "student"), CPU, torch.float32)
    state = {"step": 7, "optimizer": {"state": {}, "param_groups": []}}
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


def test_scoring_builds_no_kv_cache_and_generation_does(tiny_toy):
    """Scoring runs one forward over whole sequences: a KV cache there is memory for nothing."""
    tokenizer = common.load_tokenizer(str(tiny_toy / "student"))
    model = common.load_model(str(tiny_toy / "student"), CPU, torch.float32)
    seen = []
    decoder = model.get_decoder()
    original = decoder.forward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append((kwargs.get("use_cache"), getattr(out, "past_key_values", None)))
        return out

    decoder.forward = spy
    problems = common.load_problems(str(tiny_toy / "test.jsonl"))[:2]
    pairs = common.generate(
        model, tokenizer, [common.render_prompt(tokenizer, p["question"]) for p in problems], 4, 1.0, 2
    )
    assert any(cache is not None for _, cache in seen)  # decoding does use one
    seen.clear()
    batch = common.pad_sequences(pairs, tokenizer.pad_token_id, CPU)
    teacher_hidden = common.final_hidden(model, batch)
    common.score(
        model, batch, teacher_hidden, model.get_output_embeddings().weight, chunk_size=16, vocab_size=len(tokenizer)
    )
    assert seen and all(flag is False and cache is None for flag, cache in seen)


def test_generation_never_samples_padding_rows_of_a_wider_matrix(tiny_toy):
    """Qwen2.5's output matrix has more rows than its tokenizer has ids: those rows are never sampled or compared."""
    tokenizer = common.load_tokenizer(str(tiny_toy / "student"))
    model = common.load_model(str(tiny_toy / "student"), CPU, torch.float32)
    real = len(tokenizer)
    model.resize_token_embeddings(real + 40)
    with torch.no_grad():  # make the padding rows overwhelmingly likely if they were allowed
        model.get_output_embeddings().weight[real:] = (
            50 * model.get_decoder().norm.weight / model.get_decoder().norm.weight.norm()
        )
    prompts = [
        common.render_prompt(tokenizer, p["question"]) for p in common.load_problems(str(tiny_toy / "test.jsonl"))[:4]
    ]
    torch.manual_seed(0)
    pairs = common.generate(model, tokenizer, prompts, 6, 1.0, batch_size=4)
    assert all(t < real for _, response in pairs for t in response)
    assert common.vocab_size(tokenizer, model) == real
    with pytest.raises(common.InputError, match="fewer than the tokenizer"):
        model.resize_token_embeddings(real - 1)
        common.vocab_size(tokenizer, model)


def test_sequence_costs_sum_mean_and_prefix():
    costs = torch.tensor([[0.0, 0.3, 0.0, 0.0, 9.9], [0.1, 0.1, 0.1, 0.1, 0.1]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])  # padding after 4 tokens must be ignored
    assert torch.allclose(common.sequence_costs(costs, mask, "sum"), torch.tensor([0.3, 0.5]))
    assert torch.allclose(common.sequence_costs(costs, mask, "mean"), torch.tensor([0.075, 0.1]))
    # prefix means of row 0: 0, 0.15, 0.1, 0.075 -> worst 0.15
    assert torch.allclose(common.sequence_costs(costs, mask, "prefix"), torch.tensor([0.15, 0.1]))
    grad_in = costs.clone().requires_grad_()
    common.sequence_costs(grad_in, mask, "mean").sum().backward()  # phi is differentiable (term II of the loss)
    assert torch.allclose(grad_in.grad, mask / mask.sum(1, keepdim=True))


def test_backward_with_diagnostics_norms_cosines_and_the_summed_gradient():
    w = torch.zeros(3, requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    out = common.backward_with_diagnostics({"pg": (a * w).sum(), "kl": (b * w).sum()}, [w])
    assert list(out) == ["losses/pg_grad_norm", "losses/kl_grad_norm", "losses/cos_total_pg", "losses/cos_total_kl"]
    assert out["losses/pg_grad_norm"] == pytest.approx(3.0) and out["losses/kl_grad_norm"] == pytest.approx(4.0)
    assert out["losses/cos_total_pg"] == pytest.approx(3 / 5) and out["losses/cos_total_kl"] == pytest.approx(4 / 5)
    assert torch.equal(w.grad, a + b)  # the update's own backward, done
    for kl in (torch.tensor(0.0), 0.0 * (b * w).sum()):  # a constant term (no violators), and one with zero gradient
        w.grad = None
        out = common.backward_with_diagnostics({"pg": (a * w).sum(), "kl": kl}, [w])
        assert out["losses/kl_grad_norm"] == 0 and out["losses/cos_total_pg"] == pytest.approx(1.0)
        assert out["losses/cos_total_kl"] == 0 and torch.equal(w.grad, a)
    w.grad = None
    out = common.backward_with_diagnostics({"pg": torch.tensor(0.0), "kl": (b * w).sum()}, [w])
    assert out["losses/pg_grad_norm"] == 0 and out["losses/cos_total_kl"] == pytest.approx(1.0)
    assert torch.equal(w.grad, b)


def test_backward_with_diagnostics_needs_an_empty_gradient():
    w = torch.zeros(3, requires_grad=True)
    terms = {"pg": w.sum(), "kl": (w**2).sum()}
    w.grad = torch.zeros(3)  # zero_grad(set_to_none=False): accepted
    common.backward_with_diagnostics(terms, [w])
    assert torch.equal(w.grad, torch.ones(3))
    with pytest.raises(ValueError, match="after zero_grad"):  # a second micro-batch's: its |a|^2 would be wrong
        common.backward_with_diagnostics({"pg": w.sum(), "kl": (w**2).sum()}, [w])


def test_backward_with_diagnostics_refuses_a_gradient_in_parts():
    """Reentrant activation checkpointing delivers a weight used inside and outside a checkpointed block in two
    parts, whose squared norms do not add up: refused, not a wrong norm."""
    from torch.utils.checkpoint import checkpoint

    w, x = torch.randn(3, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    inner = checkpoint(lambda h: h @ w, x, use_reentrant=True)
    with pytest.raises(RuntimeError, match="non-reentrant"):
        common.backward_with_diagnostics({"pg": x.sum(), "kl": (inner @ w).sum()}, [w])


def _two_gradient_copies(terms: dict[str, torch.Tensor], params: list[torch.Tensor]) -> tuple[dict[str, float], list]:
    """The reference: each term's gradient as a copy (autograd.grad), the three dot products from them in float64.
    Returns (the four numbers, each term's gradient per parameter: [(a_p, b_p)])."""
    grads = []
    for loss in terms.values():
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads.append([torch.zeros_like(p) if x is None else x for p, x in zip(params, g)])
    a, b = grads

    def dot(u, w):
        return sum((x.double() * y.double()).sum() for x, y in zip(u, w)).item()

    aa, bb, ab = dot(a, a), dot(b, b), dot(a, b)
    total = (aa + bb + 2 * ab) ** 0.5
    name_a, name_b = terms
    return {
        f"losses/{name_a}_grad_norm": aa**0.5,
        f"losses/{name_b}_grad_norm": bb**0.5,
        f"losses/cos_total_{name_a}": (aa + ab) / (total * aa**0.5),
        f"losses/cos_total_{name_b}": (bb + ab) / (total * bb**0.5),
    }, list(zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_with_diagnostics_on_a_tied_model_matches_two_gradient_copies(dtype, monkeypatch):
    """A Qwen2 with tied input and output embeddings, the loop's two terms (a policy gradient on the chunked
    log-probs and a KL cost): the four numbers of two full gradient copies, and the gradient of
    (loss_a + loss_b).backward(). The tied matrix gets its gradient from the embedding and from the output layer,
    its hook one call with the sum."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).to(dtype)
    monkeypatch.setattr(common, "_DOT_CHUNK", 100)  # bf16 dot products in float32 a few chunks at a time
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 48, (4, 9), generator=g)
    teacher_hidden, teacher_weight = torch.randn(4, 8, 24, generator=g), torch.randn(48, 24, generator=g) / 4
    advantages, violated = torch.randn(4, 1, generator=g), torch.tensor([[1.0], [0.0], [1.0], [0.0]])

    def terms():
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]  # (4, 8, H)
        kl, logprobs = common.kl_from_hidden(
            hidden, model.lm_head.weight, teacher_hidden.to(dtype), teacher_weight.to(dtype), ids[:, 1:], 5
        )
        return {"pg": -(advantages * logprobs).mean(), "kl": (violated * kl).mean()}

    expected, term_grads = _two_gradient_copies(terms(), params)
    sum(terms().values()).backward()
    summed = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    out = common.backward_with_diagnostics(terms(), params)
    assert list(out) == list(expected)
    for key in expected:
        assert out[key] == pytest.approx(expected[key], rel=1e-5), key
    assert 0.05 < out["losses/cos_total_kl"] < 0.95  # two terms of comparable size: the cosines test something
    for p, ref, (a, b) in zip(params, summed, term_grads):
        assert p.grad.dtype == dtype and torch.equal(p.grad, a + b)  # .grad: a, then + b, as autograd accumulates
        if dtype == torch.float32:
            torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7)
        else:  # the summed backward rounds a + b to bf16 at every layer on the way: ~1% apart
            assert ((p.grad.float() - ref.float()).norm() / ref.float().norm()) < 5e-2


def test_disable_dropout_and_derived_seeds(tiny_toy):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=20,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            attention_dropout=0.5,
        )
    )
    common.disable_dropout(model)
    model.train()
    x = torch.randint(0, 20, (2, 7))
    assert torch.equal(model(x).logits, model(x).logits)  # train mode, yet deterministic
    assert common.derive_seed(1, 2, 3) == common.derive_seed(1, 2, 3) != common.derive_seed(1, 2, 4)
    assert 0 <= common.derive_seed(2**40, 7) < 2**63


def test_metrics_go_to_jsonl_and_tensorboard_under_the_same_keys(tmp_path):
    from dataclasses import dataclass

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    @dataclass
    class Args:
        track: bool = False

    writer = common.make_writer(tmp_path, Args())
    for record in (
        {"step": 0, "eval/accuracy": 0.5},
        {"step": 1, "train/reward": 0.25, "losses/explicit_cost_loss": 0.125},
    ):
        common.log_metrics(writer, tmp_path, record)
    common.close_writer(writer)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"step": 1, "train/reward": 0.25, "losses/explicit_cost_loss": 0.125}
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {
        "eval/accuracy",
        "train/reward",
        "losses/explicit_cost_loss",
    }
    assert [(e.step, e.value) for e in events.Scalars("train/reward")] == [(1, 0.25)]


def test_one_sentence_and_finite_flags():
    from dataclasses import dataclass

    @dataclass
    class Args:
        budget: float = 0.05
        probs: tuple[float, float] = (0.5, 0.5)
        limit: int | None = None

    common.check_finite(Args())
    for bad, message in (
        (Args(budget=float("nan")), "--budget must be a finite number, got nan"),
        (Args(probs=(0.5, float("inf"))), "--probs must be a finite number, got (0.5, inf)"),
    ):
        with pytest.raises(common.InputError, match=re.escape(message)):
            common.check_finite(bad)
    assert common.one_sentence(common.InputError("--budget must be > 0, got 0")) == "--budget must be > 0, got 0."
    sentence = common.one_sentence(OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection."))
    assert sentence.startswith("OSError: We couldn't connect to 'https://huggingface.co'; without the network")
    assert "\n" not in sentence and "hf download" in sentence


def test_evaluate_scores_each_response_under_the_constraint(tiny_toy):
    tokenizer = common.load_tokenizer(str(tiny_toy / "student"))
    student = common.load_model(str(tiny_toy / "student"), CPU, torch.float32)
    teacher = common.load_model(str(tiny_toy / "teacher"), CPU, torch.float32)
    problems = common.load_problems(str(tiny_toy / "test.jsonl"))[:5]
    out = {
        c: common.evaluate(
            student, tokenizer, problems, max_new_tokens=8, batch_size=5, teacher=teacher, budget=0.01, constraint=c
        )
        for c in ("sum", "mean")
    }
    for r_sum, r_mean in zip(out["sum"][0], out["mean"][0]):
        assert r_mean["cost"] == pytest.approx(r_mean["mean_kl"]) and r_sum["cost"] == pytest.approx(
            r_mean["mean_kl"] * r_mean["response_tokens"], rel=1e-4
        )
    summary = out["sum"][1]
    assert summary["csr"] == np.mean([r["cost"] <= 0.01 for r in out["sum"][0]]) and summary["constraint"] == "sum"
    assert summary["cost_p50"] <= summary["cost_p90"] <= summary["cost_p95"] <= max(r["cost"] for r in out["sum"][0])
