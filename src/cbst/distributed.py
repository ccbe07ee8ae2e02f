"""Several processes of one command under ``torchrun``: PyTorch's own ``torch.distributed``.

``torchrun --nproc-per-node N -m cbst COMMAND ...`` starts N copies of a command and gives each
the variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
:func:`init` joins them into one process group: gloo for tensors on the CPU and, where CUDA is
available, NCCL for tensors on the GPU, one GPU per process (the one of its ``LOCAL_RANK``).

Without torchrun's variables nothing is initialised and every helper here is the identity of a
one-process run: rank 0 of 1, barriers return at once, reductions leave their tensor unchanged,
a shard is the whole index range and :func:`data_parallel` returns the model itself.

The conventions the commands follow (docs/distributed.md): every process reads the inputs
and checks them; work is split by :func:`shard` (images) or by :class:`cbst.training.EpochBatches`
(each process a slice of every global batch); statistics are summed over the processes; files
are written by the main process only (:func:`write_once`), except the per-image outputs, which
each process writes for its own images.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cbst.errors import ConfigError

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""The variables torchrun sets in every process it starts."""
COMMUNICATION_ERRORS: tuple[type[Exception], ...] = (dist.DistError,) if dist.is_available() else ()
"""What a collective operation or the rendezvous raises when it fails (e.g. a peer is gone)."""


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables)."""
    return all(name in os.environ for name in ENVIRONMENT)


def initialized() -> bool:
    """Whether the process group exists (after :func:`init` under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the job (0 without torchrun)."""
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """Number of processes in the job (1 without torchrun)."""
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """Whether this is the process that writes the run's files and prints (rank 0)."""
    return rank() == 0


def describe() -> str:
    """``rank R/N`` under torchrun, empty in a one-process run (for prefixing messages)."""
    return f"rank {rank()}/{world_size()}" if initialized() else ""


def init() -> None:
    """Join the process group torchrun's variables describe; nothing without them.

    On a machine with CUDA this process is bound to GPU ``LOCAL_RANK`` first, so that the
    device ``cuda`` (what ``--device auto`` picks) means that GPU in every process. With more
    processes on a machine than it has GPUs, the group is gloo's alone in every process (one
    GPU per process is NCCL's rule).
    """
    if not launched() or initialized():
        return
    local = int(os.environ["LOCAL_RANK"])
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available() and processes <= torch.cuda.device_count():
        torch.cuda.set_device(local)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")


def shutdown(*, finished: bool = False) -> None:
    """Leave the process group (no-op when there is none).

    ``finished``: every process ended its command normally, so all of them first meet at a
    barrier; without it a process that tears the group down while another is still in its last
    collective can make that one abort at exit. After an error there is no barrier (the others
    may never reach it): torchrun stops them.
    """
    if initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process has reached this point."""
    if world_size() > 1:
        dist.barrier()


def write_once(write: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """Run ``write(*args, **kwargs)`` on the main process only, then wait for it in every process.

    For files that every process reads afterwards (a checkpoint, the run's configuration).
    """
    if is_main():
        write(*args, **kwargs)
    barrier()


class FailedOnMain(Exception):
    """Raised in the other processes of a job when a check that the main process alone runs
    (:func:`checked_on_main`) failed there: the main process reports it, the others exit 2."""


def checked_on_main(check: Callable[[], object]) -> None:
    """Run ``check`` (which raises to refuse) on the main process only, then tell every process.

    For what the main process alone owns, the run's lock: read by every process, the lock the
    main one has just taken would stop the others, and a refusal would be printed once a process.
    """
    if world_size() == 1:
        check()
        return
    failure: Exception | None = None
    if is_main():
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - raised again below, once every process knows
            failure = exc
    failed = torch.tensor([int(failure is not None)])
    dist.broadcast(failed, src=0)
    if failure is not None:
        raise failure
    if failed.item():
        raise FailedOnMain()


def shard(count: int) -> list[int]:
    """This process's share of ``count`` items: every ``world_size``-th index from its rank."""
    return list(range(rank(), count, world_size()))


def owner(index: int, world: int) -> tuple[int, int]:
    """(rank, position in that rank's share) of item ``index`` split by :func:`shard` over ``world``
    processes: where a process-split output, such as a kept probability cache, holds it."""
    return index % world, index // world


def shard_dataset(dataset: Any) -> Any:
    """This process's share of a ``SegmentationDataset`` (see :func:`shard`); itself in one process."""
    return dataset if world_size() == 1 else dataset.subset(shard(len(dataset)))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a floating-point ``tensor`` over all processes, in place; returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process the main process's buffers (e.g. batch-norm running statistics).

    After a training step each process has updated them from its own slice of the batch; this
    makes the models identical again, equal to the checkpoint the main process writes.
    """
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    """``--sync-bn`` with several processes needs CUDA (PyTorch's SyncBatchNorm has no CPU path)."""
    if sync_bn and world_size() > 1 and device.type != "cuda":
        raise ConfigError(f"--sync-bn needs CUDA devices (SyncBatchNorm runs on GPUs only), got {device}")


def data_parallel(model: nn.Module, device: torch.device, *, sync_bn: bool = False) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when there are several processes.

    DDP averages the gradients over the processes, bucketed and overlapped with the backward
    pass. With ``sync_bn`` the batch-norm layers are first converted (in place, keeping their
    parameters, so the optimiser and checkpoints are unaffected) to SyncBatchNorm, which
    normalises with the statistics of the global batch.
    """
    if world_size() == 1:
        return model
    check_sync_bn(sync_bn, device)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type != "cuda":
        return nn.parallel.DistributedDataParallel(model)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return nn.parallel.DistributedDataParallel(model, device_ids=[index])
