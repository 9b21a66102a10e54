"""Process-group helpers and the compute device. The only module that reads torchrun's rank environment variables
and REPA_PIPE_DEVICE (`cpu` or `cuda`: the device every stage runs on; unset, a GPU when one is present).

Every function works without torch.distributed initialised (one process: rank 0 of 1), so stages call
them unconditionally, the way EDM2's `torch_utils/distributed.py` is used.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank layout from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process if unset."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(timeout_min: float = 30.0) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU); no-op otherwise."""
    info = env_info()
    if info.world_size > 1 and not tdist.is_initialized():
        backend = "nccl" if device().type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
        _cpu_group()  # created now, by every rank in the same order, as new_group requires
    return info


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity with one process)."""
    if is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from `src` to every rank (only for small, trusted control data)."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list:
    if not is_initialized():
        return [obj]
    out: list = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def run_on_rank0(fn: Callable[[], Any]) -> Any:
    """Run fn on rank 0 and hand its result (or its RepaError) to every rank, so no rank waits forever."""
    from repa_pipe.pipeline.errors import RepaError

    result, err = None, None
    if is_main():
        try:
            result = fn()
        except RepaError as e:
            err = e
    result, err = broadcast_object((result, err))
    if err is not None:
        raise err
    return result


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (e.g. a stop signal seen by one rank). Uses the CPU (gloo)
    group, so asking every step never waits for the GPU."""
    if not is_initialized():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=_cpu_group())
    return bool(t.item())


_CPU_GROUP: Any = None


def _cpu_group() -> Any:
    global _CPU_GROUP
    if tdist.get_backend() == "gloo":
        return None  # the default group already runs on the CPU
    if _CPU_GROUP is None:
        _CPU_GROUP = tdist.new_group(backend="gloo")
    return _CPU_GROUP


DEVICE_ENV = "REPA_PIPE_DEVICE"


def device() -> torch.device:
    """cuda:LOCAL_RANK when a GPU is present, else cpu; REPA_PIPE_DEVICE=cpu|cuda chooses (the test suite pins
    cpu, so a GPU in the box changes no test's numbers; `cuda` without a GPU is refused)."""
    from repa_pipe.pipeline.errors import ConfigError

    want = os.environ.get(DEVICE_ENV, "").strip().lower()
    if want not in ("", "cpu", "cuda"):
        raise ConfigError(f"{DEVICE_ENV}={want!r}: must be cpu or cuda (or unset)")
    if want == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", env_info().local_rank)
    if want == "cuda":
        raise ConfigError(f"{DEVICE_ENV}=cuda but torch sees no CUDA device")
    return torch.device("cpu")


def shutdown() -> None:
    global _CPU_GROUP
    if is_initialized():
        tdist.destroy_process_group()
    _CPU_GROUP = None
