"""Rejection sampling of drafts (Leviathan et al. 2023; Chen et al. 2023): exact sampling from the target.

Draft x_i (proposed with probability q_i(x_i)) is accepted with probability min(1, p_i(x_i) / q_i(x_i)),
p_i the target's distribution at that position after temperature, top-k, top-p and min-p; at the first
rejection the token is drawn from max(p_i - q_i, 0) normalised and the rest is dropped; when every draft
is accepted one more token is drawn from p_k. The tokens produced are distributed exactly as sampling the
target one token at a time. A proposer that drafts deterministically (n-gram lookup) has q = one-hot, so
acceptance is p_i(x_i) and the residual is p_i without x_i.
"""

from __future__ import annotations

import torch

from effllm.engine.sampler import draw_from


def rejection_sample(
    target_probs: torch.Tensor,
    drafts: list[int],
    uniforms: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
) -> list[int]:
    """The accepted drafts, then the corrected or bonus token.

    target_probs [k + 1, V] (rows sum to 1), drafts [k], uniforms [k + 1] in [0, 1) (one per acceptance
    test, the last for the final draw), draft_probs [k, V] or None for one-hot drafts.
    """
    k = len(drafts)
    if target_probs.shape[0] != k + 1 or uniforms.shape[0] != k + 1:
        raise ValueError(f"{k} drafts need {k + 1} target rows and uniforms")
    index = torch.tensor(drafts, dtype=torch.long, device=target_probs.device)
    rows = torch.arange(k, device=target_probs.device)
    p = target_probs[rows, index]
    q = torch.ones_like(p) if draft_probs is None else draft_probs[rows, index]
    accepted = (uniforms[:k] * q < p).tolist()  # u < p / q, without dividing by a zero q
    n = accepted.index(False) if False in accepted else k
    if n == k:
        final = target_probs[k]
    else:
        if draft_probs is None:
            final = target_probs[n].clone()
            final[drafts[n]] = 0
        else:
            final = (target_probs[n] - draft_probs[n]).clamp_min(0)
        if float(final.sum()) <= 0:  # p <= q everywhere: only possible through rounding; p itself is exact
            final = target_probs[n]
    token = int(draw_from(final[None], uniforms[k : k + 1])[0])
    return [*drafts[:n], token]
