"""The names a user imports from ``sdatom`` exist and are the library's own."""

import sdatom


def test_public_names_resolve():
    for name in sdatom.__all__:
        assert getattr(sdatom, name) is not None, name


def test_public_api_round_trip(tmp_path):
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    base = model(x)
    sdatom.add_atoms(model, "atoms")
    assert torch.allclose(model(x), base, atol=1e-6)  # delta form: unchanged at step 0
    params = sdatom.trainable_parameters(model)
    assert sum(p.numel() for p in params) == 81 + 9
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
