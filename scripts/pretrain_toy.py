"""Pretrain the ``toy`` model, the toy CLIP and the toy attribute net on the toy world.

    python scripts/pretrain_toy.py --stage vae      # then clip / attrnet (any order) and unet
    python scripts/pretrain_toy.py --stage vae-decoder  # after unet-zsnr: the decoder alone
    python scripts/pretrain_toy.py --stage export   # write sdatom/toyworld/weights/
    python scripts/pretrain_toy.py --stage eval     # the base-model targets, as JSON

Deterministic and resumable: every batch is a pure function of (stage, step), each stage saves
its state every ``--save-every`` steps (atomically) and a rerun continues from there. Progress
goes to ``WORK/log.txt`` and ``WORK/curve.jsonl``; run it in the background and poll the log.
The stages are independent processes on purpose: on a 2-core machine, vae then unet can run on
one core while clip and attrnet run on the other.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_common import write_report_section

from sdatom.fileio import atomic_path, atomic_write_text
from sdatom.toyworld import model as toy
from sdatom.toyworld import world
from sdatom.toyworld.attrnet import AttrNet, attribute_targets, attrnet_loss
from sdatom.toyworld.quality import base_model_report, to_tensor, vae_round_trip

# ``unet-zsnr`` continues ``unet``: from its EMA weights, on the shipped zero-terminal-SNR
# v-prediction schedule (toy.SCHEDULER; why: its comment), with more two-tone objects.
# ``vae-decoder`` fine-tunes the decoder alone on more two-tone objects, the encoder (and so
# the latent space the UNet learned) frozen: two-tone pictures were the VAE's weak part (a
# round trip read right 97.8 %, PSNR 29.4 dB, against 99.8 % and 35.9 dB for solid ones).
STAGE_SEED = {"vae": 1, "clip": 2, "attrnet": 3, "unet": 4, "unet-zsnr": 5, "vae-decoder": 6}
STEPS = {
    "vae": 2500,
    "clip": 2000,
    "attrnet": 1500,
    "unet": 3200,
    "unet-zsnr": 6000,
    "vae-decoder": 3000,
}
# unet-zsnr's cosine ended at 4000 steps; position words only began to work there (0.34 at
# 3000, 0.66 at 4000), so a second cycle continues to 6000.
RESTARTS = {"unet-zsnr": (4000,)}
BATCH = {"vae": 32, "clip": 128, "attrnet": 128, "unet": 32, "unet-zsnr": 32, "vae-decoder": 32}
LR = {"vae": 1e-3, "clip": 1e-3, "attrnet": 2e-3, "unet": 6e-4, "unet-zsnr": 3e-4}
LR["vae-decoder"] = 3e-4
WARMUP = {"vae": 100, "clip": 200, "attrnet": 100, "unet": 300, "unet-zsnr": 200}
WARMUP["vae-decoder"] = 100
TWO_TONE = {"unet": 0.4, "unet-zsnr": 0.5, "vae-decoder": 0.7}
UNET_STAGES = ("unet", "unet-zsnr")


def stage_scheduler(stage: str) -> dict:
    return toy.EPSILON_SCHEDULER if stage == "unet" else toy.SCHEDULER


def log(work: Path, text: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {text}"
    print(line, flush=True)
    with open(work / "log.txt", "a") as f:
        f.write(line + "\n")


def curve(work: Path, record: dict) -> None:
    with open(work / "curve.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def lr_at(stage: str, step: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak; a stage with ``RESTARTS`` then
    restarts the cosine at half the peak for each further cycle (SGDR-style)."""
    bounds = (0, *RESTARTS.get(stage, ()), STEPS[stage])
    cycle = max(i for i in range(len(bounds) - 1) if step >= bounds[i])
    start, end = bounds[cycle], bounds[cycle + 1]
    peak, warm = LR[stage] * 0.5**cycle, WARMUP[stage] if cycle == 0 else 0
    if step < start + warm:
        return peak * (step + 1) / warm
    t = (step - start - warm) / max(1, end - start - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def batch_seed(stage: str, step: int) -> int:
    return STAGE_SEED[stage] * 10_000_000 + step


# ----------------------------------------------------------------------------- state


def state_path(work: Path, stage: str) -> Path:
    return work / f"{stage}.pt"


def save_state(work: Path, stage: str, step: int, modules: dict, opt, extra=None) -> None:
    state = {
        "step": step,
        "modules": {k: m.state_dict() for k, m in modules.items()},
        "optimizer": opt.state_dict(),
        "extra": extra or {},
    }
    with atomic_path(state_path(work, stage)) as tmp:
        torch.save(state, tmp)


def load_state(work: Path, stage: str):
    path = state_path(work, stage)
    if not path.is_file():
        return None
    # Our own files, read without unpickling code (weights_only).
    return torch.load(path, map_location="cpu", weights_only=True)


def resume(work: Path, stage: str, modules: dict, opt) -> tuple[int, dict]:
    state = load_state(work, stage)
    if state is None:
        return 0, {}
    for k, m in modules.items():
        m.load_state_dict(state["modules"][k])
    opt.load_state_dict(state["optimizer"])
    log(work, f"{stage}: resumed at step {state['step']}")
    return state["step"], state["extra"]


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


# ----------------------------------------------------------------------------- stages


def train_vae(work: Path, save_every: int) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**toy.VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=LR["vae"], weight_decay=0.0)
    step, _ = resume(work, "vae", {"vae": vae}, opt)
    t0, losses = time.time(), []
    while step < STEPS["vae"]:
        images, _, _ = world.world_batch(batch_seed("vae", step), BATCH["vae"])
        x = to_tensor(images)
        set_lr(opt, lr_at("vae", step))
        gen = torch.Generator().manual_seed(batch_seed("vae", step))
        # fp32: faster than bf16 autocast for this small conv net on the CPU (measured).
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 100 == 0:
            psnr = 10 * math.log10(4.0 / F.mse_loss(rec.clamp(-1, 1), x).item())
            log(
                work,
                f"vae step {step} loss {np.mean(losses):.5f} psnr(batch) {psnr:.2f} "
                f"{(time.time() - t0) / len(losses):.2f}s/step",
            )
            losses, t0 = [], time.time()
        if step % save_every == 0 or step == STEPS["vae"]:
            save_state(work, "vae", step, {"vae": vae}, opt)
    scale = latent_scale(vae)
    save_state(work, "vae", step, {"vae": vae}, opt, {"scaling_factor": scale})
    log(work, f"vae done: scaling_factor {scale:.4f}")


def train_vae_decoder(work: Path, save_every: int) -> None:
    """Fine-tune the VAE's decoder (and post-quant conv) on posterior samples of held-in
    pictures, 70 % two-tone; the encoder stays as the UNet stages saw it."""
    vae = load_vae(work, finetuned=False).requires_grad_(False)
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=LR["vae-decoder"], weight_decay=0.0)
    step, _ = resume(work, "vae-decoder", {"vae": vae}, opt)
    t0, losses = time.time(), []
    while step < STEPS["vae-decoder"]:
        seed = batch_seed("vae-decoder", step)
        images, _, _ = world.world_batch(seed, BATCH["vae-decoder"], TWO_TONE["vae-decoder"])
        x = to_tensor(images)
        set_lr(opt, lr_at("vae-decoder", step))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 100 == 0:
            psnr = 10 * math.log10(4.0 / F.mse_loss(rec.clamp(-1, 1), x).item())
            log(
                work,
                f"vae-decoder step {step} loss {np.mean(losses):.5f} psnr(batch) {psnr:.2f} "
                f"{(time.time() - t0) / len(losses):.2f}s/step",
            )
            losses, t0 = [], time.time()
        if step % save_every == 0:
            save_state(work, "vae-decoder", step, {"vae": vae}, opt)
    # The scaling factor is written when the stage ends: load_vae takes it as "finished".
    done = {"scaling_factor": vae.config.scaling_factor}
    save_state(work, "vae-decoder", step, {"vae": vae}, opt, done)
    log(work, "vae-decoder done")


@torch.no_grad()
def latent_scale(vae) -> float:
    images, _, _ = world.world_batch(99_000_000, 512)
    z = vae.encode(to_tensor(images)).latent_dist.mean
    return float(1.0 / z.std())


def load_vae(work: Path, finetuned: bool = True):
    """The trained VAE: with ``finetuned``, the ``vae-decoder`` stage's once it has finished
    (the encoder is the same). Where the ``vae`` stage's state is not at hand (a checkout that
    only has the shipped weights), the shipped VAE in fp32, said in the log."""
    from diffusers import AutoencoderKL

    decoder = load_state(work, "vae-decoder") if finetuned else None
    if decoder is not None and "scaling_factor" in decoder["extra"]:  # written when it ends
        state = decoder
    else:
        state = load_state(work, "vae")
    if state is None and (toy.WEIGHTS / "toy" / "vae").is_dir():
        log(work, f"no vae stage in {work}: starting from the shipped VAE (fp16 weights)")
        vae = AutoencoderKL.from_pretrained(toy.WEIGHTS / "toy" / "vae").float()
        return vae.eval().requires_grad_(False)
    if state is None or "scaling_factor" not in state["extra"]:  # written when it ends
        sys.exit("the vae stage has not finished: run --stage vae first")
    vae = AutoencoderKL(**{**toy.VAE, "scaling_factor": state["extra"]["scaling_factor"]})
    vae.load_state_dict(state["modules"]["vae"])
    return vae.eval().requires_grad_(False)


def train_clip(work: Path, save_every: int) -> None:
    import open_clip

    toy.register_toy_clip()
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(toy.TOY_CLIP_NAME)
    tokenizer = open_clip.get_tokenizer(toy.TOY_CLIP_NAME)
    opt = torch.optim.AdamW(model.parameters(), lr=LR["clip"], weight_decay=0.1)
    step, _ = resume(work, "clip", {"clip": model}, opt)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    t0, losses = time.time(), []
    while step < STEPS["clip"]:
        images, captions, _ = world.world_batch(batch_seed("clip", step), BATCH["clip"])
        x = ((to_tensor(images) + 1) / 2 - mean) / std
        set_lr(opt, lr_at("clip", step))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img = F.normalize(model.encode_image(x).float(), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer(captions)).float(), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        # Identical captions in one batch are not negatives of each other.
        same = torch.tensor([[a == b for b in captions] for a in captions])
        target = same.float() / same.float().sum(1, keepdim=True)
        loss = 0.5 * (
            torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
            + torch.sum(-target.T * F.log_softmax(logits.T, 1), 1).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        losses.append(loss.item())
        if step % 100 == 0:
            log(
                work,
                f"clip step {step} loss {np.mean(losses):.4f} "
                f"{(time.time() - t0) / len(losses):.2f}s/step",
            )
            losses, t0 = [], time.time()
        if step % save_every == 0 or step == STEPS["clip"]:
            save_state(work, "clip", step, {"clip": model}, opt)
    log(work, "clip done")


def train_attrnet(work: Path, save_every: int) -> None:
    torch.manual_seed(0)
    net = AttrNet()
    opt = torch.optim.AdamW(net.parameters(), lr=LR["attrnet"], weight_decay=1e-4)
    step, _ = resume(work, "attrnet", {"attrnet": net}, opt)
    t0, losses = time.time(), []
    while step < STEPS["attrnet"]:
        images, _, objs = world.world_batch(batch_seed("attrnet", step), BATCH["attrnet"])
        set_lr(opt, lr_at("attrnet", step))
        loss = attrnet_loss(net(to_tensor(images)), attribute_targets(objs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 100 == 0:
            log(
                work,
                f"attrnet step {step} loss {np.mean(losses):.4f} "
                f"{(time.time() - t0) / len(losses):.2f}s/step",
            )
            losses, t0 = [], time.time()
        if step % save_every == 0 or step == STEPS["attrnet"]:
            save_state(work, "attrnet", step, {"attrnet": net}, opt)
    log(work, "attrnet done")


class EMA:
    """Exponential moving average of parameters (decay warms up, as in diffusers' EMAModel)."""

    def __init__(self, modules: dict, decay: float = 0.999):
        self.decay = decay
        self.shadow = {
            f"{k}.{n}": p.detach().clone()
            for k, m in modules.items()
            for n, p in m.named_parameters()
        }

    @classmethod
    def from_shadow(cls, modules: dict, shadow: dict) -> EMA:
        ema = cls(modules)
        ema.shadow = shadow
        return ema

    @torch.no_grad()
    def update(self, modules: dict, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, m in modules.items():
            for n, p in m.named_parameters():
                self.shadow[f"{k}.{n}"].lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, modules: dict) -> None:
        for k, m in modules.items():
            for n, p in m.named_parameters():
                p.copy_(self.shadow[f"{k}.{n}"])


def train_unet(
    work: Path, save_every: int, eval_every: int, eval_n: int = 100, stage: str = "unet"
) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdatom.models import clip_tokenizer

    vae = load_vae(work, finetuned=False)
    scale = vae.config.scaling_factor
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**toy.UNET)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**toy.TEXT_ENCODER))
    tokenizer = clip_tokenizer()
    config = stage_scheduler(stage)
    noise_sched = DDPMScheduler(
        **{k: v for k, v in config.items() if k not in ("set_alpha_to_one", "steps_offset")}
    )
    v_pred = config["prediction_type"] == "v_prediction"
    modules = {"unet": unet, "text_encoder": text_encoder}
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=LR[stage], weight_decay=0.01)
    step, extra = resume(work, stage, modules, opt)
    if not extra and stage != "unet":  # a fresh continuation: the previous stage's EMA weights
        previous = load_state(work, "unet")
        if previous is None or previous["step"] < STEPS["unet"]:
            sys.exit("the unet stage has not finished: run --stage unet first")
        EMA.from_shadow(modules, previous["extra"]["ema"]).copy_to(modules)
    ema = EMA.from_shadow(modules, extra["ema"]) if extra else EMA(modules)
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    t0, losses = time.time(), []
    while step < STEPS[stage]:
        unet.train()
        text_encoder.train()
        seed = batch_seed(stage, step)
        images, captions, _ = world.world_batch(seed, BATCH[stage], two_tone=TWO_TONE[stage])
        rng = random.Random(seed)
        captions = ["" if rng.random() < 0.1 else c for c in captions]
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            post = vae.encode(to_tensor(images)).latent_dist
            latents = (post.mean + post.std * torch.randn(post.mean.shape, generator=gen)) * scale
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(images),), generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        ids = tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        set_lr(opt, lr_at(stage, step))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cond = text_encoder(ids)[0]
            pred = unet(noisy, t, cond).sample.float()
        if v_pred:
            # Min-SNR-5 in x0 terms, floored at 1 so the zero-SNR steps (where the layout and
            # the position words are decided) keep their full weight: w_x0 = min(snr + 1, 6).
            target = noise_sched.get_velocity(latents, noise, t)
            weight = torch.clamp(snr[t] + 1, max=6.0) / (snr[t] + 1)
        else:
            target = noise
            weight = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 for epsilon prediction
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema.update(modules, step)
        losses.append(loss.item())
        if step % 100 == 0:
            log(
                work,
                f"{stage} step {step} loss {np.mean(losses):.4f} lr {lr_at(stage, step):.2e} "
                f"{(time.time() - t0) / len(losses):.2f}s/step",
            )
            losses, t0 = [], time.time()
        if step % save_every == 0 or step == STEPS[stage]:
            save_state(work, stage, step, modules, opt, {"ema": ema.shadow})
        if eval_every and (step % eval_every == 0 or step == STEPS[stage]):
            pipe = assemble(work, vae=vae, ema=ema, stage=stage)
            report = base_model_report(
                pipe, n=eval_n, seed=1000, steps=25, guidance=5.0, held_out_n=max(4, eval_n // 4)
            )
            curve(work, {"stage": stage, "step": step, "time": time.time(), **report})
            log(work, f"{stage} eval at {step}: {json.dumps(report)}")
    log(work, f"{stage} done")


def assemble(work: Path, vae=None, ema: EMA | None = None, stage: str | None = None):
    """The toy pipeline from the stages' states (EMA weights for the UNet and text encoder);
    the UNet from ``stage``, by default the last UNet stage that has a state."""
    if stage is None:
        stage = next((s for s in reversed(UNET_STAGES) if state_path(work, s).is_file()), None)
        if stage is None:
            sys.exit("the unet stage has not started: run --stage unet first")
    pipe = toy.build_toy_pipeline(scheduler=stage_scheduler(stage))
    pipe.vae = vae if vae is not None else load_vae(work)
    pipe.register_modules(vae=pipe.vae)
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if ema is None:
        ema = EMA.from_shadow(modules, load_state(work, stage)["extra"]["ema"])
    ema.copy_to(modules)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export(work: Path, out: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    pipe = assemble(work)
    pipe.to(torch.float16).save_pretrained(out / "toy", safe_serialization=True)
    toy.register_toy_clip()
    clip, _, _ = open_clip.create_model_and_transforms(toy.TOY_CLIP_NAME)
    clip.load_state_dict(load_state(work, "clip")["modules"]["clip"])
    (out / "toy-clip").mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.half().contiguous() for k, v in clip.state_dict().items()},
        out / "toy-clip" / "open_clip_model.safetensors",
    )
    atomic_write_text(
        out / "toy-clip" / f"{toy.TOY_CLIP_NAME}.json", json.dumps(toy.CLIP_CONFIG, indent=2)
    )
    net = AttrNet()
    net.load_state_dict(load_state(work, "attrnet")["modules"]["attrnet"])
    (out / "toy-attrnet").mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.half().contiguous() for k, v in net.state_dict().items()},
        out / "toy-attrnet" / "attrnet.safetensors",
    )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(work, f"exported to {out} ({size / 1e6:.1f} MB)")


def export_vae(work: Path, out: Path) -> None:
    """Replace only the shipped VAE (fp16) with the trained one: for a checkout that has the
    shipped UNet and text encoder but not their training states."""
    load_vae(work).to(torch.float16).save_pretrained(out / "toy" / "vae", safe_serialization=True)
    log(work, f"exported the VAE to {out / 'toy' / 'vae'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--stage",
        required=True,
        choices=[
            "vae",
            "clip",
            "attrnet",
            *UNET_STAGES,
            "vae-decoder",
            "export",
            "export-vae",
            "eval",
            "report",
        ],
    )
    ap.add_argument("--work", default="runs/pretrain-toy", help="state, log and curve folder")
    ap.add_argument("--out", default=str(toy.WEIGHTS), help="where --stage export writes")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-n", type=int, default=100, help="samples per curve point")
    ap.add_argument("--quality", default="QUALITY.md", help="where --stage report writes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="override the stage's step count")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.steps and args.stage in STEPS:
        STEPS[args.stage] = args.steps
    if args.stage == "vae":
        train_vae(work, args.save_every)
    elif args.stage == "clip":
        train_clip(work, args.save_every)
    elif args.stage == "attrnet":
        train_attrnet(work, args.save_every)
    elif args.stage in UNET_STAGES:
        train_unet(work, args.save_every, args.eval_every, args.eval_n, stage=args.stage)
    elif args.stage == "vae-decoder":
        train_vae_decoder(work, args.save_every)
    elif args.stage == "export":
        export(work, Path(args.out))
    elif args.stage == "export-vae":
        export_vae(work, Path(args.out))
    elif args.stage == "report":
        write_quality_section(work, Path(args.quality))
    else:
        report = evaluate_shipped(args.eval_n)
        atomic_write_text(work / "report.json", json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))


TARGETS = (  # (label, where in report.json, target)
    ("background", ("base_model", "held_in", "background"), 0.98),
    ("appearance (solid)", ("base_model", "held_in", "appearance_solid"), 0.95),
    ("appearance (two-tone)", ("base_model", "held_in", "appearance_two_tone"), 0.95),
    ("shape", ("base_model", "held_in", "shape"), 0.95),
    ("position (prompted)", ("base_model", "held_in", "position"), 0.90),
    ("held-out (colour, shape) pairs: shape", ("base_model", "held_out_pairs", "shape"), 0.85),
    ("VAE reconstructions: PSNR (dB)", ("vae", "psnr_db"), 30.0),
    ("VAE reconstructions: oracle right", ("vae", "oracle_on_reconstructions"), 1.0),
    (
        "toy CLIP: right background caption first (held-out)",
        ("toy_clip", "background_rank1_held_out"),
        0.90,
    ),
)


def write_quality_section(work: Path, path: Path) -> None:
    """QUALITY.md's sections: the pretraining curve (where this work folder has it) and the
    shipped model's targets (from ``--stage eval``'s report.json)."""
    if (work / "curve.jsonl").is_file():
        write_report_section(path, "pretrain_toy", curve_lines(work))
    report = json.loads((work / "report.json").read_text())
    write_report_section(path, "toy_targets", target_lines(report))


def curve_lines(work: Path) -> list[str]:
    rows = [json.loads(line) for line in (work / "curve.jsonl").read_text().splitlines()]
    log_lines = (work / "log.txt").read_text().splitlines()
    lines = [
        "## The toy model: pretraining",
        "",
        "`python scripts/pretrain_toy.py --stage vae`, then `clip`, `attrnet`, `unet`,",
        "`unet-zsnr`, `vae-decoder` (each resumable, in the background), `--stage export`,",
        "`--stage eval --eval-n 400`, `--stage report`. This 2-core CPU, no GPU, one core per",
        "stage (vae then unet on one, clip then attrnet on the other). Stage steps: "
        + ", ".join(f"{k} {v}" for k, v in STEPS.items())
        + ". `unet` trains with SD-1.x's epsilon schedule; `unet-zsnr` continues from its EMA",
        "weights on the shipped zero-terminal-SNR v-prediction schedule with more two-tone",
        "objects (why: `sdatom/toyworld/model.py`, `SCHEDULER`).",
        "",
        "Curve (EMA weights; 100 held-in prompts, DDIM 25 steps, CFG 5, each stage's own",
        "schedule; oracle accuracy):",
        "",
        "| stage | step | background | shape | appearance solid | two-tone | position | "
        "held-out pairs: shape |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        h, o = r["held_in"], r.get("held_out_pairs", {})
        lines.append(
            f"| {r.get('stage', 'unet')} | {r['step']} | {h['background']:.2f} | "
            f"{h['shape']:.2f} | "
            f"{h['appearance_solid']:.2f} | {h['appearance_two_tone']:.2f} | "
            f"{h['position']:.2f} | {o.get('shape', float('nan')):.2f} |"
        )
    lines += [
        "",
        f"Log: {len(log_lines)} lines; first {log_lines[0][:8]}, last {log_lines[-1][:8]}.",
        "",
    ]
    return lines


def target_lines(report: dict) -> list[str]:
    base = report["base_model"]
    lines = [
        "## The shipped toy model: the issue's targets",
        "",
        f"`python scripts/pretrain_toy.py --stage eval --eval-n {base['n']}`: {base['n']} "
        f"held-in prompts and {report['vae']['n']} VAE pictures, DDIM {base['steps']} steps, "
        f"CFG {base['guidance']} (sdatom sample's defaults); `--stage report` writes this table.",
        "",
        "| target | reached | wanted | met |",
        "|---|---:|---:|---|",
    ]
    for label, keys, want in TARGETS:
        value = report
        for k in keys:
            value = value[k]
        lines.append(f"| {label} | {value:.3f} | {want:g} | {'yes' if value >= want else 'no'} |")
    net = report["toy_attrnet"]
    lines += [
        "",
        "Toy attribute net (the DINO slot) on fresh pictures: "
        + ", ".join(f"{k} {v:.3f}" for k, v in net.items())
        + ".",
        "",
    ]
    return lines


@torch.no_grad()
def evaluate_shipped(n: int) -> dict:
    """The targets of the shipped toy model, toy CLIP and attribute net (as JSON)."""
    from sdatom.models import load_pipeline
    from sdatom.toyworld import oracle
    from sdatom.toyworld.backbones import load_toy_attrnet, load_toy_clip
    from sdatom.toyworld.model import SAMPLE_GUIDANCE

    pipe = load_pipeline("toy", device="cpu")
    report = {
        "base_model": base_model_report(
            pipe, n=n, seed=0, steps=30, guidance=SAMPLE_GUIDANCE, held_out_n=n // 2
        )
    }
    # VAE: reconstructions of fresh pictures, held-in and held-out (the subjects' looks).
    rng = random.Random(4242)
    objs = [world.sample_object(rng, allow_held_out=True) for _ in range(500)]
    images, psnrs = vae_round_trip(pipe.vae, [world.draw(o) for o in objs])
    psnr = float(np.mean(psnrs))
    right = np.mean(
        [all(oracle.read(im).matches(o).values()) for im, o in zip(images, objs, strict=False)]
    )
    report["vae"] = {"psnr_db": psnr, "oracle_on_reconstructions": float(right), "n": len(objs)}
    # Toy CLIP: on held-out pictures, the right caption among its 6 background variants.
    clip, preprocess, tokenizer = load_toy_clip()
    held = [o for o in objs if world.is_held_out(o)][:200]
    hits = 0
    for o in held:
        img = F.normalize(clip.encode_image(preprocess(world.draw(o))[None]), dim=-1)
        variants = [
            world.caption(o, position=False, background=True).replace(
                f"on a {o.background} background", f"on a {b} background"
            )
            for b in world.BACKGROUNDS
        ]
        txt = F.normalize(clip.encode_text(tokenizer(variants)), dim=-1)
        hits += world.BACKGROUNDS[int((img @ txt.T).argmax())] == o.background
    report["toy_clip"] = {"background_rank1_held_out": hits / len(held), "n": len(held)}
    net = load_toy_attrnet()
    fresh = [world.sample_object(rng) for _ in range(500)]
    logits = net(to_tensor([world.draw(o) for o in fresh]))
    targets = attribute_targets(fresh)
    report["toy_attrnet"] = {
        k: float((logits[k].argmax(1) == targets[k]).float().mean())
        for k in ("background", "shape", "texture", "position")
    }
    return report


if __name__ == "__main__":
    main()
