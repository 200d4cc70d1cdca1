"""Pretraining of the toy world's models (toyworld.py) into toy/: tiny models of Stable Diffusion's own classes (VAE,
UNet, CLIP text encoder, SD's tokenizer) saved as a diffusers pipeline folder, the reward towers of the real open_clip
configs at toy sizes in the layouts of the released checkpoints, the toy aesthetic head, and the judge.

    python pretrain_toy.py                      # everything into toy/, about 1 h 40 min on 2 cores (docs/toy-world.md)
    python pretrain_toy.py --stages critics     # only the judge and the reward towers
    python pretrain_toy.py --stages hps,report  # only the toy hps tower, then the report

Every flag is checked before any stage runs (one line, exit status 2, nothing written); every file in toy/ is replaced
only once its new version is complete, so an interrupted run (Ctrl-C: exit status 130, SIGTERM: 143) leaves the
models it did not finish as they were.
"""
import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save as safetensors_bytes
from transformers import CLIPTextConfig, CLIPTextModel

import checks
import cli as command_line
import models
import rewards
import runfiles
import toyworld
from cli import option
from rewards import AESTHETIC_MLP, HPS_CHECKPOINT, OPENAI_TOWER, TOY_DIR, TOY_TOWER
from toyworld import (ATTRIBUTES, COMBINATIONS, HELD_OUT, JUDGE, RADIUS, SEEN, SIZE, Judge, caption,
                      draw_world, judge_accuracy, judge_correct, load_judge, parse_caption, sample_world)

# ----------------------------------------------------------------------------------------------------------------
# Richer captions for the reward towers: size and position words, each left out half the time, so that a tower's
# embedding knows where and how large the shape is (what the toy aesthetic scores) while the plain prompts that the
# rewards are called with still match every picture of their combination.

def position_word(centre: torch.Tensor) -> str:
    column = ("left", "", "right")[min(2, int(centre[0] // (SIZE / 3)))]
    row = ("top", "", "bottom")[min(2, int(centre[1] // (SIZE / 3)))]
    where = " ".join(word for word in (row, column) if word)
    return f"at the {where}" if where else "in the centre"


def tower_caption(combo, centre, radius, generator: torch.Generator) -> str:
    shape, colour, background = combo
    keep_size, keep_position = torch.rand(2, generator=generator) < 0.5
    size = ("small " if radius < sum(RADIUS) / 2 else "large ") if keep_size else ""
    where = f" {position_word(centre)}" if keep_position else ""
    return f"a {size}{colour} {shape}{where} on a {background} background"


# ----------------------------------------------------------------------------------------------------------------
# Pretraining. The models are SD1.5's own classes at toy sizes (the same classes rid.py loads for SD1.5), saved as a
# diffusers pipeline folder; the reward towers are open_clip CLIPs of the real configs at toy sizes, saved in the
# layouts of the released checkpoints, so that rewards.py's real loaders read them.

PIPELINE, REPORT = "pipeline", "pretraining.json"
TOKENS = 16  # the toy tokenizer's length: a caption is at most 9 tokens, and attention over 77 would cost 15 %
TOY = {
    "unet": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32),
    "vae": dict(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
    "text_encoder": dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32,
                         intermediate_size=128, num_attention_heads=4, num_hidden_layers=4, vocab_size=49408,
                         max_position_embeddings=TOKENS),
}


@dataclass
class PretrainArgs:
    out: str = option(str(TOY_DIR), "where the toy models are written (rid.py --tiny reads toy/)")
    seed: int = option(0, "random seed of every stage (each stage seeds its own generator from it)")
    vae_steps: int = option(1200, "AutoencoderKL steps (batch 32)")
    unet_steps: int = option(6000, "UNet + text encoder steps (batch 64)")
    tower_steps: int = option(2500, "steps of each reward tower (batch 128)")
    judge_steps: int = option(1200, "judge steps (batch 128)")
    bank: int = option(65536, "pictures encoded once by the trained VAE for the UNet's training")
    eval_every: int = option(1000, "UNet steps between fidelity checks of the base model (judge, T=10)")
    guidance_scales: str = option("2,3,5,7.5", "CFG scales tried at the end (the best one becomes rid.py's tiny "
                                  "default)")
    fidelity_prompts: int = option(240, "prompts per split (seen, held-out) of the final fidelity check")
    stages: str = option("images,critics,report", "what to run, comma-separated: images (VAE, then UNet and text "
                         "encoder), judge, aesthetic (the ViT-L-14 tower with the aesthetic head; the clip reward "
                         "reads the same tower), hps (the ViT-H-14 tower with the toy preference), critics (judge, "
                         "aesthetic and hps), report (fidelity of the pipeline in --out, and pretraining.json); two "
                         "stages run side by side")


STAGE_ORDER = ("images", "judge", "aesthetic", "hps", "report")
STAGE_GROUPS = {"critics": ("judge", "aesthetic", "hps")}
COUNTS = ("vae_steps", "unet_steps", "tower_steps", "judge_steps", "bank", "eval_every", "fidelity_prompts")


def check_args(args: PretrainArgs) -> tuple[list[str], list[float]]:
    """Every flag, before any stage runs: the stages (in STAGE_ORDER), the CFG scales, positive counts, the seed and a
    writable --out. Returns the stages and the scales; bad input is one UsageError line (exit status 2)."""
    named = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = [name for name in named if name not in STAGE_ORDER and name not in STAGE_GROUPS]
    if unknown or not named:
        raise command_line.UsageError(f"--stages: unknown stage {unknown[0]!r}" if unknown else "--stages is empty"
                                      f"; known: {', '.join([*STAGE_ORDER, *STAGE_GROUPS])}")
    chosen = {stage for name in named for stage in STAGE_GROUPS.get(name, (name,))}
    for name in COUNTS:
        if not 0 < getattr(args, name) < checks.COUNT_LIMIT:
            raise command_line.UsageError(f"{command_line.flag(name)} must be a positive integer below 2^31; got "
                                          f"{getattr(args, name)}")
    if not 0 <= args.seed < 2 ** 31:  # stage_generator seeds 1000 * seed + stage, which must fit torch's 64 bits
        raise command_line.UsageError(f"--seed must be in [0, 2^31); got {args.seed}")
    try:
        scales = [float(w) for w in args.guidance_scales.split(",")]
    except ValueError:
        raise command_line.UsageError(f"--guidance-scales must be comma-separated numbers, e.g. 3,7.5; got "
                                      f"{args.guidance_scales!r}") from None
    if not all(math.isfinite(w) and 0 <= w <= 100 for w in scales):
        raise command_line.UsageError(f"--guidance-scales must each be in [0, 100], as rid.py's; got "
                                      f"{args.guidance_scales}")
    out = Path(args.out)
    checks.check_name_lengths(out, "--out")
    if out.exists() and not out.is_dir():
        raise command_line.UsageError(f"--out {out} is a file; give a directory")
    checks.check_writable(out, "--out", out)
    return [stage for stage in STAGE_ORDER if stage in chosen], scales


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor: linear warm-up, then a cosine to 5 % of the peak at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def optimiser(params, lr: float, total: int, warmup: int = 100):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_lr(step, total, warmup))


def descend(loss: torch.Tensor, opt, schedule, clipped=None) -> None:
    """One optimizer step on `loss`: its gradients (their norm clipped to 1 over `clipped`, if given), the step, the
    learning-rate schedule's step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clipped is not None:
        torch.nn.utils.clip_grad_norm_(clipped, 1.0)
    opt.step()
    schedule.step()


def log(stage: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {message}", flush=True)


def train_vae(args: PretrainArgs, generator: torch.Generator) -> AutoencoderKL:
    """AutoencoderKL on world pictures: MSE on [-1,1] pixels plus a small KL to N(0, I) (SD's VAE was trained with a
    KL weight too, and a perceptual and GAN loss that pictures of flat colours do not need). The scaling factor is
    set so that scaled latents have unit standard deviation, as SD's 0.18215 does for SD's latents."""
    vae = AutoencoderKL(**TOY["vae"])
    opt, schedule = optimiser(vae.parameters(), 1e-3, args.vae_steps)
    for step in range(args.vae_steps):
        x = sample_world(32, generator, COMBINATIONS_FOR_VAE)["images"] * 2 - 1
        posterior = vae.encode(x).latent_dist
        mse = F.mse_loss(vae.decode(posterior.sample(generator)).sample, x)
        loss = mse + 1e-4 * posterior.kl().mean() / posterior.mean[0].numel()
        descend(loss, opt, schedule, vae.parameters())
        if step % 100 == 0 or step == args.vae_steps - 1:
            log("vae", f"step {step} mse {mse.item():.5f} psnr {10 * math.log10(4 / max(mse.item(), 1e-10)):.1f} dB")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(sample_world(256, generator)["images"] * 2 - 1).latent_dist.sample(generator)
    vae.register_to_config(scaling_factor=1 / z.std().item())
    return vae


# The VAE is a picture codec, not a model of captions: it may see every combination (the UNet, the towers and the
# judge never see the held-out ones). Seen only would do as well; this keeps held-out pictures decodable.
COMBINATIONS_FOR_VAE = COMBINATIONS


@torch.no_grad()
def latent_bank(vae: AutoencoderKL, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list]:
    """n seen-combination pictures encoded once: posterior means and stds (n,4,16,16) each, and their captions."""
    means, stds, captions = [], [], []
    for _ in range(0, n, 256):
        world = sample_world(256, generator)
        posterior = vae.encode(world["images"] * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += world["captions"]
    return torch.cat(means)[:n], torch.cat(stds)[:n], captions[:n]


def toy_pipeline(unet, vae, text_encoder, tokenizer) -> StableDiffusionPipeline:
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def encode_text(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
    return text_encoder(tokens).last_hidden_state


def train_unet(args: PretrainArgs, vae: AutoencoderKL, tokenizer, generator: torch.Generator, judge_path: Path,
               judge_since: float):
    """UNet2DConditionModel and the CLIP text encoder together, on SD's objective: eps-prediction MSE at uniformly
    drawn timesteps of SD's noise schedule, with min-SNR-5 weighting (Hang et al. 2023: converges several times
    faster), and 10 % of captions dropped to "" so that classifier-free guidance works. The text encoder is trained
    rather than frozen: a frozen random one barely separates the background word (the prototype's finding). Every
    --eval-every steps the base model's fidelity is logged, once a judge written after `judge_since` is there."""
    unet = UNet2DConditionModel(**TOY["unet"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**TOY["text_encoder"]))
    noise = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    alphas = noise.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = snr.clamp(max=5) / snr                                                       # min-SNR-5, eps target
    means, stds, captions = latent_bank(vae, args.bank, generator)
    log("unet", f"latent bank of {len(captions)} pictures encoded")
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt, schedule = optimiser(params, 1e-3, args.unet_steps, warmup=200)
    scale = vae.config.scaling_factor
    for step in range(args.unet_steps):
        unet.train(), text_encoder.train()
        ids = torch.randint(len(captions), (64,), generator=generator)
        z0 = (means[ids] + stds[ids] * torch.randn(means[ids].shape, generator=generator)) * scale
        eps = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, noise.config.num_train_timesteps, (64,), generator=generator)
        keep = torch.rand(64, generator=generator) >= 0.1
        text = encode_text(text_encoder, tokenizer, [captions[i] if k else "" for i, k in zip(ids, keep)])
        pred = unet(noise.add_noise(z0, eps, t), t, encoder_hidden_states=text).sample
        loss = (weights[t] * (pred - eps).pow(2).mean((1, 2, 3))).mean()
        descend(loss, opt, schedule, params)
        if step % 100 == 0 or step == args.unet_steps - 1:
            log("unet", f"step {step} loss {loss.item():.4f} lr {schedule.get_last_lr()[0]:.2e}")
        if (step + 1) % args.eval_every == 0 and step + 1 < args.unet_steps and judge_ready(judge_path, judge_since):
            pipe = toy_pipeline(unet.eval(), vae, text_encoder.eval(), tokenizer)
            log("unet", f"step {step + 1} fidelity {fidelity(pipe, load_judge(judge_path), 3.0, 96)}")
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


def judge_ready(path: Path, since: float) -> bool:
    """The judge file is there and was written after `since` (a run that retrains the judge must not check the
    UNet with the previous one)."""
    return path.is_file() and path.stat().st_mtime >= since


def contrastive_loss(image_features, text_features, logit_scale, captions: list[str]) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, with every pair of identical captions counted as a positive (a batch of a world this
    small repeats captions)."""
    logits = logit_scale.exp() * image_features @ text_features.T                         # (B, B)
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def jitter(images: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Pictures as a generator draws them: a per-picture colour shift, pixel noise and (sometimes) a blur, so that
    the towers and the judge also read imperfect pictures."""
    n = images.shape[0]
    shift = strength * (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1)
    noise = strength * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(images.shape, generator=generator)
    blurred = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < 0.3,
                          F.avg_pool2d(images, 3, 1, 1, count_include_pad=False), images)
    return (blurred + shift + noise).clamp(0, 1)


# The aesthetic regression's weight beside the contrastive loss: 1 gave the best aesthetic fit but a tower that
# told shapes apart in only 53 % of pictures (its clip reward then half-ignores the shape word); 0.25 keeps both.
AESTHETIC_WEIGHT = 0.25
# The toy annotators: of two pictures of one caption they choose the one with the higher toy preference with
# probability sigmoid(difference / PREFERENCE_NOISE), as people choose between two images in HPSv2's data. The
# choices' weight beside the contrastive loss: at 1 (noise 0.1) the preference explained too little of the score's
# spread over a caption set (the best picture of each caption only 1.46 of its std above the world's), so that
# fine-tuning moved hps by less than 1 std; 4 (noise 0.05) makes the preference the larger part, as in HPSv2.
PREFERENCE_NOISE = 0.05
PREFERENCE_WEIGHT = 4.0


def preference_loss(clip, tokenizer, preprocess, generator: torch.Generator, n: int) -> torch.Tensor:
    """HPSv2's objective on n synthetic choices: for each, two pictures of one caption (the same combination drawn
    twice, so only the geometry differs) and the annotator's pick; cross-entropy of the picked one over the pair's
    logits logit_scale * cos(image, caption). The tower then scores a caption's pictures by the toy preference."""
    combos = [SEEN[i] for i in torch.randint(len(SEEN), (n,), generator=generator)]
    first, second = draw_world(combos, generator), draw_world(combos, generator)
    picked_second = torch.rand(n, generator=generator) < torch.sigmoid(
        (second["preference"] - first["preference"]) / PREFERENCE_NOISE)
    images = jitter(torch.cat([first["images"], second["images"]]), generator, 0.05)
    image_features = rewards.encode_image(clip, images, preprocess).view(2, n, -1)        # (2, n, D)
    text_features = F.normalize(clip.encode_text(tokenizer(first["captions"])), dim=-1)   # (n, D)
    logits = clip.logit_scale.exp() * (image_features * text_features).sum(-1).T          # (n, 2)
    return F.cross_entropy(logits, picked_second.long())


def train_tower(args: PretrainArgs, config: str, generator: torch.Generator, aesthetic: bool, preprocess,
                preference: bool = False):
    """A CLIP of the open_clip config `config` at TOY_TOWER's sizes, trained contrastively on world pictures and
    tower captions; with `aesthetic`, jointly with rewards.Aesthetic's MLP on the normalised embedding, regressing
    the toy aesthetic score (the released MLP is linear, so the embedding must carry the score linearly: trained
    jointly, it does); with `preference`, jointly with HPSv2's pairwise objective on the toy preference
    (preference_loss), so that its caption score is caption agreement plus that preference, as HPSv2's is. Returns
    the tower and the scorer (Aesthetic) or None."""
    clip = rewards.clip_tower(config, TOY_TOWER)
    scorer = rewards.Aesthetic(clip, dim=TOY_TOWER["embed_dim"]) if aesthetic else None
    tokenizer = open_clip.get_tokenizer(config)
    params = list((scorer or clip).parameters())
    opt, schedule = optimiser(params, 2e-3, args.tower_steps)
    for step in range(args.tower_steps):
        world = sample_world(128, generator)
        combos = [parse_caption(c) for c in world["captions"]]
        texts = [tower_caption(c, p, r, generator) for c, p, r in zip(combos, world["centre"], world["radius"])]
        images = jitter(world["images"], generator, 0.05)
        image_features = rewards.encode_image(clip, images, preprocess)
        text_features = F.normalize(clip.encode_text(tokenizer(texts)), dim=-1)
        loss = contrastive_loss(image_features, text_features, clip.logit_scale, texts)
        extra = ""
        if scorer is not None:
            mse = F.mse_loss(scorer.layers(image_features).squeeze(-1), world["aesthetic"])
            loss = loss + AESTHETIC_WEIGHT * mse / 2.0                                    # score variance ~2
            extra = f" aesthetic mse {mse.item():.3f}"
        if preference:
            choices = preference_loss(clip, tokenizer, preprocess, generator, 64)
            loss = loss + PREFERENCE_WEIGHT * choices
            extra = f" preference {choices.item():.3f}"
        descend(loss, opt, schedule, params)
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == args.tower_steps - 1:
            log(config, f"step {step} loss {loss.item():.3f}{extra}")
    return clip.eval().requires_grad_(False), scorer.eval().requires_grad_(False) if scorer else None


@torch.no_grad()
def preference_headroom(scorer, n: int, generator: torch.Generator) -> dict:
    """How the toy hps ranks pictures of one caption: on n seen-combination pictures placed as the world places
    them, its mean and spread, the correlation of the score with the toy preference, and the mean score of the same
    combinations drawn as the preference likes best (the smallest shape, as low as it fits), in units of the first
    spread: the headroom a fine-tuned generator has within the world."""
    combos = [SEEN[i] for i in torch.randint(len(SEEN), (n,), generator=generator)]
    world = draw_world(combos, generator)
    scores = scorer(world["images"], world["captions"])
    radius = torch.full((n,), RADIUS[0])
    centre = torch.stack([world["centre"][:, 0].clamp(1.2 * RADIUS[0], SIZE - 1.2 * RADIUS[0]),
                          torch.full((n,), SIZE - 1.2 * RADIUS[0])], dim=1)
    best_images = toyworld.draw(world["shape"], world["colour"], world["background"], centre, radius)
    best = scorer(best_images, world["captions"])
    spread = scores.std().item()
    correlation = torch.corrcoef(torch.stack([scores, world["preference"]]))[0, 1].item()
    return {"mean": round(scores.mean().item(), 4), "std": round(spread, 4),
            "correlation_with_preference": round(correlation, 4),
            "best_gain_in_std": round((best.mean().item() - scores.mean().item()) / spread, 3)}


def train_judge(args: PretrainArgs, generator: torch.Generator) -> Judge:
    """The judge on seen combinations, with jittered pictures; cross-entropy on each attribute head."""
    judge = Judge()
    opt, schedule = optimiser(judge.parameters(), 2e-3, args.judge_steps)
    for step in range(args.judge_steps):
        world = sample_world(128, generator)
        logits = judge(jitter(world["images"], generator, 0.1))
        loss = sum(F.cross_entropy(logits[name], world[name]) for name in ATTRIBUTES)
        descend(loss, opt, schedule)
        if step % 100 == 0 or step == args.judge_steps - 1:
            log("judge", f"step {step} loss {loss.item():.4f}")
    return judge.eval().requires_grad_(False)


def fidelity_prompts(n: int, combinations) -> list[str]:
    """n prompts cycling through the combinations (each as often as n allows)."""
    return [caption(*combinations[i % len(combinations)]) for i in range(n)]


@torch.no_grad()
def fidelity(pipe: StableDiffusionPipeline, judge: Judge, guidance_scale: float, n: int, seed: int = 0) -> dict:
    """The judge's accuracy on the pipeline's samples with rid.py's own tiny sampler (DDIM, T=10, eta 0): n prompts
    of seen combinations and n of held-out ones, per attribute and all three."""
    import rid  # the sampler is rid.py's; imported here, since rid.py's import of torch and the libraries is slow
    args = dataclasses.replace(rid.resolve(rid.Args(tiny=True)), guidance_scale=guidance_scale, num_steps=10)
    pipe.scheduler.set_timesteps(args.num_steps)
    result = {}
    for split, combinations in (("seen", SEEN), ("held_out", HELD_OUT)):
        prompts = fidelity_prompts(n, combinations)
        latents = rid.initial_latents(pipe, n, SIZE, torch.Generator().manual_seed(seed))
        images = torch.cat([rid.generate(pipe, prompts[i:i + 64], latents[i:i + 64], args) for i in range(0, n, 64)])
        correct = judge_correct(judge, images, prompts)
        result[split] = {name: round(value.mean().item(), 4) for name, value in correct.items()}
    return result


# ----------------------------------------------------------------------------------------------------------------
# Writing the toy models, each in the layout its real counterpart ships in.

def half(state_dict: dict) -> dict:
    """fp16 copies of the floating-point tensors (halves the files; the models are loaded back in fp32)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}


def write_safetensors(tensors: dict, path: Path) -> None:
    """A safetensors file, replaced only once the new one is complete (runfiles.atomic_write)."""
    runfiles.atomic_write(path, lambda f: f.write(safetensors_bytes(tensors)))


def write_torch(obj, path: Path) -> None:
    """A torch.save file, replaced only once the new one is complete."""
    runfiles.atomic_write(path, lambda f: torch.save(obj, f))


def save_pipeline(pipe: StableDiffusionPipeline, out: Path) -> None:
    """A diffusers pipeline folder in fp32, as diffusers' default load expects it, replaced whole once complete."""
    with runfiles.atomic_dir(out / PIPELINE) as tmp:
        pipe.save_pretrained(tmp)


def save_towers(l_tower=None, aesthetic=None, h_tower=None, out: Path = TOY_DIR) -> None:
    """The ViT-L-14-quickgelu tower as open_clip's own checkpoint (the file `pretrained="openai"` fetches), the
    aesthetic head as the released predictor's state dict (layers.{0,2,4,6,7}), and the ViT-H-14 tower as an HPSv2
    checkpoint ({"state_dict": ...}), fp16 like the released HPS_v2.1_compressed.pt; each one given."""
    if l_tower is not None:
        write_safetensors(half(l_tower.state_dict()), out / OPENAI_TOWER)
        write_torch({f"layers.{k}": v for k, v in aesthetic.layers.state_dict().items()}, out / AESTHETIC_MLP)
    if h_tower is not None:
        write_torch({"state_dict": half(h_tower.state_dict())}, out / HPS_CHECKPOINT)


# ----------------------------------------------------------------------------------------------------------------
# The stages run two at a time, one core each: the image model (VAE, then UNet and text encoder) beside the critics
# (the judge, then the reward towers). Each seeds its own generators, so none depends on another's pace; the UNet's
# periodic fidelity check uses the judge once this run has written it.

def stage_generator(seed: int, stage: int) -> torch.Generator:
    torch.manual_seed(1000 * seed + stage)  # the stage's model initialisation
    return torch.Generator().manual_seed(1000 * seed + stage)


def image_models(args: PretrainArgs, out: Path, judge_since: float) -> dict:
    started = time.perf_counter()
    vae = train_vae(args, stage_generator(args.seed, 1))
    vae_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = models.clip_tokenizer(tmp, model_max_length=TOKENS)
    unet, text_encoder = train_unet(args, vae, tokenizer, stage_generator(args.seed, 2), out / JUDGE, judge_since)
    save_pipeline(toy_pipeline(unet, vae, text_encoder, tokenizer), out)
    return {"vae_seconds": vae_seconds, "unet_seconds": time.perf_counter() - started - vae_seconds,
            "vae_scaling_factor": vae.config.scaling_factor}


def judge_stage(args: PretrainArgs, out: Path, judge_since: float) -> dict:
    started = time.perf_counter()
    write_safetensors(half(train_judge(args, stage_generator(args.seed, 3)).state_dict()), out / JUDGE)
    return {"judge_seconds": time.perf_counter() - started,
            "judge_accuracy": judge_accuracy(load_judge(out / JUDGE), 512, torch.Generator().manual_seed(7))}


def aesthetic_stage(args: PretrainArgs, out: Path, judge_since: float) -> dict:
    started = time.perf_counter()
    l_tower, aesthetic = train_tower(args, rewards.TOWER_CONFIGS["aesthetic"], stage_generator(args.seed, 4), True,
                                     rewards.centre_crop)
    save_towers(l_tower, aesthetic, out=out)
    return {"aesthetic_tower_seconds": time.perf_counter() - started}


def hps_stage(args: PretrainArgs, out: Path, judge_since: float) -> dict:
    started = time.perf_counter()
    h_tower, _ = train_tower(args, rewards.TOWER_CONFIGS["hps"], stage_generator(args.seed, 5), False,
                             rewards.letterbox, preference=True)
    save_towers(h_tower=h_tower, out=out)
    scorer = rewards.TextImageCosine(h_tower, open_clip.get_tokenizer(rewards.TOWER_CONFIGS["hps"]), rewards.letterbox)
    return {"hps_tower_seconds": time.perf_counter() - started,
            "hps_preference": preference_headroom(scorer, 512, torch.Generator().manual_seed(8))}


STAGES = {"images": image_models, "judge": judge_stage, "aesthetic": aesthetic_stage, "hps": hps_stage}


def pretrain(args: PretrainArgs) -> dict:
    """Check every flag, run the chosen stages and write pretraining.json: what each stage measured and how long it
    took (a stage not run keeps its figures from the previous report), and the base pipeline's fidelity at each CFG
    scale. A run that fails or is interrupted appends nothing to the report."""
    stages, scales = check_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = json.loads((out / REPORT).read_text()) if (out / REPORT).is_file() else {}
    judge_since = time.time() if "judge" in stages else 0.0  # the UNet's checks read only this run's judge
    started = time.perf_counter()
    jobs = [stage for stage in stages if stage in STAGES]
    if jobs:
        with checks.worker_pool(min(2, len(jobs))) as pool:
            for job in [pool.submit(STAGES[stage], args, out, judge_since) for stage in jobs]:
                report.update(job.result())
    if "report" in stages:
        pipe, judge = load_toy_pipeline(out / PIPELINE), load_judge(out / JUDGE)
        report["fidelity"] = {str(w): fidelity(pipe, judge, w, args.fidelity_prompts) for w in scales}
        report["guidance_scale"] = max(scales, key=lambda w: report["fidelity"][str(w)]["seen"]["all"])
    runs = report.get("runs", []) + [{"stages": stages, "seconds": time.perf_counter() - started,
                                      "args": dataclasses.asdict(args), "torch": torch.__version__,
                                      "command": "python pretrain_toy.py " + " ".join(sys.argv[1:])}]
    report["runs"] = runs
    runfiles.atomic_write(out / REPORT, lambda f: f.write(json.dumps(report, indent=2).encode()))
    log("pretrain", json.dumps(report))
    return report


def load_toy_pipeline(path: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cli(argv: list[str]) -> int:
    """python pretrain_toy.py FLAGS (checks.tool_status: 2 bad input with nothing written, 130/143 interrupted with the
    files of unfinished stages as they were)."""
    return checks.tool_status("pretrain_toy.py", lambda: pretrain(command_line.parse(
        PretrainArgs, argv, prog="pretrain_toy.py", description=__doc__.split("\n")[0])))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
