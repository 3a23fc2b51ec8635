"""The fused linear-coder channel-atom path (sdatom/atoms/channel.py) against the generic one.

float64 gradcheck of the Function, float32 equality with the generic path (tolerances from
the dtype's epsilon and the problem size), bf16 autocast, the saved tensors (nothing
weight-sized but W0 itself), the ΔD = 0 identity and the dispatch rule.
"""

import copy

import pytest
import torch
from torch import nn

from sdatom.atoms import AtomConfig, AtomLinear
from sdatom.atoms.decompose import channel_rows, channel_unrows
from sdatom.atoms.kernels import apply, force_path
from sdatom.atoms.kernels import linear_path as choose_path
from sdatom.atoms.kernels.channel import _swap_blocks

# (name, in, out, input shape, bias)
CASES = [
    ("tokens", 12, 8, (3, 12), True),
    ("btc", 12, 8, (2, 3, 12), True),
    ("nobias", 16, 8, (2, 3, 16), False),
]
IDS = [c[0] for c in CASES]


def _layer(case, dtype, block=4, atoms=16):
    torch.manual_seed(0)
    lin = nn.Linear(case[1], case[2], bias=case[4]).to(dtype)
    cfg = AtomConfig(channel_block=block, num_channel_atoms=atoms)
    layer = AtomLinear(copy.deepcopy(lin), cfg, "channel").to(dtype)
    with torch.no_grad():
        layer.atoms_delta.normal_(0, 0.3)
    return layer


def _run(layer, x, dy, path, train_bias=False):
    layer.atoms_delta.grad = None
    bias = layer.base_layer.bias
    if bias is not None:
        bias.requires_grad_(train_bias)
        bias.grad = None
    xp = x.clone().requires_grad_(True)
    with force_path(path):
        y = layer(xp)
    y.backward(dy)
    gb = bias.grad if bias is not None and train_bias else None
    return [y.detach(), xp.grad, layer.atoms_delta.grad, gb]


@pytest.mark.parametrize("block", [1, 2, 4])
def test_block_swaps_match_the_decompose_layouts(block):
    w = torch.randn(8, 12)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        wd = w.to(dtype)
        rows = _swap_blocks(wd, 8 // block, block, 12 // block, block).view(-1, block**2)
        assert torch.equal(rows, channel_rows(wd, block))
        back = _swap_blocks(rows, 8 // block, 12 // block, block, block).view(8, 12)
        assert torch.equal(back, channel_unrows(rows, wd.shape, block))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fused_function_passes_gradcheck_in_float64(case):
    layer = _layer(case, torch.float64)
    base = layer.base_layer
    if base.bias is not None:
        base.bias.requires_grad_(True)
    x = torch.randn(case[3], dtype=torch.float64, requires_grad=True)

    def fn(inp, delta, *bias):
        with force_path("fused"):
            return apply(inp, base, layer.atom_update, [delta, layer.atoms_pinv])

    delta = layer.atoms_delta.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, delta))
    if base.bias is not None:  # the bias gradient, through the module parameter
        x2 = x.detach()
        with force_path("fused"):
            apply(x2, base, layer.atom_update, [delta, layer.atoms_pinv]).sum().backward()
        n = x2.numel() // x2.shape[-1]
        torch.testing.assert_close(base.bias.grad, torch.full_like(base.bias, float(n)))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fused_matches_the_generic_path_in_float32(case):
    layer = _layer(case, torch.float32)
    x = torch.randn(case[3])
    dy = torch.randn(*case[3][:-1], case[2])
    train_bias = case[4]
    want = _run(layer, x, dy, "generic", train_bias)
    got = _run(layer, x, dy, "fused", train_bias)
    eps = torch.finfo(torch.float32).eps
    # every entry is a sum of at most in·k² + tokens terms: error ≲ that many eps
    terms = case[1] * 16 + x.numel() // x.shape[-1]
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
            continue
        scale = float(w.abs().max()) + 1.0
        torch.testing.assert_close(g, w, rtol=terms * eps, atol=terms * eps * scale)


def test_bf16_autocast_runs_and_matches():
    case = CASES[1]
    layer = _layer(case, torch.float32)
    x = torch.randn(case[3])
    dy = torch.randn(*case[3][:-1], case[2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(layer, x, dy.bfloat16(), "fused", train_bias=True)
        want = _run(layer, x, dy.bfloat16(), "generic", train_bias=True)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    eps = torch.finfo(torch.bfloat16).eps
    for g, w in zip(got, want, strict=True):
        scale = float(w.abs().max()) + 1.0
        torch.testing.assert_close(g.float(), w.float(), rtol=16 * eps, atol=16 * eps * scale)


def test_fused_saves_no_weight_sized_tensor_but_w0():
    lin = nn.Linear(64, 64)  # 4096 weights: more than P (16×64) and x
    layer = AtomLinear(lin, AtomConfig(), "channel")
    x = torch.randn(2, 3, 64, requires_grad=True)
    saved = []
    with (
        force_path("fused"),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
    ):
        layer(x).sum().backward()
    big = [t for t in saved if t.numel() >= lin.weight.numel()]
    assert big and all(t.data_ptr() == lin.weight.data_ptr() for t in big)
    assert layer.atoms_delta.grad is not None and lin.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_atoms_give_exactly_the_base_output(dtype):
    case = CASES[1]
    layer = _layer(case, dtype)
    with torch.no_grad():
        layer.atoms_delta.zero_()
    x = torch.randn(case[3], dtype=dtype)
    with force_path("fused"):
        assert torch.equal(layer(x), layer.base_layer(x))


def test_dispatch_rule():
    lin = nn.Linear(8, 8)
    lin.weight.requires_grad_(False)
    assert choose_path(lin.weight) == "fused"
    with force_path("generic"):
        assert choose_path(lin.weight) == "generic"
    lin.weight.requires_grad_(True)
    assert choose_path(lin.weight) == "generic"  # a trained W0 needs the generic backward
    with pytest.raises(ValueError):
        with force_path("nope"):
            pass


def test_trained_base_weight_falls_back_to_the_generic_path():
    layer = _layer(CASES[0], torch.float32)
    layer.base_layer.weight.requires_grad_(True)
    layer(torch.randn(CASES[0][3])).sum().backward()
    assert layer.base_layer.weight.grad is not None and layer.atoms_delta.grad is not None
