"""The names a user imports from ``sdatom`` exist and are the library's own."""

import sdatom

PUBLIC = {
    "AtomConfig": "sdatom.atoms.config",
    "PRESETS": "sdatom.atoms.config",
    "add_atoms": "sdatom.atoms.inject",
    "remove_atoms": "sdatom.atoms.inject",
    "merge_atoms": "sdatom.atoms.inject",
    "unmerge_atoms": "sdatom.atoms.inject",
    "save_atoms": "sdatom.atoms.io",
    "load_atoms": "sdatom.atoms.io",
    "find_targets": "sdatom.atoms.inject",
    "trainable_parameters": "sdatom.atoms.inject",
    "TrainConfig": "sdatom.config",
    "train": "sdatom.train",
    "sample": "sdatom.sample",
    "evaluate": "sdatom.eval.metrics",
    "load_pipeline": "sdatom.models",
}


_CHECK = """
import importlib, json, sys
import sdatom
public = json.loads(sys.argv[1])
assert sorted(sdatom.__all__) == sorted(["__version__", *public]), sdatom.__all__
for name, home in public.items():
    obj = getattr(sdatom, name)
    assert obj is getattr(importlib.import_module(home), name), name
    if name != "PRESETS":
        assert callable(obj) and obj.__module__ == home, (name, obj)
assert set(sdatom.PRESETS) >= {"atoms", "atoms-oc", "atoms-attn"}
assert sdatom.__version__[0].isdigit()
try:
    sdatom.nope
except AttributeError as e:
    assert "no attribute 'nope'" in str(e)
else:
    raise AssertionError("sdatom.nope resolved")
"""


def test_public_names_are_the_library_objects_they_claim_to_be():
    """In a fresh interpreter, as a user's ``import sdatom`` sees them (in this process the
    test modules have imported the submodules sdatom.train and sdatom.sample, whose names
    then shadow the functions of the same names)."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _CHECK, json.dumps(PUBLIC)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_public_api_round_trip(tmp_path):
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    base = model(x)
    sdatom.add_atoms(model, "atoms")
    assert torch.allclose(model(x), base, atol=1e-6)  # delta form: unchanged at step 0
    params = sdatom.trainable_parameters(model)
    assert sum(p.numel() for p in params) == 81 + 1  # a 9×9 tap mix and a 1×1 gain
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.1)
    adapted = model(x)
    sdatom.save_atoms(model, tmp_path / "a.safetensors")
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in _base_state(model).items()})
    sdatom.load_atoms(fresh, tmp_path / "a.safetensors")
    sdatom.merge_atoms(fresh)
    assert torch.allclose(fresh(x), adapted, atol=1e-5)


def _base_state(model):
    return {k: v for k, v in model.state_dict().items() if "atoms" not in k and "base_layer" in k}
