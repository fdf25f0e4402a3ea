"""torchrun support: process group setup, rank info and small collective helpers."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowdose_toolkit.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Rank, world size and local rank (from torchrun's environment variables)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when started by torchrun (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=world, local_rank=local)


def check_sync_batchnorm(sync_batchnorm: bool, info: DistInfo, device: torch.device) -> None:
    """Refuse ``train.sync_batchnorm`` where torch cannot run it: distributed on a non-CUDA device."""
    if sync_batchnorm and info.enabled and device.type != "cuda":
        raise UserError(f"train.sync_batchnorm: true needs CUDA (torch's SyncBatchNorm does not train on "
                        f"{device.type}); this run has {info.world} processes on {device.type}: set "
                        "train.sync_batchnorm: false or train on GPUs")


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a SyncBatchNorm (in place below the top level).

    The parameters and buffers keep their names, so checkpoints load either way and inference (eval
    mode, running statistics) is unchanged.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def ddp_wrapper(info: DistInfo, device: torch.device, find_unused: bool,
                sync_batchnorm: bool = False) -> Callable[[nn.Module], nn.Module]:
    """A ``wrap`` function for schemes: DistributedDataParallel when distributed, identity otherwise.

    BatchNorm: by default each rank normalises with its own batch statistics; running statistics are
    broadcast from rank 0 at every forward (DDP's ``broadcast_buffers=True``) and again at each epoch's
    end, so all ranks hold identical weights and buffers. With ``sync_batchnorm`` (``train.sync_batchnorm``)
    BatchNorm layers are converted to SyncBatchNorm before wrapping: the batch statistics are computed
    over every rank's samples. That matters when a small batch is split over GPUs (the paper's batch of 4
    over 2 or 4 GPUs leaves each rank's BatchNorm one or two samples, whose statistics are noisy or, for
    one sample of a 1x1x1 feature map, undefined). It costs an all-gather per BatchNorm layer per step.
    """
    if not info.enabled:
        return lambda module: module

    def wrap(module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        if sync_batchnorm:
            module = convert_sync_batchnorm(module)
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)

    return wrap


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list by rank) on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(info: DistInfo, *modules: nn.Module | None) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if not info.enabled:
        return
    for module in modules:
        if module is not None:
            for buf in module.buffers():
                dist.broadcast(buf, src=0)


def cleanup(info: DistInfo) -> None:
    """Leave the process group together, once every rank has finished (the success path only).

    The barrier matters: gloo's worker threads free a finished collective's tensors after the caller has
    moved on, and freeing a tensor made in Python takes the GIL. A rank that left straight after its last
    collective (while rank 0 was still writing its files) could reach interpreter exit with a worker thread
    still waiting for the GIL; that thread is then killed mid-destructor and the process aborts
    ("terminate called without an active exception"). Waiting in a barrier releases the GIL so those
    threads finish, and no rank leaves while another still works. On an error no barrier is entered (the
    other ranks may never reach it): torchrun stops them.
    """
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave_process(info: DistInfo) -> None:
    """End a distributed worker whose work is done and written, skipping the interpreter's finalisation.

    After :func:`cleanup`, gloo's worker threads can still hold finished work whose tensors reference
    Python objects; if they are freed while the interpreter shuts down, taking the GIL aborts the process
    ("terminate called without an active exception", exit code -6) after a successful run (the mechanism:
    pytorch/pytorch#179291; seen here in about one two-rank test run in ten). So a distributed process
    flushes its streams and leaves with ``os._exit(0)``; a single process returns and exits as usual.
    """
    if not info.enabled:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
