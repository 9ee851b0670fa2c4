"""Run by tests/test_distributed.py under `python -m torch.distributed.run --standalone --nproc_per_node 2` (gloo,
CPU): common's collectives against torch.distributed's own, asserting on every rank; prints one line per rank."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def model_with_gradients(rank: int) -> torch.nn.Module:
    """float32, float64 and bfloat16 parameters with rank-dependent gradients; `unused` has no gradient on any rank,
    `rank1_only` has one on rank 1 only."""
    model = torch.nn.Module()
    shapes = {"w0": (7, 5), "w1": (300,), "w2": (3, 4, 2), "w3": (40, 10), "w4": (11,), "w5": (2,)}
    dtypes = {"w1": torch.float64, "w2": torch.bfloat16, "w4": torch.bfloat16}
    for name, shape in shapes.items():
        model.register_parameter(name, torch.nn.Parameter(torch.zeros(shape, dtype=dtypes.get(name, torch.float32))))
    model.register_parameter("unused", torch.nn.Parameter(torch.zeros(4)))
    model.register_parameter("rank1_only", torch.nn.Parameter(torch.zeros(6)))
    model.register_parameter("frozen", torch.nn.Parameter(torch.zeros(3), requires_grad=False))
    g = torch.Generator().manual_seed(100 + rank)
    for name, p in model.named_parameters():
        if name in shapes:
            p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * 10 ** (rank - 3)).to(p.dtype)
    if rank == 1:
        model.rank1_only.grad = torch.arange(6.0)
    model.w3.grad = model.w3.grad.t().contiguous().t()  # a non-contiguous gradient, as autograd can leave one
    return model


def main() -> None:
    rank, world_size, device = common.init_distributed("cpu")
    assert world_size == 2 and device == torch.device("cpu") and common._collective_device() == device

    # the helpers: a sum and a concatenation over ranks
    x = torch.tensor([rank + 1.0, 10.0 * rank])
    assert torch.equal(common.all_reduce(x), torch.tensor([3.0, 10.0]))
    assert torch.equal(x, torch.tensor([rank + 1.0, 10.0 * rank]))  # x itself unchanged
    assert torch.equal(common.all_gather(torch.tensor([rank])), torch.tensor([0, 1]))
    common.barrier()

    # bucketed == per-parameter all-reduce, exactly
    reference, model = model_with_gradients(rank), model_with_gradients(rank)
    for name, p in reference.named_parameters():
        if p.grad is not None and name != "rank1_only":  # per parameter, as sync_gradients did before buckets
            dist.all_reduce(p.grad)
    calls, all_reduce = [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        common.sync_gradients(model, bucket_bytes=1024)  # small enough that the float32 tensors need 3 buckets
    finally:
        dist.all_reduce = all_reduce
    for name, p in model.named_parameters():
        ref = reference.get_parameter(name)
        if name in ("unused", "frozen"):
            assert p.grad is None, name
        elif name == "rank1_only":  # zeros on rank 0, then the sum: rank 1's gradient on both
            assert torch.equal(p.grad, torch.arange(6.0)), name
        else:
            assert p.grad.dtype == ref.grad.dtype and torch.equal(p.grad, ref.grad), name
    # one flag per parameter that requires grad, then the buckets of consecutive parameters, by dtype in order of
    # appearance: float32 [w0 (140 B)] [w3 (1600 B, non-contiguous)] [w5, rank1_only], float64 [w1 (2400 B)],
    # bfloat16 [w2, w4]
    assert calls == [8, 35, 400, 2 + 6, 300, 24 + 11], calls

    common.destroy_distributed()
    assert common._collective_device() is None and common.all_reduce(x) is x  # a single process again
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    main()
