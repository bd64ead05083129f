"""Training strategies: FSDP2 data parallelism through Lightning's ``ModelParallelStrategy``."""

from __future__ import annotations

from datetime import timedelta

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with all processes on one data-parallel dimension: pure
    FSDP2, the sharding :meth:`lightning_modules.EmbeddingModule.configure_model` applies.

    ``ModelParallelStrategy`` needs ``data_parallel_size × tensor_parallel_size`` = world size, and
    its ``"auto"`` sizes put a node's devices on the tensor-parallel dimension. A config file does
    not know the world size (it changes with ``--trainer.devices`` and ``--trainer.num_nodes``), so
    this strategy sets ``data_parallel_size`` = nodes × devices per node and
    ``tensor_parallel_size`` = 1 when the processes start. Unlike Lightning's ``FSDPStrategy``
    (FSDP1), it also runs on CPU processes (gloo), which is how the tests exercise sharding.

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
