"""Rank/world helpers shared by data-parallel calibration, evaluation and QAT.

quantcore never starts processes: torchrun (TorchX ``ddp``/``qat``), Ray Train or a test's
``torch.multiprocessing`` does. :func:`setup` joins the process group those launchers describe
(``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR`` in the environment, or a group that is
already initialized, as under Ray Train) and maps ``--device cuda`` to this rank's own GPU
(``cuda:LOCAL_RANK``). Without a launcher everything here is the single-process identity.

Merges are exact: integer counts are summed, histograms merged bin by bin
(:func:`quantcore.api.merge_calibration_states`), so K ranks report what one process would.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module initialized the process group (and tears it down)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v in (None, ""):
        return default
    try:
        return int(v)
    except ValueError:
        raise UserError(f"environment variable {name}={v!r} is not an integer") from None


def resolve_rank_device(device: str, local_rank: int) -> torch.device:
    """``device`` for this rank: ``cuda`` (or ``auto`` on a GPU machine) becomes ``cuda:LOCAL_RANK``
    so ranks on one node never share GPU 0; an explicit ``cuda:N`` is kept."""
    from .pipeline import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise UserError(f"--device {device}: local rank {local_rank} has no GPU of its own (this node has "
                            f"{n}); start at most {n} ranks per node (--nproc_per_node)")
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the launcher's process group (if any) and pick this rank's device.

    Backend: NCCL when the device is CUDA, gloo on CPU. A group initialized by someone else (Ray
    Train) is used as it is. Raises :class:`UserError` for an inconsistent environment.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", _ray_local_rank())
        return DistContext(rank, world, local, resolve_rank_device(device, local), owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} / WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    dev = resolve_rank_device(device, local)
    if world == 1:
        return DistContext(0, 1, local, dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kw: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if dev.type == "cuda":
        kw["device_id"] = dev
    restart = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    if restart > 0:
        # torchrun keeps one store across restarts: the dead round's rank addresses are still in it and
        # a fast rank can read them before the new rank 0 overwrites them ("Connection refused",
        # pytorch/pytorch#167288). Each round gets its own key space.
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=kw["timeout"]))
        kw.update(store=dist.PrefixStore(f"quantcore/restart-{restart}", store), rank=rank, world_size=world)
    dist.init_process_group(**kw)
    return DistContext(rank, world, local, dev, owns_group=True)


def _ray_local_rank() -> int:
    try:
        import ray.train

        return int(ray.train.get_context().get_local_rank())
    except Exception:  # not inside a Ray Train worker
        return 0


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a group)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum/max/min) of a tensor; the identity without a group."""
    if active():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            moved = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(moved, op=ops[op])
            t.copy_(moved.to(t.device))
        else:
            dist.all_reduce(t, op=ops[op])
    return t


def ordered_mean_hook(state, bucket):  # noqa: ANN001, ANN201 - DDP checks annotations: none here
    """DDP communication hook: the gradient mean with every element summed in rank order.

    DDP lays gradients out in buckets by the order they became ready in the first step of each
    process and re-lays them after it; a ring all-reduce adds each element in an order set by its
    position in the bucket. A run resumed from a checkpoint therefore reduced some steps in another
    order than the uninterrupted run, so with 3 or more ranks their weights differed in the last bits
    (2 ranks: a + b either way). Gathering every rank's bucket and adding in rank order makes the mean
    independent of the layout: a resumed CPU run ends bit-identical. Costs world-size times the
    traffic of a ring all-reduce: used with gloo (CPU), where bit-identical resume is the promise
    (GPU reductions are not bit-reproducible anyway) and models are small. Same value convention as
    DDP's default hook (each rank's gradient divided by the world size, then summed)."""
    buf = bucket.buffer()
    world = dist.get_world_size()
    buf.div_(world)
    parts = [torch.empty_like(buf) for _ in range(world)]
    fut = dist.all_gather(parts, buf, async_op=True).get_future()

    def total(_):  # noqa: ANN001, ANN202
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    return fut.then(total)


def shard(indices: Sequence[int] | int, rank_: int | None = None, world: int | None = None) -> list[int]:
    """This rank's contiguous, balanced slice of ``indices`` (disjoint, covering, sizes differ by <= 1)."""
    from .data.subsets import shard_indices

    return shard_indices(indices, rank() if rank_ is None else rank_, world_size() if world is None else world)


def epoch_batches(n: int, batch_size: int, world: int, rank_: int, seed: int, epoch: int,
                  start: int = 0) -> list[tuple[list[int], int]]:
    """This rank's training batches of one epoch as ``[(indices, global_count), ...]``.

    A seeded permutation of the ``n`` samples (or of ``indices``), the same on every rank, is cut
    into global batches of ``batch_size * world`` samples; rank ``r`` takes the ``r``-th slice of
    each. The last global batch may be short: it is split as evenly as possible, so every rank runs
    the same number of steps and every sample is seen exactly once per epoch (none duplicated or
    dropped). A rank whose slice of that batch is empty gets ``[]`` (it contributes zero loss).
    ``global_count`` is the number of samples in the whole global batch: the loss normalizer that
    makes K ranks' averaged gradient the gradient of the global batch.

    ``start``: samples of the epoch's permutation already consumed (a resumed run continues there,
    also with another world size).
    """
    if batch_size < 1 or world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world, got {batch_size}, {rank_}, {world}")
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(n, generator=g).tolist()[start:]
    n = len(perm)
    gb = batch_size * world
    out = []
    for i in range(0, n, gb):
        chunk = perm[i:i + gb]
        if len(chunk) == gb:
            out.append((chunk[rank_ * batch_size:(rank_ + 1) * batch_size], gb))
        else:
            out.append((shard(chunk, rank_, world), len(chunk)))
    return out


def broadcast_module(module: torch.nn.Module, src: int = 0) -> torch.nn.Module:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s, in place (the identity
    without a group). For a model whose weights are not loaded from anywhere (random
    initialization): without it each rank would evaluate a different model."""
    if not active():
        return module
    nccl = dist.get_backend() == "nccl"
    with torch.no_grad():
        for t in list(module.state_dict(keep_vars=True).values()):
            if not isinstance(t, torch.Tensor):
                continue
            data = t.data
            wire = data
            if nccl and data.device.type != "cuda":
                wire = data.to(torch.device("cuda", torch.cuda.current_device()))
            elif not data.is_contiguous():
                wire = data.contiguous()
            dist.broadcast(wire, src=src)
            if wire is not data:
                data.copy_(wire)
    return module


def shard_batches(indices: Sequence[int] | int, batch_size: int, rank_: int | None = None,
                  world: int | None = None) -> list[int]:
    """This rank's share of ``indices`` as a contiguous run of WHOLE batches of ``batch_size`` (the
    batch numbers split by :func:`shard`), for evaluation and calibration: each rank's loader then
    yields exactly batches a single process would, so activations and logits are bit-identical
    (kernels may round differently for another batch size) and merged figures equal one process's.
    Shares differ by at most one batch; a rank may get none. ``indices`` may be an int ``n``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    idx = list(range(indices)) if isinstance(indices, int) else list(indices)
    mine = shard(range((len(idx) + batch_size - 1) // batch_size), rank_, world)
    return idx[mine[0] * batch_size:(mine[-1] + 1) * batch_size] if mine else []
