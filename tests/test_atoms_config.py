"""AtomConfig: validation, presets, dict/YAML round trips."""

import pytest

from sdatom.atoms import PRESETS, AtomConfig, preset, resolve_config
from sdatom.errors import ConfigError


def test_defaults_follow_the_paper():
    cfg = AtomConfig()
    assert cfg.coder == "linear"
    assert cfg.num_atoms == 9
    assert cfg.lasso_lambda == 1e-3
    assert (cfg.channel_block, cfg.num_channel_atoms) == (4, 64)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"coder": "svd"}, "coder"),
        ({"num_atoms": 0}, "num_atoms"),
        ({"num_sub_atoms": -1}, "num_sub_atoms"),
        ({"channel_block": 1.5}, "channel_block"),
        ({"lasso_lambda": -1.0}, "lasso_lambda"),
        ({"target_modules": "("}, "target_modules"),
        ({"exclude_modules": 3}, "exclude_modules"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        AtomConfig(**kwargs)


def test_lists_become_tuples_and_config_is_hashable():
    cfg = AtomConfig(channel_modules=["to_q", "to_k"])
    assert cfg.channel_modules == ("to_q", "to_k")
    assert hash(cfg) == hash(AtomConfig(channel_modules=("to_q", "to_k")))


def test_unknown_key_suggests_the_closest_one():
    with pytest.raises(ConfigError, match="did you mean 'num_atoms'"):
        AtomConfig.from_dict({"num_atom": 4})


def test_dict_round_trip_and_preset_key():
    cfg = AtomConfig.from_dict({"preset": "atoms-attn", "coder": "lasso"})
    assert cfg.channel_modules == PRESETS["atoms-attn"].channel_modules
    assert cfg.coder == "lasso"
    assert AtomConfig.from_dict(cfg.to_dict()) == cfg


def test_from_yaml(tmp_path):
    path = tmp_path / "atoms.yaml"
    path.write_text("num_sub_atoms: 3\ntarget_modules: [conv1, conv2]\n")
    cfg = AtomConfig.from_yaml(path)
    assert cfg.num_sub_atoms == 3 and cfg.target_modules == ("conv1", "conv2")
    (tmp_path / "bad.yaml").write_text("num_sub_atom: 3\n")
    with pytest.raises(ConfigError, match="num_sub_atoms"):
        AtomConfig.from_yaml(tmp_path / "bad.yaml")


def test_presets_and_resolution():
    assert set(PRESETS) == {"atoms", "atoms-paper", "atoms-oc", "atoms-attn"}
    paper = PRESETS["atoms-paper"]  # the paper's exact setting
    assert (paper.coder, paper.num_atoms, paper.lasso_lambda) == ("lasso", 9, 1e-3)
    assert preset("atoms-oc").num_sub_atoms == 3
    assert resolve_config(None) == PRESETS["atoms"]
    assert resolve_config({"num_atoms": 4}).num_atoms == 4
    with pytest.raises(ConfigError, match="did you mean 'atoms-oc'"):
        preset("atoms_oc")
