"""Fast path for linear-coder channel atoms on ``nn.Linear``.

With the linear coder the adapted weight is W' = W0 + unrows(R0·M), R0 = rows(W0) the
k×k blocks of W0 as rows (n_blocks, k²) and M = P·ΔD (k²×k²). The generic path
(:mod:`sdatom.atoms.kernels.generic`) builds the delta through autograd, in forward
and again in backward, and pays for every layout change with a slow strided copy (inner
runs of k elements). Here:

    forward   R0 = rows(W0);  W' = unrows(R0 + R0·M);  y = x·W'ᵀ + b
    backward  R0 = rows(W0);  W' as above;  gx = dy·W'
              gW = dyᵀ·x;  dM = R0ᵀ·rows(gW)          (dΔD = Pᵀ·dM by autograd outside)

saving only x, W0 (the parameter itself) and M. The block transposes (rows/unrows) move each
run of k elements as ONE wider machine word (k=4 float32 runs are 16 bytes), which makes
them 3-5× faster than element-wise strided copies.

Weight-sized passes per training step (memory sweeps over O·I elements besides the three
GEMMs y, gx, gW; counted with torch.profiler on Linear(1280, 1280)):

    generic path   8 strided permute copies, 2 weight-sized adds, 4 R0·M-type GEMMs (14)
    this path      forward 3 (rows swap, R0 + R0·M, unrows swap)
                   backward 5 (rows swap, R0 + R0·M, unrows swap, rows swap of gW, R0ᵀ·rows(gW))
                   (each addmm also copies R0 into its output: 10 in all, 5 of them word-wide
                   swaps)

The dispatch (:mod:`sdatom.atoms.kernels`) decides when this path runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sdatom.atoms.devices import supports_float64
from sdatom.atoms.kernels.generic import compute_dtype

# element sizes that a run of k elements can be moved as (bytes -> dtype)
_WORDS = {
    16: torch.complex128,
    8: torch.int64,
    4: torch.int32,
    2: torch.int16,
    1: torch.uint8,
}


# ----------------------------------------------------------------------------- layouts
def _swap_blocks(
    t: torch.Tensor, a: int, b: int, c: int, k: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Contiguous ``t.view(a, b, c, k).transpose(1, 2)``: (a, c, b, k), one pass.

    Each run of k elements is moved as one wider word when the bytes allow it (a bitwise
    copy), since element-wise copies with inner runs of k are several times slower. ``out``
    (contiguous, t's dtype and size) receives the result instead of a new tensor.
    """
    t = t.contiguous().view(a, b, c, k)
    out = torch.empty(a, c, b, k, dtype=t.dtype, device=t.device) if out is None else out
    out = out.view(a, c, b, k)
    es = t.element_size()
    for size, word in _WORDS.items():
        if size <= es:
            break  # no word wider than the element itself
        if word == torch.complex128 and not supports_float64(t.device):
            continue  # MPS has no complex128: move the run as narrower words
        if k * es % size == 0 and t.storage_offset() * es % size == 0:
            out.view(word).copy_(t.view(word).transpose(1, 2))
            return out
    return out.copy_(t.transpose(1, 2))


def _rows(w: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """channel_rows(w, k) for a 2-D weight (n_blocks, k²), one pass."""
    out_f, in_f = w.shape
    return _swap_blocks(w, out_f // k, k, in_f // k, k, out).view(-1, k * k)


def _unrows(
    rows: torch.Tensor, out_f: int, in_f: int, k: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """channel_unrows(rows, (out_f, in_f), k), one pass."""
    return _swap_blocks(rows, out_f // k, in_f // k, k, k, out).view(out_f, in_f)


def _summed_weight(
    weight: torch.Tensor, mix: torch.Tensor, k: int, dtype: torch.dtype, keep_rows: bool
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(R0 or None, W' = W0 + unrows(R0·M) in ``dtype``, a free weight-sized scratch buffer
    in M's dtype): three weight-sized passes. Buffers are reused because fresh weight-sized
    allocations page-fault on CPU (as slow as a pass)."""
    out_f, in_f = weight.shape
    r0 = _rows(weight, k).to(mix.dtype)  # pass 1 (the cast, when any, is contiguous)
    summed = torch.addmm(r0, r0, mix)  # pass 2: R0 + R0·M (exactly R0 when M = 0)
    spare = None if keep_rows or dtype != mix.dtype else r0
    w = _unrows(summed.to(dtype), out_f, in_f, k, spare)  # pass 3
    return (r0 if keep_rows else None), w, summed


# ----------------------------------------------------------------------------- function
class _ChannelLinearFn(torch.autograd.Function):
    """y = F.linear(x, W0 + unrows(rows(W0)·M), b), saving x, W0 and M only."""

    @staticmethod
    def forward(ctx, x, weight, bias, mix, block):  # type: ignore[override]
        w = _summed_weight(weight, mix, block, x.dtype, keep_rows=False)[1]
        y = F.linear(x, w, bias)
        ctx.block = block
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, mix)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, mix = ctx.saved_tensors
        need = ctx.needs_input_grad
        k = ctx.block
        out_f, in_f = weight.shape
        dy = dy.to(x.dtype)
        dy2 = dy.reshape(-1, out_f)
        gx = gmix = gb = None
        if need[0] or need[3]:
            r0, w, spare = _summed_weight(weight, mix, k, x.dtype, keep_rows=need[3])
            if need[0]:
                gx = dy @ w
            if need[3]:
                gw = torch.mm(dy2.T, x.reshape(-1, in_f), out=w)  # W' is no longer needed
                if gw.dtype == spare.dtype:
                    grows = _rows(gw, k, spare)  # pass 4
                else:
                    grows = _rows(gw, k).to(spare.dtype)
                gmix = r0.T @ grows  # pass 5
        if need[2] and ctx.has_bias:
            gb = dy2.sum(0)
        return gx, None, gb, gmix, None


# ----------------------------------------------------------------------------- entry point
def block_mix_linear(
    x: torch.Tensor, linear: torch.nn.Linear, mix: torch.Tensor, block: int
) -> torch.Tensor:
    """``linear(x)`` with W' = W0 + unrows(rows(W0)·M), ``mix`` M (k_c², k_c²) in the atoms'
    dtype."""
    dt = compute_dtype(x)
    b = linear.bias.to(dt) if linear.bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return _ChannelLinearFn.apply(x.to(dt), linear.weight, b, mix, block)
