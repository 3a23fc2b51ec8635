"""The one kernel dispatch of the atom layers: pick a path for (layer kind, input), run it.

Paths (every one exact; the tests compare each with autograd on the plain formulation):

``conv``     any conv update: ONE convolution with W0 + delta, full weight gradient
             (:mod:`.generic`)
``generic``  the same for a Linear: one matmul with the summed weight (:mod:`.generic`)
``gemm``     linear-coder k×k filter atoms (with or without sub-atoms): im2col, tap mixing on
             the columns, no weight gradient (:mod:`.tapmix`)
``scalar``   linear-coder 1×1 filter atoms (M is one gain, or one per input channel with
             sub-atoms): no weight gradient (:mod:`.tapmix`)
``fused``    linear-coder channel atoms on a Linear: the block mix with word-wide block
             transposes (:mod:`.channel`)

:func:`apply` is the dispatch (the atom layers' forward calls it once); :func:`choose_path`
its rule. Between ``conv`` and ``gemm`` the rule is a measurement for large shapes (timed once
per shape at first use and cached, on any device: :mod:`.tune`) and a fixed threshold for
small ones. ``with force_path(name):`` makes every layer that can take that path take it (the
others take their kind's generic path), for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from sdatom.atoms.kernels import generic, tune
from sdatom.atoms.kernels.channel import block_mix_linear
from sdatom.atoms.kernels.tapmix import scaled_conv2d, tap_mix_conv2d
from sdatom.atoms.method import Update, channel_atoms, mix

PATHS = ("conv", "generic", "gemm", "scalar", "fused")
# gemm path when B·L ≤ GEMM_POSITIONS_PER_CHANNEL · c_out (CPU only). Measured on the SD-1.5
# 3×3 shapes (BENCHMARKS.md, "fast path"): at B·L = c_out/5 … c_out the gemm path wins by
# 1.3–6×; at B·L = 6.4·c_out (320 ch, 64×64) it loses 1.6×.
GEMM_POSITIONS_PER_CHANNEL = 1.0
_forced: str | None = None


@contextlib.contextmanager
def force_path(path: str | None) -> Iterator[None]:
    """Inside, every layer that can take ``path`` takes it (None = the rule)."""
    global _forced
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown atom path {path!r} (valid: {', '.join(PATHS)})")
    old, _forced = _forced, path
    try:
        yield
    finally:
        _forced = old


# ----------------------------------------------------------------------------- the rule
def conv_path(
    x: torch.Tensor,
    conv: nn.Conv2d,
    weight_needs_grad: bool = False,
    measure: Callable[[str], None] | None = None,
    per_channel: bool = False,
) -> str:
    """The path of a conv with linear-coder filter atoms for input ``x``.

    1×1: ``scalar``. k×k: large shapes with ``measure`` (one forward + backward on a given
    path) take the faster of ``conv`` and ``gemm`` as measured once per shape
    (:mod:`.tune`, any device); otherwise the fixed rule: on the CPU ``gemm`` when
    B·L ≤ c_out, else ``conv``.
    """
    kh, kw = conv.kernel_size
    if weight_needs_grad or x.dim() != 4:
        return "conv"
    if kh * kw == 1:
        return "scalar" if _forced in (None, "scalar") else "conv"
    gemm_ok = conv.groups == 1
    if _forced is not None:
        return "gemm" if _forced == "gemm" and gemm_ok else "conv"
    if not gemm_ok:
        return "conv"
    h_out, w_out = _out_size(x.shape[-2:], conv)
    positions = x.shape[0] * h_out * w_out
    if measure is not None and tune.applies(x, conv, positions):
        k = tune.key(x, conv, generic.compute_dtype(x), per_channel)
        return tune.choose(k, ("conv", "gemm"), measure)
    if x.device.type != "cpu":
        return "conv"  # small shapes on CUDA: cuDNN
    return "gemm" if positions <= GEMM_POSITIONS_PER_CHANNEL * conv.out_channels else "conv"


def linear_path(weight: torch.Tensor) -> str:
    """The path of a Linear with linear-coder channel atoms: ``fused`` unless forced
    otherwise or the base weight itself is trained."""
    if weight.requires_grad or weight.dim() != 2:
        return "generic"
    return "fused" if _forced in (None, "fused") else "generic"


def choose_path(
    x: torch.Tensor, base: nn.Module, update: Update, factors: Sequence[torch.Tensor]
) -> str:
    """The path for ``base`` (a Conv2d or Linear) with ``update`` and ``factors`` (ΔD, P or α
    [, β, D1]: four = sub-atoms, M per input channel) on input ``x``."""
    if isinstance(base, nn.Linear):
        if update.kind == "channel" and update.coder == "linear":
            return linear_path(base.weight)
        return "generic"
    if update.kind == "filter" and update.coder == "linear":
        per_channel = len(factors) == 4
        if per_channel and base.groups != 1:
            return "conv"  # per-channel M of a grouped conv: the generic path
        measure = functools.partial(_measure, x, base, update, factors)
        return conv_path(x, base, base.weight.requires_grad, measure, per_channel)
    return "conv"


def _measure(
    x: torch.Tensor, base: nn.Module, update: Update, factors: Sequence[torch.Tensor], path: str
) -> None:
    """One forward + backward of ``path`` on a random input of x's shape and the layer's own
    weight and factors (copies: no gradient reaches the layer or the model)."""
    with torch.no_grad():
        xs = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    xs.requires_grad_(x.requires_grad)
    fs = [f.detach().requires_grad_(f.requires_grad) for f in factors]
    with force_path(path):
        y = apply(xs, base, update, fs)
    inputs = [t for t in [xs, *fs] if t.requires_grad]
    if inputs:
        torch.autograd.grad(y, inputs, torch.randn_like(y))


def _out_size(hw: tuple[int, int] | torch.Size, conv: nn.Conv2d) -> tuple[int, int]:
    pad = conv.padding if not isinstance(conv.padding, str) else (0, 0)
    out = []
    for i in range(2):
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        out.append((hw[i] + 2 * pad[i] - span) // conv.stride[i] + 1)
    return out[0], out[1]


# ----------------------------------------------------------------------------- dispatch
def apply(
    x: torch.Tensor, base: nn.Module, update: Update, factors: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``base(x)`` with the atoms' update, on the path :func:`choose_path` picks.

    ``factors``: ΔD, the coefficients (P or α), then β and D1 with sub-atoms.
    """
    path = choose_path(x, base, update, factors)
    if path == "conv":
        return generic.atom_conv2d(x, base.weight, base.bias, base, update.delta, factors)
    if path == "generic":
        return generic.atom_linear(x, base.weight, base.bias, update.delta, factors)
    delta_atoms, pinv = factors[:2]
    with torch.autocast(x.device.type, enabled=False):
        if path == "fused":  # M in the atoms' dtype
            m = mix(pinv, delta_atoms)
        else:  # M (k², k²) or (c_in, k², k²) in float32 whatever the compute dtype
            ft = torch.promote_types(delta_atoms.dtype, torch.float32)
            atoms = delta_atoms.to(ft)
            if len(factors) == 4:  # per-input-channel atoms; autograd reaches β and D1
                atoms = channel_atoms(atoms, factors[2].to(ft), factors[3].to(ft))
            m = mix(pinv.to(ft), atoms)
    # the Functions add the identity (W' = W0·(I + M)) and run in the compute dtype
    if path == "fused":
        return block_mix_linear(x, base, m, update.block)
    if path == "scalar":
        return scaled_conv2d(x, base, m.reshape(-1) if m.dim() == 3 else m)
    return tap_mix_conv2d(x, base, m)


__all__ = [
    "GEMM_POSITIONS_PER_CHANNEL",
    "PATHS",
    "apply",
    "choose_path",
    "conv_path",
    "force_path",
    "linear_path",
]
