"""GPTQ (Frantar et al., 2022) as pure functions: quantize one weight column by column, feeding each column's
rounding error forward onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

Works onto both grid families: integer groups (GPTQ/AWQ/compressed-tensors layouts, with act-order and static
groups) and llama.cpp's GGML block types (the block's scales and mins are fitted on the error-updated weights when
the loop reaches it, then its columns take their nearest codes one at a time).

Shapes: w float [out, in]; h float32 [in, in] = E[x xᵀ] over calibration tokens (any positive multiple works).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconv.quant import fp8, ggml_grid
from qconv.quant.int_grid import _quantize_rows, with_error_stats
from qconv.quant.tensor import BlockQuantizedTensor, GGMLGrid, IntGrid, QuantizedTensor, with_block_error_stats


@dataclass(frozen=True)
class GPTQConfig:
    """damp: fraction of the mean Hessian diagonal added to the diagonal (raised ×10 while Cholesky fails, up to
    ``max_damp``). block: columns per lazy batch update. act_order: process columns by descending Hessian diagonal.
    static_groups: with act_order, group parameters from the original weights in natural order (contiguous groups,
    no g_idx); without it, act-order groups follow the processing order and a g_idx is stored. clip: "minmax" or
    "mse" (per group, weighted by the Hessian diagonal)."""

    damp: float = 0.01
    block: int = 128
    act_order: bool = False
    static_groups: bool = False
    clip: str = "minmax"
    max_damp: float = 10.0


@dataclass
class GPTQInfo:
    """What the run did, for the manifest: the dampening finally used, dead columns, the Hessian-weighted error."""

    damp: float
    dead_columns: int
    weighted_error: float


FLOAT64_MAX_DIM = 16384


def inverse_hessian_factor(h: torch.Tensor, damp: float, max_damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = Uᵀ U), λ = damp · mean(diag H).

    With J the exchange matrix (reversal): J A J = L Lᵀ gives A⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is upper
    triangular with a positive diagonal — so U is one Cholesky factorisation and one triangular inverse, both in
    place, instead of Cholesky, cholesky_inverse and a second Cholesky (3–12× faster on CPU, equal to ~1 ulp).

    Computed in float64 up to FLOAT64_MAX_DIM inputs: float32 Cholesky of large, nearly singular Hessians fails or
    loses the small pivots GPTQ divides by. Wider Hessians (a 28672-wide down_proj: 6.6 GB per float64 copy) use
    float32, as the reference GPTQ implementations do everywhere, with the same automatic damp raising.
    Returns (U float32 [in, in], the damp used). Raises ValueError if even ``max_damp`` fails.
    """
    work = torch.float64 if h.shape[0] <= FLOAT64_MAX_DIM else torch.float32
    mean_diag = float(h.diagonal().double().mean()) if h.numel() else 1.0
    mean_diag = mean_diag if mean_diag > 0 else 1.0
    n = h.shape[0]
    d = damp
    while True:
        # At most two [in, in] matrices live at once (a 28672-wide down_proj: 3.3 GB each in float32): the
        # factorisation and the triangular solve overwrite their inputs.
        a = h.to(work, copy=True)
        a.diagonal().add_(d * mean_diag)
        a = a.flip(0, 1)
        info = torch.empty((), dtype=torch.int32, device=a.device)
        low, info = torch.linalg.cholesky_ex(a, out=(a, info))
        if int(info) == 0:
            u = torch.eye(n, dtype=work, device=a.device)
            torch.linalg.solve_triangular(low, u, upper=False, out=u)
            del low, a
            u = u.flip(0, 1)
            if bool(torch.isfinite(u).all()):
                return u.float(), d
            del u
        else:
            del low, a
        if d >= max_damp:
            raise ValueError(f"Hessian not positive definite even with damp {d:g}")
        d = min(d * 10, max_damp)


def _prepare(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 copies, with dead input columns (zero Hessian diagonal: never active in calibration) given a unit
    diagonal so the factorisation exists; their weights stay as they are (their error cannot be measured)."""
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    dead = H.diagonal() <= 0
    if bool(dead.any()):
        H[dead, dead] = 1.0
    return W, H, dead


def _block_width(gs: int, block: int, static: bool) -> int:
    """Lazy-batch width such that every group starts at a batch start (so a batch's group parameters are known
    before its columns are quantized, and one kernel launch can run the batch): ``block`` when the parameters are
    static or groups span whole batches, else the largest divisor of the group size up to ``block``."""
    if static or gs % block == 0:
        return block
    return next(d for d in range(min(gs, block), 0, -1) if gs % d == 0)


def gptq_block_reference(
    w1: torch.Tensor, u1: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One lazy batch of GPTQ's column loop, in torch. w1 float32 [R, B] (the batch's error-updated columns, not
    modified), u1 float32 [B, B] (its block of the inverse Hessian's upper Cholesky factor), s/z float32 [R, B]
    (each column's scale and zero point). Returns codes uint8 [R, B] and the scaled errors float32 [R, B] that the
    caller feeds forward onto the later columns (``W[:, B:] -= E @ U[batch, later]``)."""
    st, zt = s.t().contiguous(), z.t().contiguous()

    def rounded(x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.clamp(torch.round(x / st[i]) + zt[i], 0, qmax)
        return q.to(torch.uint8), (q - zt[i]) * st[i]

    return _column_loop(w1, u1, rounded, torch.uint8)


def _column_loop(w1: torch.Tensor, u1: torch.Tensor, rounded, code_dtype: torch.dtype):
    """GPTQ's column loop over one lazy batch for any element grid: ``rounded(x, i)`` gives column i's codes and
    their dequantized values. Columns are held as contiguous rows, each step updating the rows after it in place
    (~2.5× faster than strided columns on CPU); the arithmetic is the Triton kernel's, operation for operation.
    Returns codes [R, B] and the scaled errors float32 [R, B]."""
    wt = w1.t().contiguous()
    codes = torch.empty(wt.shape, dtype=code_dtype, device=w1.device)
    errs = torch.empty_like(wt)
    for i in range(wt.shape[0]):
        x = wt[i]
        q, dq = rounded(x, i)
        err = (x - dq) / u1[i, i]
        wt[i + 1 :] -= u1[i, i + 1 :].unsqueeze(1) * err.unsqueeze(0)
        codes[i] = q
        errs[i] = err
    return codes.t(), errs.t()


def _block_fn(w: torch.Tensor):
    """The Triton kernel on CUDA (one launch per lazy batch instead of ~15 small kernels per column); torch
    elsewhere."""
    from qconv.kernels import gptq_block

    if w.is_cuda and gptq_block.available():
        return gptq_block.gptq_block
    return gptq_block_reference


def gptq_int(w: torch.Tensor, h: torch.Tensor, grid: IntGrid, cfg: GPTQConfig) -> tuple[QuantizedTensor, GPTQInfo]:
    """GPTQ onto an integer group grid. Returns the QuantizedTensor (codes in natural column order; g_idx set for
    act-order without static groups) and run info."""
    return gptq_int_many([w], h, grid, cfg)[0]


def gptq_int_many(
    ws: list[torch.Tensor], h: torch.Tensor, grid: IntGrid, cfg: GPTQConfig
) -> list[tuple[QuantizedTensor, GPTQInfo]]:
    """GPTQ for several weights [out_i, in] that read the same inputs (q/k/v; gate/up) and so share the Hessian h.
    GPTQ treats rows independently given H, so they run stacked: one factorisation, one column loop, the same
    result as separate runs. Returns one (QuantizedTensor, GPTQInfo) per weight, in order."""
    w = ws[0] if len(ws) == 1 else torch.cat([x.detach().float() for x in ws])
    out_f, in_f = w.shape
    lazy_order = cfg.act_order and not cfg.static_groups and grid.group_size != -1
    if lazy_order and not grid.act_order:
        raise ValueError("act-order groups need a layout with g_idx (or use static groups)")
    W, H, dead = _prepare(w, h)
    if len(ws) > 1:
        del w
    gs = grid.effective_group(in_f)
    n_groups = grid.n_groups(in_f)
    diag = H.diagonal().clone()

    def params(cols: torch.Tensor, imp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g0 = torch.zeros(cols.shape[1], dtype=torch.long, device=cols.device)
        _, s, z = _quantize_rows(cols, grid, g0, 1, cfg.clip, imp, 24, 0.3)
        return s[:, 0], z[:, 0]

    static = grid.group_size == -1 or (cfg.act_order and cfg.static_groups)
    scales = torch.empty(out_f, n_groups, dtype=grid.scale_dtype, device=W.device)
    zeros = torch.empty(out_f, n_groups, dtype=torch.float32, device=W.device)
    if static:
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = params(W[:, g * gs : (g + 1) * gs], diag[g * gs : (g + 1) * gs])

    perm = torch.argsort(diag, descending=True, stable=True) if cfg.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, used = inverse_hessian_factor(H, cfg.damp, cfg.max_damp)
    del H
    order = perm if perm is not None else torch.arange(in_f, device=W.device)
    # group of each processing position: the column's own group (static parameters) or the position's (lazy)
    g_of_pos = order // gs if static else torch.arange(in_f, device=W.device) // gs

    Q = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)  # permuted positions
    block_fn = _block_fn(W)
    width = _block_width(gs, cfg.block, static)
    werr = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, in_f, width):
        i2 = min(i1 + width, in_f)
        if not static and i1 % gs == 0:
            # Lazy group parameters from the error-updated weights of the next gs columns (processing order).
            g = i1 // gs
            scales[:, g], zeros[:, g] = params(W[:, i1 : i1 + gs], diag[order[i1 : i1 + gs]])
        gp = g_of_pos[i1:i2]
        q, e = block_fn(W[:, i1:i2], U[i1:i2, i1:i2], scales[:, gp].float(), zeros[:, gp], grid.qmax)
        Q[:, i1:i2] = q
        werr += e.double().square().sum()
        W[:, i2:] -= e @ U[i1:i2, i2:]
    del W, U

    codes = torch.empty_like(Q)
    codes[:, order] = Q
    del Q
    gidx = torch.empty(in_f, dtype=torch.long, device=codes.device)
    gidx[order] = g_of_pos
    gidx32 = gidx.to(torch.int32) if grid.act_order else None
    imp = h.detach().float().diagonal().clamp_min(0)
    info = GPTQInfo(used, int(dead.sum()), float(werr))
    out = []
    r0 = 0
    for x in ws:
        r1 = r0 + x.shape[0]
        # copies, not views: each linear's tensors are written and freed on their own
        qt = QuantizedTensor(
            grid=grid,
            codes=codes[r0:r1].clone() if len(ws) > 1 else codes,
            scales=scales[r0:r1].clone() if len(ws) > 1 else scales,
            zeros=zeros[r0:r1].clone() if len(ws) > 1 else zeros,
            g_idx=gidx32.clone() if gidx32 is not None and len(ws) > 1 else gidx32,
        )
        qt = with_error_stats(qt, x, imp)
        qt.stats["gptq_damp"] = used
        out.append((qt, info))
        r0 = r1
    return out


def gptq_ggml(
    w: torch.Tensor, h: torch.Tensor, grid: GGMLGrid, cfg: GPTQConfig
) -> tuple[BlockQuantizedTensor, GPTQInfo]:
    """GPTQ into a GGML block type: natural column order (the layout's blocks are contiguous), each column block's
    fields fitted (llama.cpp-quality search, weighted by the Hessian diagonal) on the error-updated weights when the
    loop reaches it, then its columns quantized one at a time to their nearest codes with the error fed forward."""
    if cfg.act_order:
        raise ValueError("act-order does not apply to GGUF block types (their blocks are contiguous columns)")
    out_f, in_f = w.shape
    W, H, dead = _prepare(w, h)
    diag = H.diagonal().clone()
    U, used = inverse_hessian_factor(H, cfg.damp, cfg.max_damp)
    t = ggml_grid.GGMLType(grid.ggml_type)
    bs = ggml_grid.BLOCK_SIZE[t]
    # One fitted span per lazy batch: a multiple of the block size near cfg.block columns.
    span = max(bs, (cfg.block // bs) * bs)
    parts = []
    werr = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, in_f, span):
        i2 = min(i1 + span, in_f)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        fields = eg = codes = None
        for i in range(i2 - i1):
            if i % bs == 0:
                # Fit the next block's fields on its current (error-updated) columns.
                b0 = i
                f = ggml_grid.fit(W1[:, b0 : b0 + bs], t, diag[i1 + b0 : i1 + b0 + bs], grid.effort)
                fields = f
                eg = ggml_grid.element_grid(f, out_f)
                codes = torch.empty(out_f, bs, dtype=f.q.dtype, device=W.device)
            j = i - b0
            q = ggml_grid.grid_codes(W1[:, i : i + 1], eg, slice(j, j + 1))
            codes[:, j : j + 1] = q
            dq = ggml_grid.grid_values(q, eg, slice(j, j + 1))[:, 0]
            d = U1[i, i]
            err = (W1[:, i] - dq) / d
            werr += err.double().square().sum()  # a tensor: no device sync per column
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
            if j == bs - 1:
                parts.append(ggml_grid.replace_codes(fields, codes))
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    # Blocks of one row are consecutive in the GGML layout: stack the per-span column fields back into rows.
    fields = ggml_grid.hstack(parts, out_f)
    imp = h.detach().float().diagonal().clamp_min(0)
    qt = with_block_error_stats(BlockQuantizedTensor(grid, fields, tuple(w.shape)), w, imp)
    qt.stats["gptq_damp"] = used
    return qt, GPTQInfo(used, int(dead.sum()), float(werr))


def gptq_block_fp8(w1: torch.Tensor, u1: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One lazy batch of GPTQ's column loop onto FP8 E4M3: w1 float32 [R, B] (not modified), u1 float32 [B, B],
    s float32 [R, B] (each element's scale). Returns codes float8_e4m3fn [R, B] (x / s clamped to ±448, rounded
    to nearest) and the scaled errors float32 [R, B]."""
    st = s.t().contiguous()

    def rounded(x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = (x / st[i]).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8_DTYPE)
        return q, q.float() * st[i]

    return _column_loop(w1, u1, rounded, fp8.FP8_DTYPE)


def gptq_fp8(w: torch.Tensor, h: torch.Tensor, grid: fp8.Fp8Grid, cfg: GPTQConfig) -> tuple[fp8.Fp8Tensor, GPTQInfo]:
    """GPTQ onto FP8 E4M3. The scales (per tensor, channel or block; amax or MSE-searched, exactly as RTN chooses
    them) are fixed up front from the original weights: FP8 layouts store neither a column order nor zero points, so
    act-order only changes the order columns are processed in, and every element keeps its own group's scale.
    The rounding errors are fed forward as for integer grids: FP8's relative step (1/8 to 1/16 of a value) leaves
    an error that, on correlated inputs, GPTQ cancels much of. Returns (Fp8Tensor, run info)."""
    out_f, in_f = w.shape
    scale = fp8.choose_scales(w, grid)
    W, H, dead = _prepare(w, h)
    S = fp8.expand_scale(scale, (out_f, in_f), grid.block_size).float().expand(out_f, in_f).contiguous()
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if cfg.act_order else None
    if perm is not None:
        W, H, S = W[:, perm], H[perm][:, perm], S[:, perm]
    U, used = inverse_hessian_factor(H, cfg.damp, cfg.max_damp)
    del H
    Q = torch.empty(out_f, in_f, dtype=fp8.FP8_DTYPE, device=W.device)
    werr = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, in_f, cfg.block):
        i2 = min(i1 + cfg.block, in_f)
        q, e = gptq_block_fp8(W[:, i1:i2], U[i1:i2, i1:i2], S[:, i1:i2])
        Q[:, i1:i2] = q
        werr += e.double().square().sum()
        W[:, i2:] -= e @ U[i1:i2, i2:]
    del W, U, S
    if perm is not None:
        codes = torch.empty_like(Q)
        codes[:, perm] = Q
        Q = codes
    qt = fp8.with_stats(fp8.Fp8Tensor(grid, Q, scale), w)
    qt.stats["gptq_damp"] = used
    return qt, GPTQInfo(used, int(dead.sum()), float(werr))
