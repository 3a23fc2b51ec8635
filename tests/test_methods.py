"""The method registry: every method adds, saves and restores its own trainable state."""

from __future__ import annotations

import pytest
import torch

from sdatom.config import TrainConfig
from sdatom.methods import METHODS, get_method
from sdatom.models import load_pipeline


def _config(method: str) -> TrainConfig:
    return TrainConfig(subject="x", class_name="dog", method=method, preset="atoms")


@pytest.mark.parametrize("name", METHODS)
def test_a_checkpoint_state_restores_what_was_trained(tiny_dir, name):
    method = get_method(name)
    trained = load_pipeline(str(tiny_dir)).unet
    params = method.add(trained, _config(name))
    assert params and all(p.requires_grad for p in params)
    assert method.count(params) == sum(p.numel() for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 1e-2)
    fresh = load_pipeline(str(tiny_dir)).unet
    method.add(fresh, _config(name))
    method.load_state_dict(fresh, method.state_dict(trained))
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, text).sample, trained(x, t, text).sample)


def test_every_configurable_method_is_registered():
    from sdatom import config

    assert config.METHODS == METHODS == ("atoms", "lora", "full")
    assert get_method("full").default_lr < get_method("atoms").default_lr
