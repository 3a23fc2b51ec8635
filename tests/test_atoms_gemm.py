"""The linear-coder fast paths (sdatom/atoms/gemm.py) against plain autograd.

Every path ("conv", "gemm", "scalar") is forced on tiny shapes and compared with autograd on
the plain formulation y = conv(x, W0 + R0·P·ΔD): float64 gradcheck, and float32 with
tolerances derived from the dtype's epsilon. Also: the dispatch rule, and that the fast paths
keep no weight-sized tensor for backward and never build a weight gradient.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdatom.atoms import AtomConfig, AtomConv2d
from sdatom.atoms.kernels import GEMM_POSITIONS_PER_CHANNEL, apply, force_path
from sdatom.atoms.kernels import conv_path as choose_path

# (name, conv factory, input shape)
CASES = [
    ("3x3-pad", lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 5, 5)),
    ("3x3-valid-nobias", lambda: nn.Conv2d(4, 3, 3, bias=False), (1, 4, 6, 5)),
    ("strided-dilated", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2), (2, 3, 7, 7)),
    ("5x5-same", lambda: nn.Conv2d(2, 3, 5, padding="same"), (1, 2, 6, 6)),
    ("reflect", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (1, 3, 5, 5)),
    ("1x1", lambda: nn.Conv2d(4, 6, 1), (2, 4, 3, 3)),
    ("1x1-strided", lambda: nn.Conv2d(4, 6, 1, stride=2), (1, 4, 5, 5)),
]
IDS = [c[0] for c in CASES]


def _layer(case, dtype):
    torch.manual_seed(0)
    conv = case[1]().to(dtype)
    layer = AtomConv2d(copy.deepcopy(conv), AtomConfig(), "filter").to(dtype)
    with torch.no_grad():
        layer.atoms_delta.normal_(0, 0.3)
    return conv, layer


def _plain(conv, layer, x):
    """Autograd on the plain formulation with the summed weight."""
    w = conv.weight
    rows = w.reshape(-1, w.shape[2] * w.shape[3])
    delta = (rows @ (layer.atoms_pinv.to(w.dtype) @ layer.atoms_delta)).reshape(w.shape)
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return F.conv2d(x, w + delta, conv.bias, conv.stride, 0, conv.dilation)
    return F.conv2d(x, w + delta, conv.bias, conv.stride, conv.padding, conv.dilation)


def _paths(case):
    k = case[1]().kernel_size[0]
    return ["conv", "scalar"] if k == 1 else ["conv", "gemm"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_path_matches_autograd_in_float32(case):
    conv, layer = _layer(case, torch.float32)
    x = torch.randn(case[2])
    conv.requires_grad_(False)
    xr = x.clone().requires_grad_(True)
    delta_ref = layer.atoms_delta.detach().clone().requires_grad_(True)
    layer_ref = copy.deepcopy(layer)
    layer_ref.atoms_delta = nn.Parameter(delta_ref)
    y_ref = _plain(conv, layer_ref, xr)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    want = [y_ref.detach(), xr.grad, layer_ref.atoms_delta.grad]
    eps = torch.finfo(torch.float32).eps
    for path in _paths(case):
        xp = x.clone().requires_grad_(True)
        layer.atoms_delta.grad = None
        with force_path(path):
            y = layer(xp)
        y.backward(dy)
        got = [y.detach(), xp.grad, layer.atoms_delta.grad]
        for g, w in zip(got, want, strict=True):
            scale = float(w.abs().max()) + 1.0
            torch.testing.assert_close(g, w, rtol=1e3 * eps, atol=1e3 * eps * scale, msg=path)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_path_passes_gradcheck_in_float64(case):
    _, layer = _layer(case, torch.float64)
    x = torch.randn(case[2], dtype=torch.float64, requires_grad=True)
    for path in _paths(case):

        def fn(inp, delta, path=path):
            with force_path(path):
                return apply(inp, layer.base_layer, layer.atom_update, [delta, layer.atoms_pinv])

        delta = layer.atoms_delta.detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(fn, (x, delta)), path


def test_bias_gradient_flows_when_the_bias_is_trained():
    conv, layer = _layer(CASES[0], torch.float64)
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(CASES[0][2], dtype=torch.float64)
    for path in ("conv", "gemm"):
        layer.base_layer.bias.grad = None
        with force_path(path):
            layer(x).sum().backward()
        got = layer.base_layer.bias.grad
        torch.testing.assert_close(got, torch.full_like(got, 2 * 25.0))


@pytest.mark.parametrize("path", ["gemm", "scalar"])
def test_fast_paths_save_no_weight_sized_tensor_and_no_weight_gradient(path):
    k = 3 if path == "gemm" else 1
    conv = nn.Conv2d(16, 16, k, padding=k // 2)
    layer = AtomConv2d(conv, AtomConfig(), "filter")
    x = torch.randn(1, 16, 4, 4)
    saved = []
    with (
        force_path(path),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
    ):
        layer(x).sum().backward()
    big = [t for t in saved if t.numel() >= conv.weight.numel()]
    assert all(t.data_ptr() in (conv.weight.data_ptr(), x.data_ptr()) for t in big)
    assert layer.atoms_delta.grad is not None and conv.weight.grad is None


def test_dispatch_rule():
    conv = nn.Conv2d(64, 64, 3, padding=1)
    few = int(GEMM_POSITIONS_PER_CHANNEL * 64)
    assert choose_path(torch.randn(1, 64, 4, 4), conv) == "gemm"  # 16 positions ≤ 64
    assert choose_path(torch.randn(1, 64, 32, 32), conv) == "conv"
    assert choose_path(torch.randn(1, 64, 1, few + 1), nn.Conv2d(64, 64, (1, 1))) == "scalar"
    assert choose_path(torch.randn(1, 64, 4, 4), conv, weight_needs_grad=True) == "conv"
    assert choose_path(torch.randn(64, 4, 4), conv) == "conv"  # unbatched input
    grouped = nn.Conv2d(64, 64, 3, groups=2)
    assert choose_path(torch.randn(1, 64, 4, 4), grouped) == "conv"
    with force_path("conv"):
        assert choose_path(torch.randn(1, 64, 4, 4), conv) == "conv"
    with pytest.raises(ValueError):
        with force_path("nope"):
            pass


def test_default_dispatch_matches_the_generic_path_in_a_layer():
    conv, layer = _layer(("c", lambda: nn.Conv2d(32, 32, 3, padding=1), None), torch.float32)
    x = torch.randn(1, 32, 4, 4)
    assert choose_path(x, conv) == "gemm"
    y = layer(x)
    with force_path("conv"):
        y_conv = layer(x)
    torch.testing.assert_close(y, y_conv, rtol=1e-5, atol=1e-5)
