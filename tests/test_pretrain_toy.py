"""pretrain_toy.py's decoder fine-tune: it trains the decoder alone, resumes, and exports."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _stage(work: Path, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "pretrain_toy.py"), "--work", str(work), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_vae_decoder_stage_keeps_the_encoder_and_resumes(tmp_path):
    from diffusers import AutoencoderKL

    from sdatom.toyworld.model import WEIGHTS

    work = tmp_path / "work"
    _stage(work, "--stage", "vae-decoder", "--steps", "2", "--save-every", "1")
    state = torch.load(work / "vae-decoder.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2
    shipped = AutoencoderKL.from_pretrained(WEIGHTS / "toy" / "vae").float().state_dict()
    tuned = state["modules"]["vae"]
    # The UNet learned the encoder's latents: the encoder must not move, the decoder must.
    for name in shipped:
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(tuned[name], shipped[name]), name
    moved = [
        n for n in shipped if n.startswith("decoder.") and not torch.equal(tuned[n], shipped[n])
    ]
    assert moved, "no decoder weight was trained"

    out = _stage(work, "--stage", "vae-decoder", "--steps", "3", "--save-every", "1")
    assert "resumed at step 2" in out
    assert torch.load(work / "vae-decoder.pt", weights_only=True)["step"] == 3

    _stage(work, "--stage", "export-vae", "--out", str(tmp_path / "out"))
    folder = tmp_path / "out" / "toy" / "vae"
    AutoencoderKL.from_pretrained(folder)  # plain diffusers loads the export
    exported = load_file(folder / "diffusion_pytorch_model.safetensors")
    name = moved[0]
    final = torch.load(work / "vae-decoder.pt", weights_only=True)["modules"]["vae"][name]
    assert exported[name].dtype == torch.float16  # shipped as fp16, like the rest of toy
    assert torch.equal(exported[name], final.half())
