"""
Distributed data parallel: torchrun starts one process per device and sets RANK, WORLD_SIZE and
LOCAL_RANK; without it a script is one process of rank 0 in a world of 1 and every helper here is a
no-op. Rank 0 alone logs and writes files.
"""

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import tokenflow as tf


def rank_and_world_size():
    """torchrun's RANK and WORLD_SIZE -> (rank, world size); (0, 1) without torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device, world_size):
    """Join torchrun's process group, if there is one -> the device this process uses (one GPU each)."""
    if world_size > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def destroy_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    """Wait for every rank; nothing in one process."""
    if dist.is_initialized():
        dist.barrier()


def all_sum(t):
    """A tensor summed over ranks (itself in one process), on the device it came from. NCCL
    reduces CUDA tensors only, so the sum runs on this rank's GPU there."""
    if not dist.is_initialized():
        return t
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    total = t.to(device)
    dist.all_reduce(total)
    return total.to(t.device)


def all_mean(t):
    """A tensor averaged over ranks (itself in one process)."""
    return all_sum(t.detach().clone()) / (dist.get_world_size() if dist.is_initialized() else 1)


@contextmanager
def main_first(rank):
    """Rank 0 runs the block (a download, say) before the other ranks do."""
    if rank != 0:
        barrier()
    yield
    if rank == 0:
        barrier()


def rank_block(n, rank, world_size):
    """This rank's contiguous block of n items (blocks in rank order cover 0..n-1 once)."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def rank_share(data, rank, world_size):
    """This rank's block of a held-out split (no padding), so that sums all-reduced over ranks are
    the sums over the whole split."""
    return data if world_size == 1 else torch.utils.data.Subset(data, rank_block(len(data), rank, world_size))


def wrap(model, device, world_size, compile=False):
    """The module the loss calls: compiled with compile, DDP-wrapped under torchrun (DDP averages
    gradients over ranks in backward). The raw module stays the one saved and evaluated. On CUDA its
    convs go channels_last (cuDNN's NHWC kernels; tf.channels_last keeps that layout through the norms)."""
    if device.startswith("cuda"):
        tf.channels_last(model)
    net = torch.compile(model) if compile else model
    if world_size > 1:
        net = DDP(net, device_ids=[device] if device.startswith("cuda") else None,
                  gradient_as_bucket_view=True)  # the gradients live in DDP's buckets: no second fp32 copy
    return net

