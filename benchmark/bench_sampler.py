"""Benchmark: the dynamic and the static sampler of common.generate side by side, on the same prompts and weights.

The student: a random-initialised Qwen2.5-Math-1.5B-shaped model built from its config on the device (no download),
float32 weights sampled under bf16 autocast as training does (--dtype), with a word-level tokenizer of Qwen's 151,665
ids (the output matrix's 271 extra rows are suppressed, as in a real run) and prompts of --prompt-tokens random
words; or --model, a model folder or 'toy' (the toy student, prompts from the toy test split). Per configuration (full
fine-tuning, then LoRA r16 adapters added to the same weights) and batch (B rows: B/G prompts x G copies, as in
training), each sampler is timed in calls that all use one cache length (the longest prompt + --max-new-tokens), so
the static sampler compiles once per (configuration, batch):
  first_call_s    the first call, 8 tokens: the static sampler compiles its decode step and records it here
  prefill_s       then a call that generates 1 token: the shared prefill of the prompts and the first token
  call_s          the median of --repeats calls of --max-new-tokens tokens (random weights never sample eos)
  decode_ms       (call_s - prefill_s) / (the longest response's tokens - 1): one decode step after warm-up
  compile_s       first_call_s - prefill_s - 7 decode steps: compilation, warm-up and CUDA-graph recording
  peak_gb         CUDA only: torch.cuda.max_memory_allocated during a timed call
  update_s        (--update) one update on the sampled batch: forward, backward and AdamW over micro-batches of
                  --micro-batch-size, token log-probs by common.token_logprobs_from_hidden; no teacher
  generate_share  call_s / (call_s + update_s): the share of a step spent generating, the teacher's scoring pass
                  left out (benchmark/bench_real_size.py times whole steps)
The two samplers' tokens are compared (greedy unless --temperature): rows identical, the mean common prefix in
tokens, and position-wise agreement. Results go to --out after every cell, so a run cut short keeps what it measured.

    python benchmark/bench_sampler.py --device cuda --out sampler.json     # benchmark/gpu_check.sh's stage 0
    OMP_NUM_THREADS=1 python benchmark/bench_sampler.py --model toy --batch-sizes 64 --max-new-tokens 64 \\
        --configs full --temperature 1 --no-update      # CPU: the toy student, as the toy runs sample
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import toy_math  # noqa: E402
from bench_real_size import SHAPES, TOKENS  # noqa: E402

WARMUP_TOKENS = 8


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a model folder or 'toy' instead of a random --shape model")
    p.add_argument("--dataset", default="toy", help="with --model: the problems whose prompts it answers")
    p.add_argument("--shape", default="qwen2.5-math-1.5b", choices=SHAPES, help="shape of the random model")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the random model (default: the shape's)")
    p.add_argument("--configs", nargs="+", default=["full", "lora"], choices=["full", "lora"], help="lora: r16")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64], help="rows per generate call")
    p.add_argument("--group-size", type=int, default=8, help="G: copies of each prompt in a batch (at most B)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of the random model's prompts")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the agreement is then meaningful)")
    p.add_argument("--samplers", nargs="+", default=["dynamic", "static"], choices=common.SAMPLERS)
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "none", "inductor", "cudagraphs", "eager"],
        help="the static sampler's compile backend: common.static_compile_config (auto: inductor with CUDA graphs on "
        "CUDA, or cudagraphs without a C compiler; none on CPU); eager: traced but not compiled, for a CPU smoke test",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed calls per cell (median)")
    p.add_argument("--update", action=argparse.BooleanOptionalAction, default=True, help="time one update per cell")
    p.add_argument("--micro-batch-size", type=int, default=8, help="the update's micro-batch (training's M)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="autocast dtype: auto is bfloat16 on CUDA and float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    return p.parse_args()


def random_student(shape: str, layers: int | None, device: torch.device):
    """(model, tokenizer): a random-initialised Qwen2 model of `shape` in float32 on `device`, and a word-level
    tokenizer with Qwen's ids: words w0..w151642, then <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos), specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|special_{i}|>" for i in range(TOKENS - 151_646)]
    vocab = {f"w{i}": i for i in range(151_643)} | {t: 151_643 + i for i, t in enumerate(specials)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    assert len(tokenizer) == TOKENS and tokenizer.eos_token_id == 151_645, (len(tokenizer), tokenizer.eos_token_id)
    hidden, inter, n_layers, heads, kv, rows, tied = SHAPES[shape]
    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers or n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=rows,
        tie_word_embeddings=tied,
        max_position_embeddings=32768,
        rope_theta=1e6,
        bos_token_id=151_643,
        eos_token_id=151_645,
        pad_token_id=151_643,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = 151_645
    return model, tokenizer


def prompts_for(args, tokenizer, batch: int) -> list[str]:
    """B rows: B/G distinct prompts, each repeated G times (consecutive, as in training)."""
    group = min(args.group_size, batch)
    if args.model:
        problems = common.load_problems(toy_math.resolve(args.dataset, "test"))
        distinct = [common.render_prompt(tokenizer, p["question"]) for p in problems[: batch // group]]
    else:
        words = torch.randint(
            0, 151_643, (batch // group, args.prompt_tokens), generator=torch.Generator().manual_seed(1)
        )
        distinct = [" ".join(f"w{i}" for i in row.tolist()) for row in words]
    return [p for p in distinct for _ in range(group)]


def timed(device: torch.device, fn):
    """(fn's result, seconds), the device synchronised around it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def measure(args, model, tokenizer, prompts, sampler: str, autocast, compile_config) -> tuple[dict, list]:
    """One sampler on one batch: the figures of the module docstring, and the timed call's (prompt, response) pairs."""
    device, batch, n = model.device, len(prompts), args.max_new_tokens
    cap = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])

    def call(tokens: int):  # every call: the cache length cap + n, so the static sampler keeps one shape
        torch.manual_seed(args.seed)
        with autocast():
            return common.generate(
                model,
                tokenizer,
                prompts,
                tokens,
                args.temperature,
                batch,
                sampler=sampler,
                max_prompt_tokens=cap + n - tokens,
                compile_config=compile_config,
            )

    _, first = timed(device, lambda: call(WARMUP_TOKENS))
    _, prefill = timed(device, lambda: call(1))
    calls = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        calls.append(timed(device, lambda: call(n)))
    pairs, seconds = calls[-1][0], statistics.median(s for _, s in calls)
    steps = max(len(r) for _, r in pairs) - 1
    decode = (seconds - prefill) / max(steps, 1)
    figures = {
        "prefill_s": prefill,
        "first_call_s": first,
        "call_s": seconds,
        "decode_ms": 1000 * decode,
        "compile_s": first - prefill - (WARMUP_TOKENS - 1) * decode,
        "decode_steps": steps,
        "mean_response_tokens": statistics.mean(len(r) for _, r in pairs),
    }
    if device.type == "cuda":
        figures["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return figures, pairs


def agreement(a: list, b: list) -> dict:
    """How far the two samplers' responses to the same rows agree."""
    prefixes, same, total = [], 0, 0
    for (_, x), (_, y) in zip(a, b):
        common_prefix = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefixes.append(common_prefix)
        same += sum(s == t for s, t in zip(x, y))
        total += max(len(x), len(y))
    return {
        "rows_identical": sum(x == y for (_, x), (_, y) in zip(a, b)) / len(a),
        "mean_common_prefix": statistics.mean(prefixes),
        "token_agreement": same / max(total, 1),
    }


def update_seconds(args, model, tokenizer, pairs, optimizer, autocast) -> float:
    """One update on `pairs` (the second of two, so that AdamW's state exists): forward, backward, AdamW step."""
    vocab = common.vocab_size(tokenizer, model)

    def step():
        model.train()
        for j in range(0, len(pairs), args.micro_batch_size):
            mb = common.pad_sequences(pairs[j : j + args.micro_batch_size], tokenizer.pad_token_id, model.device)
            tokens = mb["input_ids"][:, 1:][mb["response_mask"].bool()]
            with autocast():
                hidden = common.final_hidden(model, mb)
                logprobs = common.token_logprobs_from_hidden(
                    hidden, model.get_output_embeddings().weight, tokens, 1024, vocab
                )
            (-logprobs.sum() / len(pairs)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()

    step()
    return timed(model.device, step)[1]


def main():
    args = parse_args()
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    compile_config = common.static_compile_config(device, args.compile)
    torch.manual_seed(args.seed)
    start = time.time()
    if args.model:
        path = toy_math.resolve(args.model, "student")
        tokenizer = common.load_tokenizer(path)
        model = common.load_model(path, device, torch.float32)  # float32 weights, as the training scripts load them
    else:
        model, tokenizer = random_student(args.shape, args.layers, device)
    common.disable_dropout(model)
    with torch.no_grad(), autocast():  # the device's first kernels (cuBLAS set-up) before any timing
        model(input_ids=torch.zeros(1, 8, dtype=torch.long, device=device))
    results = {
        "machine": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "commit": common.git_commit(),
        "torch": torch.__version__,
        "model": args.model or args.shape,
        "layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "weights": "float32",
        "compile": None if compile_config is None else {k: str(v) for k, v in compile_config.to_dict().items()},
        "max_new_tokens": args.max_new_tokens,
        "group_size": args.group_size,
        "temperature": args.temperature,
        "build_s": time.time() - start,
        "cells": {},
    }
    print(
        f"{results['model']} ({results['parameters'] / 1e6:.1f}M parameters, {results['layers']} layers) on "
        f"{results['machine']}, {results['dtype']} autocast, compile {results['compile']}; "
        f"built in {results['build_s']:.0f} s",
        flush=True,
    )

    def save():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")

    save()
    for config in args.configs:
        if config == "lora":
            model = common.add_lora(model, 16, 32, common.LORA_TARGETS)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)
        for batch in args.batch_sizes:
            name = f"{config} b{batch}"
            cell = results["cells"][name] = {"rows": batch, "prompts": batch // min(args.group_size, batch)}
            prompts, outputs = prompts_for(args, tokenizer, batch), {}
            for sampler in args.samplers:
                try:
                    cell[sampler], outputs[sampler] = measure(
                        args, model, tokenizer, prompts, sampler, autocast, compile_config
                    )
                except Exception as e:  # recorded, and the next cell still runs
                    cell[sampler] = {"error": f"{type(e).__name__}: {e}"[:3000]}
                    print(f"{name} {sampler}: FAILED {cell[sampler]['error'][:500]}", flush=True)
                    continue
                f = cell[sampler]
                print(
                    f"{name} {sampler}: {f['decode_ms']:.2f} ms per decode step, first call {f['first_call_s']:.1f} s "
                    f"(compile ~{f['compile_s']:.1f} s), {f['call_s']:.2f} s a call of {f['decode_steps'] + 1} tokens",
                    flush=True,
                )
                save()
            if len(outputs) == 2:
                cell["agreement"] = agreement(*outputs.values())
                print(f"{name} agreement: {cell['agreement']}", flush=True)
            if args.update and outputs:
                try:
                    cell["update_s"] = update_seconds(
                        args, model, tokenizer, next(iter(outputs.values())), optimizer, autocast
                    )
                except torch.OutOfMemoryError as e:
                    cell["update_s"] = None
                    cell["update_error"] = f"OutOfMemoryError: {e}"[:500]
                if cell["update_s"] is not None:
                    for sampler in outputs:
                        cell[sampler]["generate_share"] = cell[sampler]["call_s"] / (
                            cell[sampler]["call_s"] + cell["update_s"]
                        )
                    shares = {s: round(cell[s]["generate_share"], 3) for s in outputs}
                    print(f"{name} update {cell['update_s']:.2f} s; generate share {shares}", flush=True)
            save()
        del optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    results = main()
    if any("error" in cell.get(s, {}) for cell in results["cells"].values() for s in common.SAMPLERS):
        sys.exit("some cells failed (their errors are above and in the results)")
