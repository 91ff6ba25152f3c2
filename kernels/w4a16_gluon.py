"""Large-batch W4A16 matmul in Gluon (Hopper): the kernel of kernels/w4a16.py with its products asynchronous.

Triton 3.6 compiles every ``tl.dot`` whose first operand is computed in registers to ``wgmma.wait_group 0``, so the
fused kernel dequantizes and multiplies in turn. Here (``triton.experimental.gluon``) each of the 8 products of a
128-column K step is issued asynchronously and the next weight plane is dequantized while it runs
(``warpgroup_mma_wait(1)``). Same layout (``W4Layout``: static groups), same arithmetic as the fused kernel's
weights-scaled-first mode: ``code | magic`` is MAGIC + code, minus MAGIC + zero (exact), times the scale in 16 bits
(or in float32 for float32 scales), float32 accumulation.

A program computes yᵀ tiles [BN, BM]: BN weight rows (the MMA's M side, one 16-row slab per warp) × BM batch rows.
Halfwords 16t…16t+15 of a packed block row hold columns 64t + 16p … + 15 in nibble p, so the 8 products of a step
are (t, p) pairs over 16 columns each, their x columns a 16-column slice of the step's two 64-column x boxes.
x reaches shared memory by the tensor memory accelerator (TMA; zero fill past M and K) through a 3-stage ring,
issued either by the multiplying warps between products or by a loader warp of its own (warp specialisation: no
block-wide barrier around each copy); weights, scales and zero points go straight to registers a step ahead.
Work is (tile, step) items: one tile per program, a tile split between 2–4 programs, or stream-K over persistent
programs; a split tile's float32 parts meet in a workspace, summed by the last part to arrive (module
``launch``). Edges: rows past N and batch rows past M are masked; the packed K is padded to 128 with codes 0 that
meet x = 0. Needs K % 16 == 0 (TMA rows 16-byte aligned).
"""

from __future__ import annotations

import torch

HAVE_GLUON = False
try:  # triton ≥ 3.6 with Gluon's Hopper ops
    from triton import constexpr_function
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - older triton, or none
    pass


def supported(x: torch.Tensor, w) -> bool:
    """Whether this kernel can run x [M, K] @ wᵀ here (see ``usable``)."""
    return x.is_cuda and usable(x.device, w)


def usable(device: torch.device, w) -> bool:
    """A Hopper GPU, Gluon, and a layout with static groups of ≥ 16 columns (or one spanning K) and K % 16 == 0
    (TMA reads x in rows that start 16-byte aligned, K % 8 for 16-bit x; the tests cover multiples of 16)."""
    if not (HAVE_GLUON and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9):
        return False
    return w.g_idx is None and w.shape[1] % 16 == 0 and (w.n_groups == 1 or w.group_size >= 16)


if HAVE_GLUON:

    @constexpr_function
    def _nibble_asm(p, magic_bits):
        """PTX for nibble plane p of two halfwords → two 16-bit floats MAGIC + code (kernels/w4a16.py asm_codes)."""
        from qconv.kernels.w4a16 import asm_codes

        return asm_codes(magic_bits)[p]

    @gluon.jit
    def _group_rows(s_ptr, z_ptr, row0, r_ar, ok, k, N, G, GS_SHIFT, HAS_ZERO: gl.constexpr,
                    MAGIC_VALUE: gl.constexpr, xdt: gl.constexpr, row_l: gl.constexpr):  # fmt: skip
        """Scale row [BN] and MAGIC + zero row [BN] (xdt) of weight rows row0 + r_ar, for the group of column k."""
        g = gl.minimum(k >> GS_SHIFT, G - 1)
        off = g * N + row0
        sc = gl.load(s_ptr + off + r_ar, mask=ok, other=0.0)
        if HAS_ZERO:
            zero = gl.load(z_ptr + off + r_ar, mask=ok, other=0)
            zz = (zero.to(gl.float32) + MAGIC_VALUE).to(xdt)
        else:
            zz = gl.full(r_ar.shape, 8.0 + MAGIC_VALUE, xdt, layout=row_l)
        return sc, zz

    @gluon.jit
    def _first_item(start, S, num_m):
        """Work item ``start`` → (pid_m, pid_n, step k): tile-major, consecutive tiles sharing a weight tile."""
        t = start // S
        return t % num_m, t // num_m, start % S

    @gluon.jit
    def _next_item(pid_m, pid_n, k, S, num_m):
        """The work item after (pid_m, pid_n, step k) in tile-major order, consecutive tiles sharing a weight tile
        (its re-reads hit L2); no divisions."""
        k += 1
        wrap = (k == S).to(gl.int32)
        k -= wrap * S
        pid_m += wrap
        wrap = (pid_m == num_m).to(gl.int32)
        return pid_m - wrap * num_m, pid_n + wrap, k

    @gluon.jit
    def _load_x(x_desc, xs, bars, pid_m, k, live, stage, BM: gl.constexpr):
        """Start copying x columns 128k … 128k + 127 of batch rows pid_m·BM … + BM − 1 into ring stage ``stage`` (one
        thread issues both 64-column boxes; the stage's barrier counts their bytes, zero fill past M and K
        included). Nothing unless ``live``."""
        mbarrier.expect(bars.index(stage), 2 * BM * 64 * x_desc.dtype.primitive_bitwidth // 8, pred=live)
        for h in gl.static_range(2):
            tma.async_copy_global_to_shared(x_desc, [pid_m * BM, k * 128 + h * 64], bars.index(stage),
                                            xs.index(2 * stage + h), pred=live)  # fmt: skip

    @gluon.jit
    def _load_w(qw_ptr, s_ptr, z_ptr, w_off, r_ar, pid_n, k, live, N, KB, G, GS_SHIFT, HAS_ZERO: gl.constexpr,
                PLANE_GROUPS: gl.constexpr, EVEN_N: gl.constexpr, MAGIC_VALUE: gl.constexpr, xdt: gl.constexpr,
                BN: gl.constexpr, a_l: gl.constexpr):  # fmt: skip
        """Step k of weight tile pid_n: packed codes (two [BN, 16] int16 halves; halfword 16t + j of a block row holds
        columns 64t + 16p + j in nibble p; ``w_off`` their offsets in tile 0, step 0) and, unless each plane has its
        own group, the two 64-column halves' scale and zero rows. Zeros unless ``live``."""
        row_l: gl.constexpr = gl.SliceLayout(1, a_l)
        row0 = pid_n * BN
        w_ptr = qw_ptr + (pid_n.to(gl.int64) * (BN // 64 * 2048) * KB + k * 2048) + w_off
        if EVEN_N:  # one predicate for the whole tile
            ok = live
            w0 = gl.load(w_ptr, mask=live, other=0)
            w1 = gl.load(w_ptr + 16, mask=live, other=0)
        else:
            ok = (r_ar < N - row0) & live
            w0 = gl.load(w_ptr, mask=ok[:, None], other=0)
            w1 = gl.load(w_ptr + 16, mask=ok[:, None], other=0)
        if PLANE_GROUPS:  # loaded per plane where used
            s0 = gl.zeros((BN,), xdt, layout=row_l)
            z0 = s0
            s1 = s0
            z1 = s0
        else:
            s0, z0 = _group_rows(s_ptr, z_ptr, row0, r_ar, ok, k * 128, N, G, GS_SHIFT, HAS_ZERO, MAGIC_VALUE, xdt,
                                 row_l)  # fmt: skip
            s1, z1 = _group_rows(s_ptr, z_ptr, row0, r_ar, ok, k * 128 + 64, N, G, GS_SHIFT, HAS_ZERO, MAGIC_VALUE,
                                 xdt, row_l)  # fmt: skip
        return w0, w1, s0, z0, s1, z1

    @gluon.jit
    def _part_offsets(BN: gl.constexpr, BM: gl.constexpr, mma: gl.constexpr):
        """Offsets [BN, BM] (int32, accumulator layout) of a float32 partial tile, a bijection onto 0 … BN·BM − 1
        in which each warp's store of one register pair is 256 contiguous bytes (a wgmma accumulator element (n, m)
        sits in 16-row slab n // 16 (a warp's, once or more), lane 4·(n % 8) + (m % 8) // 2, register pair
        2·(m // 8) + (n % 16) // 8)."""
        n = gl.arange(0, BN, layout=gl.SliceLayout(1, mma))[:, None]
        m = gl.arange(0, BM, layout=gl.SliceLayout(0, mma))[None, :]
        mh = m // 2  # (m − 2·mh, not m % 2: the compiler then sees the pairs, and stores 8 bytes at a time)
        pair = (mh // 4) * 2 + (n % 16) // 8
        thread = (n // 16) * 32 + (n % 8) * 4 + mh % 4
        return (pair * (2 * BN) + thread) * 2 + (m - mh * 2)

    @gluon.jit
    def _store_y(y_ptr, acc, pid_m, pid_n, M, N, stride_ym, BN: gl.constexpr, BM: gl.constexpr,
                 num_warps: gl.constexpr):  # fmt: skip
        """yᵀ tile [BN, BM] (float32, any layout) → y [M, N] in y's dtype, 8 consecutive weight rows per thread."""
        out_l: gl.constexpr = gl.BlockedLayout([8, 1], [32, 1], [1, num_warps], [0, 1])
        y = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), out_l)
        yn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, out_l))
        ym = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, out_l))
        gl.store(y_ptr + ym[None, :] * stride_ym + yn[:, None], y, mask=(ym < M)[None, :] & (yn < N)[:, None])

    @constexpr_function
    def _prefetch_asm(nbytes):
        """PTX asking the L2 for ``nbytes`` (a multiple of 16) from a 16-byte aligned global address (lane 0)."""
        return (
            "{ .reg .u32 lane; .reg .pred p; mov.u32 lane, %laneid; setp.eq.u32 p, lane, 0; "
            f"@p cp.async.bulk.prefetch.L2.global [$1], {nbytes}; }} mov.u32 $0, 0;"
        )

    @gluon.jit
    def _prefetch(ptr, NBYTES: gl.constexpr):
        gl.inline_asm_elementwise(_prefetch_asm(NBYTES), "=r,l", [ptr], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _produce_x(x_desc, xs, ready, empty, qw_ptr, s_ptr, start, end, N, KB, G, GS_SHIFT, num_m,
                   PREFETCH: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr):  # fmt: skip
        """Warp-specialised loader (one warp): x of items start … end − 1 into the 3-stage ring, each stage once the
        consumers have released it (``empty``; a fresh barrier counts as released). With ``PREFETCH`` it first asks
        the L2 for the item's packed codes and scale row (whole 64-row blocks; the multiplying warps load them a
        step ahead, too late for an HBM miss at large batches)."""
        S = KB
        pid_m, pid_n, k = _first_item(start, S, num_m)
        stage = 0
        phase = 1
        for _ in range(start, end):
            if PREFETCH:
                for b in gl.static_range(BN // 64):  # a block: 64 rows × 128 columns, 4 KiB contiguous
                    _prefetch(qw_ptr + ((pid_n * (BN // 64) + b).to(gl.int64) * KB + k) * 2048, 4096)
                g = gl.minimum((k * 128) >> GS_SHIFT, G - 1)
                _prefetch(s_ptr + g * N + pid_n * BN, BN * s_ptr.dtype.element_ty.primitive_bitwidth // 8)
            mbarrier.wait(empty.index(stage), phase)
            _load_x(x_desc, xs, ready, pid_m, k, True, stage, BM)
            pid_m, pid_n, k = _next_item(pid_m, pid_n, k, S, num_m)
            stage += 1
            wrap = (stage == 3).to(gl.int32)
            stage -= 3 * wrap
            phase ^= wrap

    @gluon.jit
    def _mainloop(
        x_desc, xs, ready, empty, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, c, start, end, per, M, N, KB, G,
        GS_SHIFT, stride_ym, HAS_ZERO: gl.constexpr, S16: gl.constexpr, PLANE_GROUPS: gl.constexpr,
        EVEN_N: gl.constexpr, MAGIC_VALUE: gl.constexpr, MAGIC_BITS: gl.constexpr, BN: gl.constexpr,
        BM: gl.constexpr, WS: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        """Items start … end − 1: dequantize, multiply, store (see _w4a16_gluon_kernel). x comes through the ring:
        loaded here two steps ahead, or with ``WS`` by _produce_x, released to it through ``empty``."""
        S = KB
        num_m = gl.cdiv(M, BM)
        xdt = x_desc.dtype
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BM, 16])  # fmt: skip
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        row_l: gl.constexpr = gl.SliceLayout(1, a_l)
        r_ar = gl.arange(0, BN, layout=row_l)
        cols = gl.arange(0, 16, layout=gl.SliceLayout(0, a_l))
        w_off = ((r_ar // 64) * (KB * 2048) + (r_ar % 64) * 32)[:, None] + cols[None, :]
        first_tile = start // S
        head_part = start % S != 0  # the program's first tile began in another program
        pid_m, pid_n, k = _first_item(start, S, num_m)
        if not WS:
            _load_x(x_desc, xs, ready, pid_m, k, start < end, 0, BM)
        w0n, w1n, s0n, z0n, s1n, z1n = _load_w(qw_ptr, s_ptr, z_ptr, w_off, r_ar, pid_n, k, start < end, N, KB, G,
                                               GS_SHIFT, HAS_ZERO, PLANE_GROUPS, EVEN_N, MAGIC_VALUE, xdt, BN,
                                               a_l)  # fmt: skip
        pid_mn, pid_nn, kn = _next_item(pid_m, pid_n, k, S, num_m)
        if not WS:
            _load_x(x_desc, xs, ready, pid_mn, kn, start + 1 < end, 1, BM)
        pid_m2, pid_n2, k2 = _next_item(pid_mn, pid_nn, kn, S, num_m)  # the item after next: its x goes next
        acc = gl.zeros((BN, BM), gl.float32, layout=mma)
        a_prev = gl.zeros((BN, 16), xdt, layout=a_l)
        stage = 0
        phase = 0
        for it in range(start, end):
            live = it + 1 < end
            w0, w1, s0, z0, s1, z1 = w0n, w1n, s0n, z0n, s1n, z1n
            # the next item's weights, a step ahead
            w0n, w1n, s0n, z0n, s1n, z1n = _load_w(qw_ptr, s_ptr, z_ptr, w_off, r_ar, pid_nn, kn, live, N, KB, G,
                                                   GS_SHIFT, HAS_ZERO, PLANE_GROUPS, EVEN_N, MAGIC_VALUE, xdt, BN,
                                                   a_l)  # fmt: skip
            mbarrier.wait(ready.index(stage), phase)
            next_stage = stage + 1 - 3 * (stage == 2).to(gl.int32)
            if PLANE_GROUPS:
                if EVEN_N:
                    n_ok = r_ar < BN
                else:
                    n_ok = r_ar < N - pid_n * BN
            for t in gl.static_range(2):
                if t == 0:
                    wt = w0
                    sc = s0
                    zz = z0
                else:
                    wt = w1
                    sc = s1
                    zz = z1
                xt = xs.index(2 * stage + t)
                for p in gl.static_range(4):
                    if PLANE_GROUPS:  # groups under 64 columns: each plane's own rows
                        sc, zz = _group_rows(s_ptr, z_ptr, pid_n * BN, r_ar, n_ok, k * 128 + t * 64 + p * 16, N, G,
                                             GS_SHIFT, HAS_ZERO, MAGIC_VALUE, xdt, row_l)  # fmt: skip
                    a = gl.inline_asm_elementwise(_nibble_asm(p, MAGIC_BITS), "=r,r", [wt], xdt, True, 2)
                    a = a - zz[:, None]  # code − zero, exact in 16 bits
                    if S16:
                        a = a * sc[:, None]
                    else:
                        a = (a.to(gl.float32) * sc.to(gl.float32)[:, None]).to(xdt)
                    b = xt.slice(16 * p, 16, dim=1).permute((1, 0))
                    acc = warpgroup_mma(a, b, acc, is_async=True)
                    # the previous product is done: its operand registers (a_prev) may be reused from here on
                    acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_prev))
                    a_prev = a
                    if t == 0 and p == 0:
                        # this warpgroup is done with the previous step; after the barrier every warpgroup is,
                        # and its stage takes the step after next (the barrier waits while this product runs)
                        if WS:  # (arrive: a barrier of the consumer warps, then one arrival)
                            mbarrier.arrive(empty.index(3 - stage - next_stage), pred=it > start)
                        else:
                            gl.thread_barrier()
                            _load_x(x_desc, xs, ready, pid_m2, k2, it + 2 < end, 3 - stage - next_stage, BM)
            if (k == S - 1) | (it == end - 1):  # the end of this program's part of the tile
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                t_id = pid_n * num_m + pid_m
                if ((t_id == first_tile) & head_part) | ((it == end - 1) & (k != S - 1)):
                    # a part of the tile: add it up with the others; the last part to arrive writes the tile
                    offs = _part_offsets(BN, BM, mma)
                    c_lo = (t_id * S) // per
                    c_hi = ((t_id + 1) * S - 1) // per
                    slot = 2 * c + (t_id != first_tile).to(gl.int32)  # each part in its own slot
                    gl.store(ws_ptr + slot.to(gl.int64) * (BN * BM) + offs, acc)
                    gl.thread_barrier()  # every thread's part is in before the count is released
                    done = gl.atomic_add(cnt_ptr + t_id, 1, sem="acq_rel", scope="gpu")
                    if done == c_hi - c_lo:  # the last part to arrive sums them all, in program order
                        total = gl.zeros((BN, BM), gl.float32, layout=mma)
                        for cc in range(c_lo, c_hi + 1):
                            cc_slot = 2 * cc + ((cc * per) // S != t_id).to(gl.int32)
                            total += gl.load(ws_ptr + cc_slot.to(gl.int64) * (BN * BM) + offs,
                                             cache_modifier=".cg")  # fmt: skip
                        gl.store(cnt_ptr + t_id, 0)  # zero again for the next launch
                        _store_y(y_ptr, total, pid_m, pid_n, M, N, stride_ym, BN, BM, num_warps)
                else:
                    _store_y(y_ptr, acc, pid_m, pid_n, M, N, stride_ym, BN, BM, num_warps)
                acc = gl.zeros((BN, BM), gl.float32, layout=mma)
            pid_m, pid_n, k = pid_mn, pid_nn, kn
            pid_mn, pid_nn, kn = pid_m2, pid_n2, k2
            pid_m2, pid_n2, k2 = _next_item(pid_m2, pid_n2, k2, S, num_m)
            stage = next_stage
            phase ^= (stage == 0).to(gl.int32)

    @gluon.jit
    def _w4a16_gluon_kernel(
        x_desc, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, KB, G, GS_SHIFT, stride_ym, per,
        HAS_ZERO: gl.constexpr, S16: gl.constexpr, PLANE_GROUPS: gl.constexpr, EVEN_N: gl.constexpr,
        MAGIC_VALUE: gl.constexpr, MAGIC_BITS: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, WS: gl.constexpr,
        PREFETCH: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        # Work items are (output tile, 128-column step) pairs in tile-major order; program c takes items
        # c·per … (c+1)·per − 1, so per = KB is one tile per program and a smaller grid of persistent programs is
        # stream-K: a tile split between programs is summed by the last of them to arrive, from float32 partial
        # tiles in ws (two slots per program: its first tile, its last), in program order (deterministic).
        c = gl.program_id(0)
        start = c * per
        end = gl.minimum(start + per, gl.cdiv(M, BM) * gl.cdiv(N, BN) * KB)
        # x ring of 3 stages holding steps j − 1 (read by the products still in flight), j and j + 1; step j + 2
        # goes into step j − 1's stage once every warpgroup's first product of step j is issued (each keeps one
        # product in flight, so all of step j − 1's are done then)
        xs = gl.allocate_shared_memory(x_desc.dtype, [6, BM, 64], x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(3):
            mbarrier.init(ready.index(st), count=1)
            mbarrier.init(empty.index(st), count=1)
        gl.thread_barrier()
        if WS:
            gl.warp_specialize([
                (_mainloop, (x_desc, xs, ready, empty, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, c, start, end, per,
                             M, N, KB, G, GS_SHIFT, stride_ym, HAS_ZERO, S16, PLANE_GROUPS, EVEN_N, MAGIC_VALUE,
                             MAGIC_BITS, BN, BM, WS, num_warps)),
                (_produce_x, (x_desc, xs, ready, empty, qw_ptr, s_ptr, start, end, N, KB, G, GS_SHIFT,
                              gl.cdiv(M, BM), EVEN_N and PREFETCH, BN, BM)),
            ], [1], [24])  # fmt: skip
        else:
            _mainloop(x_desc, xs, ready, empty, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, c, start, end, per, M, N,
                      KB, G, GS_SHIFT, stride_ym, HAS_ZERO, S16, PLANE_GROUPS, EVEN_N, MAGIC_VALUE, MAGIC_BITS, BN, BM,
                      WS, num_warps)  # fmt: skip
        for st in gl.static_range(3):
            mbarrier.invalidate(ready.index(st))
            mbarrier.invalidate(empty.index(st))


def register_cap(block_n: int, block_m: int, num_warps: int, per_sm: int = 1, loader_warp: bool = False) -> int:
    """The launch's register cap per thread (``maxnreg``: the register file shared by per_sm programs, the loader
    warp counted as a whole warpgroup); ValueError for a tile the kernel cannot take: block_n a multiple of 64 and
    of 16 per warp, block_m a multiple of 8 up to 256, and room for the accumulator plus working registers."""
    if block_n % 64 or block_n % (16 * num_warps) or block_m % 8 or not 8 <= block_m <= 256:
        raise ValueError(f"Gluon W4A16 tile {block_n} × {block_m} with {num_warps} warps: block_n must be a multiple "
                         "of 64 and of 16 per warp, block_m a multiple of 8 up to 256")  # fmt: skip
    cap = 65536 // (per_sm * 32 * (num_warps + 4 * loader_warp)) // 8 * 8
    # what a multiplying thread gets: the cap, or with a loader warp what the loader's warpgroup (24 each) leaves
    per_thread = min(255, (cap * (num_warps + 4) - 24 * 4) // num_warps if loader_warp else cap)
    acc = block_n * block_m // (32 * num_warps)
    if acc + 64 > per_thread:
        raise ValueError(f"Gluon W4A16 tile {block_n} × {block_m}: {per_sm} programs per multiprocessor leave "
                         f"{per_thread} registers per thread, the accumulator alone takes {acc}")  # fmt: skip
    return cap


def launch(
    x2: torch.Tensor,
    w,
    block_n: int,
    block_m: int,
    num_warps: int,
    per_sm: int = 1,
    split: int = 1,
    stream_k: bool = False,
    loader_warp: bool = False,
    prefetch: bool = True,
) -> torch.Tensor:
    """Contiguous x2 [M, K] (already column-permuted when w.perm is set) @ dequant(w)ᵀ → [M, N] in x2's dtype.

    Programs: each takes ⌈steps / split⌉ consecutive 128-column steps of the tiles in turn (``split`` per
    block_n × block_m output tile where it divides a tile's steps; else some programs straddle two tiles), or with
    ``stream_k`` per_sm per multiprocessor, persistent, sharing all tiles' steps evenly. block_n: a multiple of 64
    and of 16·num_warps (one or more 16-row slabs per warp); block_m: a multiple of 8 up to 256. ``per_sm``: programs
    resident per multiprocessor (registers capped to fit them). ``loader_warp``: x loaded by a warp of its own
    (warp specialisation) instead of by the multiplying warps between products. Tiles split between programs meet
    in float32: each part in its own slot, summed in program order by the last to arrive (deterministic; fp32
    reductions into one slot were no faster, BENCHMARKS.md).
    ``prefetch``: the loader warp asks the L2 for each step's codes and scales ahead (N a multiple of block_n).
    """
    from qconv.kernels.w4a16 import MAGIC, _group_shift, _scratch, _sm_count

    cap = register_cap(block_n, block_m, num_warps, per_sm, loader_warp)
    m, k = x2.shape
    n = w.shape[0]
    if x2.data_ptr() % 16:  # the tensor memory accelerator reads from 16-byte aligned rows
        x2 = x2.clone()
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    magic_bits, magic_value = MAGIC[x2.dtype]
    kb = w.qweight.shape[1] // 32
    tiles = -(-n // block_n) * -(-m // block_m)
    programs = per_sm * _sm_count(x2.device) if stream_k else tiles * split
    per = -(-(tiles * kb) // min(programs, tiles * kb))
    grid = (-(-(tiles * kb) // per),)
    gdt = gl.bfloat16 if x2.dtype == torch.bfloat16 else gl.float16
    x_desc = TensorDescriptor.from_tensor(x2, [block_m, 64], gl.NVMMASharedLayout.get_default_for([block_m, 64], gdt))
    regs = {"maxnreg": cap} if cap < 255 or loader_warp else {}  # the register file shared by per_sm programs
    shared = per % kb != 0  # some tiles are split between programs
    ws = torch.empty(2 * grid[0] * block_n * block_m if shared else 1, dtype=torch.float32, device=x2.device)
    cnt = _scratch(x2.device, "counts", tiles if shared else 1, torch.int32)
    _w4a16_gluon_kernel[grid](
        x_desc, w.qweight, w.scales, w.zeros if w.zeros is not None else w.qweight, y, ws, cnt,
        m, n, kb, w.n_groups, _group_shift(w), y.stride(0), per,
        HAS_ZERO=w.zeros is not None, S16=w.scales.dtype == x2.dtype,
        PLANE_GROUPS=w.n_groups > 1 and w.group_size < 64, EVEN_N=n % block_n == 0, MAGIC_VALUE=magic_value,
        MAGIC_BITS=magic_bits, BN=block_n, BM=block_m, WS=loader_warp,
        PREFETCH=prefetch, num_warps=num_warps, **regs,
    )  # fmt: skip
    return y
