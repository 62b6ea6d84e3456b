# DiffusionNFT loss, fused forward and backward (Triton).
#
# Maths (docs/design.md; per sample b over its N elements, d = v_old - v, delta = v_theta - v_old):
#   e+ = d + beta delta = (1 - beta) v_old + beta v_theta - v
#   e- = d - beta delta = (1 + beta) v_old - beta v_theta - v
#   velocity form:  L+- = S2+- / N                         S2 = sum e^2, S1 = sum |e|
#   adaptive form:  L+- = t^2 (S2+- / N) / w+-,   w+- = max(t S1+- / N, 1e-5)   (fp64, detached)
#   loss_b = (r L+ + (1 - r) L-) / beta + kl_coef SK / N,   SK = sum (v_theta - v_ref)^2
#   dloss_b / dv_theta = a+ e+ - a- e- + (2 kl_coef / N) (v_theta - v_ref)
#       velocity: a+ = 2 r / N,                 a- = 2 (1 - r) / N
#       adaptive: a+ = 2 t^2 r / (N w+),        a- = 2 t^2 (1 - r) / (N w-)
#   reduction "mean": sum_b c_b loss_b / sum_b c_b over samples with weight c_b > 0.
#
# Memory-pass budget (one pass = one read or write of a [B, N] tensor; v_ref adds 1 pass in the
# velocity form, 2 in the adaptive form):
#   velocity form: forward reads v_theta, v_old, v and writes the unscaled gradient (the loss is
#     the last op, so its gradient is known during the forward); backward reads it once and writes
#     it scaled by grad_output (which cannot be known to be 1 without a host sync)  -> 4 + 2 = 6.
#     The saved tensor (v_theta's dtype) is r e+ - (1 - r) e- + kl_coef (v_theta - v_ref), O(|e|):
#     the factor 2 / N is applied in the backward, in fp32, because 2 e / N at FLUX sizes (N = 2^18)
#     is subnormal in fp16 and would lose most of its bits before a loss scale multiplies it back.
#   adaptive form: the gradient needs the per-sample weights w+-, i.e. a full reduction over the
#     sample first. Strategy "two passes, split across the whole GPU": the forward is the stats
#     pass (reads 3, writes nothing large); the backward recomputes e+- and writes the gradient
#     with grad_output folded in (reads 3, writes 1)  -> 3 + 4 = 7.
#     The alternative, one program per sample holding the gradient until its weight is known,
#     keeps only B (8..48) programs busy on a 132-SM GPU and cannot reach the bandwidth; a grid-wide
#     barrier would deadlock in the interpreter and needs co-resident programs. Writing e+- during
#     the forward would cost 3 + 2 + 3 = 8.
# Launches: forward = the stats kernel + a one-program finalize kernel; backward = 1 kernel.
#   Each sample is split into chunks so B x chunks programs fill the GPU; every program writes its
#   partial sums (fp64) to a workspace, and the finalize kernel reduces them in a fixed order into
#   the losses, so results are bit-identical run to run. (A "last program finalizes" ticket would
#   save the second launch but needs a zeroed counter, i.e. a memset launch anyway, and cross-program
#   memory ordering that the CPU interpreter cannot test; the kernel boundary orders it for free.)
#   |e| sums accumulate in fp64 (the reference's adaptive weight is an fp64 mean); e^2 sums in the
#   accumulation dtype per lane, fp64 across lanes and chunks.
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .launch import acc_dtype, constants, next_pow2, split_rows, tl_dtype

ADAPTIVE_FLOOR = 1e-5
N_STATS = 5  # S2+, S2-, S1+, S1-, SK per (sample, chunk)


@triton.jit
def _nft_forward_kernel(
    vt_ptr, vo_ptr, v_ptr, vref_ptr, r_ptr, params_ptr,
    ws_ptr, grad_ptr, B, N, CHUNK, CHUNKS,
    ADAPTIVE: tl.constexpr, HAS_REF: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # one program: ROWS samples (1 on a GPU) x one chunk of their elements
    pid = tl.program_id(0).to(tl.int64)
    c = pid % CHUNKS
    rows = (pid // CHUNKS) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    row_base = rows[:, None] * N
    start = c * CHUNK
    end = tl.where(start + CHUNK < N, start + CHUNK, N)
    beta = tl.load(params_ptr).to(ACC)
    kl = tl.load(params_ptr + 1).to(ACC)
    if WRITE_GRAD:  # velocity form: the gradient without its factor 2 / N (see the header)
        r = tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]

    # (tl.full, not tl.zeros: the interpreter charges ~1 ms for every nested @jit call)
    s2p = tl.full([ROWS, BLOCK], 0.0, ACC)
    s2n = tl.full([ROWS, BLOCK], 0.0, ACC)
    s1p = tl.full([ROWS, BLOCK], 0.0, tl.float64)
    s1n = tl.full([ROWS, BLOCK], 0.0, tl.float64)
    sk = tl.full([ROWS, BLOCK], 0.0, ACC)
    for off in range(start, end, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        m = row_ok[:, None] & (cols < end)[None, :]
        offs = row_base + cols[None, :]
        vt = tl.load(vt_ptr + offs, mask=m, other=0.0).to(ACC)
        vo = tl.load(vo_ptr + offs, mask=m, other=0.0).to(ACC)
        v = tl.load(v_ptr + offs, mask=m, other=0.0).to(ACC)
        d = vo - v
        delta = beta * (vt - vo)
        ep = d + delta
        en = d - delta
        s2p += ep * ep
        s2n += en * en
        if ADAPTIVE:
            s1p += tl.abs(ep).to(tl.float64)
            s1n += tl.abs(en).to(tl.float64)
        if HAS_REF:
            dk = vt - tl.load(vref_ptr + offs, mask=m, other=0.0).to(ACC)
            sk += dk * dk
        if WRITE_GRAD:
            g = r * ep - (1.0 - r) * en
            if HAS_REF:
                g += kl * dk
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=m)

    part = ws_ptr + (rows * CHUNKS + c) * 5
    tl.store(part, tl.sum(s2p.to(tl.float64), axis=1), mask=row_ok)
    tl.store(part + 1, tl.sum(s2n.to(tl.float64), axis=1), mask=row_ok)
    if ADAPTIVE:
        tl.store(part + 2, tl.sum(s1p, axis=1), mask=row_ok)
        tl.store(part + 3, tl.sum(s1n, axis=1), mask=row_ok)
    if HAS_REF:
        tl.store(part + 4, tl.sum(sk.to(tl.float64), axis=1), mask=row_ok)


@triton.jit
def _nft_finalize_kernel(r_ptr, t_ptr, w_ptr, params_ptr, ws_ptr, out_ptr, B, N, CHUNKS,
                         ADAPTIVE: tl.constexpr, HAS_REF: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                         MEAN: tl.constexpr, ACC: tl.constexpr, FIN_B: tl.constexpr, FIN_C: tl.constexpr):
    """Per-sample losses from the partials; the batch mean; the backward's per-sample weights.

    Workspace after the partials [B, CHUNKS, 5]: w+ [B], w- [B], 1 / sum of kept weights."""
    beta = tl.load(params_ptr).to(ACC)
    kl = tl.load(params_ptr + 1).to(ACC)
    floor = tl.load(params_ptr + 2).to(tl.float64)
    aux = ws_ptr + B * CHUNKS * 5
    cs = tl.arange(0, FIN_C)
    num = tl.full([FIN_B], 0.0, tl.float64)
    den = tl.full([FIN_B], 0.0, tl.float64)
    for b0 in range(0, B, FIN_B):
        bs = b0 + tl.arange(0, FIN_B)
        bm = bs < B
        pm = bm[:, None] & (cs[None, :] < CHUNKS)
        base = ws_ptr + (bs[:, None] * CHUNKS + cs[None, :]) * 5
        s2p = tl.sum(tl.load(base, mask=pm, other=0.0), axis=1)
        s2n = tl.sum(tl.load(base + 1, mask=pm, other=0.0), axis=1)
        r = tl.load(r_ptr + bs, mask=bm, other=0.0).to(ACC)
        l_pos = (s2p / N).to(ACC)
        l_neg = (s2n / N).to(ACC)
        if ADAPTIVE:
            s1p = tl.sum(tl.load(base + 2, mask=pm, other=0.0), axis=1)
            s1n = tl.sum(tl.load(base + 3, mask=pm, other=0.0), axis=1)
            t = tl.load(t_ptr + bs, mask=bm, other=0.0).to(ACC)
            t64 = t.to(tl.float64)
            w_pos = tl.maximum(t64 * (s1p / N), floor)
            w_neg = tl.maximum(t64 * (s1n / N), floor)
            tl.store(aux + bs, w_pos, mask=bm)
            tl.store(aux + B + bs, w_neg, mask=bm)
            l_pos = t * t * l_pos / w_pos.to(ACC)
            l_neg = t * t * l_neg / w_neg.to(ACC)
        loss = (r * l_pos + (1.0 - r) * l_neg) / beta
        if HAS_REF:
            sk = tl.sum(tl.load(base + 4, mask=pm, other=0.0), axis=1)
            loss += kl * (sk / N).to(ACC)
        if MEAN:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + bs, mask=bm, other=0.0).to(tl.float64)
            else:
                w = tl.where(bm, 1.0, 0.0).to(tl.float64)
            kept = w > 0
            num += tl.where(kept, loss.to(tl.float64) * w, 0.0)
            den += tl.where(kept, w, 0.0)
        else:
            tl.store(out_ptr + bs, loss, mask=bm)
    if MEAN:
        tiny = tl.load(params_ptr + 3).to(tl.float64)  # the reference's clamp: finfo(acc).tiny
        inv = 1.0 / tl.maximum(tl.sum(den, axis=0), tiny)
        tl.store(aux + 2 * B, inv)
        tl.store(out_ptr, (tl.sum(num, axis=0) * inv).to(ACC))


@triton.jit
def _nft_backward_kernel(
    go_ptr, go_stride, saved_ptr, vt_ptr, vo_ptr, v_ptr, vref_ptr, r_ptr, t_ptr, w_ptr, params_ptr,
    ws_ptr, grad_ptr, B, N, CHUNK, CHUNKS,
    FROM_SAVED: tl.constexpr, HAS_REF: tl.constexpr, HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    c = pid % CHUNKS
    rows = (pid // CHUNKS) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    row_base = rows[:, None] * N
    start = c * CHUNK
    end = tl.where(start + CHUNK < N, start + CHUNK, N)
    aux = ws_ptr + B * CHUNKS * 5
    # f = d(output) / d(loss_b): grad_output, times c_b / sum(c) for the mean
    f = tl.load(go_ptr + rows * go_stride, mask=row_ok, other=0.0).to(ACC)
    if MEAN:
        if HAS_WEIGHT:
            w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(ACC)
            f = tl.where(w > 0, f * w, 0.0)
        f = f * tl.load(aux + 2 * B).to(ACC)
    f = f[:, None]
    if FROM_SAVED:
        f = f * 2.0 / N  # (not f * (2.0 / N): that quotient would be fp32)
        for off in range(start, end, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            m = row_ok[:, None] & (cols < end)[None, :]
            offs = row_base + cols[None, :]
            g = tl.load(saved_ptr + offs, mask=m, other=0.0).to(ACC)
            tl.store(grad_ptr + offs, (f * g).to(grad_ptr.dtype.element_ty), mask=m)
    else:
        beta = tl.load(params_ptr).to(ACC)
        kl = tl.load(params_ptr + 1).to(ACC)
        r = tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
        t = tl.load(t_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
        w_pos = tl.load(aux + rows, mask=row_ok, other=1.0).to(ACC)[:, None]
        w_neg = tl.load(aux + B + rows, mask=row_ok, other=1.0).to(ACC)[:, None]
        a_pos = f * 2.0 * t * t * r / (N * w_pos)
        a_neg = f * 2.0 * t * t * (1.0 - r) / (N * w_neg)
        a_kl = f * 2.0 * kl / N
        for off in range(start, end, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            m = row_ok[:, None] & (cols < end)[None, :]
            offs = row_base + cols[None, :]
            vt = tl.load(vt_ptr + offs, mask=m, other=0.0).to(ACC)
            vo = tl.load(vo_ptr + offs, mask=m, other=0.0).to(ACC)
            v = tl.load(v_ptr + offs, mask=m, other=0.0).to(ACC)
            d = vo - v
            delta = beta * (vt - vo)
            g = a_pos * (d + delta) - a_neg * (d - delta)
            if HAS_REF:
                g += a_kl * (vt - tl.load(vref_ptr + offs, mask=m, other=0.0).to(ACC))
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=m)


# -- launchers ----------------------------------------------------------------------------------------
def _config(N: int, B: int, device: torch.device, block: int | None, chunks: int | None):
    """(ROWS, BLOCK, CHUNK, CHUNKS, num_warps).

    GPU: one sample per program, 2048-element tiles, 8 warps (8 values per thread, 16-byte loads;
    the adaptive forward with its fp64 accumulators needs ~126 registers on sm_90, so 2 programs
    fit per SM: tests/kernels/test_gpu_compile.py), chunks so that there are about 4 programs per
    SM. Interpreter: every program costs milliseconds of Python, so
    few programs: whole samples, many samples per program (up to 2^17 elements)."""
    if device.type == "cuda":
        rows, block, num_warps = 1, block or 2048, 8
    else:
        block = block or min(max(next_pow2(N), 16), 1 << 15)
        rows, num_warps = min(next_pow2(B), max(1, (1 << 17) // block)), 4
    chunk, n_chunks = split_rows(N, -(-B // rows), block, device, chunks)
    return rows, block, chunk, n_chunks, num_warps


def finalize_tile(B: int, chunks: int, device: torch.device) -> tuple[int, int]:
    """(FIN_B, FIN_C): samples x chunks reduced per step by the finalize kernel. Five fp64 tiles
    are live at once: 512 elements on a GPU (4 warps, no spills); bigger in the interpreter."""
    fin_c = next_pow2(chunks)
    return max(1, min(next_pow2(B), (512 if device.type == "cuda" else 4096) // fin_c)), fin_c


class _Launch:
    """Everything one call needs, resolved once on the host."""

    __slots__ = ("B", "N", "acc", "params", "rows", "block", "chunk", "chunks", "num_warps", "grid",
                 "adaptive", "mean", "has_ref", "has_weight")

    def __init__(self, vt: Tensor, beta: float, kl_coef: float, adaptive: bool, mean: bool,
                 has_ref: bool, has_weight: bool, block: int | None, chunks: int | None):
        self.B = vt.shape[0]
        self.N = vt.numel() // self.B
        self.acc = acc_dtype(vt.dtype)
        self.params = constants((float(beta), float(kl_coef), ADAPTIVE_FLOOR, torch.finfo(self.acc).tiny),
                                self.acc, vt.device)
        self.rows, self.block, self.chunk, self.chunks, self.num_warps = _config(self.N, self.B, vt.device,
                                                                                block, chunks)
        self.grid = (-(-self.B // self.rows) * self.chunks,)
        self.adaptive, self.mean, self.has_ref, self.has_weight = adaptive, mean, has_ref, has_weight


def _forward(L: _Launch, vt, vo, v, vref, r, t, weight, write_grad: bool):
    B, dev = L.B, vt.device
    ws = launch.empty((B * L.chunks * N_STATS + 2 * B + 1,), torch.float64, dev)
    out = launch.empty(() if L.mean else (B,), L.acc, dev)
    grad = launch.empty(vt.shape, vt.dtype, dev) if write_grad else vt
    fin_b, fin_c = finalize_tile(B, L.chunks, dev)
    w = r if weight is None else weight
    t = r if t is None else t
    _nft_forward_kernel[L.grid](
        vt, vo, v, vt if vref is None else vref, r, L.params, ws, grad, B, L.N, L.chunk, L.chunks,
        ADAPTIVE=L.adaptive, HAS_REF=L.has_ref, WRITE_GRAD=write_grad, ACC=tl_dtype(L.acc), ROWS=L.rows,
        BLOCK=L.block, num_warps=L.num_warps,
    )
    _nft_finalize_kernel[(1,)](
        r, t, w, L.params, ws, out, B, L.N, L.chunks,
        ADAPTIVE=L.adaptive, HAS_REF=L.has_ref, HAS_WEIGHT=L.has_weight, MEAN=L.mean, ACC=tl_dtype(L.acc),
        FIN_B=fin_b, FIN_C=fin_c, num_warps=4,
    )
    return out, ws, (grad if write_grad else None)


def _backward(L: _Launch, go: Tensor, saved, vt, vo, v, vref, r, t, weight, ws) -> Tensor:
    grad = launch.empty(vt.shape, vt.dtype, vt.device)
    go_stride = 0 if go.dim() == 0 else go.stride(0)
    _nft_backward_kernel[L.grid](
        go, go_stride, vt if saved is None else saved, vt, vo, v, vt if vref is None else vref,
        r, r if t is None else t, r if weight is None else weight, L.params, ws, grad,
        L.B, L.N, L.chunk, L.chunks,
        FROM_SAVED=saved is not None, HAS_REF=L.has_ref, HAS_WEIGHT=L.has_weight, MEAN=L.mean,
        ACC=tl_dtype(L.acc), ROWS=L.rows, BLOCK=L.block, num_warps=L.num_warps,
    )
    return grad


class NFTLossFunction(torch.autograd.Function):
    """Autograd binding: gradient to v_theta only, in v_theta's dtype."""

    @staticmethod
    def forward(ctx, vt, vo, v, vref, r, t, weight, L: _Launch):
        saved_grad = not L.adaptive  # velocity form: the gradient is written during the forward
        out, ws, grad = _forward(L, vt, vo, v, vref, r, t, weight, write_grad=saved_grad)
        ctx.L = L
        if saved_grad:
            ctx.save_for_backward(grad, weight, ws)
        else:
            ctx.save_for_backward(vt, vo, v, vref, r, t, weight, ws)
        return out

    @staticmethod
    def backward(ctx, go):
        L = ctx.L
        if L.adaptive:
            vt, vo, v, vref, r, t, weight, ws = ctx.saved_tensors
            grad = _backward(L, go, None, vt, vo, v, vref, r, t, weight, ws)
        else:
            saved, weight, ws = ctx.saved_tensors
            grad = _backward(L, go, saved, saved, saved, saved, None, saved, None, weight, ws)
        return grad, None, None, None, None, None, None, None


def nft_loss_triton(v_theta: Tensor, v_old: Tensor, v_target: Tensor, r: Tensor, t: Tensor | None = None, *,
                    beta: float, adaptive: bool = True, v_ref: Tensor | None = None, kl_coef: float = 0.0,
                    weight: Tensor | None = None, reduction: str = "mean", block: int | None = None,
                    chunks: int | None = None) -> Tensor:
    """The Triton NFT loss on already-validated inputs (kernels.nft_loss checks and dispatches).

    `block` and `chunks` override the launch configuration (tests use them to reach edge sizes)."""
    mean = reduction == "mean"
    L = _Launch(v_theta, beta, kl_coef, adaptive, mean, v_ref is not None, mean and weight is not None,
                block, chunks)
    vt, vo, v = v_theta.contiguous(), v_old.detach().contiguous(), v_target.detach().contiguous()
    vref = None if v_ref is None else v_ref.detach().contiguous()
    r = r.detach().contiguous()
    t = None if t is None else t.detach().contiguous()
    weight = None if not L.has_weight else weight.detach().contiguous()
    if torch.is_grad_enabled() and v_theta.requires_grad:
        return NFTLossFunction.apply(vt, vo, v, vref, r, t, weight, L)
    return _forward(L, vt, vo, v, vref, r, t, weight, write_grad=False)[0]
