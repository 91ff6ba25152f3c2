"""AWQ (Lin et al., 2023) as pure functions: per input channel scales s = mean|x|^α that make salient channels
quantize more finely, α searched on the real outputs of the linears that share the input; the inverse scale is folded
exactly into the op that produces that input (a norm's weight, or the rows of the linear before).

Shapes: x float32 [n, in] (a sample of the group's input rows); x_abs float32 [in] (mean |x| over all calibration
tokens); weights float [out_k, in]; s float32 [in].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ALPHAS = tuple(i / 20 for i in range(20))  # 0, 0.05, …, 0.95; α = 0 is plain RTN, so AWQ never loses to it


def scales_for(x_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^α normalised to geometric-mean-of-extremes 1 (keeps weights and norms in range)."""
    s = x_abs.float().clamp_min(1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scales(
    x: torch.Tensor,
    x_abs: torch.Tensor,
    weights: Sequence[torch.Tensor],
    quantize: Callable[[torch.Tensor, int], torch.Tensor],
    alphas: Sequence[float] = ALPHAS,
) -> tuple[torch.Tensor, float, list[float]]:
    """The α whose scales minimise Σ_k ‖x Wₖᵀ − x (Q(Wₖ·s)/s)ᵀ‖² over the sample.

    quantize(w_scaled, k) → the dequantized float32 weights of linear k on its grid. Returns (s, α, losses per α).
    """
    x = x.float()
    refs = [x @ w.float().T for w in weights]
    best_s, best_a, best = torch.ones_like(x_abs, dtype=torch.float32), 0.0, float("inf")
    losses = []
    for a in alphas:
        s = scales_for(x_abs, a)
        loss = 0.0
        for k, (w, ref) in enumerate(zip(weights, refs)):
            wq = quantize(w.float() * s, k) / s
            loss += float((x @ wq.T - ref).square().mean())
        losses.append(loss)
        if loss < best:
            best, best_a, best_s = loss, a, s
    return best_s, best_a, losses
