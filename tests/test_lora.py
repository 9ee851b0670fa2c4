"""LoRA through PEFT (--lora-rank): only adapters train, step 0 is the base model, checkpoints hold the adapter alone
and reload (eval_math.py, --resume, torchrun), and the output layer and embeddings are never targets. Toy models,
and SmolLM2-135M's first 2 layers when its GGUF file is installed (conftest.smollm2)."""

import json
import os

import pytest
import torch

from conftest import (
    first_layers,
    read_metrics,
    run_distributed,
    run_script,
    step_without_and_with_checkpointing,
    tiny_run_args,
)

pytest.importorskip("peft", reason="LoRA needs PEFT: pip install -r requirements-lora.txt")

import common  # noqa: E402

SCRIPTS = ("cmdp_distill.py", "lagrangian_distill.py")
CPU = torch.device("cpu")


def _batch(model, tokenizer, seed: int = 0) -> dict:
    """Two prompts x 2 random responses of 5 tokens, padded like the training scripts' micro-batches."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [
        tokenizer(common.render_prompt(tokenizer, q), add_special_tokens=False)["input_ids"]
        for q in ("What is 2 + 3?", "Tom has 4 apples.")
    ]
    pairs = [
        (p, torch.randint(0, len(tokenizer), (5,), generator=generator).tolist()) for p in prompts for _ in range(2)
    ]
    return common.pad_sequences(pairs, tokenizer.pad_token_id, CPU)


def _logprobs(model, batch: dict, vocab: int) -> torch.Tensor:
    with torch.no_grad():  # the model scores itself as the teacher: only its log-probs are compared
        teacher_hidden = common.final_hidden(model, batch)
    return common.score(model, batch, teacher_hidden, model.get_output_embeddings().weight.detach(), 64, vocab)[1]


def _check_lora_step(folder: str, targets: tuple[str, ...] = common.LORA_TARGETS) -> None:
    """Step 0 (B = 0) scores like the base model; one AdamW step on the adapters moves them and nothing else."""
    tokenizer = common.load_tokenizer(folder)
    base = common.load_model(folder, CPU, torch.float32).eval()
    model = common.add_lora(common.load_model(folder, CPU, torch.float32), 4, 8.0, targets).eval()
    vocab = common.vocab_size(tokenizer, model)
    batch = _batch(model, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(_logprobs(model, batch, vocab), _logprobs(base, batch, vocab), atol=1e-6, rtol=0)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(".lora_A." in n or ".lora_B." in n for n in params)
    assert {n.split(".")[-4] for n in params} == set(targets)  # every target, and only them, has an adapter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    model.train()
    (-_logprobs(model, batch, vocab).sum()).backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(params)
    assert any(".lora_B." in n for n in changed)  # B leaves zero, so the policy moves


def test_lora_step_zero_is_the_base_model_and_only_adapters_move(tiny_toy):
    _check_lora_step(str(tiny_toy / "student"))
    _check_lora_step(str(tiny_toy / "student"), ("q_proj", "v_proj"))


@pytest.mark.parametrize("targets", [("lm_head",), ("embed_tokens",), ("q_proj", "model.embed_tokens")])
def test_output_layer_and_embeddings_are_refused(tiny_toy, targets):
    with pytest.raises(common.InputError, match="exact KL reads"):
        common.check_lora_args(4, 8.0, targets, "toy")
    model = common.load_model(str(tiny_toy / "student"), CPU, torch.float32)
    with pytest.raises(common.InputError, match="exact KL reads"):
        common.add_lora(model, 4, 8.0, targets)


def test_empty_or_unknown_target_modules_are_one_sentence(tiny_toy):
    for targets, shown in (((), "nothing"), (("q_proj", ""), "'q_proj' ''")):
        with pytest.raises(common.InputError, match=f"must name one module or more, none of them empty, got {shown}"):
            common.check_lora_args(4, 8.0, targets, "toy")
    common.check_lora_args(0, 8.0, (), "toy")  # full fine-tuning: no targets needed
    model = common.load_model(str(tiny_toy / "student"), CPU, torch.float32)
    with pytest.raises(
        common.InputError, match="--lora-target-modules qproj matches no module of .*; its linear layers"
    ):
        common.add_lora(model, 4, 8.0, ("q_proj", "qproj"))
    assert not any(".lora_" in n for n, _ in model.named_parameters())  # refused before any adapter went in


@pytest.mark.slow
def test_bad_lora_flags_are_one_sentence(tiny_toy, tmp_path):
    for flags, message in (
        (["--lora-rank", "-1"], "--lora-rank must be >= 0"),
        (["--lora-rank", "4", "--lora-target-modules", "q_proj", "lm_head"], "--lora-target-modules lm_head"),
    ):
        proc = run_script(
            *tiny_run_args("cmdp_distill.py", tiny_toy, tmp_path / "runs", *flags), cwd=tmp_path, timeout=120
        )
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_lora_checkpoint_reloads_evaluates_and_resumes(tiny_toy, tmp_path, script):
    out = tmp_path / "runs"
    proc = run_script(
        *tiny_run_args(
            script,
            tiny_toy,
            out,
            "--num-steps",
            "2",
            "--save-interval",
            "1",
            "--eval-interval",
            "0",
            "--lora-rank",
            "4",
            "--lora-alpha",
            "8",
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = out.iterdir()
    checkpoint = run_dir / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0
    assert os.path.isabs(config["base_model_name_or_path"]) and os.path.samefile(
        config["base_model_name_or_path"], tiny_toy / "student"
    )
    assert json.loads((checkpoint / "args.json").read_text())["lora_rank"] == 4

    # base + adapter: the trained adapter is loaded (it scores differently from the base) and nothing else differs
    tokenizer = common.load_tokenizer(str(checkpoint))
    model = common.load_model(str(checkpoint), CPU, torch.float32).eval()
    base = common.load_model(str(tiny_toy / "student"), CPU, torch.float32).eval()
    assert any(".lora_B." in n and p.abs().max() > 0 for n, p in model.named_parameters())
    base_weights = dict(base.named_parameters())
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(p, base_weights[name.replace(".base_layer", "")]), name
    batch, vocab = _batch(model, tokenizer), common.vocab_size(tokenizer, model)
    with torch.no_grad():
        assert (_logprobs(model, batch, vocab) - _logprobs(base, batch, vocab)).abs().max() > 1e-6

    proc = run_script(
        "eval_math.py",
        "--model",
        str(checkpoint),
        "--teacher",
        str(tiny_toy / "teacher"),
        "--dataset",
        str(tiny_toy / "test.jsonl"),
        "--limit",
        "4",
        "--max-new-tokens",
        "12",
        "--output-dir",
        str(tmp_path / "eval"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "eval" / "results.jsonl").is_file()

    proc = run_script(
        *tiny_run_args(script, tiny_toy, out, "--num-steps", "3", "--eval-interval", "0", "--resume", str(checkpoint)),
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and "resume it with --lora-rank 4" in proc.stderr, proc.stderr[-2000:]
    proc = run_script(
        *tiny_run_args(
            script,
            tiny_toy,
            out,
            "--num-steps",
            "3",
            "--eval-interval",
            "0",
            "--resume",
            str(checkpoint),
            "--lora-rank",
            "4",
            "--lora-alpha",
            "8",
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]
    resumed = common.load_model(str(run_dir / "checkpoint-3"), CPU, torch.float32)
    trained = dict(model.named_parameters())
    assert any(
        not torch.equal(p, trained[n]) for n, p in resumed.named_parameters() if ".lora_" in n
    )  # step 3 trained the adapter
    assert common.load_trainer_state(run_dir / "checkpoint-3")["step"] == 3


@pytest.mark.slow
def test_lora_two_ranks_update_like_one_process(tiny_toy, tmp_path):
    """torchrun with LoRA: two ranks give the one-process adapter weights, as for full fine-tuning."""
    import safetensors.torch

    weights = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        argv = tiny_run_args(
            "cmdp_distill.py",
            tiny_toy,
            out,
            "--num-steps",
            "1",
            "--prompts-per-step",
            "4",
            "--group-size",
            "4",
            "--eval-limit",
            "4",
            "--learning-rate",
            "1e-3",
            "--lora-rank",
            "4",
        )
        proc = run_distributed(argv, tmp_path, nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run_dir,) = out.iterdir()
        weights[nproc] = safetensors.torch.load_file(run_dir / "checkpoint-1" / "adapter_model.safetensors")
    assert any(".lora_B." in n and w.abs().max() > 0 for n, w in weights[1].items())
    for name in weights[1]:
        torch.testing.assert_close(weights[2][name], weights[1][name], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_lora_with_gradient_checkpointing_gives_the_same_update(tiny_toy, tmp_path):
    """Checkpointed layers with frozen base weights: the adapters still get their gradient, the same as without."""
    weights = step_without_and_with_checkpointing(tiny_toy, tmp_path, "adapter_model.safetensors", "--lora-rank", "4")
    assert any(".lora_B." in n and w.abs().max() > 0 for n, w in weights[""].items())
    for name, plain in weights[""].items():
        torch.testing.assert_close(weights["--gradient-checkpointing"][name], plain, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_smollm2_lora_step_zero_is_the_base_model_and_only_adapters_move(smollm2, tmp_path_factory):
    """The real architecture (tied embeddings, 49,152 ids): the same properties on SmolLM2-135M's first 2 layers."""
    folder = first_layers(smollm2, tmp_path_factory.mktemp("smollm2") / "first2", 2)
    assert common.load_model(str(folder), CPU, torch.float32).config.tie_word_embeddings
    _check_lora_step(str(folder))
    with pytest.raises(common.InputError, match="exact KL reads"):  # tied: the embeddings are the output layer
        common.add_lora(common.load_model(str(folder), CPU, torch.float32), 4, 8.0, ("embed_tokens",))


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_frozen_base_is_held_in_the_compute_dtype_and_the_adapters_in_float32(tiny_toy, script):
    """With LoRA and --dtype bfloat16 the scripts load the frozen base in bf16 (half its memory, and no cast of it at
    every decode step under autocast) and train float32 adapters; full fine-tuning keeps float32 weights."""
    import importlib

    import tyro

    module = importlib.import_module(script.removesuffix(".py"))
    argv = tiny_run_args(script, tiny_toy, tiny_toy / "unused", "--dtype", "bfloat16", "--device", "cpu")[1:]
    for lora, trained, frozen in (
        (["--lora-rank", "4"], {torch.float32}, {torch.bfloat16}),
        ([], {torch.float32}, set()),
    ):
        args = tyro.cli(module.Args, args=argv + lora)
        *_, student, teacher, autocast = module.load(args, 0, CPU)
        assert {p.dtype for p in student.parameters() if p.requires_grad} == trained
        assert {p.dtype for p in student.parameters() if not p.requires_grad} == frozen
        assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
        if lora:  # the bf16 base and the float32 adapters compute together under the scripts' autocast
            batch = _batch(student, common.load_tokenizer(str(tiny_toy / "student")))
            with autocast():
                assert torch.isfinite(common.final_hidden(student, batch)).all()
