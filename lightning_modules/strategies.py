"""Training strategies: FSDP2 data parallelism through Lightning's ``ModelParallelStrategy``, and the
gradient averaging that data-parallel paths outside a reducer need."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from lightning_modules.adapters import quantized_parameters
from lightning_modules.backbones.base import Backbone


def average_gradients(params: Iterable[nn.Parameter], group: dist.ProcessGroup) -> None:
    """Replace each parameter's gradient by its mean over the processes of ``group``.

    A process whose backward never reached a parameter contributes zeros, so that every process
    issues the same collectives.
    """
    params = list(params)
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    pending = [dist.all_reduce(param.grad, group=group, async_op=True) for param in params]
    for work in pending:
        work.wait()
    world = dist.get_world_size(group)
    for param in params:
        param.grad.div_(world)


def replicated_parameters(module: nn.Module) -> set[nn.Parameter]:
    """Parameters FSDP2 keeps whole on every rank: 0-d ones (a learnable τ), which ``fully_shard``
    refuses, and bitsandbytes 4-bit weights, whose quantisation state lives outside the tensor and
    would not survive sharding."""
    return quantized_parameters(module) | {param for param in module.parameters() if param.ndim == 0}


def shard_module(module: nn.Module, mesh: DeviceMesh) -> None:
    """Shard ``module`` in place with FSDP2 (``torch.distributed.fsdp.fully_shard``) over ``mesh``.

    Each block a :class:`~lightning_modules.backbones.base.Backbone` inside ``module`` lists in
    :meth:`~lightning_modules.backbones.base.Backbone.shard_units` (decoder layers, audio-encoder
    blocks) becomes its own unit, so only one block's full weights exist at a time; then every child
    with parameters (backbone, head, loss, ...) becomes a root unit for the rest (embeddings, norms,
    projector, head). ``module`` itself is not sharded: Lightning calls ``training_step`` directly,
    and FSDP2 gathers a unit's weights in its ``forward`` hooks. The :func:`replicated_parameters`
    stay whole. Sharding twice is a no-op (Lightning sets the strategy up again for every stage).
    """
    if any(isinstance(sub, FSDPModule) for sub in module.modules()):
        return
    replicated = replicated_parameters(module)
    for backbone in [sub for sub in module.modules() if isinstance(sub, Backbone)]:
        for unit in backbone.shard_units():
            fully_shard(unit, mesh=mesh, ignored_params=replicated)
    for child in module.children():
        if any(param not in replicated for param in child.parameters()):
            fully_shard(child, mesh=mesh, ignored_params=replicated)


class FSDP2Strategy(ModelParallelStrategy):
    """Pure FSDP2 data parallelism for any LightningModule of the project: the strategy shards the
    model itself (:func:`shard_module`) and averages the replicated parameters' gradients.

    Lightning's ``ModelParallelStrategy`` needs ``data_parallel_size × tensor_parallel_size`` = world
    size, and its ``"auto"`` sizes put a node's devices on the tensor-parallel dimension. A config file
    does not know the world size (it changes with ``--trainer.devices`` and ``--trainer.num_nodes``),
    so this strategy sets ``data_parallel_size`` = nodes × devices per node and
    ``tensor_parallel_size`` = 1 when the processes start. Unlike Lightning's ``FSDPStrategy`` (FSDP1),
    it also runs on CPU processes (gloo), which is how the tests exercise sharding. Parameters are
    sharded over all processes (Zhao et al., "PyTorch FSDP", VLDB 2023;
    https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html).

    FSDP2 reduces the gradients of the parameters it shards; the replicated ones (:func:`replicated_parameters`)
    are plain tensors, averaged over the ranks after each step's backward passes and before
    ``on_before_optimizer_step`` (so the non-finite guard and clipping see reduced gradients), on the
    automatic and the manual optimisation path alike.

    Args:
        save_distributed_checkpoint: each rank writes its own shard and the checkpoint is a folder
            (fast, no gathering); ``False`` gathers full weights and optimizer state into one file
            on rank 0.
        process_group_backend: ``None`` picks ``nccl`` on GPUs and ``gloo`` on CPUs.
        timeout: timeout of collective operations.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        # ModelParallelStrategy.setup insists that the LightningModule shards itself in
        # configure_model; here the strategy does it, then follows the same steps as that method.
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        shard_module(self.lightning_module, self.device_mesh["data_parallel"])
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        def closure_then_average() -> Any:
            result = closure()
            replicated = [p for p in self.lightning_module.parameters() if p.requires_grad and not isinstance(p, DTensor)]
            average_gradients(replicated, self.device_mesh["data_parallel"].get_group())
            return result

        return super().optimizer_step(optimizer, closure_then_average, model, **kwargs)
