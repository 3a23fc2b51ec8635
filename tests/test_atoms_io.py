"""Adapter files: round trip, metadata, refusals (foreign, truncated, wrong base)."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sdatom
from sdatom.atoms import (
    AtomConfig,
    add_atoms,
    atom_state_dict,
    load_atom_state_dict,
    load_atoms,
    merge_atoms,
    read_atoms_metadata,
    save_atoms,
    trainable_parameters,
)
from sdatom.errors import AdapterError, ConfigError


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(8, 8, 1),
        nn.Flatten(1),
        nn.Linear(8 * 16, 8),
    )


CFG = AtomConfig(num_sub_atoms=2, channel_modules=["4"])


def _trained(cfg=CFG, seed=0, cache_dir=None):
    net = _net(seed)
    add_atoms(net, cfg, cache_dir=cache_dir)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainable_parameters(net):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net


class Pipe:
    def __init__(self, unet):
        self.unet = unet


X = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize(
    "cfg", [CFG, AtomConfig(coder="lasso", dict_iters=2)], ids=["linear-oc-channel", "lasso"]
)
def test_round_trip_into_a_fresh_model(tmp_path, cfg):
    net = _trained(cfg, cache_dir=tmp_path)
    want = net(X)
    path = save_atoms(net, tmp_path / "a.safetensors", metadata={"subject": "dog"})
    fresh = _net()
    loaded = load_atoms(Pipe(fresh), path, cache_dir=tmp_path)
    assert loaded == (["0", "2", "4"] if cfg is CFG else ["0", "2"])
    torch.testing.assert_close(fresh(X), want, rtol=1e-5, atol=1e-6)
    merge_atoms(fresh)
    torch.testing.assert_close(fresh(X), want, rtol=1e-5, atol=1e-5)


def test_file_holds_only_atoms_and_metadata(tmp_path):
    net = _trained()
    path = save_atoms(net, tmp_path / "a.safetensors", metadata={"subject": "dog"})
    meta = read_atoms_metadata(path)
    assert meta["format"] == "sdatom-atoms" and meta["format_version"] == "2"
    assert meta["sdatom_version"] == sdatom.__version__ and meta["subject"] == "dog"
    assert AtomConfig.from_dict(meta["config"]) == CFG
    assert meta["layers"]["0"]["weight_shape"] == [8, 3, 3, 3]
    assert len(meta["base_fingerprint"]) == 16
    keys = set(atom_state_dict(net))
    assert keys == {
        f"{n}.{t}"
        for n in ("0", "2")
        for t in ("atoms_delta", "atoms_beta", "atoms_sub", "atoms_d0")
    } | {"4.atoms_delta", "4.atoms_d0"}
    assert not any("base_layer" in k or "coef" in k for k in keys)
    with pytest.raises(ConfigError, match="reserved"):
        save_atoms(net, tmp_path / "b.safetensors", metadata={"format": "x"})


def test_fingerprint_ignores_dtype_and_merging(tmp_path):
    net = _trained()
    fp = read_atoms_metadata(save_atoms(net, tmp_path / "a.safetensors"))["base_fingerprint"]
    merge_atoms(net)
    merged = read_atoms_metadata(save_atoms(net, tmp_path / "m.safetensors"))
    assert merged["base_fingerprint"] == fp
    half = _net().half()
    load_atoms(half, tmp_path / "a.safetensors")  # an fp16 copy of the base is accepted


def test_state_dict_helpers_round_trip():
    net = _trained()
    sd = {k: v.clone() for k, v in atom_state_dict(net).items()}
    other = _net()
    add_atoms(other, CFG)
    assert load_atom_state_dict(other, sd) == ["0", "2", "4"]
    torch.testing.assert_close(other(X), net(X))
    with pytest.raises(AdapterError, match="missing"):
        load_atom_state_dict(other, {k: v for k, v in sd.items() if not k.startswith("0.")})


def test_wrong_base_model_is_refused_unless_forced(tmp_path):
    path = save_atoms(_trained(), tmp_path / "a.safetensors")
    with pytest.raises(
        AdapterError,
        match=r"a\.safetensors: does not match this base model.*"
        r"different base weights.*force=True",
    ):
        load_atoms(_net(seed=1), path)
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 1))
    with pytest.raises(AdapterError, match="shape"):
        load_atoms(other, path)
    unrelated = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.SiLU(), nn.Conv2d(6, 4, 1))
    with pytest.raises(AdapterError, match="no layer matches"):
        load_atoms(unrelated, path, force=True)  # no layer of the same shape: nothing to load
    # Forced onto other base weights of the same shapes (a fine-tuned variant): every layer
    # is loaded, with a warning, and computes the same atoms on its own weights.
    with pytest.warns(UserWarning, match="forced: loading 3 layers of matching shape"):
        assert load_atoms(_net(seed=1), path, force=True) == ["0", "2", "4"]
    partial = copy.deepcopy(_net())
    with torch.no_grad():
        partial[2].weight.add_(1.0)
    with pytest.warns(UserWarning, match="1 problems.*'2' has different base weights"):
        assert load_atoms(partial, path, force=True) == ["0", "2", "4"]


def test_truncated_file_is_refused(tmp_path):
    path = save_atoms(_trained(), tmp_path / "a.safetensors")
    data = path.read_bytes()
    for cut in (len(data) - 10, 40):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(AdapterError, match=f"cut{cut}.safetensors: .*truncated or corrupt"):
            load_atoms(_net(), bad)


def test_lora_and_foreign_files_are_refused(tmp_path):
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(AdapterError, match="looks like a LoRA file") as err:
        load_atoms(_net(), lora)
    assert "\n" not in str(err.value)
    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.ones(())}, str(kohya))
    with pytest.raises(AdapterError, match="looks like a LoRA file"):
        load_atoms(_net(), kohya)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="not an sdatom atoms file"):
        read_atoms_metadata(other)
    text = tmp_path / "notes.safetensors"
    text.write_text(json.dumps({"hello": 1}))
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_atoms(_net(), text)
    with pytest.raises(AdapterError, match="no such adapter file"):
        load_atoms(_net(), tmp_path / "missing.safetensors")


def test_fingerprint_probe_stays_inside_large_weights():
    from sdatom.atoms.io import _probe

    # 29,491,200 elements: a float32 linspace ends one past the last index here.
    weight = torch.zeros(1280, 2560, 3, 3)
    weight.view(-1)[-1] = 7.0
    probe = _probe(weight)
    assert len(probe) == 64 and probe[-1] == 7.0


def _format_1_file(path, net, cfg, old_atoms):
    """An adapter written by sdatom 0.1 (format 1): ``old_atoms`` per layer (9 scalar atoms on
    the 1×1 conv, 64 channel atoms), random ΔD; returns the update M = pinv(D0)·ΔD per layer
    that those files applied to the weights."""
    from safetensors import safe_open

    from sdatom.atoms.decompose import linear_atoms, projector

    model = copy.deepcopy(net)
    add_atoms(model, cfg)
    save_atoms(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers, mixes = json.loads(meta["layers"]), {}
    gen = torch.Generator().manual_seed(3)
    for name, layer in sdatom.atoms.inject.atom_layers(model).items():
        d = layer.atoms_d0.shape[1]
        rows = layer._rows_of(layer.base_layer.weight.detach())
        d0 = linear_atoms(rows, old_atoms[name])  # the old layout: the basis repeated
        delta = torch.randn(old_atoms[name], d, generator=gen) * 0.1
        tensors[f"{name}.atoms_d0"], tensors[f"{name}.atoms_delta"] = d0, delta
        layers[name]["tensors"] = {"atoms_d0": list(d0.shape), "atoms_delta": list(delta.shape)}
        mixes[name] = projector(d0) @ delta
    meta["format_version"], meta["layers"] = "1", json.dumps(layers)
    save_file(tensors, str(path), metadata=meta)
    return mixes


def test_format_1_linear_adapters_load_with_the_same_effect(tmp_path):
    net = _net()
    cfg = AtomConfig(channel_modules=["4"])
    path = tmp_path / "old.safetensors"
    mixes = _format_1_file(path, net, cfg, {"0": 9, "2": 9, "4": 64})
    fresh = copy.deepcopy(net)
    load_atoms(fresh, path)
    from sdatom.atoms.decompose import channel_rows, channel_unrows

    for name, mix in mixes.items():
        layer = fresh.get_submodule(name)
        w0 = layer.base_layer.weight.detach()
        if name == "4":  # channel atoms: each 4×4 block times the 16×16 mix
            expected = channel_unrows(channel_rows(w0, 4) @ mix, w0.shape, 4)
        else:  # filter atoms: the taps of every filter times the mix
            expected = (w0.reshape(-1, mix.shape[0]) @ mix).reshape(w0.shape)
        got = layer.get_delta_weight().detach()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert fresh.get_submodule("2").atoms_delta.shape == (1, 1)  # now one gain
    assert fresh.get_submodule("4").atoms_delta.shape == (16, 16)


def test_format_1_layers_that_cannot_be_converted_are_refused_in_one_line(tmp_path):
    net = _net()
    cfg = AtomConfig(coder="lasso", dict_iters=1, lasso_iters=10)
    path = tmp_path / "old-lasso.safetensors"
    _format_1_file(path, net, cfg, {"0": 9, "2": 9})
    with pytest.raises(AdapterError) as e:
        load_atoms(copy.deepcopy(net), path, cache_dir=tmp_path)
    message = str(e.value)
    assert "\n" not in message and "format 1" in message and "'2'" in message
    assert "sdatom export --merged" in message
