"""Tensor parallelism for the knowledge model: its shards over N ranks on torch.distributed,
with transformers' own tensor-parallel plans. Rank 0 (the driver) runs the engine; ranks
1..N-1 only run the knowledge model's forward on the steps the driver broadcasts."""
from .checks import check_tensor_parallel
from .group import TensorParallelGroup
from .runner import TensorParallelRunner

__all__ = ["TensorParallelGroup", "TensorParallelRunner", "check_tensor_parallel"]
