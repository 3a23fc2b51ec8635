"""Every trainable parameter is a degree of freedom: the Jacobian of a layer's output with
respect to its trainable atoms, at a random point, has full column rank.

Small layers of every kind (3×3 conv, 1×1 conv, channel atoms on a Linear and on a 1×1 conv),
both coders. The counts asserted here are the ones ``count_trainable``, ``sdatom inspect``,
train_summary.json and the README report. (The overcomplete option's β·D1 product has LoRA's
B·A rescaling freedom by construction and is not part of this check.)
"""

import pytest
import torch
from torch import nn

from sdatom.atoms import AtomConfig, AtomConv2d, AtomLinear, count_trainable

LASSO = {"coder": "lasso", "dict_iters": 3, "lasso_iters": 100}

# (name, layer factory, input shape, mode, config, trainable count)
CASES = [
    ("3x3-linear", lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 6, 6), "filter", {}, 81),
    ("3x3-linear-m4", lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 6, 6), "filter",
     {"num_atoms": 4}, 36),
    ("3x3-lasso", lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 6, 6), "filter", LASSO, 81),
    ("1x1-linear", lambda: nn.Conv2d(4, 8, 1), (2, 4, 3, 3), "filter", {}, 1),
    ("1x1-lasso", lambda: nn.Conv2d(4, 8, 1), (2, 4, 3, 3), "filter", LASSO, 1),
    ("linear-channel-linear", lambda: nn.Linear(32, 32), (48, 32), "channel", {}, 256),
    ("linear-channel-lasso", lambda: nn.Linear(32, 32), (48, 32), "channel", LASSO, 1024),
    ("conv1x1-channel-linear", lambda: nn.Conv2d(16, 16, 1), (4, 16, 4, 4), "channel", {}, 256),
]  # fmt: skip
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jacobian_rank_equals_the_trainable_count(case, tmp_path):
    name, factory, shape, mode, cfg, count = case
    torch.manual_seed(0)
    base = factory().double()
    config = AtomConfig(channel_modules=None, **cfg)
    cls = AtomLinear if isinstance(base, nn.Linear) else AtomConv2d
    layer = cls(base, config, mode, name=name, cache_dir=tmp_path).double()
    assert layer.atoms_delta.numel() == count
    counted = config if mode == "filter" else AtomConfig(channel_modules=("0",), **cfg)
    assert count_trainable(nn.Sequential(base), counted)["trainable_params"] == count
    x = torch.randn(shape, dtype=torch.float64)
    point = torch.randn_like(layer.atoms_delta) * 0.1  # a random point of the parameters

    def output(delta):
        return torch.func.functional_call(layer, {"atoms_delta": delta}, (x,)).reshape(-1)

    jac = torch.autograd.functional.jacobian(output, point, vectorize=False)
    jac = jac.reshape(jac.shape[0], -1)
    assert jac.shape[0] >= count  # enough outputs to see every direction
    assert int(torch.linalg.matrix_rank(jac)) == count


def test_the_old_linear_layout_had_dead_parameters():
    """Why the layout changed: 9 scalar atoms on a 1×1 conv, or 64 channel atoms, reach the
    weights through P = pinv(D0) of rank 1 (resp. 16) only."""
    from sdatom.atoms.decompose import channel_rows, linear_atoms, projector

    w = torch.randn(32, 32, dtype=torch.float64)
    d0 = linear_atoms(channel_rows(w, 4), 64).double()  # the old layout: 64 atoms of 16
    assert int(torch.linalg.matrix_rank(projector(d0))) == 16  # 1,024 numbers, 256 free
    d0 = linear_atoms(w.reshape(-1, 1), 9).double()  # 9 scalar atoms of a 1×1 conv
    assert int(torch.linalg.matrix_rank(projector(d0))) == 1
