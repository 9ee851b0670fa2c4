"""Benchmark: one step of each training script at real width and vocabulary: peak memory and time per phase.

Models with the Qwen2.5 architecture, random-initialised from configs built here (no download), saved to a temp
folder with a tokenizer of 151,665 ids built in-process (Qwen's 151,643 words + 22 specials; WordLevel, no chat
template), then each configuration runs the real `main()` of cmdp_distill.py or lagrangian_distill.py in a fresh
subprocess: --num-steps 1, 1 prompt x G responses of --max-new-tokens tokens (a random model almost never samples
eos, so responses run to the cap), eval of 1 problem at steps 0 and 1, and the final checkpoint.
Phases are told apart by wrapping common.generate / pad_sequences / score (under grad) / evaluate /
all_gather / save_checkpoint: generate, score (teacher states and costs), update (forward + backward + AdamW,
whose state is allocated in the first step), eval, save. Memory per phase:
  CPU : resident set size sampled every 2 ms from /proc/self/statm by a thread (peak per phase);
  CUDA: torch.cuda.max_memory_allocated, reset at each phase change.
Time per phase: the script's own perf/generate_s, perf/score_s, perf/update_s. Each peak is compared with
`predict()`, the per-rank arithmetic of docs/scaling.md.

    python benchmark/bench_real_size.py                                  # CPU: 0.5B-shaped student, 1.5B-shaped teacher
    python benchmark/bench_real_size.py --student-shape qwen2.5-math-1.5b --teacher-shape qwen2.5-7b --device cuda \\
        --dtype bfloat16 --max-new-tokens 1024 --group-size 8 --micro-batch-size 8  # what benchmark/gpu_check.sh runs
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
# Qwen2.5 configs (hidden, intermediate, layers, heads, kv heads, output rows, tied embeddings), from the public
# config.json files; the 1.5B-shaped teacher defaults to the 7B's 152,064 rows so that the widths differ as in the paper
SHAPES = {
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151_936, True),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 152_064, True),
    "qwen2.5-math-1.5b": (1536, 8960, 28, 12, 2, 151_936, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152_064, False),
    "tiny": (64, 128, 2, 4, 2, 151_936, True),  # the real vocabulary at toy width: gpu_check.sh's CPU smoke test
    "tiny-teacher": (128, 256, 2, 4, 2, 152_064, False),
}
TOKENS = 151_665  # Qwen2.5's tokenizer: 151,643 words + 22 special tokens
CONFIGS = {  # name -> (script, extra flags)
    "cmdp full": ("cmdp_distill.py", []),
    "cmdp full + grad ckpt": ("cmdp_distill.py", ["--gradient-checkpointing"]),
    "cmdp LoRA r16": ("cmdp_distill.py", ["--lora-rank", "16", "--lora-alpha", "32"]),
    "cmdp LoRA r16 + grad ckpt": (
        "cmdp_distill.py",
        ["--lora-rank", "16", "--lora-alpha", "32", "--gradient-checkpointing"],
    ),
    "lagrangian full": ("lagrangian_distill.py", []),
    "lagrangian LoRA r16": ("lagrangian_distill.py", ["--lora-rank", "16", "--lora-alpha", "32"]),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student-shape", default="qwen2.5-0.5b", choices=SHAPES)
    p.add_argument("--teacher-shape", default="qwen2.5-1.5b", choices=SHAPES)
    p.add_argument("--student-layers", type=int, default=None, help="decoder layers (default: the shape's)")
    p.add_argument("--teacher-layers", type=int, default=None, help="decoder layers (default: the shape's)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--group-size", type=int, default=2, help="responses of the one prompt")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--kl-chunk-size", type=int, default=1024)
    p.add_argument(
        "--diagnostic-interval",
        type=int,
        default=10,
        help="the scripts' --diagnostic-interval (10, their default: one more backward of a micro-batch at step 0)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="the scripts' --dtype (teacher weights, autocast)")
    p.add_argument("--work-dir", default=None, help="where the models are saved (default: a temp folder, removed)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    return p.parse_args()


def build_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with exactly TOKENS ids, like Qwen's: the 256 byte symbols, their 65,536 pairs and
    as many triples as fill 151,643 ids (each with its merge), then the special tokens at Qwen's ids 151,643.. (eos
    <|im_end|> = 151,645). It loads as Qwen2Tokenizer beside a qwen2 config, as the real one does."""
    import itertools

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = sorted(pre_tokenizers.ByteLevel.alphabet())
    pairs = [a + b for a in base for b in base]
    vocab, merges = {t: i for i, t in enumerate(base + pairs)}, [(a, b) for a in base for b in base]
    for pair, c in itertools.islice(itertools.product(pairs, base), 151_643 - len(vocab)):
        vocab[pair + c] = len(vocab)
        merges.append((pair, c))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|special_{i}|>" for i in range(TOKENS - 151_643 - 3)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert len(fast) == TOKENS and fast.eos_token_id == 151_645, (len(fast), fast.eos_token_id)
    fast.save_pretrained(folder)


def build_model(folder: Path, shape: str, layers: int | None, device: str, dtype) -> int:
    """Random-initialised Qwen2 model of `shape` saved to folder (safetensors); returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

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
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = 151_645
    model.save_pretrained(folder, safe_serialization=True)
    count = sum(p.numel() for p in model.parameters())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return count


def predict(
    n_student: int,
    n_trainable: int,
    n_teacher: int,
    shape_s,
    shape_t,
    *,
    teacher_bytes: int,
    tokens_per_mb: int,
    responses: int,
    response_tokens: int,
    chunk: int,
    lora: bool,
    autocast_copy: bool,
) -> dict:
    """Per-rank memory (bytes) by the arithmetic of docs/scaling.md, before activations: the fixed state, and the
    update phase's transient peak (gradients, the KL's chunk logits). The diagnostics hold no gradient copy."""
    (h_s, *_, rows_s, _), (h_t, *_, rows_t, _) = shape_s, shape_t
    frozen = n_student - n_trainable if lora else 0  # LoRA's frozen base, held in the compute dtype
    weights = 4 * (n_student - frozen) + teacher_bytes * frozen + teacher_bytes * n_teacher
    adam = 8 * n_trainable
    grads = 4 * n_trainable
    teacher_states = responses * response_tokens * h_t * teacher_bytes
    kl = 4 * min(chunk, tokens_per_mb) * max(rows_s, rows_t) * 4  # ~4 fp32 [chunk x vocab] copies
    head_grad = 0 if lora else 4 * rows_s * h_s  # the KL's fp32 gradient of the output layer, before it joins .grad
    autocast = 2 * n_trainable if autocast_copy else 0  # bf16 autocast's cached copy of the weights that require grad
    return {
        "weights": weights,
        "adam": adam,
        "grads": grads,
        "teacher_states": teacher_states,
        "kl_chunk": kl,
        "head_grad": head_grad,
        "autocast_copy": autocast,
        "update_peak": weights + adam + grads + teacher_states + kl + head_grad + autocast,
    }


def child(spec: dict) -> None:
    """One configuration in this process: the script's main() with phase-marking wrappers around common's calls."""
    import importlib

    import torch

    sys.path.insert(0, str(ROOT))
    import common

    cuda = spec["device"].startswith("cuda")
    state = {"phase": "load", "in_eval": False, "peaks": {}, "running": True}
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def sample():
        while state["running"]:
            value = rss()
            state["peaks"][state["phase"]] = max(state["peaks"].get(state["phase"], 0), value)
            time.sleep(0.002)

    def mark(phase: str) -> None:
        if phase == state["phase"]:
            return
        if cuda:
            torch.cuda.synchronize()
            old = state["phase"]
            state["peaks"][old] = max(state["peaks"].get(old, 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        state["phase"] = phase

    def wrap(name: str, phase: str, when=lambda *a, **k: True, after: str | None = None):
        original = getattr(common, name)

        def wrapped(*args, **kwargs):
            if not state["in_eval"] and when(*args, **kwargs):
                mark(phase)
            if name == "evaluate":
                state["in_eval"] = True
            try:
                return original(*args, **kwargs)
            finally:
                if name == "evaluate":
                    state["in_eval"] = False
                if after:
                    mark(after)

        setattr(common, name, wrapped)

    wrap("evaluate", "eval", after="other")
    wrap("generate", "generate")
    wrap("pad_sequences", "score")
    wrap("score", "update", when=lambda *a, **k: torch.is_grad_enabled())
    wrap("all_gather", "other")
    wrap("save_checkpoint", "save", after="other")
    thread = threading.Thread(target=sample, daemon=True)
    if not cuda:
        thread.start()
    module = importlib.import_module(spec["script"].removesuffix(".py"))
    argv = [
        "--student",
        spec["student"],
        "--teacher",
        spec["teacher"],
        "--dataset",
        spec["data"],
        "--eval-dataset",
        spec["data"],
        "--output-dir",
        spec["output_dir"],
        "--num-steps",
        "1",
        "--prompts-per-step",
        "1",
        "--group-size",
        str(spec["group_size"]),
        "--micro-batch-size",
        str(spec["micro_batch_size"]),
        "--max-new-tokens",
        str(spec["max_new_tokens"]),
        "--eval-limit",
        "1",
        "--eval-interval",
        "0",
        "--kl-chunk-size",
        str(spec["kl_chunk_size"]),
        "--device",
        spec["device"],
        "--dtype",
        spec["dtype"],
        "--budget",
        "0.05",
        "--diagnostic-interval",
        str(spec["diagnostic_interval"]),
        *spec["flags"],
    ]
    import tyro

    args = tyro.cli(module.Args, args=argv)
    start = time.time()
    run_dir = module.main(args)
    mark("end")
    state["running"] = False
    wall = time.time() - start
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    from safetensors import safe_open

    trainable = 0  # the checkpoint's tensors: the adapters with LoRA, else the student (a tied matrix saved once)
    for path in (run_dir / "checkpoint-1").glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            trainable += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(
        "RESULT "
        + json.dumps(
            {
                "peaks": {k: v for k, v in state["peaks"].items() if k != "end"},
                "wall_s": wall,
                "generate_s": record["perf/generate_s"],
                "score_s": record["perf/score_s"],
                "update_s": record["perf/update_s"],
                "response_tokens": record["train/response_tokens"],
                "trainable": trainable,
            }
        ),
        flush=True,
    )


def main():
    a = parse_args()
    if a.child:
        return child(json.loads(a.child))
    import torch

    sys.path.insert(0, str(ROOT))
    import common

    work = Path(a.work_dir or tempfile.mkdtemp(prefix="bench_real_size_"))
    work.mkdir(parents=True, exist_ok=True)
    teacher_dtype = common.resolve_dtype(a.dtype, torch.device(a.device))
    t0 = time.time()
    n_student = build_model(work / "student", a.student_shape, a.student_layers, a.device, torch.float32)
    n_teacher = build_model(work / "teacher", a.teacher_shape, a.teacher_layers, a.device, teacher_dtype)
    build_tokenizer(work / "student")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(work / "student" / name, work / "teacher" / name)
    (work / "data.jsonl").write_text(
        json.dumps({"question": "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16", "answer": "7"}) + "\n"
    )
    build_s = time.time() - t0
    print(
        f"built student {n_student / 1e9:.3f}B and teacher {n_teacher / 1e9:.3f}B params "
        f"in {build_s:.0f} s under {work}",
        flush=True,
    )
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)",
        "commit": common.git_commit(),
        "torch": torch.__version__,
        "student_shape": a.student_shape,
        "teacher_shape": a.teacher_shape,
        "student_layers": a.student_layers or SHAPES[a.student_shape][2],
        "teacher_layers": a.teacher_layers or SHAPES[a.teacher_shape][2],
        "n_student": n_student,
        "n_teacher": n_teacher,
        "group_size": a.group_size,
        "micro_batch_size": a.micro_batch_size,
        "max_new_tokens": a.max_new_tokens,
        "device": a.device,
        "dtype": a.dtype,
        "build_s": build_s,
        "runs": {},
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for name in a.configs:
        script, flags = CONFIGS[name]
        spec = {
            "script": script,
            "flags": flags,
            "student": str(work / "student"),
            "teacher": str(work / "teacher"),
            "data": str(work / "data.jsonl"),
            "output_dir": str(work / "runs" / name.replace(" ", "_").replace("+", "")),
            "group_size": a.group_size,
            "micro_batch_size": a.micro_batch_size,
            "max_new_tokens": a.max_new_tokens,
            "kl_chunk_size": a.kl_chunk_size,
            "device": a.device,
            "dtype": a.dtype,
            "diagnostic_interval": a.diagnostic_interval,
        }
        t = time.time()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env, cwd=work
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            results["runs"][name] = {"error": proc.stderr[-3000:]}
            print(f"{name}: FAILED\n{proc.stderr[-3000:]}", flush=True)
            if a.out:
                Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
            continue
        run = json.loads(lines[-1].removeprefix("RESULT "))
        lora = "LoRA" in name
        run["predicted"] = predict(
            n_student,
            run["trainable"],
            n_teacher,
            SHAPES[a.student_shape],
            SHAPES[a.teacher_shape],
            teacher_bytes=teacher_dtype.itemsize,
            tokens_per_mb=a.micro_batch_size * int(run["response_tokens"]),
            responses=a.group_size,
            response_tokens=int(run["response_tokens"]),
            chunk=a.kl_chunk_size,
            lora=lora,
            autocast_copy=a.device.startswith("cuda") and teacher_dtype == torch.bfloat16,
        )
        run["process_s"] = time.time() - t
        results["runs"][name] = run
        peaks = " ".join(f"{k} {v / GB:.2f}" for k, v in run["peaks"].items())
        print(
            f"{name}: peak GB {peaks} | "
            f"predicted update peak {run['predicted']['update_peak'] / GB:.2f} + activations | "
            f"generate {run['generate_s']:.1f} s score {run['score_s']:.1f} s update {run['update_s']:.1f} s | "
            f"{run['response_tokens']:.0f} tokens/response | trainable {run['trainable'] / 1e6:.2f}M",
            flush=True,
        )
        shutil.rmtree(spec["output_dir"], ignore_errors=True)
        if a.out:  # after every configuration, so that a run cut short by a time limit keeps what it measured
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    if not a.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    results = main()
    if results and any("error" in run for run in results["runs"].values()):
        sys.exit("some configurations failed (their errors are above and in the results)")
