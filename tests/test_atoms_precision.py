"""Atom arithmetic under autocast: the atoms' own numbers stay float32 on every path.

Only the activations and the frozen weight run in the compute dtype. A gain of 0.02 must act
as 1.02, not as the nearest bf16 number 1.0234, and the atoms' gradients must be reduced in
float32 (a half-precision sum loses bits and overflows fp16 under a loss scaler).
"""

import pytest
import torch
from torch import nn

from sdatom.atoms import AtomConfig, AtomConv2d, AtomLinear
from sdatom.atoms import kernels as channel_mod
from sdatom.atoms import kernels as gemm

BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7
GAIN = 0.02

# (path, layer factory, input shape, context that forces the path)
PATHS = [
    ("scalar", lambda: AtomConv2d(nn.Conv2d(16, 32, 1, bias=False), AtomConfig(), "filter"),
     (2, 16, 8, 8), lambda: gemm.force_path("scalar")),
    ("gemm", lambda: AtomConv2d(nn.Conv2d(16, 32, 3, padding=1, bias=False), AtomConfig(),
     "filter"), (2, 16, 8, 8), lambda: gemm.force_path("gemm")),
    ("conv", lambda: AtomConv2d(nn.Conv2d(16, 32, 3, padding=1, bias=False), AtomConfig(),
     "filter"), (2, 16, 8, 8), lambda: gemm.force_path("conv")),
    ("channel-fused", lambda: AtomLinear(nn.Linear(32, 48, bias=False), AtomConfig(), "channel"),
     (4, 16, 32), lambda: channel_mod.force_path("fused")),
    ("channel-generic", lambda: AtomLinear(nn.Linear(32, 48, bias=False), AtomConfig(),
     "channel"), (4, 16, 32), lambda: channel_mod.force_path("generic")),
    ("lasso-conv", lambda: AtomConv2d(nn.Conv2d(16, 32, 3, padding=1, bias=False),
     AtomConfig(coder="lasso", lasso_lambda=0.0, dict_iters=0, lasso_iters=50), "filter"),
     (2, 16, 8, 8), lambda: gemm.force_path(None)),
]  # fmt: skip
IDS = [p[0] for p in PATHS]


def _layer(case):
    torch.manual_seed(0)
    layer = case[1]()
    with torch.no_grad():  # ΔD = g·D0: with P·D0 = I the update is exactly g·W0
        layer.atoms_delta.copy_(GAIN * layer.atoms_d0)
    return layer


def _slope(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Least-squares factor between an output and the base output: ⟨y, ref⟩ / ⟨ref, ref⟩."""
    y, ref = y.detach().double(), ref.detach().double()
    return float((y * ref).sum() / (ref * ref).sum())


@pytest.mark.parametrize("case", PATHS, ids=IDS)
def test_a_gain_of_two_percent_acts_as_two_percent_under_bf16_autocast(case):
    layer = _layer(case)
    x = torch.randn(case[2])
    with case[3](), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        base = layer.base_layer(x)
    assert y.dtype == torch.bfloat16
    # bf16 rounds 1.02 to 1.0234; rounding only the 0.02 keeps the gain within 1e-3.
    assert abs(_slope(y, base) - (1 + GAIN)) < 1e-3, _slope(y, base)


@pytest.mark.parametrize("case", PATHS, ids=IDS)
def test_atom_gradients_under_bf16_autocast_match_float32(case):
    layer = _layer(case)
    with torch.no_grad():
        layer.atoms_delta.add_(0.05 * torch.randn_like(layer.atoms_delta))
    x = torch.randn(case[2])
    y32 = layer.base_layer(x)
    r = torch.randn(y32.shape)
    grads = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        layer.atoms_delta.grad = None
        with case[3](), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            y = layer(x)
        (y.float() * r).sum().backward()
        grads[name] = layer.atoms_delta.grad.clone()
    assert grads["bf16"].dtype == torch.float32
    # Inputs and weights rounded once to bf16 (relative error eps/2 each), then reduced in
    # float32: the gradient is within a couple of bf16 epsilons of the float32 one.
    err = (grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm()
    assert err < 2 * BF16_EPS, float(err)


@pytest.mark.parametrize("case", PATHS[:2], ids=IDS[:2])
def test_atom_gradient_sums_do_not_overflow_fp16(case):
    """Under a loss scaler each gradient element fits fp16 but their sum does not."""
    layer = _layer(case)
    with torch.no_grad():
        layer.base_layer.weight.fill_(0.1)
    x = torch.ones(case[2])
    scale = 1024.0  # what GradScaler multiplies the loss by (its default start is 65536)
    grads = {}
    for name, enabled in (("fp32", False), ("fp16", True)):
        layer.atoms_delta.grad = None
        with case[3](), torch.autocast("cpu", dtype=torch.float16, enabled=enabled):
            y = layer(x)
        (y.float().sum() * scale).backward()
        grads[name] = layer.atoms_delta.grad.clone()
    assert grads["fp32"].abs().max() > torch.finfo(torch.float16).max  # the sum is that big
    assert torch.isfinite(grads["fp16"]).all()
    err = (grads["fp16"] - grads["fp32"]).norm() / grads["fp32"].norm()
    assert err < 2 * torch.finfo(torch.float16).eps, float(err)
