"""transformers as the reference: greedy continuations and the near-tie rule."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

NEAR_TIE = 1e-4


def reference_greedy(
    model_dir: Path, prompts: list[list[int]], new_tokens: int
) -> list[tuple[list[int], torch.Tensor]]:
    """transformers' greedy tokens and per-step scores for each prompt (EOS ignored)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.generation_config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=None,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    out = []
    with torch.no_grad():
        for ids in prompts:
            res = model.generate(torch.tensor([ids]))
            out.append((res.sequences[0, len(ids) :].tolist(), torch.stack(res.scores)[:, 0]))
    return out


def assert_greedy_equal(label: str, ours: list[int], ref_tokens: list[int], scores: torch.Tensor) -> bool:
    """Equal, or diverging only at a genuine near-tie of the reference (returns True then)."""
    if ours == ref_tokens:
        return False
    pos = next(
        (j for j, (a, b) in enumerate(zip(ours, ref_tokens)) if a != b), min(len(ours), len(ref_tokens))
    )
    assert pos < min(len(ours), len(ref_tokens)), f"{label}: lengths differ: {len(ours)} vs {len(ref_tokens)}"
    top2 = scores[pos].topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < NEAR_TIE, (
        f"{label}: first mismatch at new token {pos}: ours {ours[pos]} vs transformers {ref_tokens[pos]}, "
        f"reference top-2 gap {gap:.3g}\nours {ours}\nref  {ref_tokens}"
    )
    return True
