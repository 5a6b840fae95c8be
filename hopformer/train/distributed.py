"""Training on several processes with ``torch.distributed``: DDP by default, FSDP2 with ``train.parallel=fsdp``.

    torchrun --nproc-per-node 4 -m hopformer train --config configs/lra/listops.yaml
    torchrun --nproc-per-node 4 -m hopformer train --config ... --set train.parallel=fsdp

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`setup` joins the process group (NCCL on CUDA,
one GPU per process by ``LOCAL_RANK``; gloo on CPU), or uses one the caller initialised. One process (no
``torchrun``, or a world of 1) runs the single-process loop unchanged.

What a distributed run keeps equal to a single-process run with the same ``train.batch_size`` (the global batch
of an optimiser step):

- **Data.** Every rank draws the same seeded order of micro-batches (``batch_size / grad_accum`` examples, or byte
  windows) and collates each whole, padding and hidden tokens included, then keeps its contiguous block of rows
  (``micro / world`` of them): a distributed sampler whose position is the single-process one, so a checkpoint
  resumes exactly under any number of processes.
- **Gradients.** DDP averages them over ranks (FSDP2 reduce-scatters the same average), so with per-example
  losses (classification; causal LM windows of one length) a step's update is the single-process one, up to float
  summation order; the masked objective's mean over a micro-batch's hidden tokens is a mean per rank instead.
  Micro-batches before the last of a step skip the gradient synchronisation.
- **Metrics.** The training window's sums are all-reduced before every log line and checkpoint; evaluation runs
  the whole split on every rank (identical numbers; not split across ranks yet).
- **Checkpoints.** Rank 0 writes them, atomically, in the single-process format: the full weights (FSDP2's shards
  gathered) and the optimiser state keyed as a single process keys it. So a checkpoint saved under N processes
  resumes under M (single process included) and the reverse. Each rank's RNG state is saved too; under the same
  world size every rank gets its own back (dropout continues exactly), under another the data order is still
  exact and dropout masks are drawn afresh.
- **Stopping.** Time limits and signals are agreed by all ranks after every step, so all stop at the same step.

Routing attention all-reduces its k-means statistics (summed over ranks: the global batch's) and broadcasts its
initial centroids from rank 0, so the centroids stay identical on every rank.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

PARALLELS = ("ddp", "fsdp")
"""``train.parallel``: how a multi-process run shards its work."""


@dataclass
class Parallel:
    """Where this process stands in a run: its rank, the world, and how the model is parallelised.

    ``kind`` is ``"none"`` for a single process (every method then leaves things as they are), ``"ddp"`` or
    ``"fsdp"``.
    """

    kind: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # the group was initialised here (and is destroyed by :meth:`close`)

    @property
    def active(self) -> bool:
        return self.kind != "none"

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    def describe(self) -> str:
        """``DDP, world size 2 (gloo)``; ``single process``."""
        if not self.active:
            return "single process"
        name = {"ddp": "DDP", "fsdp": "FSDP2 (fully_shard)"}[self.kind]
        return f"{name}, world size {self.world} ({self.backend})"

    # -------------------------------------------------------------------------------- the model
    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: ``cuda:LOCAL_RANK``."""
        if self.active and device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model``, or FSDP2's ``fully_shard`` on every block and on the whole (in place)."""
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = next(model.parameters()).device
            return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            from hopformer.models.encoder import Block

            mesh = init_device_mesh(next(model.parameters()).device.type, (self.world,))
            for module in model.modules():
                if isinstance(module, Block):
                    fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The model itself (DDP's ``module``; FSDP2 shards in place)."""
        return getattr(model, "module", model)

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        """What evaluates: the bare module under DDP (no collectives: ranks may evaluate apart); under FSDP2 the
        sharded model, whose forward every rank runs together."""
        return model if self.kind == "fsdp" else self.unwrap(model)

    @contextlib.contextmanager
    def gradient_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Backward inside synchronises gradients only when ``sync`` (the last micro-batch of a step)."""
        if self.kind == "ddp" and not sync:
            with model.no_sync():
                yield
        elif self.kind == "fsdp":
            model.set_requires_gradient_sync(sync)
            yield
        else:
            yield

    # ------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value``, on rank 0 (None elsewhere)."""
        if not self.active:
            return [value]
        values = [None] * self.world if self.main else None
        dist.gather_object(value, values, dst=0)
        return values

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64)."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def agree(self, code: int) -> int:
        """The largest of every rank's ``code`` (a stop request anywhere stops all)."""
        if not self.active:
            return code
        tensor = torch.tensor([code], dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------------------ checkpoints
    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (CPU; FSDP2's shards gathered), None elsewhere."""
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(model, options=options)
            return state if self.main else None
        return self.unwrap(model).state_dict() if self.main else None

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The optimiser state on rank 0 as a single process keys it (parameter positions), None elsewhere."""
        if self.kind != "fsdp":
            return optimizer.state_dict() if self.main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(model, optimizer, options=options)
        if not self.main:
            return None
        positions = {name: i for i, name in enumerate(n for group in state["param_groups"] for n in group["params"])}
        groups = [{**group, "params": [positions[n] for n in group["params"]]} for group in state["param_groups"]]
        return {"state": {positions[name]: value for name, value in state["state"].items()}, "param_groups": groups}

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load full weights (every rank passes the same) into the model, sharded or not."""
        from hopformer.models.pretrained import load_weights_into

        if self.kind != "fsdp":
            load_weights_into(self.unwrap(model), state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        names: dict[int, list[str]] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            names.setdefault(id(tensor), []).append(name)
        state = dict(state)
        for group in names.values():  # a tied weight stored once
            present = [name for name in group if name in state]
            for name in group:
                if present and name not in state:
                    state[name] = state[present[0]]
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load an optimiser state keyed by parameter positions (a single process's; :meth:`full_optimizer_state`)."""
        if self.kind != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(p): name for name, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        groups = [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]]
        keyed = {"state": {order[i]: value for i, value in state["state"].items()}, "param_groups": groups}
        set_optimizer_state_dict(model, optimizer, keyed, options=StateDictOptions(full_state_dict=True))

    def close(self) -> None:
        """Leave the process group if it was joined here."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def setup(kind: str = "ddp", device: str = "auto") -> Parallel:
    """This process's :class:`Parallel`: from ``torchrun``'s environment (joining the group: NCCL when training
    on CUDA, ``device`` being ``train.device``, else gloo), from a group the caller initialised, or a single
    process."""
    if kind not in PARALLELS:
        raise ValueError(f"train.parallel={kind!r} is not known; choose one of {list(PARALLELS)}")
    owns = False
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Parallel()
        cuda = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    if dist.get_world_size() == 1:
        if owns:
            dist.destroy_process_group()
        return Parallel()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Parallel(kind, dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), owns)


def rows(parallel: Parallel, micro_batch: int) -> slice | None:
    """The rows of a (global) micro-batch this rank trains on: a contiguous block; None for a single process."""
    if not parallel.active:
        return None
    if micro_batch % parallel.world:
        raise ValueError(
            f"a micro-batch of {micro_batch} (train.batch_size / train.grad_accum) does not split over "
            f"{parallel.world} processes; make train.batch_size a multiple of train.grad_accum x {parallel.world}"
        )
    share = micro_batch // parallel.world
    return slice(parallel.rank * share, (parallel.rank + 1) * share)
