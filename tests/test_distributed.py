"""Data parallelism with torchrun on CPU (gloo): two ranks give the one-process update, and one set of outputs."""

import re

import pytest
import torch

from conftest import read_metrics, run_distributed, tiny_run_args

SCRIPTS = ("cmdp_distill.py", "lagrangian_distill.py")
METHOD_KEYS = {
    "cmdp_distill.py": ("train/shaped_reward", "losses/explicit_cost_loss"),
    "lagrangian_distill.py": ("train/shaped_reward", "losses/lagrangian_penalty"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_two_ranks_update_like_one_process_on_the_whole_batch(tiny_toy, tmp_path, script):
    """The same sampled responses (every generation chunk is seeded by (seed, step, chunk), not by rank), split
    across two ranks, give the parameters of one process on the whole batch, to float tolerance."""
    import safetensors.torch

    lr = 1e-3
    weights, samples, records = {}, {}, {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        # 4 prompts x 4 responses, micro-batches of 4: each rank holds 2 whole groups
        proc = run_distributed(
            tiny_run_args(
                script,
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
                str(lr),
            ),
            tmp_path,
            nproc,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run_dir,) = out.iterdir()  # one run folder, written by rank 0 only
        weights[nproc] = safetensors.torch.load_file(run_dir / "checkpoint-1" / "model.safetensors")
        samples[nproc] = (run_dir / "samples.jsonl").read_text()
        records[nproc] = read_metrics(run_dir)
    assert samples[1] == samples[2]  # identical responses, rewards and costs
    one, two = records[1][1], records[2][1]
    for key in (
        "train/reward",
        "train/mean_kl",
        "train/cost",
        "train/csr",
        "train/response_tokens",
        "losses/policy_loss",
        *METHOD_KEYS[script],
    ):  # global metrics: reduced over ranks
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    assert records[2][0]["eval/accuracy"] == records[1][0]["eval/accuracy"]  # the eval's counts are summed over ranks
    assert two["eval/mean_kl"] == pytest.approx(
        one["eval/mean_kl"], rel=1e-4
    )  # other eval batches: other padding, fp32 sums
    start = safetensors.torch.load_file(tiny_toy / "student" / "model.safetensors")
    for name in weights[1]:
        moved = (weights[1][name] - start[name]).abs().max()
        assert moved > 0.5 * lr, name  # the step did move the weights (by about lr, AdamW's first step)
        torch.testing.assert_close(weights[2][name], weights[1][name], atol=1e-3 * lr, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_torchrun_two_steps_one_set_of_logs_and_a_resumable_checkpoint(tiny_toy, tmp_path, script):
    import common

    out = tmp_path / "runs"
    proc = run_distributed(
        tiny_run_args(script, tiny_toy, out, "--num-steps", "2", "--save-interval", "1", "--eval-interval", "0"),
        tmp_path,
        2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = out.iterdir()
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2]  # each step logged once, by rank 0
    assert proc.stdout.count("run folder:") == 1
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 2 * 4
    model = common.load_model(str(run_dir / "checkpoint-2"), torch.device("cpu"), torch.float32)
    assert model.config.model_type == "llama" and common.load_trainer_state(run_dir / "checkpoint-2")["step"] == 2
    proc = run_distributed(
        tiny_run_args(
            script, tiny_toy, out, "--num-steps", "3", "--eval-interval", "0", "--resume", str(run_dir / "checkpoint-2")
        ),
        tmp_path,
        2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_bucketed_gradient_sync_equals_the_per_parameter_all_reduce(tmp_path):
    """tests/distributed_worker.py on two gloo ranks: all_reduce, all_gather and barrier; sync_gradients with buckets
    small enough that several form (float32, float64 and bfloat16 gradients, a non-contiguous one, one None on every
    rank, one None on rank 0 only) gives exactly the gradients of torch.distributed's all-reduce of each parameter, in
    one collective per bucket; after destroy_distributed the helpers are a single process's again."""
    proc = run_distributed(["tests/distributed_worker.py"], tmp_path, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the ranks share one stdout pipe; unbuffered, print writes the text and the newline apart, so lines can interleave
    assert sorted(re.findall(r"rank \d+: ok", proc.stdout)) == ["rank 0: ok", "rank 1: ok"]


def test_a_single_process_never_joins_a_process_group(monkeypatch):
    import common

    monkeypatch.delenv("WORLD_SIZE", raising=False)  # a plain `python script.py`
    assert common.init_distributed("cpu") == (0, 1, torch.device("cpu"))
    assert not torch.distributed.is_initialized()
    x = torch.arange(3.0)
    assert common.all_reduce(x) is x and common.all_gather(x) is x
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.ones(2, 2)
    common.sync_gradients(model)
    common.barrier()
    common.destroy_distributed()
    assert torch.equal(model.weight.grad, torch.ones(2, 2)) and model.bias.grad is None
    assert not torch.distributed.is_initialized()


def test_prompts_must_split_evenly_across_ranks(monkeypatch):
    import tyro

    import cmdp_distill
    import common

    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun --nproc_per_node 3 sets; checked before any process group
    with pytest.raises(common.InputError, match=re.escape("must be a multiple of the number of processes (3)")):
        cmdp_distill.check_args(tyro.cli(cmdp_distill.Args, args=["--prompts-per-step", "16"]))
