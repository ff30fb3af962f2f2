"""Everything that knows about ranks. Helpers are no-ops at world size 1.

Under torchrun (or a PyTorchJob pod whose command is torchrun), the per-process variables
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set; node-level variables
(PET_*) are torchrun's business, never ours. Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """Process-group setup or a collective failed (unreachable master, dead peer, timeout)."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # ranks on this node (sizes threads and loader workers)
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_context(local_rank_flag: int | None = None) -> DistContext:
    """Read the torchrun environment. `--local-rank`/`--local_rank` (older launchers) wins over
    LOCAL_RANK when given."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = local_rank_flag if local_rank_flag is not None and local_rank_flag >= 0 else int(os.environ.get("LOCAL_RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"inconsistent environment: RANK={rank} WORLD_SIZE={world}")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return DistContext(rank=rank, local_rank=local, world_size=world, local_world_size=max(1, local_world))


def select_device(request: str, local_rank: int = 0) -> torch.device:
    """'' (auto), 'cpu', '0', 'cuda', 'cuda:1' -> a torch.device; under DDP each rank takes the GPU
    of its local rank."""
    request = request.strip().lower()
    if request == "cpu":
        return torch.device("cpu")
    if request in ("", "cuda") or request.isdigit() or request.startswith("cuda"):
        if not torch.cuda.is_available():
            if request == "":
                return torch.device("cpu")
            raise DistributedError(f"--device {request}: CUDA is not available on this machine")
        if request.startswith("cuda:"):
            return torch.device(request)
        index = int(request) if request.isdigit() else local_rank
        if index >= torch.cuda.device_count():
            raise DistributedError(f"--device {request}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    raise DistributedError(f"--device {request!r}: expected '', 'cpu', a CUDA index or 'cuda:N'")


def init_distributed(ctx: DistContext, device: torch.device, timeout_s: float = 600.0) -> DistContext:
    """Join the process group (when WORLD_SIZE > 1). Collectives time out after `timeout_s`, so a
    dead peer ends every rank with an error instead of a hang."""
    if not ctx.distributed:
        return ctx
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout,
                                store=_attempt_store(ctx, timeout))
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]  # torch appends a C++ backtrace
        raise DistributedError(f"rank {ctx.rank}: cannot join the process group at {addr} within "
                               f"{timeout_s:g} s ({type(e).__name__}: {first_line})") from None
    log.info("rank %d/%d joined %s process group at %s", ctx.rank, ctx.world_size, backend, addr)
    return dataclasses.replace(ctx, backend=backend)


def _attempt_store(ctx: DistContext, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the agent's store under a prefix of its own per restart. torchrun's c10d
    rendezvous keeps one store server across restarts, and torch does not prefix the process group's
    keys by attempt: after `--max-restarts` restarted the workers, a rank could read the gloo address
    its dead predecessor left there and time out connecting to it. None: torch's env:// default."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), ctx.world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"kfyolo/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def cleanup() -> None:
    """Leave the process group. Drop DDP wrappers first (their reducer holds the group)."""
    if dist.is_available() and dist.is_initialized():
        # Gloo's worker threads free finished work objects, and freeing a tensor made in Python
        # needs the GIL. A rank with nothing left to do reaches the group's destructor, which joins
        # those threads while holding the GIL, before they got it: both wait forever (seen at exit
        # of an idle rank). A short sleep hands them the GIL first.
        time.sleep(0.2)
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if _active():
        dist.barrier()


def collective_device() -> torch.device:
    """Where tensors must live for the backend's collectives (nccl: the current GPU)."""
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Broadcast from `src`; returns a tensor on t's original device. Every rank passes a tensor
    of the same shape and dtype."""
    if not _active():
        return t
    buf = t.to(collective_device())
    dist.broadcast(buf, src)
    return buf.to(t.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, device=collective_device())
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, dst: int = 0) -> list[Any]:
    """Every rank's `obj` on rank `dst`, in rank order; other ranks get an empty list."""
    if not _active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out or []


@torch.no_grad()
def broadcast_state(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of `module` with rank `src`'s, in place (one flat
    broadcast per dtype; the modules must have the same architecture on every rank)."""
    if not _active():
        return
    tensors = list(module.state_dict().values())
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group]).to(collective_device())
        dist.broadcast(flat, src)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not _active():
        return t
    buf = t.to(collective_device()).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return (buf / dist.get_world_size()).to(t.device)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks (t itself at world size 1)."""
    if not _active():
        return t
    buf = t.to(collective_device()).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.to(t.device)


@contextlib.contextmanager
def no_sync(model: torch.nn.Module, skip_sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation steps that don't end in an optimizer step."""
    if skip_sync and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield
