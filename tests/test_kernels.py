"""The kernel dispatch (sdatom/atoms/kernels): overcomplete atoms on the fast paths and the
measured path choice.

Every path a layer with sub-atoms can take is forced on tiny shapes and compared with
autograd on the plain formulation y = conv(x, W0 + Update.delta(W0, ΔD, P, β, D1)):
float64 gradcheck (x, ΔD, β, D1) and float32 with tolerances from the dtype's epsilon; the
fast paths keep no weight-sized tensor for backward. The measured choice: picks one of the
candidates, measures each shape once, leaves the model's gradients alone, is off for small
shapes, without grad and with SDATOM_KERNEL_TUNING=0.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdatom.atoms import AtomConfig, AtomConv2d
from sdatom.atoms.kernels import apply, choose_path, force_path, tune

OC = AtomConfig(num_sub_atoms=3)
# (name, conv factory, input shape, paths)
CASES = [
    ("3x3-pad", lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 5, 5), ["conv", "gemm"]),
    ("3x3-strided-nobias", lambda: nn.Conv2d(4, 3, 3, stride=2, bias=False), (1, 4, 7, 6),
     ["conv", "gemm"]),
    ("5x5-same", lambda: nn.Conv2d(2, 3, 5, padding="same"), (1, 2, 6, 6), ["conv", "gemm"]),
    ("1x1", lambda: nn.Conv2d(4, 6, 1), (2, 4, 3, 3), ["conv", "scalar"]),
]  # fmt: skip
IDS = [c[0] for c in CASES]


def _layer(case, dtype, config=OC):
    torch.manual_seed(0)
    conv = case[1]().to(dtype)
    layer = AtomConv2d(copy.deepcopy(conv), config, "filter").to(dtype)
    with torch.no_grad():
        for p in (layer.atoms_delta, layer.atoms_beta, layer.atoms_sub):
            if p is not None:
                p.normal_(0, 0.3)
    return conv, layer


def _trainable(layer):
    return [p for p in (layer.atoms_delta, layer.atoms_beta, layer.atoms_sub) if p is not None]


def _plain(conv, layer, x, params):
    w = conv.weight
    delta = layer.atom_update.delta(w, params[0], layer.atoms_pinv, *params[1:]).to(w.dtype)
    return F.conv2d(x, w + delta, conv.bias, conv.stride, conv.padding, conv.dilation)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_overcomplete_paths_match_autograd_in_float32(case):
    conv, layer = _layer(case, torch.float32)
    conv.requires_grad_(False)
    x = torch.randn(case[2])
    params = [p.detach().clone().requires_grad_(True) for p in _trainable(layer)]
    xr = x.clone().requires_grad_(True)
    y_ref = _plain(conv, layer, xr, params)
    dy = torch.randn_like(y_ref)
    want = [y_ref.detach(), *torch.autograd.grad(y_ref, [xr, *params], dy)]
    eps = torch.finfo(torch.float32).eps
    for path in case[3]:
        xp = x.clone().requires_grad_(True)
        with force_path(path):
            factors = layer.atom_factors()
            assert choose_path(xp, layer.base_layer, layer.atom_update, factors) == path
            y = layer(xp)
        got = [y.detach(), *torch.autograd.grad(y, [xp, *_trainable(layer)], dy)]
        for g, w in zip(got, want, strict=True):
            scale = float(w.abs().max()) + 1.0
            torch.testing.assert_close(g, w, rtol=1e3 * eps, atol=1e3 * eps * scale, msg=path)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_overcomplete_paths_pass_gradcheck_in_float64(case):
    _, layer = _layer(case, torch.float64)
    x = torch.randn(case[2], dtype=torch.float64, requires_grad=True)
    base, pinv = layer.base_layer, layer.atoms_pinv
    for path in case[3]:

        def fn(inp, delta, beta, sub, path=path):
            with force_path(path):
                return apply(inp, base, layer.atom_update, [delta, pinv, beta, sub])

        params = [p.detach().clone().requires_grad_(True) for p in _trainable(layer)]
        assert torch.autograd.gradcheck(fn, (x, *params)), path


@pytest.mark.parametrize("path", ["gemm", "scalar"])
def test_overcomplete_fast_paths_save_no_weight_sized_tensor(path):
    k = 3 if path == "gemm" else 1
    conv = nn.Conv2d(16, 16, k, padding=k // 2)
    layer = AtomConv2d(conv, OC, "filter")
    x = torch.randn(1, 16, 4, 4)
    saved = []
    with (
        force_path(path),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
    ):
        layer(x).sum().backward()
    big = [t for t in saved if t.numel() >= conv.weight.numel()]
    assert all(t.data_ptr() in (conv.weight.data_ptr(), x.data_ptr()) for t in big)
    assert all(p.grad is not None for p in _trainable(layer)) and conv.weight.grad is None


def test_grouped_overcomplete_takes_the_generic_path():
    layer = AtomConv2d(nn.Conv2d(4, 4, 1, groups=2), OC, "filter")
    x = torch.randn(1, 4, 3, 3)
    assert choose_path(x, layer.base_layer, layer.atom_update, layer.atom_factors()) == "conv"


@pytest.fixture
def measured(monkeypatch):
    """Every shape measured (threshold 0) and a fresh table."""
    monkeypatch.setattr(tune, "MIN_MACS", 0)
    monkeypatch.delenv("SDATOM_KERNEL_TUNING", raising=False)
    tune.clear()
    yield
    tune.clear()


def test_measured_choice_runs_each_shape_once_and_is_exact(measured, monkeypatch):
    torch.manual_seed(0)
    layer = AtomConv2d(nn.Conv2d(8, 8, 3, padding=1), AtomConfig(), "filter")
    with torch.no_grad():
        layer.atoms_delta.normal_(0, 0.3)
    calls = []
    real = tune.choose

    def spy(k, candidates, run):
        calls.append(k in tune._table)
        return real(k, candidates, run)

    monkeypatch.setattr(tune, "choose", spy)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    grads = [x.grad.clone(), layer.atoms_delta.grad.clone()]
    (row,) = tune.table()
    assert row["path"] in ("conv", "gemm") and set(row["ms"]) == {"conv", "gemm"}
    assert row["input"] == [2, 8, 6, 6] and row["weight"] == [8, 8, 3, 3]
    layer(x)  # the second forward reads the table
    assert calls == [False, True] and len(tune.table()) == 1
    # the measurement left no gradient behind: one backward, one contribution
    other = "gemm" if row["path"] == "conv" else "conv"
    x2 = x.detach().clone().requires_grad_(True)
    layer.atoms_delta.grad = None
    with force_path(other):
        layer(x2).sum().backward()
    torch.testing.assert_close(x2.grad, grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.atoms_delta.grad, grads[1], rtol=1e-4, atol=1e-4)


def test_measured_choice_is_off_without_grad_for_small_shapes_and_by_env(monkeypatch):
    tune.clear()
    layer = AtomConv2d(nn.Conv2d(8, 8, 3, padding=1), AtomConfig(), "filter")
    x = torch.randn(1, 8, 2, 2)
    args = (x, layer.base_layer, layer.atom_update, layer.atom_factors())
    assert choose_path(*args) == "gemm" and tune.table() == []  # small: the fixed rule
    monkeypatch.setattr(tune, "MIN_MACS", 0)
    with torch.no_grad():
        assert choose_path(*args) == "gemm" and tune.table() == []
    monkeypatch.setenv("SDATOM_KERNEL_TUNING", "0")
    assert choose_path(*args) == "gemm" and tune.table() == []
    monkeypatch.setenv("SDATOM_KERNEL_TUNING", "1")
    assert choose_path(*args) in ("conv", "gemm") and len(tune.table()) == 1
    tune.clear()
