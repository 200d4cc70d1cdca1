"""The toy world: a procedural world of captioned 32x32 pictures, and the pretraining of tiny models of Stable
Diffusion's own classes on it, so that tiny mode (`rid.py --tiny`) fine-tunes a model that draws something.

A picture is one shape (circle, square or upright triangle) in one colour on a background of another colour, at a
random position and size, captioned "a red circle on a black background". Every colour is used for shapes and
for backgrounds; HELD_OUT combinations never appear in any training, so that prompt fidelity can be measured on
compositions the models have not seen. Everything is drawn from a seeded generator: no files.

    python toyworld.py                      # pretrain every toy model into toy/ (README: time on 2 cores)
"""
import dataclasses
import itertools
import json
import math
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

import cli as command_line
import models
import rewards
from cli import option
from rewards import AESTHETIC_MLP, HPS_CHECKPOINT, OPENAI_TOWER, TOY_DIR, TOY_TOWER

SIZE = 32  # pixels per side
COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "white": (1, 1, 1),
           "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")
# (shape, colour, background) triples never drawn in training: each shape, colour and background still appears in
# training in other combinations, so generating these tests composition, not vocabulary.
HELD_OUT = (("circle", "red", "blue"), ("circle", "white", "green"), ("circle", "black", "yellow"),
            ("square", "green", "red"), ("square", "yellow", "black"), ("square", "blue", "white"),
            ("triangle", "blue", "yellow"), ("triangle", "red", "white"), ("triangle", "white", "black"),
            ("triangle", "green", "blue"))
COMBINATIONS = tuple((s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, COLOURS) if c != b)
SEEN = tuple(combo for combo in COMBINATIONS if combo not in HELD_OUT)


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """caption()'s inverse: (shape, colour, background), or None for a prompt that is not a toy-world caption."""
    words = text.split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    combo = (words[2], words[1], words[5])
    return combo if combo in COMBINATIONS else None


# ----------------------------------------------------------------------------------------------------------------
# Drawing. Shapes are drawn at 4x resolution and averaged down, so edges are anti-aliased like a photograph's.

SUPERSAMPLE = 4


def shape_masks(shapes: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Coverage (B, SIZE, SIZE) in [0,1] of shapes (B,) (indices into SHAPES) with centres (B, 2) (x, y) and radii
    (B,) in pixels. A circle of radius r, a square of half-side r*0.9 (about the circle's area), an upright
    isosceles triangle of half-base r*1.15 and height 2r*1.15 centred on its box."""
    n = SIZE * SUPERSAMPLE
    grid = (torch.arange(n, dtype=torch.float32) + 0.5) / SUPERSAMPLE                      # pixel coordinates
    y, x = grid.view(1, n, 1), grid.view(1, 1, n)
    cx, cy, r = centre[:, 0].view(-1, 1, 1), centre[:, 1].view(-1, 1, 1), radius.view(-1, 1, 1)
    circle = (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
    square = ((x - cx).abs() <= 0.9 * r) & ((y - cy).abs() <= 0.9 * r)
    h = 1.15 * r                                                                            # half-height, half-base
    depth = (y - (cy - h)) / (2 * h)                                                        # 0 at apex, 1 at base
    triangle = (depth >= 0) & (depth <= 1) & ((x - cx).abs() <= h * depth)
    masks = torch.stack([circle, square, triangle], 1)[torch.arange(len(shapes)), shapes].float()
    return F.avg_pool2d(masks.unsqueeze(1), SUPERSAMPLE).squeeze(1)


def draw(shapes, colours, backgrounds, centre, radius) -> torch.Tensor:
    """Pictures (B, 3, SIZE, SIZE) in [0,1]: each shape's coverage blends its colour over the background."""
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)                    # (6, 3)
    mask = shape_masks(shapes, centre, radius).unsqueeze(1)                                 # (B, 1, H, W)
    fg, bg = palette[colours].view(-1, 3, 1, 1), palette[backgrounds].view(-1, 3, 1, 1)
    return mask * fg + (1 - mask) * bg


def toy_aesthetic(colours, backgrounds, centre, radius) -> torch.Tensor:
    """The toy aesthetic score (B,) in [0, 10], a stated procedural property of a picture: contrast (the RGB
    distance of shape and background, over the largest possible), centring (1 at the centre, 0 at a corner) and
    size (the shape's radius over the largest drawn), weighted 0.5, 0.3, 0.2. It is learned by a regression head
    (rewards.Aesthetic) over a CLIP tower that has only ever seen toy-world pictures, so it can be hacked: a
    generator can push its pictures off the world (textures, several shapes, colours never drawn) to where the head
    extrapolates high scores that no real picture of the world has."""
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    contrast = (palette[colours] - palette[backgrounds]).norm(dim=-1) / math.sqrt(3)
    offset = (centre - SIZE / 2).norm(dim=-1) / (math.sqrt(2) * SIZE / 2)
    size = radius / RADIUS[1]
    return 10 * (0.5 * contrast + 0.3 * (1 - offset) + 0.2 * size)


RADIUS = (5.0, 11.0)  # the shapes' radius in pixels is drawn uniformly from this range


def sample_world(n: int, generator: torch.Generator, combinations=SEEN) -> dict:
    """n random pictures of the given (shape, colour, background) combinations, with everything that made them:
    images (n,3,32,32) in [0,1], captions, the attribute indices (shape, colour, background), the geometry
    (centre (n,2) and radius (n,) in pixels) and the toy aesthetic score. Shapes lie wholly inside the picture."""
    shape_ids, colour_ids = {s: i for i, s in enumerate(SHAPES)}, {c: i for i, c in enumerate(COLOURS)}
    picks = torch.randint(len(combinations), (n,), generator=generator)
    combos = [combinations[i] for i in picks]
    shapes = torch.tensor([shape_ids[s] for s, _, _ in combos])
    colours = torch.tensor([colour_ids[c] for _, c, _ in combos])
    backgrounds = torch.tensor([colour_ids[b] for _, _, b in combos])
    radius = RADIUS[0] + (RADIUS[1] - RADIUS[0]) * torch.rand(n, generator=generator)
    margin = 1.2 * radius.unsqueeze(1)                                                       # the triangle's reach
    centre = margin + (SIZE - 2 * margin) * torch.rand(n, 2, generator=generator)
    return {"images": draw(shapes, colours, backgrounds, centre, radius), "captions": [caption(*c) for c in combos],
            "shape": shapes, "colour": colours, "background": backgrounds,
            "centre": centre, "radius": radius, "aesthetic": toy_aesthetic(colours, backgrounds, centre, radius)}


def world_prompts(combinations) -> list[str]:
    return [caption(*combo) for combo in combinations]


# eval.py's default prompts for a tiny run: 10 seen combinations spread over the list, then the 10 held-out ones.
EVAL_PROMPTS = world_prompts(SEEN[::8] + HELD_OUT)


def split_of(prompt: str) -> str | None:
    """"seen" or "held_out" for a toy-world caption, None for any other prompt."""
    combo = parse_caption(prompt)
    return None if combo is None else "held_out" if combo in HELD_OUT else "seen"


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
# The judge: an attribute classifier of shape, colour and background, for prompt fidelity. No training run
# optimises it; it is trained on the seen combinations only (every attribute has its own head, so it reads the
# held-out combinations too: pretraining measures that).

class Judge(torch.nn.Module):
    """A small CNN: (B,3,32,32) pixels in [0,1] -> logits for shape (B,3), colour (B,6) and background (B,6)."""

    def __init__(self, width: int = 32):
        super().__init__()
        def block(c_in, c_out):
            return [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.GroupNorm(8, c_out), torch.nn.SiLU()]
        self.features = torch.nn.Sequential(*block(3, width), *block(width, width), torch.nn.MaxPool2d(2),
                                            *block(width, 2 * width), *block(2 * width, 2 * width),
                                            torch.nn.MaxPool2d(2), *block(2 * width, 4 * width),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.heads = torch.nn.ModuleDict({"shape": torch.nn.Linear(4 * width, len(SHAPES)),
                                          "colour": torch.nn.Linear(4 * width, len(COLOURS)),
                                          "background": torch.nn.Linear(4 * width, len(COLOURS))})

    def forward(self, images):
        h = self.features(images * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}


ATTRIBUTES = ("shape", "colour", "background")


def attribute_targets(prompts: list[str]) -> dict[str, torch.Tensor]:
    """The attribute indices (B,) each prompt asks for (prompts must be toy-world captions)."""
    combos = [parse_caption(p) for p in prompts]
    colours = list(COLOURS)
    return {"shape": torch.tensor([SHAPES.index(s) for s, _, _ in combos]),
            "colour": torch.tensor([colours.index(c) for _, c, _ in combos]),
            "background": torch.tensor([colours.index(b) for _, _, b in combos])}


@torch.no_grad()
def judge_correct(judge: Judge, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per image (B,), whether the judge sees each attribute that its prompt asks for, and all three ("all")."""
    logits = judge(images.float())
    targets = attribute_targets(prompts)
    correct = {name: (logits[name].argmax(-1).cpu() == targets[name]).float() for name in ATTRIBUTES}
    return {**correct, "all": torch.stack(list(correct.values())).prod(0)}


# ----------------------------------------------------------------------------------------------------------------
# Pretraining. The models are SD1.5's own classes at toy sizes (the same classes rid.py loads for SD1.5), saved as a
# diffusers pipeline folder; the reward towers are open_clip CLIPs of the real configs at toy sizes, saved in the
# layouts of the released checkpoints, so that rewards.py's real loaders read them.

PIPELINE, JUDGE, REPORT = "pipeline", "judge.safetensors", "pretraining.json"
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
                         "encoder), critics (judge and reward towers), report (fidelity of the pipeline in --out, and "
                         "pretraining.json); images and critics run side by side")


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor: linear warm-up, then a cosine to 5 % of the peak at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def optimiser(params, lr: float, total: int, warmup: int = 100):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_lr(step, total, warmup))


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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        schedule.step()
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
               out: Path):
    """UNet2DConditionModel and the CLIP text encoder together, on SD's objective: eps-prediction MSE at uniformly
    drawn timesteps of SD's noise schedule, with min-SNR-5 weighting (Hang et al. 2023: converges several times
    faster), and 10 % of captions dropped to "" so that classifier-free guidance works. The text encoder is trained
    rather than frozen: a frozen random one barely separates the background word (the prototype's finding)."""
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        if step % 100 == 0 or step == args.unet_steps - 1:
            log("unet", f"step {step} loss {loss.item():.4f} lr {schedule.get_last_lr()[0]:.2e}")
        if (step + 1) % args.eval_every == 0 and step + 1 < args.unet_steps and judge_path.exists():
            pipe = toy_pipeline(unet.eval(), vae, text_encoder.eval(), tokenizer)
            log("unet", f"step {step + 1} fidelity {fidelity(pipe, load_judge(judge_path), 3.0, 96)}")
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


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


def train_tower(args: PretrainArgs, config: str, generator: torch.Generator, aesthetic: bool, preprocess):
    """A CLIP of the open_clip config `config` at TOY_TOWER's sizes, trained contrastively on world pictures and
    tower captions; with `aesthetic`, jointly with rewards.Aesthetic's MLP on the normalised embedding, regressing
    the toy aesthetic score (the released MLP is linear, so the embedding must carry the score linearly: trained
    jointly, it does). Returns the tower and the scorer (Aesthetic) or None."""
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
        if scorer is not None:
            mse = F.mse_loss(scorer.layers(image_features).squeeze(-1), world["aesthetic"])
            loss = loss + AESTHETIC_WEIGHT * mse / 2.0                                    # score variance ~2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == args.tower_steps - 1:
            extra = f" aesthetic mse {mse.item():.3f}" if scorer is not None else ""
            log(config, f"step {step} loss {loss.item():.3f}{extra}")
    return clip.eval().requires_grad_(False), scorer.eval().requires_grad_(False) if scorer else None



def train_judge(args: PretrainArgs, generator: torch.Generator) -> Judge:
    """The judge on seen combinations, with jittered pictures; cross-entropy on each attribute head."""
    judge = Judge()
    opt, schedule = optimiser(judge.parameters(), 2e-3, args.judge_steps)
    for step in range(args.judge_steps):
        world = sample_world(128, generator)
        logits = judge(jitter(world["images"], generator, 0.1))
        loss = sum(F.cross_entropy(logits[name], world[name]) for name in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 100 == 0 or step == args.judge_steps - 1:
            log("judge", f"step {step} loss {loss.item():.4f}")
    return judge.eval().requires_grad_(False)


def load_judge(path: Path) -> Judge:
    judge = Judge()
    judge.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def judge_accuracy(judge: Judge, n: int, generator: torch.Generator) -> dict:
    """The judge's accuracy on fresh pictures, of seen and of held-out combinations."""
    result = {}
    for split, combinations in (("seen", SEEN), ("held_out", HELD_OUT)):
        world = sample_world(n, generator, combinations)
        correct = judge_correct(judge, world["images"], world["captions"])
        result[split] = {name: round(value.mean().item(), 4) for name, value in correct.items()}
    return result


def fidelity_prompts(n: int, combinations) -> list[str]:
    """n prompts cycling through the combinations (each as often as n allows)."""
    return [caption(*combinations[i % len(combinations)]) for i in range(n)]


@torch.no_grad()
def fidelity(pipe: StableDiffusionPipeline, judge: Judge, guidance_scale: float, n: int, seed: int = 0) -> dict:
    """The judge's accuracy on the pipeline's samples with rid.py's own tiny sampler (DDIM, T=10, eta 0): n prompts
    of seen combinations and n of held-out ones, per attribute and all three."""
    import rid  # rid.py imports this module for its toy paths; the sampler is rid.py's, so imported here
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


def save_pipeline(pipe: StableDiffusionPipeline, out: Path) -> None:
    """A diffusers pipeline folder, weights in fp16 (rid.py's loader reads them as fp32)."""
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        torch.nn.Module.to(module, torch.float16)  # not diffusers' .to(dtype), which warns about fp32 modules
    pipe.save_pretrained(out / PIPELINE)


def save_towers(l_tower, aesthetic, h_tower, out: Path) -> None:
    """The ViT-L-14-quickgelu tower as open_clip's own checkpoint (the file `pretrained="openai"` fetches), the
    aesthetic head as the released predictor's state dict (layers.{0,2,4,6,7}), and the ViT-H-14 tower as an HPSv2
    checkpoint ({"state_dict": ...}), fp16 like the released HPS_v2.1_compressed.pt."""
    save_file(half(l_tower.state_dict()), out / OPENAI_TOWER)
    torch.save({f"layers.{k}": v for k, v in aesthetic.layers.state_dict().items()}, out / AESTHETIC_MLP)
    torch.save({"state_dict": half(h_tower.state_dict())}, out / HPS_CHECKPOINT)


# ----------------------------------------------------------------------------------------------------------------
# The two halves of pretraining run side by side, one core each: the image model (VAE, then UNet and text encoder)
# and the critics (the reward towers and the judge). Each seeds its own generators, so neither depends on the other's
# pace; the UNet's periodic fidelity check uses the judge once it is written.

def stage_generator(seed: int, stage: int) -> torch.Generator:
    torch.manual_seed(1000 * seed + stage)  # the stage's model initialisation
    return torch.Generator().manual_seed(1000 * seed + stage)


def image_models(args: PretrainArgs, out: Path) -> dict:
    torch.set_num_threads(1)
    started = time.perf_counter()
    vae = train_vae(args, stage_generator(args.seed, 1))
    vae_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = models.clip_tokenizer(tmp, model_max_length=TOKENS)
    unet, text_encoder = train_unet(args, vae, tokenizer, stage_generator(args.seed, 2), out / JUDGE, out)
    save_pipeline(toy_pipeline(unet, vae, text_encoder, tokenizer), out)
    return {"vae_seconds": vae_seconds, "unet_seconds": time.perf_counter() - started - vae_seconds,
            "vae_scaling_factor": vae.config.scaling_factor}


def critics(args: PretrainArgs, out: Path) -> dict:
    torch.set_num_threads(1)
    started = time.perf_counter()
    judge = train_judge(args, stage_generator(args.seed, 3))
    save_file(half(judge.state_dict()), out / JUDGE)
    judge_seconds = time.perf_counter() - started
    l_tower, aesthetic = train_tower(args, rewards.TOWER_CONFIGS["aesthetic"], stage_generator(args.seed, 4), True,
                                     rewards.centre_crop)
    h_tower, _ = train_tower(args, rewards.TOWER_CONFIGS["hps"], stage_generator(args.seed, 5), False,
                             rewards.letterbox)
    save_towers(l_tower, aesthetic, h_tower, out)
    return {"judge_seconds": judge_seconds, "tower_seconds": time.perf_counter() - started - judge_seconds,
            "judge_accuracy": judge_accuracy(load_judge(out / JUDGE), 512, torch.Generator().manual_seed(7))}


STAGES = {"images": image_models, "critics": critics}


def pretrain(args: PretrainArgs) -> dict:
    """Run the chosen stages and write pretraining.json: what each stage measured and how long it took (a stage not
    run keeps its figures from the previous report), and the base pipeline's fidelity at each CFG scale."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    report = json.loads((out / REPORT).read_text()) if (out / REPORT).is_file() else {}
    if "critics" in stages:
        (out / JUDGE).unlink(missing_ok=True)  # the UNet's checks must not read an older run's judge
    started = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(STAGES[stage], args, out) for stage in stages if stage in STAGES]
        for job in jobs:
            report.update(job.result())
    if "report" in stages:
        pipe, judge = load_toy_pipeline(out / PIPELINE), load_judge(out / JUDGE)
        scales = [float(w) for w in args.guidance_scales.split(",")]
        report["fidelity"] = {str(w): fidelity(pipe, judge, w, args.fidelity_prompts) for w in scales}
        report["guidance_scale"] = max(scales, key=lambda w: report["fidelity"][str(w)]["seen"]["all"])
    runs = report.get("runs", []) + [{"stages": stages, "seconds": time.perf_counter() - started,
                                      "args": dataclasses.asdict(args), "torch": torch.__version__,
                                      "command": "python toyworld.py " + " ".join(sys.argv[1:])}]
    report["runs"] = runs
    (out / REPORT).write_text(json.dumps(report, indent=2))
    log("pretrain", json.dumps(report))
    return report


def load_toy_pipeline(path: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


if __name__ == "__main__":
    pretrain(command_line.parse(PretrainArgs, sys.argv[1:], prog="toyworld.py", description=__doc__.split("\n")[0]))
