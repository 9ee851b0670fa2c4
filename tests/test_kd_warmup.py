"""kd_warmup.py: the off-policy KD warm-up learns the teacher's samples, and its checkpoint is a training --student."""

import re

import pytest
import torch

import common
import kd_warmup
from conftest import read_metrics, run_script, tiny_run_args

CPU = torch.device("cpu")


def test_cross_entropy_is_the_mean_negative_log_prob_of_the_steps_tokens():
    logprobs = torch.tensor([-0.5, -2.0, -1.5], requires_grad=True)  # 3 of the step's N = 10 teacher tokens
    loss = kd_warmup.cross_entropy_loss(logprobs, num_tokens=10)
    assert loss.item() == pytest.approx(4.0 / 10)
    loss.backward()
    assert logprobs.grad.tolist() == pytest.approx([-0.1] * 3)


def warmup_args(toy, out, *extra):
    return [
        "--student",
        str(toy / "student"),
        "--teacher",
        str(toy / "teacher"),
        "--dataset",
        str(toy / "train.jsonl"),
        "--output-dir",
        str(out),
        "--prompts-per-step",
        "4",
        "--group-size",
        "2",
        "--micro-batch-size",
        "4",
        "--max-new-tokens",
        "12",
        *extra,
    ]


@pytest.mark.slow
def test_the_warm_up_moves_the_student_towards_the_teachers_samples(tiny_toy, tmp_path):
    """Five steps at a large learning rate raise the student's log-probability of held-out teacher samples. The tiny
    teacher is near-uniform, so its output layer is sharpened first: its samples then have a pattern to learn."""
    import tyro

    tokenizer = common.load_tokenizer(str(tiny_toy / "student"))
    teacher = common.load_model(str(tiny_toy / "teacher"), CPU, torch.float32).eval()
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(30)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    problems = common.load_problems(str(tiny_toy / "test.jsonl"))
    prompts = [common.render_prompt(tokenizer, p["question"]) for p in problems[:8]]
    torch.manual_seed(0)
    held = common.pad_sequences(common.generate(teacher, tokenizer, prompts, 12, 1.0, 8), tokenizer.pad_token_id, CPU)

    def held_logprob(model):  # mean log-prob of the held-out teacher samples under the model
        with torch.no_grad():
            return common.token_logprobs_from_hidden(
                common.final_hidden(model, held),
                model.get_output_embeddings().weight,
                held["input_ids"][:, 1:][held["response_mask"].bool()],
                64,
                len(tokenizer),
            ).mean()

    argv = warmup_args(tiny_toy, tmp_path / "runs", "--num-steps", "5", "--learning-rate", "1e-2")
    argv[argv.index("--teacher") + 1] = str(tmp_path / "teacher")
    run_dir = kd_warmup.main(tyro.cli(kd_warmup.Args, args=argv))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and all(r["train/loss"] > 0 for r in records)
    before = held_logprob(common.load_model(str(tiny_toy / "student"), CPU, torch.float32))
    after = held_logprob(common.load_model(str(run_dir / "checkpoint-5"), CPU, torch.float32))
    assert after > before + 0.05


@pytest.mark.slow
def test_its_checkpoint_is_the_student_of_a_training_run(tiny_toy, tmp_path):
    """The hand-off: kd_warmup.py writes a model folder that cmdp_distill.py takes as --student and trains from."""
    import safetensors.torch

    proc = run_script("kd_warmup.py", *warmup_args(tiny_toy, tmp_path / "warmup", "--num-steps", "2"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (warmup_dir,) = (tmp_path / "warmup").iterdir()
    checkpoint = warmup_dir / "checkpoint-2"
    assert f"warmed-up student: {checkpoint}" in proc.stdout
    warmed = safetensors.torch.load_file(checkpoint / "model.safetensors")
    start = safetensors.torch.load_file(tiny_toy / "student" / "model.safetensors")
    assert any(not torch.equal(warmed[k], start[k]) for k in start)  # the warm-up trained
    argv = tiny_run_args("cmdp_distill.py", tiny_toy, tmp_path / "rl", "--num-steps", "1", "--eval-interval", "0")
    argv[argv.index("--student") + 1] = str(checkpoint)
    proc = run_script(*argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rl_dir,) = (tmp_path / "rl").iterdir()
    assert read_metrics(rl_dir)[0]["step"] == 0  # the step-0 eval scored the warmed-up student
    import json

    assert json.loads((rl_dir / "config.json").read_text())["args"]["student"] == str(checkpoint)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-steps", "0"], "--num-steps must be > 0"),
        (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--prompts-per-step", "3", "--group-size", "2", "--micro-batch-size", "4"], "must divide"),
        (["--student", "/no/such/model"], "does not exist"),
    ],
)
def test_bad_input_is_rejected_with_one_sentence(flags, message):
    import tyro

    args = tyro.cli(kd_warmup.Args, args=flags)
    with pytest.raises(common.InputError, match=re.escape(message)) as info:
        kd_warmup.check_args(args)
    assert "\n" not in common.one_sentence(info.value)
