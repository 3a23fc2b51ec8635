"""Atom deltas and the memory-lean autograd Function that applies them.

The adapted layer runs ONE convolution (or matmul) with W' = W0 + delta(W0, factors). The
Function saves only x, W0 (the frozen parameter itself, not a copy) and the small factors;
backward recomputes W', gets the input gradient and the weight gradient dW' from one
``convolution_backward`` call, then chains dW' into the factors through the (cheap) delta
function, e.g. for the linear coder dM = R0ᵀ·dR.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sdatom.atoms.decompose import channel_rows, channel_unrows

DeltaFn = Callable[..., torch.Tensor]


class PathOverride:
    """A process-wide override of a dispatch rule's choice, for tests and benchmarks.

    ``force(path)`` is a context manager: inside it ``forced`` is ``path`` (None = the rule).
    """

    def __init__(self, paths: Sequence[str], what: str) -> None:
        self.paths, self.what = tuple(paths), what
        self.forced: str | None = None

    @contextlib.contextmanager
    def force(self, path: str | None) -> Iterator[None]:
        if path is not None and path not in self.paths:
            valid = ", ".join(self.paths)
            raise ValueError(f"unknown {self.what} path {path!r} (valid: {valid})")
        old, self.forced = self.forced, path
        try:
            yield
        finally:
            self.forced = old


# ----------------------------------------------------------------------------- deltas
def filter_delta(
    weight: torch.Tensor,
    delta_atoms: torch.Tensor,
    coef: torch.Tensor,
    beta: torch.Tensor | None = None,
    sub_atoms: torch.Tensor | None = None,
    *,
    coder: str = "linear",
) -> torch.Tensor:
    """Update of a conv weight (c_out, c_in_g, k, k) from filter atoms.

    ``delta_atoms`` ΔD (m, k²). ``coef`` is P = pinv(D0) (k², m) for the linear coder
    (update R·P·ΔD) or α (N, m) for the lasso coder (update α·ΔD). With the overcomplete
    option the atoms become per input channel c: ΔD_c = ΔD + Σ_a β[c, :, a]·D1[:, a], with
    ``beta`` (c_in_g·m, m1) and ``sub_atoms`` D1 (m·m1, k, k). Computed in ΔD's dtype.
    """
    dt = delta_atoms.dtype
    c_out, c_in = weight.shape[0], weight.shape[1]
    m, kk = delta_atoms.shape
    coef = coef.to(dt)
    if beta is None or sub_atoms is None:
        if coder == "linear":
            out = weight.reshape(c_out * c_in, kk).to(dt) @ (coef @ delta_atoms)
        else:
            out = coef @ delta_atoms
        return out.reshape(weight.shape)
    m1 = beta.shape[1]
    per_channel = delta_atoms + torch.einsum(
        "cja,jaq->cjq", beta.reshape(c_in, m, m1), sub_atoms.reshape(m, m1, kk)
    )
    if coder == "linear":
        mix = torch.einsum("pj,cjq->cpq", coef, per_channel)  # (c_in, k², k²)
        out = torch.einsum("ocp,cpq->ocq", weight.reshape(c_out, c_in, kk).to(dt), mix)
    else:
        out = torch.einsum("ocj,cjq->ocq", coef.reshape(c_out, c_in, m), per_channel)
    return out.reshape(weight.shape)


def channel_delta(
    weight: torch.Tensor,
    delta_atoms: torch.Tensor,
    coef: torch.Tensor,
    *,
    block: int,
    coder: str = "linear",
) -> torch.Tensor:
    """Update of a 2-D (or 1×1 conv) weight from channel atoms ΔD (m_c, k_c²).

    Each k_c×k_c block B_b of W gets B_b·(P·ΔD) (linear coder, P (k_c², m_c)) or
    Σ_j α[b, j]·ΔD_j (lasso coder, α (n_blocks, m_c)): a sum of Kronecker products.
    """
    dt = delta_atoms.dtype
    coef = coef.to(dt)
    if coder == "linear":
        rows = channel_rows(weight.to(dt), block) @ (coef @ delta_atoms)
    else:
        rows = coef @ delta_atoms
    return channel_unrows(rows, weight.shape, block)


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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
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
    dt = _compute_dtype(x)
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
    dt = _compute_dtype(x)
    b = bias.to(dt) if bias is not None else None
    return _SummedWeightFn.apply(x.to(dt), weight, b, _LinearOp(), delta_fn, *factors)
