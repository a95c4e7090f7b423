"""Several processes, one run: data-parallel training through fastai's ``distrib_ctx``, which uses
Hugging Face accelerate. Launch with ``accelerate launch run.py ...`` or ``torchrun``; a plain
``hpa-fastai`` is one process and none of this applies."""
from __future__ import annotations

import contextlib
import os

import torch
# fastai.distributed imports accelerate (0.2 s): only a launch with several processes needs it
from fastai.torch_core import num_distrib, rank_distrib


def world_size() -> int:
    return max(1, num_distrib())


def is_main() -> bool:
    return rank_distrib() == 0


def init(device: torch.device) -> torch.device:
    """Start the process group (nccl on GPU, gloo on CPU) before training, so that rank 0 can share
    the run folder and the learning rate with the others. Returns this process's device."""
    if world_size() <= 1:
        return device
    from accelerate import PartialState
    from fastai.distributed import DistributedDL

    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    PartialState(cpu=device.type == "cpu")
    DistributedDL._broadcast = _broadcast_any_backend
    return device


def _broadcast_any_backend(self, t, rank):
    # fastai's DistributedDL._broadcast always moves the index list to CUDA, which nccl needs but
    # gloo (the CPU backend) cannot take; use the device the process group's backend works on.
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor(t, dtype=torch.long, device=device)
    torch.distributed.broadcast(t, rank)
    return t.cpu().tolist()


def share(obj):
    """``obj`` as rank 0 has it, on every rank."""
    if world_size() <= 1:
        return obj
    buf = [obj]
    torch.distributed.broadcast_object_list(buf, src=0)
    return buf[0]


def context(learn, device: torch.device):
    """fastai's distributed context when launched with several processes, else nothing.
    ``cpu=True`` makes accelerate pick gloo; without it, it looks for GPUs and fails on CPU. On a CPU
    BatchNorm stays plain: fastai turns it into ``SyncBatchNorm`` by default, which only runs on
    GPUs, so each process normalises with its own batch's statistics there."""
    if world_size() <= 1:
        return contextlib.nullcontext()
    on_cpu = device.type == "cpu"
    return learn.distrib_ctx(sync_bn=not on_cpu, cpu=on_cpu)


@contextlib.contextmanager
def single_process():
    """Rank 0 alone, after training: fastai gathers predictions from all processes whenever
    WORLD_SIZE is above 1, and would wait for ranks that have finished."""
    saved = os.environ.get("WORLD_SIZE")
    if saved is not None:
        os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is not None:
            os.environ["WORLD_SIZE"] = saved
