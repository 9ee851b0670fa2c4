"""--resume is refused in one sentence, before anything loads (common.check_resume), when the folder could not continue
the run: not a checkpoint, a damaged trainer_state.pt, args.json missing or not a JSON object, flags that fix the data
order changed, or LoRA settings other than the checkpoint's (another rank, alpha or target modules; LoRA on a full
fine-tuning checkpoint), which the saved ones would otherwise override silently or the optimizer refuse in a traceback.
The checkpoints are hand-made folders holding the files that common.save_checkpoint writes (no weights: nothing loads).
"""

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import cmdp_distill
import common
import lagrangian_distill
from conftest import run_script, tiny_run_args

SAME = ("seed", "prompts_per_step", "group_size", "dataset")  # the flags that fix the data order and the batches
TARGETS = ("q_proj", "v_proj")


def make_checkpoint(folder: Path, args, lora: dict | None = None) -> Path:
    """A checkpoint folder as save_checkpoint leaves it, weights aside: args.json, trainer_state.pt and config.json or,
    for a LoRA run, adapter_config.json as PEFT writes it (target_modules a sorted list; base_model_name_or_path
    absolute)."""
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(asdict(args)))
    torch.save({"step": 1, "optimizer": {}}, folder / "trainer_state.pt")
    if lora is not None:
        (folder / "adapter_config.json").write_text(json.dumps(lora))
    else:
        (folder / "config.json").write_text("{}")  # what check_model_path looks for in a full model's folder
    return folder


@pytest.fixture
def lora_checkpoint(tmp_path) -> tuple[Path, object]:
    """A LoRA checkpoint of rank 4, alpha 8 on q_proj and v_proj, and the Args that resume it."""
    base = tmp_path / "base"
    base.mkdir()
    args = cmdp_distill.Args(lora_rank=4, lora_alpha=8.0, lora_target_modules=TARGETS)
    lora = dict(r=4, lora_alpha=8, target_modules=sorted(TARGETS), base_model_name_or_path=str(base))
    folder = make_checkpoint(tmp_path / "lora" / "checkpoint-1", args, lora)
    return folder, replace(args, resume=str(folder))


@pytest.fixture
def full_checkpoint(tmp_path) -> tuple[Path, object]:
    """A full fine-tuning checkpoint (no adapter) and the Args that resume it."""
    folder = make_checkpoint(tmp_path / "full" / "checkpoint-1", cmdp_distill.Args())
    return folder, cmdp_distill.Args(resume=str(folder))


def refusal(args) -> str:
    with pytest.raises(common.InputError) as info:
        common.check_resume(args, SAME)
    sentence = common.one_sentence(info.value)
    assert "\n" not in sentence and "Error" not in sentence.split(":")[0]  # ours, not a Python error's text
    return sentence


def test_resume_accepts_its_own_checkpoints(lora_checkpoint, full_checkpoint):
    common.check_resume(lora_checkpoint[1], SAME)
    common.check_resume(replace(lora_checkpoint[1], lora_target_modules=TARGETS[::-1]), SAME)  # a set: any order
    common.check_resume(full_checkpoint[1], SAME)
    common.check_resume(cmdp_distill.Args(), SAME)  # no --resume: nothing to check


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(lora_alpha=16.0), "the checkpoint's LoRA adapter was trained with --lora-alpha 8, not 16.0"),
        (
            dict(lora_target_modules=("q_proj", "k_proj", "v_proj")),
            "the checkpoint's LoRA adapter was trained with --lora-target-modules q_proj v_proj, "
            "not k_proj q_proj v_proj",
        ),
        (
            dict(lora_target_modules=("q_proj",)),
            "the checkpoint's LoRA adapter was trained with --lora-target-modules q_proj v_proj, not q_proj;",
        ),
    ],
)
def test_resume_refuses_another_lora_alpha_or_target_modules(lora_checkpoint, change, message):
    sentence = refusal(replace(lora_checkpoint[1], **change))
    assert sentence.startswith("--resume: " + message) and sentence.endswith("(or start a new run).")


@pytest.mark.parametrize("rank", [0, 8])
def test_resume_refuses_another_lora_rank(lora_checkpoint, rank):
    assert refusal(replace(lora_checkpoint[1], lora_rank=rank)) == (
        f"the checkpoint holds a LoRA adapter of rank 4: resume it with --lora-rank 4, not {rank}."
    )


def test_resume_refuses_lora_on_a_full_fine_tuning_checkpoint(full_checkpoint):
    folder, args = full_checkpoint
    assert refusal(replace(args, lora_rank=4)) == (
        f"--resume {str(folder)!r} is a full fine-tuning checkpoint (it holds no LoRA adapter): resume it with "
        f"--lora-rank 0, not 4, or train adapters on it in a new run (--student {folder})."
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "has no args.json, which a checkpoint of these scripts holds"),
        ('{"seed": 1,', "its args.json is not valid JSON (Expecting property name enclosed in double quotes)"),
        ("", "its args.json is not valid JSON (Expecting value)"),
        ("7", "its args.json holds a number, not an object"),
        ('["seed", 1]', "its args.json holds an array, not an object"),
        (b"\xff\xfe{}", "its args.json is not valid JSON (not UTF-8 text)"),
    ],
)
def test_resume_refuses_a_missing_or_broken_args_json(full_checkpoint, content, message):
    folder, args = full_checkpoint
    (folder / "args.json").unlink()
    if isinstance(content, str):
        (folder / "args.json").write_text(content)
    elif content is not None:
        (folder / "args.json").write_bytes(content)
    assert refusal(args).startswith(f"--resume {str(folder)!r}") and message in refusal(args)


def test_resume_refuses_a_broken_adapter_config(lora_checkpoint):
    folder, args = lora_checkpoint
    (folder / "adapter_config.json").write_text("{")
    assert "its adapter_config.json is not valid JSON" in refusal(args)


def test_resume_refuses_folders_that_are_not_checkpoints(full_checkpoint, tmp_path):
    folder, args = full_checkpoint
    sentence = refusal(replace(args, resume=str(tmp_path / "missing")))
    assert sentence.endswith("is not a checkpoint folder (it has no trainer_state.pt).")
    (folder / "trainer_state.pt").write_bytes(b"\x00" * 100)  # truncated or overwritten
    assert "its trainer_state.pt is not a file written by torch.save" in refusal(args)


@pytest.mark.parametrize(
    "change, flag", [(dict(seed=2), "--seed 1, not 2"), (dict(group_size=4), "--group-size 8, not 4")]
)
def test_resume_refuses_flags_that_fix_the_batches(full_checkpoint, change, flag):
    assert refusal(replace(full_checkpoint[1], **change)).startswith(
        f"--resume: the checkpoint was trained with {flag}"
    )


def test_resume_refuses_a_lora_checkpoint_whose_base_is_gone(lora_checkpoint, tmp_path):
    folder, args = lora_checkpoint
    (tmp_path / "base").rmdir()
    assert refusal(args) == (
        f"--resume {str(folder)!r}: adapter_config.json's base_model_name_or_path {str(tmp_path / 'base')!r} does "
        "not exist; put the base model back there, or write where it is now."
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", [cmdp_distill, lagrangian_distill], ids=lambda m: m.__name__)
def test_scripts_refuse_other_lora_flags_on_resume_in_one_sentence(tiny_toy, tmp_path, script):
    """End to end: a LoRA checkpoint resumed with another --lora-alpha, and a full one with --lora-rank 4, each
    refused in one sentence before anything loads (the hand-made checkpoints hold no weights to load)."""
    import tyro

    argv = tiny_run_args(script.__name__ + ".py", tiny_toy, tmp_path / "runs")
    args = tyro.cli(script.Args, args=argv[1:])  # the run that wrote the checkpoints
    base = str(tiny_toy / "student")
    lora = dict(r=4, lora_alpha=8, target_modules=sorted(common.LORA_TARGETS), base_model_name_or_path=base)
    lora_folder = make_checkpoint(tmp_path / "lora" / "checkpoint-1", replace(args, lora_rank=4, lora_alpha=8.0), lora)
    full_folder = make_checkpoint(tmp_path / "full" / "checkpoint-1", args)
    for folder, flags, message in (
        (lora_folder, ["--lora-rank", "4", "--lora-alpha", "16"], "trained with --lora-alpha 8, not 16.0"),
        (full_folder, ["--lora-rank", "4"], "is a full fine-tuning checkpoint (it holds no LoRA adapter)"),
    ):
        proc = run_script(*argv, "--resume", str(folder), *flags, cwd=tmp_path, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
