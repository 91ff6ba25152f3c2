"""HQQ (half-quadratic quantization) as pure functions: zero points (and optionally scales) fitted to a weight under
an lp loss (p < 1) by alternating a proximal shrinkage step with a closed-form zero update, calibration-free.

Layout. HQQ groups a weight [out, in] in one of two ways (the hqq package's ``axis``):
  axis 1: W.reshape(-1, g): each group is g consecutive elements of a row (qconv's usual input-column groups);
  axis 0: W.reshape(g, -1): group j holds the flat elements j, j + N/g, j + 2N/g, … (N = out·in).
Everything here works on the *canonical* form ``wg`` float32 [n_groups, g] (one group per row) produced by
``to_groups``; ``from_groups`` inverts it. Per-group parameters are float32 [n_groups, 1].

HQQ works with the inverse scale: code = round(w·inv_scale + zero), w ≈ (code − zero) / inv_scale; the stored
(dequantization) scale is 1 / inv_scale and the stored zero is a float in code units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qconv.quant.tensor import IntGrid, error_stats


@dataclass(frozen=True)
class HQQConfig:
    """Optimiser settings (the hqq package's defaults: p = 0.7, β = 10, κ = 1.01, 20 iterations).

    early_stop: stop when no group improved in an iteration (each group keeps its best parameters either way).
    optimize_scale: also refit the scale in closed form each iteration (least squares on the shrunk target).
    int_zero: zero points restricted to integers (formats that store integer zeros): "project" rounds the zero
    inside every iteration, "round" optimises float zeros, rounds them at the end and refits the scale.
    """

    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    early_stop: bool = True
    optimize_scale: bool = False
    int_zero: str = "project"


@dataclass(frozen=True)
class HQQGrid(IntGrid):
    """The grid of transformers/hqq's HQQLinear: asymmetric, float zero points, groups along ``axis`` (see the
    module docstring); scales and zeros stored in ``scale_dtype`` (the loader's compute dtype)."""

    axis: int = 1

    @property
    def name(self) -> str:
        g = "c" if self.group_size == -1 else str(self.group_size)
        return f"hqq{self.bits}-g{g}-axis{self.axis}"

    def group_len(self, shape: tuple[int, int]) -> int:
        """Elements per group; −1 means one group per row (axis 1) or per column (axis 0)."""
        if self.group_size != -1:
            return self.group_size
        return shape[1] if self.axis == 1 else shape[0]


def to_groups(w: torch.Tensor, group: int, axis: int) -> torch.Tensor:
    """float [out, in] → float32 [N/group, group] canonical groups (see the module docstring)."""
    w = w.float()
    if axis == 1:
        return w.reshape(-1, group)
    return w.reshape(group, -1).T.contiguous()


def from_groups(wg: torch.Tensor, shape: tuple[int, int], axis: int) -> torch.Tensor:
    """Inverse of ``to_groups``: [N/group, group] → [out, in] (any dtype)."""
    if axis == 1:
        return wg.reshape(shape)
    return wg.T.contiguous().reshape(shape)


def init_params(wg: torch.Tensor, qmax: int, round_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The hqq package's min-max start: inv_scale = qmax / (max − min) (1 where the range is ≤ 1e-4, at most 2e4),
    zero = −min · inv_scale (rounded with ``round_zero``). wg float32 [G, g] → ([G, 1], [G, 1])."""
    lo = wg.amin(dim=1, keepdim=True)
    hi = wg.amax(dim=1, keepdim=True)
    denom = hi - lo
    inv = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), qmax / denom).clamp(max=2e4)
    zero = -lo * inv
    return inv, (zero.round() if round_zero else zero)


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding, the proximal operator of |x|^p / β: sign(x)·max(|x| − |x|^(p−1)/β, 0)."""
    a = x.abs()
    if p == 1:
        return torch.sign(x) * (a - 1.0 / beta).clamp_min(0)
    # |x|^(p−1) is infinite at 0; the clamp then gives 0 there, as intended
    return torch.sign(x) * (a - a.pow(p - 1) / beta).clamp_min(0)


def _codes(wg: torch.Tensor, inv: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.round(wg * inv + zero).clamp_(0, qmax)


def _group_err(wg: torch.Tensor, wr: torch.Tensor) -> torch.Tensor:
    return (wg - wr).square().sum(dim=1, keepdim=True)


def optimize(
    wg: torch.Tensor,
    inv: torch.Tensor,
    zero: torch.Tensor,
    qmax: int,
    cfg: HQQConfig,
    integer_zero: bool = False,
    runs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's half-quadratic solver on canonical groups wg float32 [G, g] from (inv_scale, zero) [G, 1].

    Each iteration: codes from the current parameters, the residual's lp-proximal shrinkage W_e, then the zero
    (and with ``cfg.optimize_scale`` the scale) that fit W − W_e best in least squares; β grows by κ. Unlike the
    hqq package, which keeps the last iterate, each group keeps the parameters with its least squared error seen
    (the min-max start included), so the result is never worse than the start. ``runs``: int64 [G], the weight
    each group belongs to when several are fitted in one batch (early stopping is per weight, so the result is
    the same as fitting each alone); None = one weight. Returns (inv_scale, zero).
    """
    if integer_zero:
        zero = zero.round().clamp(0, qmax)
    g = wg.shape[0]
    if runs is None:
        runs = torch.zeros(g, dtype=torch.long, device=wg.device)
    inf = torch.full_like(inv, float("inf"))
    if not cfg.optimize_scale:
        best_inv, best_zero, _ = _solve(wg, inv, zero, inf, qmax, cfg, integer_zero, runs, None)
        return best_inv, best_zero
    # Zero points alone (the hqq package's path) and scale and zero together, both from the same start, batched as
    # 2G groups (half the kernel launches and syncs, which bound the time on a GPU), each run still stopping on its
    # own. Each group keeps the better of its two results: the joint run can only improve on the zero-only one.
    n_runs = int(runs.max()) + 1 if g else 1
    both_inv, both_zero, err = _solve(
        torch.cat([wg, wg]), torch.cat([inv, inv]), torch.cat([zero, zero]), torch.cat([inf, inf]), qmax, cfg,
        integer_zero, torch.cat([runs, runs + n_runs]), g,
    )  # fmt: skip
    better = err[g:] < err[:g]
    return torch.where(better, both_inv[g:], both_inv[:g]), torch.where(better, both_zero[g:], both_zero[:g])


def _solve(wg, inv, zero, best, qmax, cfg: HQQConfig, integer_zero: bool, runs: torch.Tensor, joint_from):
    """The solver from (inv, zero); ``best`` [G, 1] the squared errors to beat; ``runs`` int64 [G] the independent
    run of each group (with early stopping a run stops when none of its groups improved, exactly as if run alone,
    and its groups leave the batch); groups ≥ ``joint_from`` (None: none) refit their scale too. Returns the best
    (inv, zero, error) per group."""
    beta = cfg.beta
    best_inv, best_zero, best = inv.clone(), zero.clone(), best.clone()
    n = wg.shape[0]
    n_runs = int(runs.max()) + 1 if n else 0
    live = n_runs  # runs still iterating
    idx = None  # the batch's groups (None: all n, in order)
    w = wg
    joint = None
    if joint_from is not None:
        joint = (torch.arange(n, device=wg.device) >= joint_from).unsqueeze(1)
    for i in range(max(cfg.iters, 1)):
        q = _codes(w, inv, zero, qmax)
        wr = (q - zero) / inv
        err = _group_err(w, wr)
        cur = best if idx is None else best[idx]
        better = err < cur
        if cfg.early_stop and i > 0:
            # per run: did any of its groups improve? (one sync for all runs)
            alive = torch.zeros(n_runs, device=w.device).scatter_reduce_(0, runs, better[:, 0].float(), "amax")
            n_alive = int(alive.sum())
            if n_alive == 0:
                break
            if n_alive < live:  # some runs stopped: drop their groups from the batch
                keep = alive[runs].bool().nonzero().squeeze(1)
                w, q, wr, err, better, cur = w[keep], q[keep], wr[keep], err[keep], better[keep], cur[keep]
                inv, zero, runs = inv[keep], zero[keep], runs[keep]
                joint = None if joint is None else joint[keep]
                idx = keep if idx is None else idx[keep]
                live = n_alive
        if idx is None:
            best = torch.where(better, err, best)
            best_inv = torch.where(better, inv, best_inv)
            best_zero = torch.where(better, zero, best_zero)
        else:
            best[idx] = torch.where(better, err, cur)
            best_inv[idx] = torch.where(better, inv, best_inv[idx])
            best_zero[idx] = torch.where(better, zero, best_zero[idx])
        target = w - shrink_lp(w - wr, beta, cfg.lp_norm)
        if joint is not None:
            # dequantization scale s minimising ||target − (q − zero)·s||², for the joint run's groups
            qz = q - zero
            den = qz.square().sum(dim=1, keepdim=True)
            s = (target * qz).sum(dim=1, keepdim=True) / den.clamp_min(1e-12)
            ok = joint & (den > 0) & (s > 0)
            inv = torch.where(ok, (1.0 / s.clamp_min(1e-30)).clamp(max=2e4), inv)
        zero = torch.mean(q - target * inv, dim=1, keepdim=True)
        if integer_zero:
            zero = zero.round().clamp(0, qmax)
        beta *= cfg.kappa
    return best_inv, best_zero, best


def refit_scale(wg: torch.Tensor, inv: torch.Tensor, zero: torch.Tensor, qmax: int, rounds: int = 2) -> torch.Tensor:
    """With integer zeros fixed, alternate nearest codes and the least-squares scale; keep a group's old scale
    where the refit does not lower its squared error. Returns inv_scale [G, 1]."""
    best = _group_err(wg, (_codes(wg, inv, zero, qmax) - zero) / inv)
    for _ in range(rounds):
        qz = _codes(wg, inv, zero, qmax) - zero
        den = qz.square().sum(dim=1, keepdim=True)
        s = (wg * qz).sum(dim=1, keepdim=True) / den.clamp_min(1e-12)
        cand = torch.where((den > 0) & (s > 0), 1.0 / s.clamp_min(1e-30), inv)
        err = _group_err(wg, (_codes(wg, cand, zero, qmax) - zero) / cand)
        better = err < best
        inv = torch.where(better, cand, inv)
        best = torch.where(better, err, best)
    return inv


def fit(
    wg: torch.Tensor,
    bits: int,
    cfg: HQQConfig,
    integer_zero: bool = False,
    round_zero: bool = False,
    runs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical groups float32 [G, g] → (inv_scale, zero) [G, 1] float32 (integer-valued zeros with
    ``integer_zero``, by ``cfg.int_zero``). ``runs``: see ``optimize`` (several weights in one batch)."""
    qmax = (1 << bits) - 1
    inv, zero = init_params(wg, qmax, round_zero)
    if not integer_zero:
        return optimize(wg, inv, zero, qmax, cfg, runs=runs)
    if cfg.int_zero == "project":
        inv, zero = optimize(wg, inv, zero, qmax, cfg, integer_zero=True, runs=runs)
    elif cfg.int_zero == "round":
        inv, zero = optimize(wg, inv, zero, qmax, cfg, runs=runs)
        zero = zero.round().clamp(0, qmax)
    else:
        raise ValueError(f"int_zero must be 'project' or 'round', got {cfg.int_zero!r}")
    return refit_scale(wg, inv, zero, qmax), zero


def stored_params(
    inv: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype, float_zero: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantization scale, zero) [G, 1] rounded to what the format stores: scale in ``dtype``; the zero in
    ``dtype`` (float zeros) or as an integer-valued float32."""
    scale = (1.0 / inv).to(dtype)
    tiny = torch.finfo(dtype).tiny
    scale = torch.where(scale == 0, torch.full_like(scale, tiny), scale)
    return scale, (zero.to(dtype) if float_zero else zero.float())


def nearest_codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """Codes uint8 [G, g] for the *stored* parameters (so rounding of scale and zero is accounted for)."""
    return torch.round(wg / scale.float() + zero.float()).clamp_(0, qmax).to(torch.uint8)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """What HQQLinear computes, in the parameters' dtype: (code − zero) rounded, then · scale rounded.
    codes [G, g]; scale, zero [G, 1] of one dtype (the loader's compute dtype)."""
    dt = scale.dtype
    return (codes.to(dt) - zero.to(dt)) * scale


@dataclass(frozen=True)
class HQQTensor:
    """One linear weight [out, in] on an HQQGrid.

    codes: uint8 [out, in] in 0 … 2^bits − 1; scale, zero: [n_groups] in grid.scale_dtype, in canonical group order
    (axis 1: row-major groups of a row; axis 0: group j = flat elements j, j + N/g, …).
    """

    grid: HQQGrid
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        g = self.grid.group_len(self.shape)
        cg = to_groups(self.codes, g, self.grid.axis)
        wg = dequantize_groups(cg, self.scale[:, None], self.zero[:, None])
        return from_groups(wg, self.shape, self.grid.axis).to(dtype or self.grid.scale_dtype)


def quantize_hqq(w: torch.Tensor, grid: HQQGrid, cfg: HQQConfig) -> HQQTensor:
    """Weight float [out, in] → HQQTensor with float zeros (the HQQLinear layout)."""
    return quantize_many([w], grid, cfg)[0]


def quantize_int(w: torch.Tensor, grid: IntGrid, cfg: HQQConfig):
    """Weight float [out, in] → QuantizedTensor on a contiguous-group integer grid with integer zero points
    (compressed-tensors' asymmetric int), the zeros and scales chosen by HQQ."""
    return quantize_many([w], grid, cfg)[0]


def quantize_many(ws: list[torch.Tensor], grid: IntGrid, cfg: HQQConfig) -> list:
    """Several weights float [out, in] (e.g. one decoder layer's linears) onto the same grid, fitted as one batch of
    groups: the same result as one call each (per-weight early stopping), with a fraction of the kernel launches,
    which bound HQQ's time on a GPU. ``grid``: an HQQGrid (→ HQQTensor, float zeros) or an asymmetric contiguous
    IntGrid (→ QuantizedTensor, integer zeros)."""
    from qconv.quant.int_grid import with_error_stats
    from qconv.quant.tensor import QuantizedTensor

    float_zero = isinstance(grid, HQQGrid)
    groups = []
    for w in ws:
        if float_zero:
            g, axis = grid.group_len(tuple(w.shape)), grid.axis
            if w.numel() % g:
                raise ValueError(f"group size {g} does not divide the weight's {tuple(w.shape)} elements")
        else:
            g, axis = grid.effective_group(w.shape[1]), 1
            if w.shape[1] % g:
                raise ValueError(f"group size {g} does not divide the {w.shape[1]} input columns")
        groups.append(to_groups(w, g, axis))
    sizes = [x.shape[0] for x in groups]
    wg = torch.cat(groups) if len(groups) > 1 else groups[0]
    runs = torch.repeat_interleave(torch.arange(len(ws), device=wg.device), torch.tensor(sizes, device=wg.device))
    inv, zero = fit(wg, grid.bits, cfg, integer_zero=not float_zero, runs=runs)
    scale, zero = stored_params(inv, zero, grid.scale_dtype, float_zero=float_zero)
    out = []
    for w, wgi, sc, zr in zip(ws, groups, scale.split(sizes), zero.split(sizes)):
        codes = nearest_codes(wgi, sc, zr, grid.qmax)
        if float_zero:
            qt = HQQTensor(grid, from_groups(codes, tuple(w.shape), grid.axis), sc[:, 0], zr[:, 0])
            out.append(with_stats(qt, w))
        else:
            out_f, in_f = w.shape
            qt = QuantizedTensor(grid, codes.reshape(out_f, in_f), sc.reshape(out_f, -1), zr.reshape(out_f, -1))
            out.append(with_error_stats(qt, w))
    return out


def with_stats(qt: HQQTensor, w: torch.Tensor) -> HQQTensor:
    """Relative squared error and max |error| of the loader's dequantization against ``w``."""
    qt.stats.update(error_stats(qt.dequantize(torch.float32), w))
    return qt


# ---------------------------------------------------------------------------------------------------------------
# GGUF: llama.cpp's affine block types store d and m as floats, so HQQ's scale and float zero map onto them exactly
# (w = (q − z)·s = s·q + (−z·s)): Q4_1 / Q5_1 per block of 32, Q4_K per sub-block of 32 (6-bit scales and mins).

GGML_TYPES = (3, 7, 12)  # GGMLType.Q4_1, Q5_1, Q4_K
_GGML_BITS = {3: 4, 7: 5, 12: 4}


def _ggml_fields(w: torch.Tensor, ggml_type: int, cfg: HQQConfig):
    from qconv.formats import ggml_blocks as gb
    from qconv.quant import ggml_grid

    bits = _GGML_BITS[ggml_type]
    wg = w.float().reshape(-1, 32)
    inv, zero = fit(wg, bits, cfg)
    s = (1.0 / inv)[:, 0]
    mn = -(zero[:, 0] * s)  # the block's offset: value = s·q + mn
    if ggml_type in (3, 7):
        d = s.to(torch.float16)
        q0 = torch.zeros(wg.shape, dtype=torch.uint8, device=w.device)
        cls = gb.Q4_1Fields if ggml_type == 3 else gb.Q5_1Fields
        fields = cls(d=d, m=mn.to(torch.float16), q=q0)
    else:  # Q4_K: 8 sub-blocks per super-block; value = (d·sc)·q − (dmin·m), sc and m in 0…63
        s8, m8 = s.reshape(-1, 8), (-mn).clamp_min(0).reshape(-1, 8)
        d = (s8.amax(dim=1) / 63).to(torch.float16)
        dmin = (m8.amax(dim=1) / 63).to(torch.float16)
        sc = torch.round(s8 / d.float().clamp_min(1e-30)[:, None]).clamp(0, 63).to(torch.uint8)
        m = torch.round(m8 / dmin.float().clamp_min(1e-30)[:, None]).clamp(0, 63).to(torch.uint8)
        q0 = torch.zeros(s8.shape[0], 256, dtype=torch.uint8, device=w.device)
        fields = gb.Q4_KFields(d=d, dmin=dmin, sc=sc, m=m, q=q0)
    return ggml_grid.requantize(w.float(), fields)


def _select_blocks(mask: torch.Tensor, a, b):
    """Per-block choice between two field sets of one type: ``a`` where mask [nb], else ``b``."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        m = mask.reshape(-1, *([1] * (x.dim() - 1)))
        out[f.name] = torch.where(m, x, y)
    return type(a)(**out)


def quantize_ggml(w: torch.Tensor, grid, cfg: HQQConfig, importance: torch.Tensor | None = None):
    """Weight float [out, in] → BlockQuantizedTensor on Q4_1 / Q5_1 / Q4_K with HQQ's block parameters; a block
    keeps llama.cpp's least-squares parameters (qconv.quant.ggml_grid.fit) where those reconstruct it better."""
    from qconv.formats.ggml_blocks import BLOCK_SIZE, dequantize_blocks
    from qconv.quant import ggml_grid
    from qconv.quant.tensor import BlockQuantizedTensor, with_block_error_stats

    bs = BLOCK_SIZE[grid.ggml_type]
    if w.shape[1] % bs:
        raise ValueError(f"rows of {w.shape[1]} do not divide {grid.name}'s block of {bs}")
    ours = _ggml_fields(w, grid.ggml_type, cfg)
    ref = ggml_grid.fit(w, grid.ggml_type, importance, getattr(grid, "effort", "best"))
    wb = w.float().reshape(-1, bs)
    imp = 1.0 if importance is None else importance.float().reshape(1, -1).expand(w.shape[0], -1).reshape(-1, bs)
    e_ours = ((dequantize_blocks(ours) - wb).square() * imp).sum(dim=1)
    e_ref = ((dequantize_blocks(ref) - wb).square() * imp).sum(dim=1)
    use = e_ours <= e_ref
    qt = BlockQuantizedTensor(grid, _select_blocks(use, ours, ref), tuple(w.shape))
    qt = with_block_error_stats(qt, w, importance)
    qt.stats["hqq_blocks"] = float(use.float().mean())
    return qt
