"""Multi-process training under `torchrun`: process-group setup, the DDP and FSDP2 wrappers, and the collective
helpers the training loop uses.

How a step is split (so that N processes compute what one process computes on the combined batch):
- every rank reads the same global batch from the same seeded stream and draws the objective's randomness for
  the whole global batch from the same seeded generator, then keeps its own contiguous slice of rows;
- the loss is a batch mean, so averaging the ranks' gradients (DDP's all-reduce, FSDP2's reduce-scatter) gives
  the gradient of the mean over the global batch;
- all state that decides the next step (generators, data position, step count) is identical on every rank, so a
  checkpoint written by rank 0 resumes on any world size.

The gradient pass must go through the wrapper's `forward`: the fused JVP path is one `model(z, cond, dz, dcond)`
call. A call to `model.module.<method>` with grad enabled would build a graph DDP never hooks and silently skip the
all-reduce (a known failure of MeanFlow code); `DDPModel` therefore forwards only the no-grad target methods.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

PARALLEL_MODES = ("ddp", "fsdp")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; world_size 1 means a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous slice of a global batch (checked to divide evenly by `check_batch`)."""
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size != 0:
            raise ValueError(
                f"distributed: the batch size {batch_size} must be a multiple of the world size {self.world_size}, "
                "so every rank gets the same number of rows"
            )


def init_distributed(device: torch.device | str = "cpu") -> DistInfo:
    """Joins the process group `torchrun` describes (RANK, WORLD_SIZE, LOCAL_RANK in the environment): NCCL for
    CUDA devices, gloo for the CPU. Without those variables, or with WORLD_SIZE 1, it returns a single-process
    DistInfo and creates no group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def rank_device(device: torch.device | str, info: DistInfo) -> torch.device:
    """cuda -> cuda:LOCAL_RANK under torchrun (one GPU per process); other devices unchanged."""
    device = torch.device(device)
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


# The process group `shutdown` destroyed last, its Python handle kept until the next `shutdown` or the exit (below).
_retired_group: list[Any] = []
atexit.register(_retired_group.clear)


def shutdown(info: DistInfo) -> None:
    """Destroys the process group `init_distributed` joined, keeping its Python handle until the next `shutdown` or
    the interpreter's exit. A DDP model made on the group holds it too (its C++ Reducer), and where the Reducer is
    the last holder, its destructor destroys the group with the GIL held: gloo's destructor joins its worker threads
    while one of them waits for the GIL to free the tensors of the last all-reduce, and the process hangs as the
    model goes (torch 2.11 and 2.13: `torchrun imf train` on 2 CPU processes hung at its exit in about 1 run of 5;
    not seen on 2.14). Python's handle, the last holder instead, releases the GIL as it destroys the group."""
    if info.enabled and dist.is_initialized():
        group = dist.group.WORLD
        dist.destroy_process_group()
        _retired_group[:] = [group]


class DDPModel(DistributedDataParallel):
    """DDP that also exposes what the objectives read from the model: `cfg`, `takes_tangents`, and the no-grad
    target evaluations (`fused_u`, `fused_v`, `u`, `v`). Those run on the local module without DDP's hooks, which
    is right only without a graph, so they refuse to run with grad enabled: the graded pass must be `model(...)`."""

    _ATTRIBUTES = ("cfg", "takes_tangents")
    _NO_GRAD_METHODS = ("fused_u", "fused_v", "u", "v")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self._ATTRIBUTES:
                return getattr(self.module, name)
            if name in self._NO_GRAD_METHODS:
                return _no_grad_only(getattr(self.module, name), name)
            raise


def _no_grad_only(method, name: str):
    def call(*args, **kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"distributed: model.{name}(...) was called with grad enabled under DDP; its gradients would not "
                "be all-reduced. Run the graded pass through model(z, cond, dz, dcond) (the fused path, jvp='fused')"
            )
        return method(*args, **kwargs)

    return call


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused_parameters: bool) -> DDPModel:
    """DDP over `model` (its parameters are broadcast from rank 0). `find_unused_parameters` is needed when a
    step's graded pass leaves parameters out (e.g. the v-head under the MF or FM objective)."""
    device_ids = [info.local_rank] if next(model.parameters()).device.type == "cuda" else None
    return DDPModel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def shard_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2 (`fully_shard`) in place: each U-Net block is its own unit, then the root. The fused path calls the
    blocks' `fused` method and the root's `fused_u` / `fused_v`, not only `forward`, so those are registered as
    forward methods: FSDP gathers the parameters around them too."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    blocks = [m for name, m in model.named_modules() if name and type(m).__name__ in ("ResBlock", "AttnBlock")]
    for block in blocks:
        fully_shard(block)
        if hasattr(block, "fused"):
            register_fsdp_forward_method(block, "fused")
    fully_shard(model)
    for name in ("fused_u", "fused_v"):
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def all_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a scalar over the ranks (the global batch's loss); the value itself on one process."""
    if not info.enabled:
        return value
    total = value.detach().to(torch.promote_types(value.dtype, torch.float32)).clone().reshape(1)
    dist.all_reduce(total)
    return total[0] / info.world_size


def any_rank(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """True on every rank when it is True on at least one (a signal that reached only some of them)."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def slice_rows(value: Any, rows: slice) -> Any:
    """Rows `rows` of a tensor, or of every tensor field of a dataclass (an objective's draws, their host copies
    too); None stays None."""
    if value is None:
        return None
    if torch.is_tensor(value):
        return value[rows]
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(
            value, **{f.name: slice_rows(getattr(value, f.name), rows) for f in dataclasses.fields(value)}
        )
    raise TypeError(f"slice_rows: cannot take rows of {type(value).__name__}")


# --------------------------------------------------------------------------------------------------------
# FSDP2 state: checkpoints hold whole tensors, so they load on any world size and in either mode
# --------------------------------------------------------------------------------------------------------


def full_tensors(state: Any) -> Any:
    """`state` with every DTensor shard replaced by the whole tensor (a collective under FSDP2: call it on every
    rank); plain tensors and other values are returned as they are."""
    if isinstance(state, dict):
        return {k: full_tensors(v) for k, v in state.items()}
    if hasattr(state, "full_tensor"):
        return state.full_tensor()
    return state


def shard_like(state: Any, reference: Any) -> Any:
    """Whole tensors in `state` cut into the shards of the DTensors at the same keys of `reference` (every rank
    holds the whole tensor, so each keeps its own shard); entries without a DTensor counterpart are unchanged."""
    if isinstance(state, dict) and isinstance(reference, dict):
        return {k: shard_like(v, reference[k]) if k in reference else v for k, v in state.items()}
    if torch.is_tensor(state) and hasattr(reference, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(state.to(reference.device), reference.device_mesh, reference.placements)
    return state


def shard_optimizer_state(state: dict, params: list[torch.Tensor]) -> dict:
    """An optimizer state_dict of whole tensors cut like `params` (the optimizer's parameters in order): each
    per-parameter tensor of the parameter's shape (Adam's moments) becomes that parameter's shard."""
    per_param = {
        index: {
            k: shard_like(v, params[int(index)]) if torch.is_tensor(v) and v.shape == params[int(index)].shape else v
            for k, v in values.items()
        }
        for index, values in state["state"].items()
    }
    return {**state, "state": per_param}
