"""Tensor-parallel linear layers that own their sharding.

Each parameter is allocated at its per-rank size and carries a
``weight_loader(param, loaded_tensor, shard_id=None)`` that cuts this rank's slice out of the
full checkpoint tensor. Collectives live inside ``forward``. How a layer stores its weight
and multiplies by it is its ``LinearMethod``, chosen per layer when the model is built
(``Ops.linear``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightllm_grpc.parallel import all_reduce, tp_rank, tp_size

ShardId = str | int | None  # which part of a fused parameter a checkpoint tensor fills
# ``y = x W^T + b`` as a layer's forward calls it: ``matmul(x, weight, bias)``.
Matmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class LinearMethod:
    """How a linear layer holds its weight and multiplies by it; one is chosen per layer at build time.

    This one keeps ``weight [out, in]`` (and ``bias [out]``) unquantized in the model dtype and
    multiplies with ``F.linear`` (cuBLAS on GPU). Contract for a variant (e.g. FP8):
    ``create_weights`` registers the layer's tensors, allocated at their per-rank size (the
    layer then gives every parameter without one its own sharding ``weight_loader``);
    ``matmul`` returns the callable the layer's forward calls as ``matmul(x, weight, bias)``
    (it may close over other tensors it registered, such as scales). Both run once, in the
    layer's constructor, so a forward pays no dispatch.
    """

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, bias: bool) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        if bias:
            layer.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
        else:
            layer.register_parameter("bias", None)

    def matmul(self, layer: nn.Module) -> Matmul:
        return F.linear


UNQUANTIZED = LinearMethod()


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` that refuses to broadcast, so a wrong-shaped checkpoint tensor fails loudly."""
    if dst.shape != src.shape:
        raise ValueError(
            f"checkpoint tensor of shape {tuple(src.shape)} does not fit parameter {tuple(dst.shape)}"
        )
    dst.copy_(src)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    """``y = x W^T + b`` with ``W`` of shape ``[out_per_rank, in_per_rank]``.

    ``matmul`` is bound from ``method`` here; warm-up may swap it for a tuned one-token kernel
    on this layer alone (``matmul_tuning.tune_gemv``). ``method`` stays on the layer, for what
    asks how its weight is stored (dummy weights, tests).
    """

    def __init__(self, input_size: int, output_size: int, bias: bool, method: LinearMethod) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.method = method
        method.create_weights(self, input_size, output_size, bias)
        for param in self.parameters(recurse=False):
            if not hasattr(param, "weight_loader"):
                param.weight_loader = self.weight_loader
        self.matmul: Matmul = method.matmul(self)

    def output_rows(self, shard_id: ShardId = None) -> tuple[int, int]:
        """``(offset, size)`` of this rank's output rows that checkpoint part ``shard_id`` fills."""
        return 0, self.weight.shape[0]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        copy_checked(param.data, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank returns its slice, no collective."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, *, method: LinearMethod
    ) -> None:
        super().__init__(input_size, _divide(output_size, tp_size(), "output size"), bias, method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        size = param.shape[0]
        copy_checked(param.data, loaded.narrow(0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections stored as one (gate_up); shard_id is the index of the part."""

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False, *, method: LinearMethod
    ) -> None:
        self.output_sizes = list(output_sizes)
        for part in self.output_sizes:
            _divide(part, tp_size(), "merged output part")
        super().__init__(input_size, sum(output_sizes), bias, method=method)

    def output_rows(self, shard_id: ShardId = None) -> tuple[int, int]:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(
                f"merged linear needs a part index below {len(self.output_sizes)}, got {shard_id!r}"
            )
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        return offset, self.output_sizes[shard_id] // self.tp_size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        offset, size = self.output_rows(shard_id)
        copy_checked(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections as one column-parallel matmul, split by heads.

    When there are fewer kv heads than ranks, each kv head is replicated on
    ``tp_size / num_kv_heads`` consecutive ranks, so every rank holds exactly one.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        *,
        method: LinearMethod,
    ) -> None:
        size = tp_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, size, "number of attention heads")
        if num_kv_heads >= size:
            self.num_kv_heads = _divide(num_kv_heads, size, "number of kv heads")
            self.kv_head_start = tp_rank() * self.num_kv_heads
        else:
            if size % num_kv_heads:
                raise ValueError(
                    f"tensor-parallel size {size} is not a multiple of num_kv_heads {num_kv_heads}"
                )
            replicas = size // num_kv_heads
            self.num_kv_heads = 1
            self.kv_head_start = tp_rank() // replicas
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden_size, output_size, bias, method)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def output_rows(self, shard_id: ShardId = None) -> tuple[int, int]:
        if shard_id == "q":
            return 0, self.q_size
        if shard_id == "k":
            return self.q_size, self.kv_size
        if shard_id == "v":
            return self.q_size + self.kv_size, self.kv_size
        raise ValueError(f"qkv shard id must be 'q', 'k' or 'v', got {shard_id!r}")

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        offset, size = self.output_rows(shard_id)
        start = self.tp_rank * self.q_size if shard_id == "q" else self.kv_head_start * self.head_dim
        copy_checked(param.data.narrow(0, offset, size), loaded.narrow(0, start, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are summed with an all-reduce in
    forward, or (``reduce_output=False``) by the layer that reads them (``AddNormLinear``'s
    ``reduce_input``), which can fold the all-reduce into its own kernel."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        method: LinearMethod,
        reduce_output: bool = True,
    ) -> None:
        super().__init__(_divide(input_size, tp_size(), "input size"), output_size, bias, method)
        self.reduce_output = reduce_output and self.tp_size > 1

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if param.dim() == 1:  # the bias is not sharded
            copy_checked(param.data, loaded)
            return
        size = param.shape[1]
        copy_checked(param.data, loaded.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only rank 0 adds the bias, so the all-reduce sums it exactly once.
        y = self.matmul(x, self.weight, self.bias if self.tp_rank == 0 else None)
        return all_reduce(y) if self.reduce_output else y
