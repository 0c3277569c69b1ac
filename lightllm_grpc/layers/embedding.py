"""Vocabulary-parallel token embedding and LM head.

Each rank holds ``ceil(vocab / tp)`` rows (the last rank's tail is zero padding when the
vocabulary does not divide evenly). The embedding all-reduces the rows each rank owns; the
head all-gathers per-rank logits and drops the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightllm_grpc.layers.linear import Matmul, ShardId, copy_checked
from lightllm_grpc.parallel import all_gather_last_dim, all_reduce, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    """``reduce_output=False``: with tensor parallelism, forward returns this rank's rows only (zeros
    for tokens another rank owns), and the layer that reads them all-reduces (``AddNormLinear``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, reduce_output: bool = True) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.reduce_output = reduce_output
        self.num_embeddings = num_embeddings
        self.rows_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if loaded.shape[0] != self.num_embeddings:
            raise ValueError(
                f"vocabulary tensor has {loaded.shape[0]} rows, config says {self.num_embeddings}"
            )
        owned = self.vocab_end - self.vocab_start
        copy_checked(param.data[:owned], loaded.narrow(0, self.vocab_start, owned))
        param.data[owned:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(owned, input_ids - self.vocab_start, 0)
        y = F.embedding(local_ids, self.weight).masked_fill(~owned.unsqueeze(-1), 0)
        return all_reduce(y) if self.reduce_output else y


class ParallelLMHead(VocabParallelEmbedding):
    """``logits = hidden @ W^T`` over the full vocabulary; may share its weight with the embedding.

    Its matmul is cuBLAS (``F.linear``) under every ``Ops``; warm-up may swap it for a tuned
    one-token kernel on this layer alone, as for the linear layers.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.matmul: Matmul = F.linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last_dim(self.matmul(hidden, self.weight, None))
        return logits[..., : self.num_embeddings]
