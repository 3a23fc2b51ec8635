"""Tap-mix paths for linear-coder filter atoms: a backward without the weight-gradient pass.

With the linear coder the adapted weight is W' = W0·A on the k² tap axis, A = I + M,
M = P·ΔD (k²×k²). The generic path (:mod:`sdatom.atoms.kernels.generic`) pays for the
full weight gradient dW' (one extra convolution-sized pass plus a weight-sized tensor) and
then contracts it into M. Two cheaper paths exist:

``gemm`` (k×k kernels, groups 1, few output positions). Im2col: U = unfold(x) (B, c_in·k², L).
    forward   y  = W0 · (A·U)                     (A mixes the k² taps of each channel)
    backward  G  = W0ᵀ · dy                       (the GEMM the input gradient needs anyway)
              dx = fold(Aᵀ·G)     dA = Σ_{b,c,l} G[b,c,:,l] ⊗ U[b,c,:,l]
  Mixing U instead of W0 costs B·c_in·L·k⁴ instead of c_out·c_in·k⁴, and the unfold/fold
  traffic is B·c_in·k²·L: a win exactly when B·L is small next to c_out (the deep, low-
  resolution layers, where the weight is far bigger than the activations). At high
  resolution oneDNN's 3×3 convolutions beat unfold+GEMM, so the generic path stays there
  (which one a large shape takes is measured: :mod:`sdatom.atoms.kernels.tune`).

``scalar`` (1×1 atoms: M is one number m, any device). W' = (1 + m)·W0, so
    y = (1 + m)·conv(x, W0) + b,  gx0 = convᵀ(dy, W0),  dx = (1 + m)·gx0,  dm = ⟨gx0, x⟩
  (⟨convᵀ dy, x⟩ = ⟨dy, conv x⟩ by linearity): no weight gradient at all.

Overcomplete atoms (per-input-channel M_c, DESIGN §1) take the same two paths: the gemm path
mixes channel c's columns with A_c, the scalar path scales input channel c by 1 + m_c.

Both save only x, W0 (the parameter itself) and the k²×k² matrix M, which stays float32 under
autocast (only the activations are in the compute dtype); the reductions that give dM are
accumulated in float32. Which path a layer takes is decided in
:mod:`sdatom.atoms.kernels` (one dispatch for every atom layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sdatom.atoms.kernels.generic import compute_dtype, conv_op


# ----------------------------------------------------------------------------- gemm path
class _TapMixConvFn(torch.autograd.Function):
    """y = conv(x, W0·(I + M), b) through im2col; backward without a weight gradient.

    ``mix`` M is (k², k²), or (c_in, k², k²) for per-input-channel atoms (the overcomplete
    option: A_c = I + M_c mixes channel c's taps). M stays float32: A·U = U + M·U with M
    rounded once to the compute dtype (relative error ~1e-3 of M, not of 1 + M), and dM is
    accumulated in float32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mix, op):  # type: ignore[override]
        b, c_in, h, w = x.shape
        c_out, _, kh, kw = weight.shape
        kk = kh * kw
        w2 = weight.reshape(c_out, c_in * kk).to(x.dtype)
        u = F.unfold(x, (kh, kw), op.dilation, op.padding, op.stride)  # (B, c_in·k², L)
        length = u.shape[-1]
        u4 = u.view(b, c_in, kk, length)
        u = torch.matmul(mix.to(x.dtype), u4).add_(u4).view(b, c_in * kk, length)  # A·U
        y = x.new_empty(b, c_out, length)
        for i in range(b):  # 2-D GEMMs: a batched matmul would copy the expanded weight
            torch.mm(w2, u[i], out=y[i])
        if bias is not None:
            y += bias.view(1, c_out, 1)
        h_out = (h + 2 * op.padding[0] - op.dilation[0] * (kh - 1) - 1) // op.stride[0] + 1
        w_out = (w + 2 * op.padding[1] - op.dilation[1] * (kw - 1) - 1) // op.stride[1] + 1
        ctx.op = op
        ctx.save_for_backward(x, weight, mix)
        return y.view(b, c_out, h_out, w_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, mix = ctx.saved_tensors
        op = ctx.op
        b, c_in, h, w = x.shape
        c_out, _, kh, kw = weight.shape
        kk = kh * kw
        dy = dy.to(x.dtype).reshape(b, c_out, -1)
        length = dy.shape[-1]
        w2 = weight.reshape(c_out, c_in * kk).to(x.dtype)
        g = x.new_empty(b, c_in * kk, length)
        for i in range(b):
            torch.mm(w2.t(), dy[i], out=g[i])  # G = W0ᵀ·dy, the input gradient's GEMM
        g = g.view(b, c_in, kk, length)
        gx = gmix = gb = None
        if ctx.needs_input_grad[0]:
            gu = torch.matmul(mix.transpose(-1, -2).to(x.dtype), g).add_(g)
            gu = gu.view(b, c_in * kk, length)
            gx = F.fold(gu, (h, w), (kh, kw), op.dilation, op.padding, op.stride)
        if ctx.needs_input_grad[3]:
            u = F.unfold(x, (kh, kw), op.dilation, op.padding, op.stride)
            u = u.view(b * c_in, kk, length).transpose(1, 2)
            # Σ G ⊗ U summed in float32: a half-precision sum loses bits and can overflow.
            gg = g.view(b * c_in, kk, length)
            gmix = torch.bmm(gg.to(mix.dtype), u.to(mix.dtype))  # (B·c_in, k², k²)
            gmix = gmix.view(b, c_in, kk, kk).sum(0) if mix.dim() == 3 else gmix.sum(0)
        if ctx.needs_input_grad[2]:
            gb = dy.sum((0, 2), dtype=mix.dtype).to(dy.dtype)
        return gx, None, gb, gmix, None


# ----------------------------------------------------------------------------- scalar path
class _ScaledConvFn(torch.autograd.Function):
    """y = (1 + m)·conv(x, W0) + b; backward without a weight gradient.

    ``gain`` m is one number (1, 1), or one per input channel (c_in,) for per-channel atoms:
    then W' = W0·diag(1 + m) and y = conv((1 + m)·x, W0), gx = (1 + m)·gx0, dm_c = ⟨gx0, x⟩_c.
    ``m`` stays float32: y0 + m·y0 rounds m once (relative error ~1e-3 of m), where
    (1 + m) in bf16 moves in steps of ~8e-3; dm = ⟨gx0, x⟩ is summed in float32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gain, op):  # type: ignore[override]
        if gain.dim() == 1:  # per input channel: scale the input (a transient, not saved)
            g = gain.to(x.dtype).view(1, -1, 1, 1)
            y = op.forward(x + x * g, weight.to(x.dtype), None)
        else:
            y = op.forward(x, weight.to(x.dtype), None)
            y = y.add_(y * gain.to(y.dtype))
        if bias is not None:
            y += bias.view(1, -1, 1, 1)
        ctx.op = op
        ctx.save_for_backward(x, weight, gain)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, gain = ctx.saved_tensors
        dy = dy.to(x.dtype)
        need = ctx.needs_input_grad
        gx0 = ctx.op.backward(x, weight.to(x.dtype), dy, False, (True, False, False))[0]
        g = gain.to(gx0.dtype).view(1, -1, 1, 1) if gain.dim() == 1 else gain.to(gx0.dtype)
        gx = gx0 + gx0 * g if need[0] else None
        ggain = None
        if need[3]:
            prod = gx0.to(gain.dtype) * x.to(gain.dtype)
            dims = (0, 2, 3) if gain.dim() == 1 else None
            ggain = (prod.sum(dims) if dims else prod.sum()).reshape(gain.shape)
        gb = dy.sum((0, 2, 3), dtype=gain.dtype).to(dy.dtype) if need[2] else None
        return gx, None, gb, ggain, None


# ----------------------------------------------------------------------------- entry points
def tap_mix_conv2d(x: torch.Tensor, conv: torch.nn.Conv2d, mix: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` with the weight W0·(I + M) on the tap axis, ``mix`` M float32: (k², k²),
    or (c_in, k², k²) per input channel."""
    dt = compute_dtype(x)
    x, op = conv_op(x, conv)
    b = conv.bias.to(dt) if conv.bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return _TapMixConvFn.apply(x.to(dt), conv.weight, b, mix, op)


def scaled_conv2d(x: torch.Tensor, conv: torch.nn.Conv2d, gain: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` with the weight (1 + m)·W0 of a 1×1 conv, ``gain`` m float32: (1, 1), or
    (c_in,) per input channel (W0·diag(1 + m))."""
    dt = compute_dtype(x)
    x, op = conv_op(x, conv)
    b = conv.bias.to(dt) if conv.bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return _ScaledConvFn.apply(x.to(dt), conv.weight, b, gain, op)
