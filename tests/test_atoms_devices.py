"""Devices without float64 (Apple's MPS): the atoms never use a dtype the device lacks.

No MPS is at hand, so a fake one stands in: the model's weights are marked as living on a
device without float64, the mark follows every tensor computed from them until one is moved
to the CPU, and an op that makes a float64/complex128 tensor on that device fails the way MPS
does. The code's own device check (``supports_float64``) is told the same.
"""

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from sdatom.atoms import AtomConfig, add_atoms, merge_atoms, unmerge_atoms
from sdatom.atoms import kernels as channel_mod
from sdatom.atoms.kernels import channel as channel_kernels

NO_FLOAT64 = (torch.float64, torch.complex128)


class FakeMPS(TorchFunctionMode):
    """Tensors derived from ``tensors`` count as on a device without float64."""

    def __init__(self, tensors):
        super().__init__()
        self.keep = list(tensors)  # keeps ids unique while the mode lives
        self.ids = {id(t) for t in self.keep}

    def _moves_to_cpu(self, func, args, kwargs):
        if func in (torch.Tensor.cpu, torch.Tensor.numpy):
            return True
        if func is torch.Tensor.to:
            for a in [*args[1:], *kwargs.values()]:
                if a == "cpu" or (isinstance(a, torch.device) and a.type == "cpu"):
                    return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device = any(
            isinstance(a, torch.Tensor) and id(a) in self.ids for a in tree_leaves((args, kwargs))
        )
        out = func(*args, **kwargs)
        if on_device and self._moves_to_cpu(func, args, kwargs):
            # A real device-to-CPU move copies; on the CPU, .cpu() returns the tensor itself.
            return out.clone() if any(out is a for a in args) else out
        if on_device:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    if t.dtype in NO_FLOAT64:
                        raise TypeError(f"fake MPS: {func} made a {t.dtype} tensor on the device")
                    self.keep.append(t)
                    self.ids.add(id(t))
        return out


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.to_q = nn.Linear(8, 8)

    def forward(self, x):
        y = self.proj(self.conv(x))
        return self.to_q(y.permute(0, 2, 3, 1))


@pytest.fixture
def no_float64(monkeypatch):
    import sdatom.atoms.layer as layer_mod

    for mod in (layer_mod, channel_kernels):
        monkeypatch.setattr(mod, "supports_float64", lambda device: False, raising=False)


@pytest.mark.parametrize("coder", ["linear", "lasso"])
def test_atoms_decompose_train_and_merge_without_float64_on_the_device(no_float64, coder, tmp_path):
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 4, 6, 6)
    config = AtomConfig(coder=coder, channel_modules=("to_q",), dict_iters=1, lasso_iters=10)
    with FakeMPS(list(net.parameters()) + [x]):
        add_atoms(net, config, cache_dir=tmp_path)  # decomposes in float64 on the CPU
        with channel_mod.force_path("fused"):
            y = net(x)  # the fused channel path moves 16-byte runs without complex128
            y.square().sum().backward()
        merge_atoms(net)
        unmerge_atoms(net)  # the small solve runs in float32 on such a device
    assert net.to_q.atoms_delta.grad is not None
    assert net.conv.atoms_d0.dtype == torch.float32


def test_the_fake_device_catches_float64():
    """The fake is strict: the old decomposition (float64 on the weight's device) fails it."""
    w = torch.randn(8, 9)
    with FakeMPS([w]), pytest.raises(TypeError, match="fake MPS"):
        (w.T @ w).double()
    with FakeMPS([w]):
        (w.T @ w).to("cpu", torch.float64)  # moved to the CPU first: fine
