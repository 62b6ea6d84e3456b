# Mask-aware sampler step (Triton): an Euler step where the model generates, the re-noised source
# where the image is kept.
#
# Maths (docs/design.md; m = 1 generates, m = 0 keeps; soft values blend):
#   x_next = m (x_t + (t' - t) v) + (1 - m) ((1 - t') x0_known + t' eps)
#   gradients: dx_t = m g, dv = m (t' - t) g, dx0_known = (1 - m)(1 - t') g, deps = (1 - m) t' g
#   (none for the mask and the times: the public function refuses them when they require grad)
#
# Memory-pass budget: forward reads x_t, v, x0_known, eps once and writes x_next once (5 passes;
# the mask adds 1 when it is elementwise, ~nothing when it is per token or per pixel). Backward
# reads g once and writes one pass per input that needs a gradient. One launch each way.
#
# Layout: the tensors are viewed as a contiguous [ROWS, COLS] grid tiled [BLOCK_R, BLOCK_C], and
# the mask's offset is computed per row, never per element (no integer division in the inner
# loop):   mask_offset(row, col) = ((row // RK) % RM) * M_ROW + col * M_COL
# which covers, after merging dimensions, every mask whose broadcast dimensions form one run:
#   elementwise [B, L, C]:          rows = B,         cols = L C,  mask_offset = row * L C + col
#   per token [B, L, 1]:            rows = B L,       cols = C,    mask_offset = row
#   per pixel [B, 1, H, W] for x [B, C, H, W]: rows = B C, cols = H W, offset = (row // C) H W + col
#   shared over the batch [1, ...]: the same with "% RM" folding the batch away.
# Masks with two separate broadcast runs (rare, e.g. [B, 1, H, 1]) are expanded to x's shape first.
# Per-sample times are read per row (row // rows_per_sample).
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .launch import acc_dtype, constants, next_pow2, tl_dtype


@triton.jit
def _tile(pid, ROWS, COLS, N_CB, RK, RM, M_ROW, RPS,
          M_COL: tl.constexpr, HAS_RM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets of this program's tile: data [BLOCK_R, BLOCK_C], mask (broadcastable), sample."""
    rows = (pid // N_CB) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % N_CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < ROWS
    inside = row_ok[:, None] & (cols < COLS)[None, :]
    offs = rows[:, None] * COLS + cols[None, :]
    mrow = rows // RK
    if HAS_RM:
        mrow = mrow % RM
    if M_COL:
        m_offs = mrow[:, None] * M_ROW + cols[None, :]
        m_ok = inside
    else:
        m_offs = mrow[:, None] * M_ROW
        m_ok = row_ok[:, None]
    return offs, inside, m_offs, m_ok, rows // RPS, row_ok


@triton.jit
def _times(t_ptr, tn_ptr, sample, row_ok, T_ROWS: tl.constexpr, TN_ROWS: tl.constexpr, ACC: tl.constexpr):
    if T_ROWS:
        t = tl.load(t_ptr + sample, mask=row_ok, other=0.0).to(ACC)[:, None]
    else:
        t = tl.load(t_ptr).to(ACC)
    if TN_ROWS:
        tn = tl.load(tn_ptr + sample, mask=row_ok, other=0.0).to(ACC)[:, None]
    else:
        tn = tl.load(tn_ptr).to(ACC)
    return t, tn


@triton.jit
def _blend_forward_kernel(
    x_ptr, v_ptr, m_ptr, x0_ptr, n_ptr, t_ptr, tn_ptr, out_ptr,
    ROWS, COLS, N_CB, RK, RM, M_ROW, RPS,
    M_COL: tl.constexpr, HAS_RM: tl.constexpr, T_ROWS: tl.constexpr, TN_ROWS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs, inside, m_offs, m_ok, sample, row_ok = _tile(pid, ROWS, COLS, N_CB, RK, RM, M_ROW, RPS,
                                                       M_COL, HAS_RM, BLOCK_R, BLOCK_C)
    t, tn = _times(t_ptr, tn_ptr, sample, row_ok, T_ROWS, TN_ROWS, ACC)
    m = tl.load(m_ptr + m_offs, mask=m_ok, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(ACC)
    v = tl.load(v_ptr + offs, mask=inside, other=0.0).to(ACC)
    x0 = tl.load(x0_ptr + offs, mask=inside, other=0.0).to(ACC)
    eps = tl.load(n_ptr + offs, mask=inside, other=0.0).to(ACC)
    euler = x + (tn - t) * v
    renoised = (1.0 - tn) * x0 + tn * eps
    # two products, not renoised + m (euler - renoised): m = 1 must give the Euler step exactly
    out = m * euler + (1.0 - m) * renoised
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _blend_backward_kernel(
    g_ptr, m_ptr, t_ptr, tn_ptr, gx_ptr, gv_ptr, gx0_ptr, gn_ptr,
    ROWS, COLS, N_CB, RK, RM, M_ROW, RPS,
    M_COL: tl.constexpr, HAS_RM: tl.constexpr, T_ROWS: tl.constexpr, TN_ROWS: tl.constexpr,
    NEED_X: tl.constexpr, NEED_V: tl.constexpr, NEED_X0: tl.constexpr, NEED_N: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs, inside, m_offs, m_ok, sample, row_ok = _tile(pid, ROWS, COLS, N_CB, RK, RM, M_ROW, RPS,
                                                       M_COL, HAS_RM, BLOCK_R, BLOCK_C)
    t, tn = _times(t_ptr, tn_ptr, sample, row_ok, T_ROWS, TN_ROWS, ACC)
    m = tl.load(m_ptr + m_offs, mask=m_ok, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(ACC)
    gm = m * g
    gk = (1.0 - m) * g
    if NEED_X:
        tl.store(gx_ptr + offs, gm.to(gx_ptr.dtype.element_ty), mask=inside)
    if NEED_V:
        tl.store(gv_ptr + offs, ((tn - t) * gm).to(gv_ptr.dtype.element_ty), mask=inside)
    if NEED_X0:
        tl.store(gx0_ptr + offs, ((1.0 - tn) * gk).to(gx0_ptr.dtype.element_ty), mask=inside)
    if NEED_N:
        tl.store(gn_ptr + offs, (tn * gk).to(gn_ptr.dtype.element_ty), mask=inside)


# -- layout and launch --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def mask_layout(x_shape: tuple[int, ...], m_shape: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:
    """((ROWS, COLS, RK, RM, M_ROW, M_COL, RPS), expand): the [ROWS, COLS] view and the mask's
    per-row offset rule (module header; RM = 0: no modulo, the mask has its own batch). RPS: rows
    per sample. expand=True: the mask must first be expanded to x."""
    B, N = x_shape[0], math.prod(x_shape)
    m_shape = (1,) * (len(x_shape) - len(m_shape)) + tuple(m_shape)
    batch_shared = B > 1 and m_shape[0] == 1
    runs: list[list] = []  # [is_full, size] over the trailing dimensions of size > 1
    for xs, ms in zip(x_shape[1:], m_shape[1:]):
        if xs == 1:
            continue
        full = ms == xs
        if runs and runs[-1][0] == full:
            runs[-1][1] *= xs
        else:
            runs.append([full, xs])
    flags = [f for f, _ in runs]
    sizes = [s for _, s in runs]
    if flags in ([], [False], [True, False]):  # per sample / per token: one mask value per row
        outer = sizes[0] if flags == [True, False] else 1
        cols = N // (B * outer)
        rows = B * outer
        return (rows, cols, 1, outer if batch_shared else 0, 1, 0, outer), False
    if flags in ([True], [False, True], [True, False, True]):  # inner elements follow the mask
        inner = sizes[-1]
        k = sizes[-2] if len(flags) >= 2 else 1
        outer = sizes[0] if len(flags) == 3 else 1
        rows = N // inner
        return (rows, inner, k, outer if batch_shared else 0, inner, 1, rows // B), False
    return mask_layout(x_shape, x_shape)[0], True


def _config(cols: int, device: torch.device, block: int | None) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): 2048-element tiles, 4 warps on a GPU (16 values per thread,
    four 16-byte loads per tensor); in the interpreter, where each program costs milliseconds of
    Python, few big tiles (2^18 elements)."""
    total = block or (2048 if device.type == "cuda" else 1 << 18)
    block_c = min(next_pow2(cols), total)
    return max(1, total // block_c), block_c, 4


def _times_arg(a, acc: torch.dtype, device: torch.device) -> tuple[Tensor, bool]:
    """(tensor, per_row): a time as a device tensor; per_row when it holds one value per sample."""
    if isinstance(a, Tensor):
        return a.detach().contiguous(), a.dim() == 1 and a.shape[0] > 1
    return constants((float(a),), acc, device), False


class _Launch:
    __slots__ = ("layout", "acc", "block_r", "block_c", "num_warps", "grid", "n_cb", "t", "tn",
                 "t_rows", "tn_rows")

    def __init__(self, x: Tensor, layout: tuple[int, ...], t, t_next, block: int | None):
        self.layout = layout
        self.acc = acc_dtype(x.dtype)
        rows, cols = layout[0], layout[1]
        self.block_r, self.block_c, self.num_warps = _config(cols, x.device, block)
        self.n_cb = -(-cols // self.block_c)
        self.grid = (-(-rows // self.block_r) * self.n_cb,)
        self.t, self.t_rows = _times_arg(t, self.acc, x.device)
        self.tn, self.tn_rows = _times_arg(t_next, self.acc, x.device)

    def args(self):
        rows, cols, rk, rm, m_row, _, rps = self.layout
        return (rows, cols, self.n_cb, rk, rm, m_row, rps)

    def meta(self):
        return dict(M_COL=self.layout[5] == 1, HAS_RM=self.layout[3] > 0, T_ROWS=self.t_rows,
                    TN_ROWS=self.tn_rows, ACC=tl_dtype(self.acc), BLOCK_R=self.block_r,
                    BLOCK_C=self.block_c, num_warps=self.num_warps)


def _forward(L: _Launch, x, v, m, x0, n) -> Tensor:
    out = launch.empty(x.shape, x.dtype, x.device)
    _blend_forward_kernel[L.grid](x, v, m, x0, n, L.t, L.tn, out, *L.args(), **L.meta())
    return out


class MaskedBlendFunction(torch.autograd.Function):
    """Autograd binding: gradients to x_t, v, x0_known and noise."""

    @staticmethod
    def forward(ctx, x, v, m, x0, n, L: _Launch):
        ctx.L = L
        ctx.save_for_backward(m)
        return _forward(L, x, v, m, x0, n)

    @staticmethod
    def backward(ctx, g):
        L = ctx.L
        (m,) = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = g.contiguous()
        outs = [launch.empty(g.shape, g.dtype, g.device) if need[i] else None for i in (0, 1, 3, 4)]
        _blend_backward_kernel[L.grid](
            g, m, L.t, L.tn, *[o if o is not None else g for o in outs], *L.args(),
            NEED_X=need[0], NEED_V=need[1], NEED_X0=need[3], NEED_N=need[4], **L.meta())
        gx, gv, gx0, gn = outs
        return gx, gv, None, gx0, gn, None


def masked_blend_step_triton(x_t: Tensor, v: Tensor, mask: Tensor, x0_known: Tensor, noise: Tensor,
                             t: float | Tensor, t_next: float | Tensor, *, block: int | None = None) -> Tensor:
    """The Triton blend step on already-validated inputs (kernels.masked_blend_step checks and
    dispatches). `block` overrides the elements per tile (tests use it to reach edge sizes)."""
    layout, expand = mask_layout(tuple(x_t.shape), tuple(mask.shape))
    m = mask.detach()
    m = m.expand(x_t.shape).contiguous() if expand else m.contiguous()
    L = _Launch(x_t, layout, t, t_next, block)
    x, vv, x0, n = x_t.contiguous(), v.contiguous(), x0_known.contiguous(), noise.contiguous()
    if torch.is_grad_enabled() and (x_t.requires_grad or v.requires_grad or x0_known.requires_grad
                                    or noise.requires_grad):
        return MaskedBlendFunction.apply(x, vv, m, x0, n, L)
    return _forward(L, x, vv, m, x0, n)
