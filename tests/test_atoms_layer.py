"""Atom layers on hand-built modules: the invariants of a peft-style adapter layer, and the
custom autograd Function against plain autograd."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdatom.atoms import AtomConfig, AtomConv2d, AtomLinear
from sdatom.atoms.decompose import channel_rows
from sdatom.atoms.kernels.generic import atom_conv2d, atom_linear

LINEAR = AtomConfig()
OC = AtomConfig(num_sub_atoms=2)
LASSO = AtomConfig(coder="lasso", dict_iters=2, lasso_iters=20)
LASSO_OC = AtomConfig(coder="lasso", num_sub_atoms=2, dict_iters=2, lasso_iters=20)
SMALL_CHANNEL = AtomConfig(channel_block=2, num_channel_atoms=6)

# (name, module factory, input shape, mode, config)
CASES = [
    ("conv3x3", lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 5, 5), "filter", LINEAR),
    ("conv3x3-oc", lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 5, 5), "filter", OC),
    ("conv3x3-lasso", lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 5, 5), "filter", LASSO),
    ("conv3x3-lasso-oc", lambda: nn.Conv2d(3, 4, 3), (1, 3, 5, 5), "filter", LASSO_OC),
    (
        "strided-dilated",
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
        (2, 4, 7, 7),
        "filter",
        LINEAR,
    ),
    ("conv1x1-scalars", lambda: nn.Conv2d(4, 8, 1), (2, 4, 3, 3), "filter", LINEAR),
    ("conv1x1-scalars-oc", lambda: nn.Conv2d(4, 8, 1), (2, 4, 3, 3), "filter", OC),
    ("grouped", lambda: nn.Conv2d(4, 8, 3, groups=2, padding=1), (1, 4, 5, 5), "filter", OC),
    (
        "depthwise-same-nobias",
        lambda: nn.Conv2d(4, 4, 3, groups=4, padding="same", bias=False),
        (1, 4, 5, 5),
        "filter",
        LINEAR,
    ),
    (
        "reflect-pad",
        lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        (1, 3, 5, 5),
        "filter",
        LINEAR,
    ),
    (
        "conv5x5-m25",
        lambda: nn.Conv2d(2, 3, 5, padding=2),
        (1, 2, 6, 6),
        "filter",
        AtomConfig(num_atoms=None),
    ),
    ("linear-channel", lambda: nn.Linear(8, 12), (2, 3, 8), "channel", SMALL_CHANNEL),
    (
        "linear-channel-lasso",
        lambda: nn.Linear(8, 4),
        (2, 8),
        "channel",
        AtomConfig(coder="lasso", channel_block=2, num_channel_atoms=6, dict_iters=2),
    ),
    ("conv1x1-channel", lambda: nn.Conv2d(8, 12, 1), (2, 8, 3, 3), "channel", SMALL_CHANNEL),
]
IDS = [c[0] for c in CASES]


def _build(case, dtype=torch.float32, tmp_path=None):
    _, factory, shape, mode, cfg = case
    torch.manual_seed(0)
    base = factory().to(dtype)
    cls = AtomLinear if isinstance(base, nn.Linear) else AtomConv2d
    layer = cls(copy.deepcopy(base), cfg, mode, name="layer", cache_dir=tmp_path)
    x = torch.randn(shape, dtype=dtype)
    return base, layer.to(dtype), x


def _randomise(layer, scale=0.2):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _reference(layer, x):
    """The straightforward formulation: one op with W + delta, plain autograd."""
    base = layer.base_layer
    delta = layer.atom_update.delta(base.weight, *layer.atom_factors())
    w = base.weight + delta.to(base.weight.dtype)
    if isinstance(base, nn.Linear):
        return F.linear(x, w, base.bias)
    return base._conv_forward(x, w, base.bias)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fresh_atoms_leave_the_output_unchanged(case, tmp_path):
    base, layer, x = _build(case, tmp_path=tmp_path)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert layer.base_layer.weight.data_ptr() != base.weight.data_ptr()  # deepcopy in _build


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapted_merged_disabled_and_unmerged_agree(case, tmp_path):
    base, layer, x = _build(case, tmp_path=tmp_path)
    _randomise(layer)
    w0 = layer.base_layer.weight.detach().clone()
    adapted = layer(x)
    assert not torch.allclose(adapted, base(x), atol=1e-4)
    torch.testing.assert_close(adapted, _reference(layer, x).detach(), rtol=1e-5, atol=1e-5)
    layer.merge(safe=True, reversible=True)
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.base_layer.weight, w0) or layer.atom_config.coder == "lasso"
    layer.disabled = True
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_function_gradcheck_float64(case, tmp_path):
    _, layer, x = _build(case, dtype=torch.float64, tmp_path=tmp_path)
    _randomise(layer)
    base = layer.base_layer
    base.weight.requires_grad_(True)  # check the weight path too
    x.requires_grad_(True)
    trainable = [p for p in layer.parameters() if p.requires_grad and p is not base.weight]
    coef = layer.atoms_coefficients

    def fn(x, weight, *params):
        factors = [params[0], coef, *params[1:]]
        if isinstance(base, nn.Linear):
            return atom_linear(x, weight, base.bias, layer.atom_update.delta, factors)
        return atom_conv2d(x, weight, base.bias, base, layer.atom_update.delta, factors)

    assert torch.autograd.gradcheck(fn, (x, base.weight, *trainable), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_function_gradients_match_plain_autograd_float32(case, tmp_path):
    _, layer, x = _build(case, tmp_path=tmp_path)
    _randomise(layer)
    x.requires_grad_(True)
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    dy = torch.randn_like(layer(x))
    got = torch.autograd.grad(layer(x), params, dy)
    want = torch.autograd.grad(_reference(layer, x), params, dy)
    eps = torch.finfo(torch.float32).eps
    for g, w in zip(got, want, strict=True):
        scale = float(w.abs().max()) + 1.0
        torch.testing.assert_close(g, w, rtol=1e3 * eps, atol=1e3 * eps * scale)


def test_forward_saves_no_summed_weight():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    layer = AtomConv2d(conv, OC, "filter")
    x = torch.randn(1, 16, 4, 4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    big = [t for t in saved if t.numel() >= conv.weight.numel()]
    assert all(t.data_ptr() in (conv.weight.data_ptr(), x.data_ptr()) for t in big)
    assert layer.atoms_delta.grad is not None and conv.weight.grad is None


def test_linear_coder_is_exact_with_a_complete_basis():
    conv = nn.Conv2d(8, 8, 3)
    assert AtomConv2d(conv, AtomConfig(num_atoms=9), "filter").fit_report()["rel_error"] < 1e-5
    partial = AtomConv2d(nn.Conv2d(8, 8, 3), AtomConfig(num_atoms=4), "filter").fit_report()
    assert partial["rel_error"] > 1e-3


def test_channel_atoms_equal_a_sum_of_kronecker_products():
    torch.manual_seed(0)
    lin = nn.Linear(8, 12)
    layer = AtomLinear(copy.deepcopy(lin), AtomConfig(), "channel")  # k_c = 4
    assert layer.atoms_delta.numel() == 16 * 16  # the linear coder's 16×16 block mix
    _randomise(layer)
    kc = 4
    alpha = channel_rows(lin.weight.detach(), kc) @ layer.atoms_pinv  # (n_blocks, m_c)
    expected = torch.zeros_like(lin.weight)
    for j in range(alpha.shape[1]):
        coeff = alpha[:, j].reshape(12 // kc, 8 // kc)
        expected += torch.kron(coeff, layer.atoms_delta[j].detach().reshape(kc, kc))
    torch.testing.assert_close(layer.get_delta_weight().detach(), expected, rtol=1e-4, atol=1e-5)
    x = torch.randn(3, 8)
    torch.testing.assert_close(
        layer(x), F.linear(x, lin.weight + expected, lin.bias), rtol=1e-4, atol=1e-5
    )


def test_overcomplete_atoms_are_per_input_channel():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 3)
    layer = AtomConv2d(conv, AtomConfig(num_sub_atoms=2), "filter")
    _randomise(layer)
    m, m1, kk = 9, 2, 9
    beta = layer.atoms_beta.detach().reshape(3, m, m1)
    d1 = layer.atoms_sub.detach().reshape(m, m1, kk)
    alpha = conv.weight.detach().reshape(6, kk) @ layer.atoms_pinv
    expected = torch.zeros(2, 3, kk)
    for o in range(2):
        for c in range(3):
            for j in range(m):
                atom = layer.atoms_delta[j].detach() + sum(
                    beta[c, j, a] * d1[j, a] for a in range(m1)
                )
                expected[o, c] += alpha[o * 3 + c, j] * atom
    torch.testing.assert_close(
        layer.get_delta_weight().detach(), expected.reshape(2, 3, 3, 3), rtol=1e-4, atol=1e-6
    )
    assert layer.atoms_beta.shape == (3 * m, m1) and layer.atoms_sub.shape == (m * m1, 3, 3)


def test_autocast_runs_in_the_autocast_dtype_with_float32_atoms():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    layer = AtomConv2d(copy.deepcopy(conv), LINEAR, "filter")
    x = torch.randn(1, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = conv(x)
        got = layer(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    _randomise(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    assert layer.atoms_delta.grad.dtype == torch.float32
    assert torch.isfinite(layer.atoms_delta.grad).all()


def test_half_precision_base_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    layer32 = AtomConv2d(copy.deepcopy(conv), LINEAR, "filter")
    layer16 = AtomConv2d(copy.deepcopy(conv).to(torch.bfloat16), LINEAR, "filter")
    assert layer16.atoms_delta.dtype == torch.float32
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(layer16(x.bfloat16()), layer16.base_layer(x.bfloat16()))
    _randomise(layer32)
    _randomise(layer16)
    out16 = layer16(x.bfloat16())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), layer32(x), rtol=5e-2, atol=5e-2)
    out16.float().sum().backward()
    assert layer16.atoms_delta.grad.dtype == torch.float32


def test_safe_merge_names_the_layer():
    layer = AtomConv2d(nn.Conv2d(2, 2, 3), LINEAR, "filter", name="down.0.conv")
    with torch.no_grad():
        layer.atoms_delta.fill_(float("inf"))
    with pytest.raises(Exception, match="down.0.conv"):
        layer.merge(safe=True)
    assert not layer.merged


def _held_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of every tensor a module holds (parameters, buffers and plain attributes), by
    device; shared storages counted once."""
    seen: dict[int, tuple[str, int]] = {}
    for m in module.modules():
        tensors = [*m._parameters.values(), *m._buffers.values()]
        tensors += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t is not None:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = (t.device.type, storage.nbytes())
    out: dict[str, int] = {}
    for device, nbytes in seen.values():
        out[device] = out.get(device, 0) + nbytes
    return out


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_holds_no_weight_sized_tensor_and_unmerge_recomputes_w0(case, tmp_path):
    _, layer, x = _build(case, tmp_path=tmp_path)
    _randomise(layer, scale=0.05)
    w0 = layer.base_layer.weight.detach().clone()
    adapted = layer(x).detach()
    before = _held_bytes(layer)
    layer.merge()
    assert _held_bytes(layer) == before  # the old code kept a float32 copy of the delta
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    # W0 = W'·(I + M)⁻¹ (or W' − α·ΔD): the merged weight's float32 rounding, amplified by
    # the conditioning of I + M (close to 1 for updates this size).
    eps = torch.finfo(torch.float32).eps
    scale = float(w0.abs().max())
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=64 * eps * scale)
    assert _held_bytes(layer) == before


def test_reversible_merge_keeps_w0_on_the_cpu_only():
    layer = AtomConv2d(nn.Conv2d(8, 16, 3), LINEAR, "filter")
    _randomise(layer)
    w0 = layer.base_layer.weight.detach().clone()
    before = _held_bytes(layer)
    layer.merge(reversible=True)
    after = _held_bytes(layer)
    assert after["cpu"] - before["cpu"] == w0.numel() * w0.element_size()
    assert layer._unmerged_weight.device.type == "cpu"
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)
    assert _held_bytes(layer) == before
