"""The generic path: any update, ONE convolution (or matmul) with the summed weight.

The adapted layer runs op(x, W0 + delta(W0, factors)) (``delta`` is
:meth:`sdatom.atoms.method.Update.delta`). The Function saves only x, W0 (the frozen
parameter itself, not a copy) and the small factors; backward recomputes W', gets the input
gradient and the weight gradient dW' from one ``convolution_backward`` call, then chains dW'
into the factors through the (cheap) delta function, e.g. for the linear coder dM = R0ᵀ·dR.
It pays for the full weight gradient; :mod:`sdatom.atoms.kernels.tapmix` and
:mod:`sdatom.atoms.kernels.channel` avoid it where they apply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

DeltaFn = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------- ops
class _ConvOp:
    """conv2d with fixed stride/padding/dilation/groups (padding already an int pair)."""

    def __init__(
        self, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int
    ) -> None:
        self.stride, self.padding = list(stride), list(padding)
        self.dilation, self.groups = list(dilation), groups

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def backward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        dy: torch.Tensor,
        has_bias: bool,
        mask: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor | None, ...]:
        return torch.ops.aten.convolution_backward(
            dy,
            x,
            w,
            [w.shape[0]] if has_bias else None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0, 0],
            self.groups,
            list(mask),
        )


class _LinearOp:
    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def backward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        dy: torch.Tensor,
        has_bias: bool,
        mask: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor | None, ...]:
        dy2 = dy.reshape(-1, dy.shape[-1])
        gx = (dy @ w) if mask[0] else None
        gw = (dy2.T @ x.reshape(-1, x.shape[-1])) if mask[1] else None
        gb = dy2.sum(0) if mask[2] and has_bias else None
        return gx, gw, gb


class _SummedWeightFn(torch.autograd.Function):
    """y = op(x, W0 + delta_fn(W0, *factors), b), saving x, W0 and factors only."""

    @staticmethod
    def forward(ctx, x, weight, bias, op, delta_fn, *factors):  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):
            delta = delta_fn(weight, *factors)
            w = (weight.to(delta.dtype) + delta).to(x.dtype)
            y = op.forward(x, w, bias)
        ctx.op, ctx.delta_fn = op, delta_fn
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, *factors)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, *factors = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_factors = need[5:]
        need_w = need[1] or any(need_factors)
        with torch.autocast(x.device.type, enabled=False):
            with torch.enable_grad():
                w_in = weight.detach().requires_grad_(need[1])
                fs = [
                    f.detach().requires_grad_(n) for f, n in zip(factors, need_factors, strict=True)
                ]
                delta = ctx.delta_fn(w_in, *fs)
            w = (weight.to(delta.dtype) + delta.detach()).to(x.dtype)
            gx, gw, gb = ctx.op.backward(
                x, w, dy.to(x.dtype), ctx.has_bias, (need[0], need_w, need[2])
            )
            grads_w: torch.Tensor | None = None
            grads_f: list[torch.Tensor | None] = [None] * len(factors)
            inputs = ([w_in] if need[1] else []) + [f for f in fs if f.requires_grad]
            if inputs:
                got = list(
                    torch.autograd.grad(delta, inputs, gw.to(delta.dtype), allow_unused=True)
                )
                if need[1]:
                    extra = got.pop(0)
                    grads_w = gw.to(weight.dtype)
                    if extra is not None:
                        grads_w = grads_w + extra.to(weight.dtype)
                it = iter(got)
                grads_f = [next(it) if f.requires_grad else None for f in fs]
        return (gx, grads_w, gb, None, None, *grads_f)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def atom_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv: torch.nn.Conv2d,
    delta_fn: DeltaFn,
    factors: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``conv(x)`` with weight W0 + delta_fn(W0, *factors), through one convolution.

    Takes stride/padding/dilation/groups/padding_mode from ``conv``. Under autocast the
    convolution runs in the autocast dtype; the delta is computed in the factors' dtype.
    """
    dt = compute_dtype(x)
    x, op = conv_op(x, conv)
    b = bias.to(dt) if bias is not None else None
    return _SummedWeightFn.apply(x.to(dt), weight, b, op, delta_fn, *factors)


def conv_op(x: torch.Tensor, conv: torch.nn.Conv2d) -> tuple[torch.Tensor, _ConvOp]:
    """``conv``'s settings as a _ConvOp; string padding and non-zero padding modes are applied
    to ``x`` up front (returned padded), so the op itself only needs integer zero padding."""
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        if padding != "valid":
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0, 0)
    return x, _ConvOp(conv.stride, padding, conv.dilation, conv.groups)


def atom_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta_fn: DeltaFn,
    factors: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``F.linear`` with weight W0 + delta_fn(W0, *factors), through one matmul."""
    dt = compute_dtype(x)
    b = bias.to(dt) if bias is not None else None
    return _SummedWeightFn.apply(x.to(dt), weight, b, _LinearOp(), delta_fn, *factors)
