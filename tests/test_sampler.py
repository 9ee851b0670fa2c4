"""The static sampler (one preallocated KV cache, the decode step compiled once) samples exactly the tokens of the
dynamic one, and neither lets a checkpoint's generation_config reach sampling.

Compilation runs through a CPU-capable torch.compile backend that executes the traced graph as it is and counts the
graphs and the calls: the same tracing, guards and recompilations as on CUDA, without a compiler.
"""

import pytest
import torch

import common
from conftest import read_metrics, tiny_run_args

CPU = torch.device("cpu")
MAX_NEW_TOKENS = 16


@pytest.fixture
def counting_compile():
    """(a transformers CompileConfig whose backend runs each traced graph eagerly, {"graphs": compiled, "calls": run});
    dynamo's caches are emptied first, so that graphs compiled by other tests are not counted or reused."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    counts = {"graphs": 0, "calls": 0}

    def backend(graph, example_inputs, **options):
        counts["graphs"] += 1

        def run(*args):
            counts["calls"] += 1
            return graph.forward(*args)

        return run

    config = CompileConfig(backend=backend, fullgraph=True, dynamic=False)
    config._compile_all_devices = True  # transformers compiles generate's decode step on accelerators only, otherwise
    yield config, counts
    torch._dynamo.reset()


def decisive_model(toy, padding_rows: int = 0):
    """The tiny toy student (near-uniform after a few training steps) made decisive: its output layer scaled by 10 and
    an eos row that wins in some contexts and not in others (responses of mixed lengths, greedy and sampled); with
    `padding_rows`, that many extra output rows beyond the tokenizer's ids, made overwhelmingly likely, which the
    sampler must suppress. Returns (model, tokenizer)."""
    tokenizer = common.load_tokenizer(str(toy / "student"))
    model = common.load_model(str(toy / "student"), CPU, torch.float32)
    real = len(tokenizer)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(10)
        direction = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))
        head[tokenizer.eos_token_id] = 3 * head.norm(dim=1).mean() * direction / direction.norm()
    if padding_rows:
        model.resize_token_embeddings(real + padding_rows)
        norm = model.get_decoder().norm.weight
        with torch.no_grad():
            model.get_output_embeddings().weight[real:] = 50 * norm / norm.norm()
    return model, tokenizer


def prompts_of(toy, tokenizer, first: int, count: int, group_size: int = 1) -> list[str]:
    questions = [p["question"] for p in common.load_problems(str(toy / "test.jsonl"))[first : first + count]]
    return [common.render_prompt(tokenizer, q) for q in questions for _ in range(group_size)]


def sample_in_chunks(model, tokenizer, prompts, temperature, chunk, seed=7, **sampler):
    """generate() chunk by chunk, each chunk seeded from (seed, step 0, chunk index) as the training scripts do."""
    pairs = []
    for j in range(0, len(prompts), chunk):
        torch.manual_seed(common.derive_seed(seed, 0, j // chunk))
        pairs += common.generate(
            model, tokenizer, prompts[j : j + chunk], MAX_NEW_TOKENS, temperature, chunk, **sampler
        )
    return pairs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_sampler_gives_the_dynamic_samplers_tokens(tiny_toy, counting_compile, temperature):
    compile_config, counts = counting_compile
    model, tokenizer = decisive_model(tiny_toy, padding_rows=40)
    prompts = prompts_of(tiny_toy, tokenizer, 0, 6, group_size=4)  # 6 groups of G = 4 copies, consecutive
    cap = common.longest_prompt_tokens(tokenizer, common.load_problems(str(tiny_toy / "test.jsonl")))
    dynamic = sample_in_chunks(model, tokenizer, prompts, temperature, 8)  # 3 chunks of 2 groups
    static = sample_in_chunks(
        model,
        tokenizer,
        prompts,
        temperature,
        8,
        sampler="static",
        max_prompt_tokens=cap,
        compile_config=compile_config,
    )
    assert static == dynamic
    # the cases the equality covers: prompts of mixed lengths, responses ending at eos and responses cut at the cap,
    # no padding row sampled, and (sampling) copies of one prompt sampled independently
    assert len({len(p) for p, _ in static}) > 1
    lengths = [len(r) for _, r in static]
    assert min(lengths) < MAX_NEW_TOKENS == max(lengths)
    assert all(r[-1] == tokenizer.eos_token_id for r in (r for _, r in static) if len(r) < MAX_NEW_TOKENS)
    assert all(t < len(tokenizer) for _, r in static for t in r)
    if temperature > 0:
        assert all(len({tuple(r) for _, r in static[g : g + 4]}) > 1 for g in range(0, 24, 4))
    # every decode step ran through one compiled graph: per chunk, its longest response's tokens after the first
    steps = sum(max(lengths[j : j + 8]) - 1 for j in range(0, 24, 8))
    assert counts == {"graphs": 1, "calls": steps}


def test_static_sampler_pads_a_short_chunk_and_compiles_once_per_run(tiny_toy, counting_compile):
    compile_config, counts = counting_compile
    model, tokenizer = decisive_model(tiny_toy)
    static = dict(sampler="static", max_prompt_tokens=60, compile_config=compile_config)
    first, second = prompts_of(tiny_toy, tokenizer, 0, 7), prompts_of(tiny_toy, tokenizer, 7, 9)
    widths = set()
    for prompts in (first, second):  # 7 and 9 distinct prompts (evaluation), batch 4: a last chunk of 3, then of 1
        dynamic = common.generate(model, tokenizer, prompts, MAX_NEW_TOKENS, 0.0, 4)
        assert common.generate(model, tokenizer, prompts, MAX_NEW_TOKENS, 0.0, 4, **static) == dynamic
        assert len(dynamic) == len(prompts)  # the dummy rows' outputs dropped
        widths |= {max(len(p) for p, _ in dynamic[j : j + 4]) for j in range(0, len(dynamic), 4)}
    cache = common._STATIC_CACHES[model][1]
    assert len(widths) > 2 and counts["graphs"] == 1  # chunks of several padded widths, one graph
    # sampled: a short chunk's dummy rows stop after one token, so decoding lasts as long as its real rows need
    torch.manual_seed(0)
    counts["calls"] = 0
    pairs = common.generate(model, tokenizer, first[:3], MAX_NEW_TOKENS, 1.0, 4, **static)
    assert counts == {"graphs": 1, "calls": max(len(r) for _, r in pairs) - 1}
    assert common._STATIC_CACHES[model][1] is cache  # one cache for the run, emptied between calls


def test_static_sampler_refuses_a_prompt_over_its_cap(tiny_toy):
    model, tokenizer = decisive_model(tiny_toy)
    prompts = prompts_of(tiny_toy, tokenizer, 0, 2)
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    message = f"a prompt of {longest} tokens is longer than the static sampler's cap of {longest - 1} tokens"
    with pytest.raises(common.InputError, match=message):
        common.generate(model, tokenizer, prompts, 4, 0.0, 2, sampler="static", max_prompt_tokens=longest - 1)
    with pytest.raises(common.InputError, match="sampler must be one of dynamic, static, got 'vllm'"):
        common.generate(model, tokenizer, prompts, 4, 0.0, 2, sampler="vllm")


def test_eval_math_takes_the_sampler_and_answers_the_same(tiny_toy, tmp_path):
    """eval_math.py --sampler static (on CPU: the static cache, uncompiled) through common.evaluate, whose cache
    holds the longest of its prompts: 5 problems in batches of 4, scored by the teacher, the same results."""
    import json

    import tyro

    import eval_math

    results = {}
    for sampler in ("dynamic", "static"):
        argv = ["--model", str(tiny_toy / "student"), "--teacher", str(tiny_toy / "teacher")]
        argv += ["--dataset", str(tiny_toy / "test.jsonl"), "--limit", "5", "--batch-size", "4"]
        argv += ["--max-new-tokens", "12", "--sampler", sampler, "--output-dir", str(tmp_path / sampler)]
        eval_math.main(tyro.cli(eval_math.Args, args=argv))
        assert json.loads((tmp_path / sampler / "summary.json").read_text())["sampler"] == sampler
        results[sampler] = (tmp_path / sampler / "results.jsonl").read_text()
    assert results["static"] == results["dynamic"] and len(results["static"].splitlines()) == 5


@pytest.mark.parametrize("sampler", ["dynamic", "static"])
def test_a_checkpoints_generation_config_does_not_reach_sampling(tiny_toy, tmp_path, counting_compile, sampler):
    from transformers import GenerationConfig

    compile_config, _ = counting_compile
    model, tokenizer = decisive_model(tiny_toy)
    prompts = prompts_of(tiny_toy, tokenizer, 0, 2, group_size=4)
    clean = {t: sample_in_chunks(model, tokenizer, prompts, t, 8) for t in (0.0, 1.0)}  # default generation_config
    tokens = [t for _, r in clean[0.0] + clean[1.0] for t in r if t != tokenizer.eos_token_id]
    frequent = sorted(set(tokens), key=tokens.count, reverse=True)[:4]  # the tokens a ban or bias would change
    polluted = GenerationConfig(
        do_sample=True,
        temperature=0.3,
        top_k=2,
        top_p=0.5,
        min_p=0.3,
        typical_p=0.5,
        epsilon_cutoff=0.01,
        eta_cutoff=0.01,
        repetition_penalty=2.0,
        no_repeat_ngram_size=1,
        min_length=40,
        min_new_tokens=10,
        bad_words_ids=[[frequent[0]]],
        sequence_bias=[[[frequent[1]], -10.0]],
        suppress_tokens=[frequent[2]],
        begin_suppress_tokens=[frequent[3]],
        bos_token_id=model.generation_config.bos_token_id,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id,
    )
    model.generation_config = polluted
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = common.load_model(str(tmp_path), CPU, torch.float32)
    assert loaded.generation_config.min_p == 0.3 and loaded.generation_config.bad_words_ids == [[frequent[0]]]
    # what generate() does with such a checkpoint when handed only the project's settings: its fields fill the rest
    enc = tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False)
    ours = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, repetition_penalty=1.0)
    leaked = loaded.generate(**enc, generation_config=ours)[0, enc["input_ids"].shape[1] :].tolist()
    assert leaked[: len(clean[0.0][0][1])] != clean[0.0][0][1]
    options = dict(sampler="static", max_prompt_tokens=60, compile_config=compile_config) if sampler == "static" else {}
    for temperature in (0.0, 1.0):
        assert sample_in_chunks(loaded, tokenizer, prompts, temperature, 8, **options) == clean[temperature]
    assert loaded.generation_config.min_p == 0.3  # the checkpoint's own config is back after the call


@pytest.mark.slow
def test_a_toy_training_run_samples_the_same_through_the_static_sampler(tiny_toy, tmp_path, counting_compile):
    """Two steps of cmdp_distill.py with in-run evaluations, once with --sampler dynamic and once with --sampler
    static: the same metrics in every digit. On CPU the run does not compile; here common.generate is wrapped to
    compile with the test's cheap backend, so that the compiled path is what runs."""
    import tyro

    import cmdp_distill

    compile_config, counts = counting_compile
    generate, records = common.generate, {}
    try:
        common.generate = lambda *args, **kwargs: generate(*args, **{**kwargs, "compile_config": compile_config})
        for sampler in ("dynamic", "static"):
            out = tmp_path / sampler
            flags = ("--num-steps", "2", "--eval-interval", "1", "--sampler", sampler)
            argv = tiny_run_args("cmdp_distill.py", tiny_toy, out, *flags)[1:]
            cmdp_distill.main(tyro.cli(cmdp_distill.Args, args=argv))
            (run_dir,) = out.iterdir()
            records[sampler] = [
                {k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(run_dir)
            ]
    finally:
        common.generate = generate
    assert records["static"] == records["dynamic"] and len(records["static"]) >= 2
    assert counts["graphs"] == 1 and counts["calls"] > 0  # training chunks and evaluation share the one graph
