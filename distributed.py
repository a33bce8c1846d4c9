# Data parallel for VL-DAC (arXiv 2508.04280) under torchrun: each rank rolls out its own envs; gradients and
# logged statistics are averaged over ranks. Without torchrun this is rank 0 of 1 and every helper is a no-op.
"""torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `init` opens the process group (nccl on GPUs, gloo on CPUs)."""
import os

import torch
import torch.distributed as dist

RANK, LOCAL_RANK, WORLD_SIZE = (int(os.environ.get(name, default))
                                for name, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))


def init(use_cuda):
    if WORLD_SIZE > 1:  # one process per GPU (nccl), or per share of the CPU (gloo)
        dist.init_process_group("nccl" if use_cuda else "gloo")


def close():
    if WORLD_SIZE > 1:
        dist.destroy_process_group()


def copy_for_backend(x):
    """A copy of x on the device the backend sends from: nccl takes GPU tensors only, gloo CPU tensors."""
    return x.to(f"cuda:{LOCAL_RANK}") if dist.get_backend() == "nccl" else x.clone()


def all_ranks(x):
    """x (n, ...) of every rank, concatenated in rank order, (n * WORLD_SIZE, ...)."""
    if WORLD_SIZE == 1:
        return x
    y = copy_for_backend(x)
    parts = [torch.empty_like(y) for _ in range(WORLD_SIZE)]
    dist.all_gather(parts, y)
    return torch.cat(parts).to(x.device)


def sum_over_ranks(values):
    """{name: number} -> the same names, each summed over every rank (one all-reduce, float64)."""
    if WORLD_SIZE == 1:
        return {k: float(v) for k, v in values.items()}
    packed = copy_for_backend(torch.tensor([float(v) for v in values.values()], dtype=torch.float64))
    dist.all_reduce(packed)
    return dict(zip(values, packed.tolist()))


def average_gradients(params):
    """What DDP would do, by hand: DDP hooks a module's forward(), and ours runs generate() and a scoring
    forward of the inner model instead. One all-reduce of the flattened gradients (LoRA: a few MB)."""
    grads = [p.grad for p in params if p.grad is not None]
    if WORLD_SIZE == 1 or not grads:
        return
    flat = copy_for_backend(torch.cat([g.flatten() for g in grads]))
    dist.all_reduce(flat)
    for g, total in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(total.view_as(g).to(g.device) / WORLD_SIZE)
