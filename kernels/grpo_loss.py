# GRPO loss: Flow-GRPO's clipped objective of one SDE step, fused forward and backward (Triton).
#
# Maths (docs/design.md; per sample b over its N elements, weights m_i (the mask, 1 = generated; no
# mask: all 1), the step's numbers a = mean_x, c = mean_v, s = std, the advantage A, clip range eps):
#   mu_i  = a x_t_i + c v_i        e_i = x_next_i - mu_i        (the sampled step's residual)
#   M = sum_i m_i      Q = sum_i m_i e_i^2      K = sum_i m_i (v_i - v_ref_i)^2
#   logp  = -Q / (2 s^2 M) - log s - log sqrt(2 pi)          (M = 0: Q = 0, the constants only)
#   rho   = exp(logp - logp_old)          (on-policy, logp_old None: logp_old = logp detached, rho = 1)
#   loss  = max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) + kl_coef c^2 K / (2 s^2 M)
#   dloss / dv_i = (c m_i / (s^2 M)) (g e_i + kl_coef c (v_i - v_ref_i))
#       g = dloss / dlogp = -A rho, or 0 where the clip holds (A > 0 and rho > 1 + eps, or A < 0 and
#       rho < 1 - eps; at the boundaries torch's max / clamp give the full gradient, and so does this)
#   reduction "mean": sum_b w_b loss_b / sum_b w_b over samples with w_b > 0.
#
# Memory-pass budget (one pass = one read or write of a [B, N] tensor; the mask is one of them):
#   g needs rho, rho needs the whole sample's Q: the gradient's per-sample coefficients are known only
#   after a full reduction. The forward therefore writes what the gradient needs per element, and the
#   backward scales it by per-sample factors (c / (s^2 M), g, grad_output), applied in fp32:
#   on-policy (logp_old None): rho = 1 is known before the reduction, so g = -A is too: the forward
#     reads v, x_t, x_next, m and writes u = m (g e + kl_coef c (v - v_ref)) (the KL folded in, one
#     tensor); the backward reads u and writes the gradient  -> 5 + 2 = 7 (v_ref: +1 read = 8).
#   off-policy: the forward reads 4 and writes h = m e (and, with v_ref, h2 = m c (v - v_ref): g is
#     not known yet, so two tensors); the backward reads them and writes the gradient
#     -> 5 + 2 = 7 (v_ref: 7 + 3 = 10).
#   Recomputing e in the backward instead (nft_loss's adaptive form) costs 4 + 5 = 9 (v_ref: 11);
#   it would save one or two tensors of memory between forward and backward, which at FLUX sizes
#   is small beside the activations. The saved tensors are O(e) in v's dtype; 1 / (s^2 M), tiny at
#   FLUX sizes (M = 2^18), is applied in fp32 in the backward, as nft_loss does with its 2 / N.
#   No mask: one read less everywhere. No gradient needed (rollout log-probs): 4 reads, nothing large
#   written.
# Launches: forward = the stats kernel + a one-program finalize kernel; backward = 1 kernel. As in
#   nft_loss, each sample is split into chunks so that B x chunks programs fill the GPU; every
#   program writes fp64 partial sums to a workspace that the finalize kernel reduces in a fixed order
#   (bit-identical runs); it also writes the per-sample factors the backward needs.
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .launch import acc_dtype, constants, next_pow2, split_rows, tl_dtype
from .nft_loss import finalize_tile
from .reference import LOG_SQRT_2PI

N_STATS = 3  # Q, M, K per (sample, chunk)
NO_WRITE, WRITE_FOLDED, WRITE_SPLIT = 0, 1, 2


@triton.jit
def _grpo_forward_kernel(
    v_ptr, x_ptr, xn_ptr, m_ptr, vref_ptr, a_ptr, c_ptr, adv_ptr, params_ptr,
    ws_ptr, h_ptr, h2_ptr, B, N, CHUNK, CHUNKS,
    HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr, WRITE: tl.constexpr, ACC: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # one program: ROWS samples (1 on a GPU) x one chunk of their elements
    pid = tl.program_id(0).to(tl.int64)
    ch = pid % CHUNKS
    rows = (pid // CHUNKS) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    row_base = rows[:, None] * N
    start = ch * CHUNK
    end = tl.where(start + CHUNK < N, start + CHUNK, N)
    a = tl.load(a_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    kl = tl.load(params_ptr + 1).to(ACC)
    if WRITE == 1:  # on-policy: g = -A is known now
        g = -tl.load(adv_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]

    # (tl.full, not tl.zeros: the interpreter charges ~1 ms for every nested @jit call)
    sq = tl.full([ROWS, BLOCK], 0.0, ACC)
    sm = tl.full([ROWS, BLOCK], 0.0, ACC)
    sk = tl.full([ROWS, BLOCK], 0.0, ACC)
    for off in range(start, end, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inside = row_ok[:, None] & (cols < end)[None, :]
        offs = row_base + cols[None, :]
        v = tl.load(v_ptr + offs, mask=inside, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(ACC)
        xn = tl.load(xn_ptr + offs, mask=inside, other=0.0).to(ACC)
        e = xn - (a * x + c * v)
        if HAS_MASK:
            m = tl.load(m_ptr + offs, mask=inside, other=0.0).to(ACC)
            me = m * e
            sm += m
        else:
            me = e
        sq += me * e
        if HAS_REF:
            dk = v - tl.load(vref_ptr + offs, mask=inside, other=0.0).to(ACC)
            if HAS_MASK:
                mdk = m * dk
            else:
                mdk = dk
            sk += mdk * dk
        if WRITE == 1:
            u = g * me
            if HAS_REF:
                u += kl * c * mdk
            tl.store(h_ptr + offs, u.to(h_ptr.dtype.element_ty), mask=inside)
        if WRITE == 2:
            tl.store(h_ptr + offs, me.to(h_ptr.dtype.element_ty), mask=inside)
            if HAS_REF:
                tl.store(h2_ptr + offs, (c * mdk).to(h2_ptr.dtype.element_ty), mask=inside)

    part = ws_ptr + (rows * CHUNKS + ch) * 3
    tl.store(part, tl.sum(sq.to(tl.float64), axis=1), mask=row_ok)
    if HAS_MASK:
        tl.store(part + 1, tl.sum(sm.to(tl.float64), axis=1), mask=row_ok)
    if HAS_REF:
        tl.store(part + 2, tl.sum(sk.to(tl.float64), axis=1), mask=row_ok)


@triton.jit
def _grpo_finalize_kernel(s_ptr, c_ptr, adv_ptr, lpo_ptr, w_ptr, params_ptr, ws_ptr, out_ptr, logp_ptr,
                          B, N, CHUNKS,
                          HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr, ON_POLICY: tl.constexpr,
                          HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr,
                          FIN_B: tl.constexpr, FIN_C: tl.constexpr):
    """Per-sample log-probs and losses from the partials; the batch mean; the backward's factors.

    Workspace after the partials [B, CHUNKS, 3]: g [B], c / (s^2 M) [B], 1 / sum of kept weights."""
    eps = tl.load(params_ptr).to(ACC)
    kl = tl.load(params_ptr + 1).to(ACC)
    tiny = tl.load(params_ptr + 2).to(tl.float64)
    log_sqrt_2pi = tl.load(params_ptr + 3).to(ACC)
    aux = ws_ptr + B * CHUNKS * 3
    cs = tl.arange(0, FIN_C)
    num = tl.full([FIN_B], 0.0, tl.float64)
    den = tl.full([FIN_B], 0.0, tl.float64)
    for b0 in range(0, B, FIN_B):
        bs = b0 + tl.arange(0, FIN_B)
        bm = bs < B
        pm = bm[:, None] & (cs[None, :] < CHUNKS)
        base = ws_ptr + (bs[:, None] * CHUNKS + cs[None, :]) * 3
        q = tl.sum(tl.load(base, mask=pm, other=0.0), axis=1)
        if HAS_MASK:
            count = tl.sum(tl.load(base + 1, mask=pm, other=0.0), axis=1)
        else:
            count = tl.full([FIN_B], 0.0, tl.float64) + N
        count = tl.where(count > 0, count, 1.0)  # no generated element: Q = K = 0 and h = 0, any M will do
        s = tl.load(s_ptr + bs, mask=bm, other=1.0).to(ACC)
        c = tl.load(c_ptr + bs, mask=bm, other=0.0).to(ACC)
        adv = tl.load(adv_ptr + bs, mask=bm, other=0.0).to(ACC)
        s2 = s * s
        logp = -(q / (2.0 * s2.to(tl.float64) * count)).to(ACC) - tl.log(s) - log_sqrt_2pi
        tl.store(logp_ptr + bs, logp, mask=bm)
        if ON_POLICY:
            rho = tl.full([FIN_B], 1.0, ACC)
        else:
            rho = tl.exp(logp - tl.load(lpo_ptr + bs, mask=bm, other=0.0).to(ACC))
        lo = 1.0 - eps
        hi = 1.0 + eps
        clipped = tl.minimum(tl.maximum(rho, lo), hi)
        loss = tl.maximum(-adv * rho, -adv * clipped)
        held = ((adv > 0) & (rho > hi)) | ((adv < 0) & (rho < lo))
        tl.store(aux + bs, tl.where(held, 0.0, -adv * rho), mask=bm)
        tl.store(aux + B + bs, c / (s2.to(tl.float64) * count).to(ACC), mask=bm)
        if HAS_REF:
            k = tl.sum(tl.load(base + 2, mask=pm, other=0.0), axis=1)
            loss += kl * c * c * (k / (2.0 * s2.to(tl.float64) * count)).to(ACC)
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
        inv = 1.0 / tl.maximum(tl.sum(den, axis=0), tiny)
        tl.store(aux + 2 * B, inv)
        tl.store(out_ptr, (tl.sum(num, axis=0) * inv).to(ACC))


@triton.jit
def _grpo_backward_kernel(
    go_ptr, go_stride, h_ptr, h2_ptr, w_ptr, params_ptr, ws_ptr, grad_ptr, B, N, CHUNK, CHUNKS,
    SPLIT: tl.constexpr, HAS_REF: tl.constexpr, HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    ch = pid % CHUNKS
    rows = (pid // CHUNKS) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    row_base = rows[:, None] * N
    start = ch * CHUNK
    end = tl.where(start + CHUNK < N, start + CHUNK, N)
    aux = ws_ptr + B * CHUNKS * 3
    # f = d(output) / d(loss_b) x c / (s^2 M): grad_output, times w_b / sum(w) for the mean
    f = tl.load(go_ptr + rows * go_stride, mask=row_ok, other=0.0).to(ACC)
    if MEAN:
        if HAS_WEIGHT:
            w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(ACC)
            f = tl.where(w > 0, f * w, 0.0)
        f = f * tl.load(aux + 2 * B).to(ACC)
    f = f * tl.load(aux + B + rows, mask=row_ok, other=0.0).to(ACC)
    if SPLIT:
        fg = (f * tl.load(aux + rows, mask=row_ok, other=0.0).to(ACC))[:, None]
        fk = (f * tl.load(params_ptr + 1).to(ACC))[:, None]
    f = f[:, None]
    for off in range(start, end, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inside = row_ok[:, None] & (cols < end)[None, :]
        offs = row_base + cols[None, :]
        h = tl.load(h_ptr + offs, mask=inside, other=0.0).to(ACC)
        if SPLIT:
            grad = fg * h
            if HAS_REF:
                grad += fk * tl.load(h2_ptr + offs, mask=inside, other=0.0).to(ACC)
        else:
            grad = f * h
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=inside)


# -- launchers ----------------------------------------------------------------------------------------
def _config(N: int, B: int, device: torch.device, block: int | None, chunks: int | None):
    """(ROWS, BLOCK, CHUNK, CHUNKS, num_warps), as nft_loss: on a GPU one sample per program,
    2048-element tiles and 8 warps (three fp32 accumulators: 24 values per thread), about 4 programs
    per SM; in the interpreter few programs, whole samples, many samples per program."""
    if device.type == "cuda":
        rows, block, num_warps = 1, block or 2048, 8
    else:
        block = block or min(max(next_pow2(N), 16), 1 << 15)
        rows, num_warps = min(next_pow2(B), max(1, (1 << 17) // block)), 4
    chunk, n_chunks = split_rows(N, -(-B // rows), block, device, chunks)
    return rows, block, chunk, n_chunks, num_warps


class _Launch:
    """Everything one call needs, resolved once on the host."""

    __slots__ = ("B", "N", "acc", "params", "rows", "block", "chunk", "chunks", "num_warps", "grid",
                 "has_mask", "has_ref", "on_policy", "has_weight", "mean")

    def __init__(self, v: Tensor, clip_range: float, kl_coef: float, has_mask: bool, has_ref: bool,
                 on_policy: bool, has_weight: bool, mean: bool, block: int | None, chunks: int | None):
        self.B = v.shape[0]
        self.N = v.numel() // self.B
        self.acc = acc_dtype(v.dtype)
        self.params = constants((float(clip_range), float(kl_coef), torch.finfo(self.acc).tiny, LOG_SQRT_2PI),
                                self.acc, v.device)
        self.rows, self.block, self.chunk, self.chunks, self.num_warps = _config(self.N, self.B, v.device,
                                                                                block, chunks)
        self.grid = (-(-self.B // self.rows) * self.chunks,)
        self.has_mask, self.has_ref, self.on_policy = has_mask, has_ref, on_policy
        self.has_weight, self.mean = has_weight, mean


def _forward(L: _Launch, v, x, xn, m, vref, a, c, s, adv, lpo, weight, write: int):
    B, dev = L.B, v.device
    ws = launch.empty((B * L.chunks * N_STATS + 2 * B + 1,), torch.float64, dev)
    out = launch.empty(() if L.mean else (B,), L.acc, dev)
    logp = launch.empty((B,), L.acc, dev)
    h = launch.empty(v.shape, v.dtype, dev) if write else None
    h2 = launch.empty(v.shape, v.dtype, dev) if write == WRITE_SPLIT and L.has_ref else None
    fin_b, fin_c = finalize_tile(B, L.chunks, dev)
    _grpo_forward_kernel[L.grid](
        v, x, xn, v if m is None else m, v if vref is None else vref, a, c, adv, L.params, ws,
        v if h is None else h, v if h2 is None else h2, B, L.N, L.chunk, L.chunks,
        HAS_MASK=L.has_mask, HAS_REF=L.has_ref, WRITE=write, ACC=tl_dtype(L.acc), ROWS=L.rows, BLOCK=L.block,
        num_warps=L.num_warps,
    )
    _grpo_finalize_kernel[(1,)](
        s, c, adv, adv if lpo is None else lpo, adv if weight is None else weight, L.params, ws, out, logp,
        B, L.N, L.chunks,
        HAS_MASK=L.has_mask, HAS_REF=L.has_ref, ON_POLICY=L.on_policy, HAS_WEIGHT=L.has_weight, MEAN=L.mean,
        ACC=tl_dtype(L.acc), FIN_B=fin_b, FIN_C=fin_c, num_warps=4,
    )
    return out, logp, ws, h, h2


def _backward(L: _Launch, go: Tensor, h: Tensor, h2: Tensor | None, weight: Tensor | None, ws: Tensor) -> Tensor:
    grad = launch.empty(h.shape, h.dtype, h.device)
    go_stride = 0 if go.dim() == 0 else go.stride(0)
    _grpo_backward_kernel[L.grid](
        go, go_stride, h, h if h2 is None else h2, h if weight is None else weight, L.params, ws, grad,
        L.B, L.N, L.chunk, L.chunks,
        SPLIT=not L.on_policy, HAS_REF=L.has_ref, HAS_WEIGHT=L.has_weight, MEAN=L.mean,
        ACC=tl_dtype(L.acc), ROWS=L.rows, BLOCK=L.block, num_warps=L.num_warps,
    )
    return grad


class GRPOLossFunction(torch.autograd.Function):
    """Autograd binding: gradient to v_theta only, in v_theta's dtype; the log-probs are a second,
    non-differentiable output."""

    @staticmethod
    def forward(ctx, v, x, xn, m, vref, a, c, s, adv, lpo, weight, L: _Launch):
        write = WRITE_FOLDED if L.on_policy else WRITE_SPLIT
        out, logp, ws, h, h2 = _forward(L, v, x, xn, m, vref, a, c, s, adv, lpo, weight, write)
        ctx.L = L
        ctx.save_for_backward(h, h2, weight, ws)
        ctx.mark_non_differentiable(logp)
        return out, logp

    @staticmethod
    def backward(ctx, go, _go_logp):
        h, h2, weight, ws = ctx.saved_tensors
        grad = _backward(ctx.L, go.contiguous(), h, h2, weight, ws)
        return (grad,) + (None,) * 11


def grpo_loss_triton(v_theta: Tensor, x_t: Tensor, x_next: Tensor, advantage: Tensor,
                     logp_old: Tensor | None = None, *, mean_x: Tensor, mean_v: Tensor, std: Tensor,
                     mask: Tensor | None = None, clip_range: float, v_ref: Tensor | None = None,
                     kl_coef: float = 0.0, weight: Tensor | None = None, reduction: str = "mean",
                     return_logp: bool = False, block: int | None = None,
                     chunks: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The Triton GRPO loss on already-validated inputs (kernels.grpo_loss checks and dispatches).

    `block` and `chunks` override the launch configuration (tests use them to reach edge sizes)."""
    mean = reduction == "mean"
    L = _Launch(v_theta, clip_range, kl_coef, mask is not None, v_ref is not None, logp_old is None,
                mean and weight is not None, mean, block, chunks)
    v = v_theta.contiguous()
    x, xn = x_t.detach().contiguous(), x_next.detach().contiguous()
    m = None
    if mask is not None:
        m = mask.detach()
        m = m.to(v.dtype) if m.dtype == torch.bool else m
        m = (m.expand(v.shape) if m.shape != v.shape else m).contiguous()
    vref = None if v_ref is None else v_ref.detach().contiguous()
    a, c, s, adv = (z.detach().contiguous() for z in (mean_x, mean_v, std, advantage))
    lpo = None if logp_old is None else logp_old.detach().contiguous()
    weight = None if not L.has_weight else weight.detach().contiguous()
    if torch.is_grad_enabled() and v_theta.requires_grad:
        out, logp = GRPOLossFunction.apply(v, x, xn, m, vref, a, c, s, adv, lpo, weight, L)
    else:
        out, logp = _forward(L, v.detach(), x, xn, m, vref, a, c, s, adv, lpo, weight, NO_WRITE)[:2]
    return (out, logp) if return_logp else out


def sde_step_logprob_triton(v: Tensor, x_t: Tensor, x_next: Tensor, *, mean_x: Tensor, mean_v: Tensor,
                            std: Tensor, mask: Tensor | None = None, block: int | None = None,
                            chunks: int | None = None) -> Tensor:
    """Per-sample log-probabilities of SDE steps (the forward of grpo_loss_triton, nothing else):
    no gradient, on validated inputs (kernels.sde_step_logprob checks and dispatches)."""
    zeros = torch.zeros(v.shape[0], dtype=acc_dtype(v.dtype), device=v.device)
    with torch.no_grad():
        return grpo_loss_triton(v, x_t, x_next, zeros, mean_x=mean_x, mean_v=mean_v, std=std, mask=mask,
                                clip_range=0.0, reduction="none", return_logp=True, block=block, chunks=chunks)[1]
