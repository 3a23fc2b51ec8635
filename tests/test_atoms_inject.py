"""Target matching, add/remove/merge/disable on whole models, trainable-parameter counts."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from sdatom.atoms import (
    AtomConv2d,
    AtomLinear,
    add_atoms,
    count_trainable,
    disable_atoms,
    find_targets,
    merge_atoms,
    remove_atoms,
    trainable_parameters,
    unmerge_atoms,
)
from sdatom.errors import AdapterError, NoTargetsMatchedError

SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
TINY = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.to_out = nn.ModuleList([nn.Linear(8, 8), nn.Dropout(0.0)])

    def forward(self, x):
        return self.to_out[0](self.to_q(x) * self.to_k(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.SiLU(), nn.Conv2d(8, 8, 1)
        )
        self.attn = Attn()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.block(self.conv_in(x))
        return self.head(self.attn(h.mean((2, 3))))


@pytest.fixture(scope="module")
def sd15_meta():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY).eval()


def test_default_targets_every_conv2d():
    assert find_targets(Net()) == ["conv_in", "block.0", "block.2"]


def test_pattern_rules_follow_peft():
    net = Net()
    # a list entry matches an exact name or a dotted suffix
    assert find_targets(net, {"target_modules": ["2", "conv_in"]}) == ["conv_in", "block.2"]
    # a string must match the whole name
    assert find_targets(net, {"target_modules": r"block\.\d"}) == ["block.0", "block.2"]
    # exclusions win; channel modules pick Linears
    cfg = {
        "exclude_modules": ["conv_in"],
        "channel_modules": ["to_q", "to_out.0"],
        "channel_block": 4,
        "num_channel_atoms": 8,
    }
    assert find_targets(net, cfg) == ["block.0", "block.2", "attn.to_q", "attn.to_out.0"]


def test_no_match_echoes_patterns_and_real_names():
    with pytest.raises(NoTargetsMatchedError, match=r"'block'.*some module names: conv_in"):
        find_targets(Net(), {"target_modules": "block"})
    with pytest.raises(NoTargetsMatchedError):
        add_atoms(nn.Sequential(nn.Linear(2, 2)))


def test_indivisible_layers_are_skipped_with_a_reason():
    net = Net()
    with pytest.warns(UserWarning, match="head: weight \\(5, 8\\) is not divisible"):
        names = add_atoms(net, {"target_modules": ["to_q", "head"]})
    assert names == ["attn.to_q"]
    assert isinstance(net.attn.to_q, AtomLinear)


def test_add_freezes_everything_else_and_remove_restores():
    net = Net()
    originals = dict(net.named_modules())
    names = add_atoms(net, "atoms-attn")
    assert names == ["conv_in", "block.0", "block.2", "attn.to_q", "attn.to_k", "attn.to_out.0"]
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.atoms_delta" for n in names}
    assert net.conv_in.base_layer is originals["conv_in"]
    with pytest.raises(AdapterError, match="already has atoms"):
        add_atoms(net)
    remove_atoms(net)
    assert dict(net.named_modules()).keys() == originals.keys()
    assert net.conv_in is originals["conv_in"]


def test_training_changes_only_the_atoms():
    torch.manual_seed(0)
    net = Net()
    add_atoms(net, "atoms-oc")
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    params = trainable_parameters(net)
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.Adam(params, lr=1e-2)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    assert all(p.grad is None for n, p in net.named_parameters() if n in frozen)
    for n, p in net.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("preset", ["atoms", "atoms-oc", "atoms-attn", {"coder": "lasso"}])
def test_presets_keep_a_hand_built_net_output_at_step_0(preset, tmp_path):
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 3, 6, 6)
    base = net(x)
    add_atoms(net, preset, cache_dir=tmp_path)
    torch.testing.assert_close(net(x), base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", ["atoms", "atoms-oc", "atoms-attn"])
def test_presets_keep_the_tiny_unet_output_at_step_0(tiny_unet, preset):
    unet = copy.deepcopy(tiny_unet)
    torch.manual_seed(1)
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32)
    with torch.no_grad():
        base = unet(sample, 10, text).sample
        add_atoms(unet, preset)
        assert (
            sum(p.numel() for p in trainable_parameters(unet))
            == count_trainable(tiny_unet, preset)["trainable_params"]
        )
        torch.testing.assert_close(unet(sample, 10, text).sample, base, rtol=1e-5, atol=1e-5)
        for p in trainable_parameters(unet):
            p.normal_(0, 0.05)
        adapted = unet(sample, 10, text).sample
        assert not torch.allclose(adapted, base, atol=1e-4)
        with disable_atoms(unet):
            torch.testing.assert_close(unet(sample, 10, text).sample, base, rtol=1e-5, atol=1e-5)
        merge_atoms(unet, safe=True)
        torch.testing.assert_close(unet(sample, 10, text).sample, adapted, rtol=1e-4, atol=1e-4)
        unmerge_atoms(unet)
        remove_atoms(unet)
    for (n, p), q in zip(unet.named_parameters(), tiny_unet.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_sd15_trainable_counts_on_meta(sd15_meta):
    assert sum(p.numel() for p in sd15_meta.parameters()) == 859_520_964
    # Every trainable number is a degree of freedom (issue 10): 52 3×3 convs get the 9×9 tap
    # mix, 46 1×1 convs one gain each (9 scalar atoms used to act as one: 4,626 before).
    atoms = count_trainable(sd15_meta, "atoms")
    assert atoms["trainable_params"] == 52 * 81 + 46 * 1 == 4_258
    assert len(atoms["layers"]) == 98
    # The paper's setting (lasso, m = 9): the same count, all free (α has full column rank).
    assert count_trainable(sd15_meta, "atoms-paper")["trainable_params"] == 4_258
    # + the 16×16 block mix of 128 attention projections (64 atoms × 16 used to: 1,024 each)
    attn = count_trainable(sd15_meta, "atoms-attn")
    assert attn["trainable_params"] == 4_258 + 128 * 256 == 37_026
    oc = count_trainable(sd15_meta, "atoms-oc")
    assert oc["trainable_params"] == 1_661_620
    assert attn["fp16_bytes"] * 2 == attn["fp32_bytes"]
    assert sum(g["trainable"] for g in attn["groups"].values()) == 37_026
    assert "down_blocks.0" in attn["groups"]


def test_add_atoms_works_on_a_meta_model(sd15_meta):
    unet = copy.deepcopy(sd15_meta)
    add_atoms(unet, "atoms-attn")
    assert sum(p.numel() for p in trainable_parameters(unet)) == 37_026
    assert isinstance(unet.conv_in, AtomConv2d)
