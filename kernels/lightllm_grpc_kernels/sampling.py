"""Sorting-free sampling: top-k / top-p / min-p and a seeded exponential race, one program per row.

Semantics (those of the shard's torch sampler, see docs/sampling.md): ``p = softmax(logits / T)``;
order the tokens by ``p`` descending, ties by index ascending; a token at rank ``r`` is kept
when ``r < top_k``, the mass ranked before it is ``< top_p`` (``top_p >= 1``: off) and
``p >= min_p * max(p)``; the top token always stays. The token is ``argmax(p / E)`` over the
kept ones, ``E = -log(u)`` with ``u`` from the counter-based hash of (seed, counter, token id),
so a seeded row draws the same token as the torch path, alone or in any batch.

The kept set is a prefix of that order, and the race winner over any superset ``S`` of it is the
answer whenever the winner is itself kept. So the kernel never sorts: after one pass for the
softmax statistics it races over ``S`` and checks the winner (its rank and the mass before it
are a count and a sum over ``S``); a rejected winner shrinks ``S`` to the tokens ranked before
it. The first ``S`` is bounded below by the k-th largest of BLOCK per-lane maxima (at least k
tokens lie above it) and by the min-p threshold, so top-k rows usually finish in three passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import block, check_index, check_rows, on_gpu, pdl, wait_for_predecessor

_MAX_ROUNDS = 64  # a rejected winner removes itself from S at least; real rows need a few


@triton.jit
def _splitmix(x):
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _kth_lane_bound(lanes, m, top_k, NPIV: tl.constexpr, ITERS: tl.constexpr):
    """A value at most the k-th largest of ``lanes`` and close to it (-inf where fewer than k are
    finite): ITERS rounds of NPIV pivots narrow [lo, hi] keeping ``count(lanes >= lo) >= k``."""
    finite = lanes > float("-inf")
    lo = tl.min(tl.where(finite, lanes, m), 0)
    hi = m
    steps = (tl.arange(0, NPIV) + 1).to(tl.float32) / (NPIV + 1)
    for _ in tl.static_range(ITERS):
        piv = lo + (hi - lo) * steps
        ok = tl.sum((lanes[:, None] >= piv[None, :]).to(tl.int32), 0) >= top_k
        lo, hi = tl.max(tl.where(ok, piv, lo), 0), tl.min(tl.where(ok, hi, piv), 0)
    return tl.where(tl.sum(finite.to(tl.int32), 0) >= top_k, lo, float("-inf"))


@triton.jit
def _sample_kernel(
    logits_ptr,
    params_ptr,
    seed_ptr,
    counter_ptr,
    noise_ptr,
    out_ptr,
    stride_l,
    stride_p,
    stride_n,
    vocab,
    HASH: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_ROUNDS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    r = tl.program_id(0).to(tl.int64)
    row = logits_ptr + r * stride_l
    noise_row = noise_ptr + r * stride_n
    temp = tl.load(params_ptr + r * stride_p)
    top_k = tl.load(params_ptr + r * stride_p + 1).to(tl.int32)
    top_p = tl.load(params_ptr + r * stride_p + 2)
    min_p = tl.load(params_ptr + r * stride_p + 3)
    cols = tl.arange(0, BLOCK)
    # Loops keep per-lane vectors and reduce once after the loop: no block-wide sync per iteration.
    if temp <= 0:  # greedy: the first index of the largest logit
        best = tl.full((BLOCK,), float("-inf"), tl.float32)
        best_i = tl.zeros((BLOCK,), tl.int32)
        for start in range(0, vocab, BLOCK):
            x = tl.load(row + start + cols, mask=start + cols < vocab, other=float("-inf"))
            better = x > best
            best = tl.where(better, x, best)
            best_i = tl.where(better, start + cols, best_i)
        top = tl.max(best, 0)
        answer = tl.min(tl.where(best == top, best_i, vocab), 0)
        answer = tl.where(top == float("-inf"), 0, answer)
    else:
        # Pass 0: max and sum of exp per lane (online), then of the row; the lanes' maxima bound top-k.
        lanes = tl.full((BLOCK,), float("-inf"), tl.float32)
        sums = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, vocab, BLOCK):
            x = tl.load(row + start + cols, mask=start + cols < vocab, other=float("-inf")) / temp
            new = tl.maximum(lanes, x)
            safe = tl.where(new == float("-inf"), 0.0, new)
            sums = sums * tl.exp(lanes - safe) + tl.exp(x - safe)
            lanes = new
        m = tl.max(lanes, 0)
        s = tl.sum(sums * tl.exp(lanes - m), 0)
        kth = _kth_lane_bound(lanes, m, top_k, NPIV=8, ITERS=4)
        # A little under the k-th lane's p, in case a compiled exp is not monotone at the last ulp;
        # the min-p threshold stays exact, since S then stands for min-p's kept set.
        lower = tl.maximum(tl.exp(kth - m) / s * 0.999, min_p * (1.0 / s))
        if HASH:
            seed = tl.load(seed_ptr + r).to(tl.uint64, bitcast=True)
            counter = tl.load(counter_ptr + r).to(tl.uint64, bitcast=True)
            base = _splitmix(seed * 0x9E3779B97F4A7C15 + counter * 0xD1B54A32D192ED03)
        else:
            base = tl.full((), 0, tl.uint64)
        # Rejection rounds. S = tokens with p >= lower ranked before the pivot (at first: all).
        answer = tl.full((), -1, tl.int32)
        piv_i = tl.full((), -1, tl.int32)
        piv_p = tl.full((), -1.0, tl.float32)
        rounds = tl.full((), 0, tl.int32)
        while (answer < 0) & (rounds < MAX_ROUNDS):
            count = tl.zeros((BLOCK,), tl.int32)
            mass = tl.zeros((BLOCK,), tl.float32)
            best = tl.full((BLOCK,), -1.0, tl.float32)
            best_i = tl.zeros((BLOCK,), tl.int32)
            best_p = tl.zeros((BLOCK,), tl.float32)
            for start in range(0, vocab, BLOCK):
                idx = start + cols
                valid = idx < vocab
                x = tl.load(row + idx, mask=valid, other=float("-inf")) / temp
                p = tl.exp(x - m) / s
                before = (p > piv_p) | ((p == piv_p) & (idx < piv_i))
                in_s = valid & (p >= lower) & before
                count += in_s.to(tl.int32)
                mass += tl.where(in_s, p, 0.0)
                if tl.max(in_s.to(tl.int32), 0) > 0:  # top-k leaves most blocks without S: no hashing there
                    # p / -log(u): u from the hash stream of lightllm_grpc.shard.rng, or given (tests).
                    if HASH:
                        h = base + idx.to(tl.uint64) * 0x9E3779B97F4A7C15
                        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9
                        h = (h ^ (h >> 27)) * 0x94D049BB133111EB
                        # 23 bits, as rng.to_unit: with 24, the largest value rounds to 1.0.
                        u = (((h ^ (h >> 31)) >> 41).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
                    else:
                        u = tl.load(noise_row + idx, mask=valid, other=0.5)
                    key = tl.where(in_s, p / -tl.log(u), -1.0)
                    better = key > best
                    best = tl.where(better, key, best)
                    best_i = tl.where(better, idx, best_i)
                    best_p = tl.where(better, p, best_p)
            n = tl.sum(count, 0)
            total = tl.sum(mass, 0)
            top = tl.max(best, 0)
            win = tl.min(tl.where(best == top, best_i, vocab), 0)  # the first index among equal keys
            win_p = tl.max(tl.where((best == top) & (best_i == win), best_p, 0.0), 0)
            # The pivot (last round's winner) has ``n`` tokens and ``total`` mass ranked before it.
            if (piv_i >= 0) & ((n == 0) | ((n < top_k) & ((top_p >= 1.0) | (total < top_p)))):
                answer = piv_i
            if answer < 0:
                # This round's winner is kept for sure when all of S could rank before it.
                if (n <= top_k) & ((top_p >= 1.0) | (total - win_p < top_p)):
                    answer = win
                piv_i = win
                piv_p = win_p
            rounds += 1
        answer = tl.where(answer < 0, piv_i, answer)
    tl.store(out_ptr + r, answer.to(tl.int64))


def sample(
    logits: torch.Tensor,
    params: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    uniform: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """One token per row of float32 ``logits`` [B, V]; returns int64 [B].

    ``params`` [B, >=4] float32 holds each row's temperature (<= 0: greedy), top_k (V or more:
    off), top_p and min_p. The noise is the hash stream of int64 ``seeds`` / ``counters`` [B]
    (the same as ``lightllm_grpc.shard.rng.uniform``), or ``uniform`` [B, V] when given (tests).
    """
    check_rows(logits, "logits", 2, torch.float32)
    b, vocab = logits.shape
    check_rows(params, "params", 2, torch.float32)
    assert params.shape[0] == b and params.shape[1] >= 4, f"params: expected [{b}, >=4], got {params.shape}"
    check_index(seeds, "seeds", b, torch.int64)
    check_index(counters, "counters", b, torch.int64)
    if uniform is not None:
        check_rows(uniform, "uniform", 2, torch.float32)
        assert uniform.shape == logits.shape, (
            f"uniform {tuple(uniform.shape)} != logits {tuple(logits.shape)}"
        )
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b == 0:
        return out
    width = block_size or min(2048, block(vocab))
    noise = logits if uniform is None else uniform  # a valid pointer; unused when hashing
    _sample_kernel[(b,)](
        logits, params, seeds, counters, noise, out,
        logits.stride(0), params.stride(0), noise.stride(0), vocab,
        HASH=uniform is None,
        BLOCK=width,
        MAX_ROUNDS=_MAX_ROUNDS,
        num_warps=8 if on_gpu(logits) else 1,
        **pdl(logits),
    )  # fmt: skip
    return out


def sample_ref(logits: torch.Tensor, params: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`sample` given the noise ``uniform`` [B, V] (a full sort per row)."""
    temp, top_k, top_p, min_p = params[:, :4].unbind(1)
    greedy = temp <= 0
    probs = filter_ref(
        torch.softmax(logits / torch.where(greedy, 1.0, temp)[:, None], dim=-1), top_k, top_p, min_p
    )
    race = probs / -torch.log(uniform)
    return torch.where(greedy, logits.argmax(dim=-1), race.argmax(dim=-1))


def filter_ref(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """``probs`` with the tokens that top-k / top-p / min-p drop set to 0 (not renormalised)."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(probs.shape[1], device=probs.device)[None, :]
    drop = rank >= top_k[:, None]
    drop |= ((sorted_p.cumsum(dim=-1) - sorted_p) >= top_p[:, None]) & (top_p < 1)[:, None]
    drop |= sorted_p < (min_p * sorted_p[:, 0])[:, None]
    drop[:, 0] = False
    return torch.zeros_like(probs).scatter_(1, order, sorted_p.masked_fill(drop, 0.0))


@triton.jit
def _penalty_kernel(
    logits_ptr,
    counts_ptr,
    rows_ptr,
    params_ptr,
    stride_l,
    stride_c,
    stride_p,
    vocab,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    b = tl.program_id(0).to(tl.int64)
    rep = tl.load(params_ptr + b * stride_p)
    presence = tl.load(params_ptr + b * stride_p + 1)
    frequency = tl.load(params_ptr + b * stride_p + 2)
    if (rep != 1.0) | (presence != 0.0) | (frequency != 0.0):
        row = tl.load(rows_ptr + b)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(logits_ptr + b * stride_l + cols, mask=mask)
        v = tl.load(counts_ptr + row * stride_c + cols, mask=mask, other=0)
        count = (v >> 1).to(tl.float32)
        scaled = tl.where(x > 0, tl.div_rn(x, rep), x * rep)  # IEEE division, as torch
        x = tl.where(v != 0, scaled, x)  # rep 1 scales by 1: exact
        x = x - frequency * count - presence * (count > 0).to(tl.float32)
        tl.store(logits_ptr + b * stride_l + cols, x, mask=mask)


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor, params: torch.Tensor
) -> torch.Tensor:
    """Repetition / presence / frequency penalties on float32 ``logits`` [B, V], in place.

    ``counts`` [R, V] int32 holds per state row ``2 * times generated + (1 if in the prompt)``;
    ``rows`` [B] int64 picks each logits row's state row; ``params`` [B, >=3] float32 holds
    (repetition, presence, frequency). Rows whose penalties are all off are not touched.
    """
    check_rows(logits, "logits", 2, torch.float32)
    b, vocab = logits.shape
    check_rows(counts, "counts", 2, torch.int32)
    assert counts.shape[1] == vocab, f"counts: expected [R, {vocab}], got {tuple(counts.shape)}"
    check_index(rows, "rows", b, torch.int64)
    check_rows(params, "params", 2, torch.float32)
    assert params.shape[0] == b and params.shape[1] >= 3, f"params: expected [{b}, >=3], got {params.shape}"
    if b == 0:
        return logits
    width = min(4096, block(vocab))
    _penalty_kernel[(b, triton.cdiv(vocab, width))](
        logits, counts, rows, params,
        logits.stride(0), counts.stride(0), params.stride(0), vocab,
        BLOCK=width,
        num_warps=8 if on_gpu(logits) else 1,
        enable_fp_fusion=False,  # the torch path rounds after each multiply
        **pdl(logits),
    )  # fmt: skip
    return logits


def apply_penalties_ref(
    logits: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor, params: torch.Tensor
) -> torch.Tensor:
    """Torch reference of :func:`apply_penalties` (returns a new tensor)."""
    v = counts[rows]
    count = (v >> 1).float()
    rep, presence, frequency = (c[:, None] for c in params[:, :3].unbind(1))
    scaled = torch.where(logits > 0, logits / rep, logits * rep)
    out = torch.where((v != 0) & (rep != 1), scaled, logits)
    return out - frequency * count - presence * (count > 0).float()
