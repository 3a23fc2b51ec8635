"""Fast paths for linear-coder filter atoms: a backward without the weight-gradient pass.

With the linear coder the adapted weight is W' = W0·A on the k² tap axis, A = I + M,
M = P·ΔD (k²×k²). The generic path (:func:`sdatom.atoms.functional.atom_conv2d`) pays for the
full weight gradient dW' (one extra convolution-sized pass plus a weight-sized tensor) and
then contracts it into M. Two cheaper paths exist:

``gemm`` (k×k kernels, CPU, few output positions). Im2col: U = unfold(x) (B, c_in·k², L).
    forward   y  = W0 · (A·U)                     (A mixes the k² taps of each channel)
    backward  G  = W0ᵀ · dy                       (the GEMM the input gradient needs anyway)
              dx = fold(Aᵀ·G)     dA = Σ_{b,c,l} G[b,c,:,l] ⊗ U[b,c,:,l]
  Mixing U instead of W0 costs B·c_in·L·k⁴ instead of c_out·c_in·k⁴, and the unfold/fold
  traffic is B·c_in·k²·L: a win exactly when B·L is small next to c_out (the deep, low-
  resolution layers, where the weight is far bigger than the activations). At high
  resolution oneDNN's direct convolutions beat unfold+GEMM, so the generic path stays.

``scalar`` (1×1 atoms: M is one number m, any device). W' = (1 + m)·W0, so
    y = (1 + m)·conv(x, W0) + b,  gx0 = convᵀ(dy, W0),  dx = (1 + m)·gx0,  dm = ⟨gx0, x⟩
  (⟨convᵀ dy, x⟩ = ⟨dy, conv x⟩ by linearity): no weight gradient at all.

Both save only x, W0 (the parameter itself) and the k²×k² matrix M, which stays float32 under
autocast (only the activations are in the compute dtype); the reductions that give dM are
accumulated in float32. :func:`choose_path` is the
dispatch rule; :func:`force_path` overrides it (tests, benchmarks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sdatom.atoms.functional import PathOverride, _compute_dtype, atom_conv2d, conv_op, filter_delta

PATHS = ("conv", "gemm", "scalar")
# gemm path when B·L ≤ GEMM_POSITIONS_PER_CHANNEL · c_out (CPU only). Measured on the SD-1.5
# 3×3 shapes (BENCHMARKS.md, "fast path"): at B·L = c_out/5 … c_out the gemm path wins by
# 1.3–6×; at B·L = 6.4·c_out (320 ch, 64×64) it loses 1.6×.
GEMM_POSITIONS_PER_CHANNEL = 1.0
_override = PathOverride(PATHS, "atom")
#: ``with force_path("gemm"):`` uses that path wherever it applies (tests, benchmarks).
force_path = _override.force


def choose_path(x: torch.Tensor, conv: torch.nn.Conv2d, weight_needs_grad: bool = False) -> str:
    """Which backward a linear-coder filter-atom conv uses for input ``x`` (see module doc)."""
    kh, kw = conv.kernel_size
    if weight_needs_grad or x.dim() != 4:
        return "conv"
    if kh * kw == 1:
        return "scalar" if _override.forced in (None, "scalar") else "conv"
    gemm_ok = conv.groups == 1
    if _override.forced is not None:
        return "gemm" if _override.forced == "gemm" and gemm_ok else "conv"
    if not gemm_ok or x.device.type != "cpu":
        return "conv"  # on CUDA keep cuDNN (unmeasured here: see BENCHMARKS.md)
    h_out, w_out = _out_size(x.shape[-2:], conv)
    positions = x.shape[0] * h_out * w_out
    return "gemm" if positions <= GEMM_POSITIONS_PER_CHANNEL * conv.out_channels else "conv"


def _out_size(hw: tuple[int, int] | torch.Size, conv: torch.nn.Conv2d) -> tuple[int, int]:
    pad = conv.padding if not isinstance(conv.padding, str) else (0, 0)
    out = []
    for i in range(2):
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        out.append((hw[i] + 2 * pad[i] - span) // conv.stride[i] + 1)
    return out[0], out[1]


# ----------------------------------------------------------------------------- gemm path
class _TapMixConvFn(torch.autograd.Function):
    """y = conv(x, W0·(I + M), b) through im2col; backward without a weight gradient.

    M stays float32: A·U = U + M·U with M rounded once to the compute dtype (relative error
    ~1e-3 of M, not of 1 + M), and dM is accumulated in float32.
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
        u = torch.matmul(mix.to(x.dtype), u4).add_(u4).view(b, c_in * kk, length)  # (I + M)·U
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
            gu = torch.matmul(mix.t().to(x.dtype), g).add_(g).view(b, c_in * kk, length)
            gx = F.fold(gu, (h, w), (kh, kw), op.dilation, op.padding, op.stride)
        if ctx.needs_input_grad[3]:
            u = F.unfold(x, (kh, kw), op.dilation, op.padding, op.stride)
            u = u.view(b * c_in, kk, length).transpose(1, 2)
            # Σ G ⊗ U summed in float32: a half-precision sum loses bits and can overflow.
            gg = g.view(b * c_in, kk, length)
            gmix = torch.bmm(gg.to(mix.dtype), u.to(mix.dtype)).sum(0)
        if ctx.needs_input_grad[2]:
            gb = dy.sum((0, 2), dtype=mix.dtype).to(dy.dtype)
        return gx, None, gb, gmix, None


# ----------------------------------------------------------------------------- scalar path
class _ScaledConvFn(torch.autograd.Function):
    """y = (1 + m)·conv(x, W0) + b; backward without a weight gradient.

    ``m`` stays float32: y0 + m·y0 rounds m once (relative error ~1e-3 of m), where
    (1 + m) in bf16 moves in steps of ~8e-3; dm = ⟨gx0, x⟩ is summed in float32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gain, op):  # type: ignore[override]
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
        gx = gx0 + gx0 * gain.to(gx0.dtype) if need[0] else None
        ggain = None
        if need[3]:
            ggain = torch.sum(gx0.to(gain.dtype) * x.to(gain.dtype)).reshape(gain.shape)
        gb = dy.sum((0, 2, 3), dtype=gain.dtype).to(dy.dtype) if need[2] else None
        return gx, None, gb, ggain, None


# ----------------------------------------------------------------------------- entry point
def linear_atom_conv2d(
    x: torch.Tensor, conv: torch.nn.Conv2d, delta_atoms: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """``conv(x)`` with linear-coder filter atoms (W' = W0 + R0·P·ΔD) on the cheapest path."""
    weight, bias = conv.weight, conv.bias
    path = choose_path(x, conv, weight.requires_grad)
    if path == "conv":
        return atom_conv2d(x, weight, bias, conv, filter_delta, [delta_atoms, coef])
    dt = _compute_dtype(x)
    x, op = conv_op(x, conv)
    b = bias.to(dt) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        # M (k², k²) in float32 whatever the compute dtype; the Functions add the identity.
        ft = torch.promote_types(delta_atoms.dtype, torch.float32)
        m = coef.to(ft) @ delta_atoms.to(ft)
        if path == "scalar":
            return _ScaledConvFn.apply(x.to(dt), weight, b, m, op)
        return _TapMixConvFn.apply(x.to(dt), weight, b, m, op)
