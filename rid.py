"""Reward Incremental Distillation (RID): reward-incremental LoRA fine-tuning of Stable Diffusion.

Rewards r_1, ..., r_N arrive one after another (tasks). For each task we fine-tune LoRA weights theta by
backpropagating the reward through the last K DDIM steps (DRaFT-K / AlignProp), and distil from an EMA teacher so
that the model keeps what earlier tasks taught it and its visual structure:

    L = L_reward + lambda_out * L_out + lambda_feat * L_feat                                       (train_step)
    L_reward = -s * mean_b r_n(x_0^b, c^b)        x_0 = decode(DDIM(x_T, c)), grads only in the last K steps
    L_out    = mean_k || eps_S(x_t, t, c) - eps_T(x_t, t, c) ||^2                 at the K gradient steps
    L_feat   = mean_k mean_l || h_S^l(x_t, t, c) - h_T^l(x_t, t, c) ||^2            (distillation_losses)
    theta_T <- mu * theta_T + (1 - mu) * theta_S            after every optimizer step (ema_update)

Each task trains a fresh LoRA adapter while earlier ones stay active and frozen (the adapter group); the teacher
runs on the student's own UNet with its LoRA tensors swapped in (torch.func.functional_call), so it costs one copy
of the LoRA tensors, not a second UNet. With --lambda-out 0 --lambda-feat 0 --shared-adapter this is plain
sequential reward fine-tuning, the baseline.

The RIL/RID paper (arXiv 2411.17310) has no public code; everything more specific than its abstract (the loss
terms, the EMA schedule, which features are distilled) is our reading, with every choice a flag below.

    python rid.py --tiny --rewards aesthetic,hps        # tiny random models, CPU, 30-90 s (README: measured)
    python rid.py --rewards aesthetic,hps               # Stable Diffusion v1.5 on a GPU
    accelerate launch --multi_gpu --num_processes 4 rid.py --rewards aesthetic,hps --grad-accum 8   # data parallel
    python rid.py ... --resume                          # continue a killed run from its last checkpoint
"""
import collections
import contextlib
import dataclasses
import difflib
import importlib
import json
import logging
import math
import os
import pickle
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

import numpy
import open_clip
import psutil
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, HfArgumentParser

import figures
from rewards import REWARDS, MissingWeights, fetching, load_reward, seeded

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
DEFAULT_PROMPTS = [
    "a photo of a cat", "a photo of a dog", "a horse in a field", "a red fox in the snow", "a lighthouse at dusk",
    "a bowl of ramen", "a bicycle leaning on a wall", "a portrait of an old fisherman", "a mountain lake at sunrise",
    "a city street in the rain", "a cup of coffee on a wooden table", "an owl on a branch", "a sailing boat at sea",
    "a vase of sunflowers", "a robot reading a book", "a castle on a hill", "a koala eating leaves",
    "a bridge over a river", "a plate of strawberries", "a desert with sand dunes",
]


@dataclass
class Args:
    rewards: str = field(default="aesthetic,hps", metadata={"help": f"task order, comma-separated; known: {', '.join(REWARDS)}"})
    tiny: bool = field(default=False, metadata={"help": "tiny random models built from code (CPU, no download)"})
    random_weights: bool = field(default=False, metadata={"help": "SD1.5's architecture with random weights, built "
                                                                  "from code (no download; for benchmarks)"})
    out_dir: str = field(default="runs/rid", metadata={"help": "output directory (holds no run yet, unless --resume)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out-dir from its last checkpoint"})
    checkpoint_every: int = field(default=50, metadata={"help": "write OUT/checkpoint.pt every this many steps "
                                                                 "(and at each task end)"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many consecutive steps with a "
                                                            "non-finite loss or gradient (each one is skipped)"})
    model: str = field(default=SD15, metadata={"help": "diffusers Stable Diffusion checkpoint (hub id or local path)"})
    prompts: str | None = field(default=None, metadata={"help": "text file, one prompt a line (default: built-in set)"})
    steps_per_task: int | None = field(default=None, metadata={"help": "optimizer steps per reward [full 500, tiny 20]"})
    num_steps: int | None = field(default=None, metadata={"help": "DDIM steps T [full 50, tiny 10]"})
    k: int = field(default=1, metadata={"help": "the last K DDIM steps carry gradients (1 <= K <= T)"})
    random_k: bool = field(default=False, metadata={"help": "draw K uniformly from 1..k once per batch"})
    batch_size: int | None = field(default=None, metadata={"help": "prompts per process and micro-batch [full 4, tiny 2]"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (gradient accumulation)"})
    resolution: int | None = field(default=None, metadata={"help": "image side in pixels [full 512, tiny 32]"})
    lr: float | None = field(default=None, metadata={"help": "AdamW learning rate [full 4e-4, tiny 3e-2]",
                                                      "aliases": ["--learning-rate"]})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (pulls LoRA towards the base)"})
    grad_clip: float = field(default=5.0, metadata={"help": "clip the LoRA gradient norm to this"})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank r of each adapter (alpha = r)"})
    guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance scale w"})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta (0: deterministic)"})
    reward_scale: float | None = field(default=None, metadata={"help": "s in L_reward = -s * mean r [full 1, tiny 1e4]"})
    ema_decay: float | None = field(default=None, metadata={"help": "teacher EMA decay mu in [0, 1]; horizon ~1/(1-mu) "
                                                                   "steps; 1 = frozen task-start teacher [full 0.99, tiny 0.8]"})
    lambda_out: float = field(default=1.0, metadata={"help": "weight of output (eps) distillation"})
    lambda_feat: float = field(default=0.01, metadata={"help": "weight of feature distillation (an MSE of raw "
                                                                 "activations: far larger than L_out)"})
    feat_layers: str = field(default="mid_block,up_blocks.0,up_blocks.1",
                             metadata={"help": "UNet modules whose outputs are distilled, comma-separated"})
    checkpointing: bool = field(default=True, metadata={"help": "activation checkpointing of the K gradient steps and "
                                                                "the VAE decode (--no-checkpointing keeps every "
                                                                "activation: faster, memory grows with K)"})
    shared_adapter: bool = field(default=False, metadata={"help": "one LoRA adapter for all tasks instead of one each"})
    seed: int = field(default=0, metadata={"help": "random seed (LoRA init, prompts, noise)"})
    log_every: int = field(default=10, metadata={"help": "print a summary line every this many steps"})
    report_to: Literal["none", "tensorboard", "wandb", "all"] = field(default="none", metadata={
        "help": "also log every metrics line and each task's samples.png to TensorBoard (offline, in OUT/logs) "
                "and/or Weights & Biases (pip install wandb), through Accelerate's trackers"})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata={
        "help": "run the VAE, the text encoder and the T-K sampling steps without gradients in bf16/fp16; the K "
                "gradient steps, the teacher and the rewards stay fp32 (README, Precision)"})
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even if a GPU is visible"})


MODE_DEFAULTS = {
    "full": dict(steps_per_task=500, num_steps=50, batch_size=4, resolution=512, lr=4e-4, reward_scale=1.0,
                 ema_decay=0.99),
    # Tiny random models have LoRA gradients of ~1e-8, below AdamW's eps: the reward is scaled up so that the
    # optimizer sees them, and the run is short (see README, "Tiny mode").
    "tiny": dict(steps_per_task=20, num_steps=10, batch_size=2, resolution=32, lr=3e-2, reward_scale=1e4,
                 ema_decay=0.8),
}


# Fields that may change when a run is resumed: they do not change what is computed (cpu: not on a CPU run).
RESUME_MAY_DIFFER = ("resume", "out_dir", "log_every", "cpu", "checkpoint_every", "max_bad_steps", "checkpointing",
                     "report_to")
CHECKPOINT = "checkpoint.pt"
LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes into each task directory


class UsageError(ValueError):
    """Bad input: printed as one line on stderr, exit status 2, before anything is written."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite steps): one line on stderr, exit status 3, checkpoint intact."""


class WriteFailed(RuntimeError):
    """A file could not be written (disk full, quota, read-only): one line naming it, exit status 74 (EX_IOERR); the
    file's previous version, and so the last checkpoint, is intact."""


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT: the current step was finished and checkpointed; exit status 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.status = 128 + signum


EXIT_STATUS = {UsageError: 2, MissingWeights: 2, TrainingStopped: 3, WriteFailed: 74}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class OneLineErrors:
    """An argparse mixin: a parse error (an unknown flag, a value of the wrong type) raises a UsageError, printed as
    one line, instead of argparse's usage dump; an unknown flag gets the nearest known one as a suggestion."""

    def error(self, message: str):
        raise UsageError(message)

    def parse_flags(self, argv: list[str]):
        """parse_known_args, refusing what is left over."""
        known, unknown = self.parse_known_args(argv)
        if unknown:
            raise UsageError(unknown_argument(unknown[0], self))
        return known


def unknown_argument(argument: str, parser) -> str:
    options = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    if not argument.startswith("-"):
        return f"unexpected argument {argument!r}: every setting is a --flag (see --help)"
    close = difflib.get_close_matches(argument.split("=")[0], options, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "see --help for the flags"
    return f"unknown flag {argument}; {hint}"


class ArgumentParser(OneLineErrors, HfArgumentParser):
    def parse_args_into_args(self, argv: list[str]) -> Args:
        return Args(**vars(self.parse_flags(argv)))


def parse_args(argv: list[str]) -> Args:
    return ArgumentParser(Args).parse_args_into_args(argv)


def resolve(args: Args) -> Args:
    """Fill the per-mode defaults (fields left at None) from MODE_DEFAULTS."""
    defaults = MODE_DEFAULTS["tiny" if args.tiny else "full"]
    return dataclasses.replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})


def reward_names(args: Args) -> list[str]:
    return [name.strip() for name in args.rewards.split(",")]


def read_prompts(path: str | None) -> list[str]:
    """One prompt a line from a UTF-8 text file; a binary or otherwise encoded file is refused, naming the byte."""
    if path is None:
        return DEFAULT_PROMPTS
    if not Path(path).is_file():
        raise UsageError(f"--prompts {path}: no such file; give a text file with one prompt a line")
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"--prompts {path}: cannot be read ({error.strerror})") from None
    if b"\0" in data:
        raise UsageError(f"--prompts {path}: a binary file (it holds NUL bytes); give a UTF-8 text file, one prompt a "
                         "line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UsageError(f"--prompts {path}: not UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}); save "
                         "it as UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE`") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {path}: the file holds no prompt; write one prompt a line")
    return prompts


# Each float flag must be finite and satisfy its condition; the reason says what a value outside would silently do.
NUMBER_RANGES = {
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "grad_clip": (lambda v: v > 0, "> 0 (a negative max norm flips the gradient, 0 trains nothing)"),
    "guidance_scale": (lambda v: True, ""),
    "eta": (lambda v: 0 <= v <= 1, "in [0, 1] (0: deterministic DDIM, 1: DDPM's noise)"),
    "reward_scale": (lambda v: v > 0, "> 0 (0 trains nothing, a negative scale minimises the reward)"),
    "ema_decay": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lambda_out": (lambda v: v >= 0, ">= 0"),
    "lambda_feat": (lambda v: v >= 0, ">= 0"),
}


def check_numbers(args: Args) -> None:
    """Integers positive and in range, floats finite and in their NUMBER_RANGES."""
    for name in ("steps_per_task", "num_steps", "batch_size", "grad_accum", "resolution", "lora_rank", "log_every",
                 "checkpoint_every", "max_bad_steps"):
        if getattr(args, name) <= 0:
            raise UsageError(f"{flag(name)} must be a positive integer, got {getattr(args, name)}")
    if not 1 <= args.k <= args.num_steps:
        raise UsageError(f"--k must be between 1 and --num-steps ({args.num_steps}), got {args.k}")
    if not 0 <= args.seed < 2 ** 63:
        raise UsageError(f"--seed must be in [0, 2^63), got {args.seed}")
    for name, (within, condition) in NUMBER_RANGES.items():
        value = getattr(args, name)
        if not (math.isfinite(value) and within(value)):
            raise UsageError(f"{flag(name)} must be a finite number{' ' * bool(condition)}{condition}, got {value}")


def check_feat_layer_names(args: Args) -> None:
    """Empty names ("", "mid_block,,") would name the whole UNet; the rest is checked on the model."""
    if any(not name.strip() for name in args.feat_layers.split(",")):
        raise UsageError(f"--feat-layers {args.feat_layers!r} holds an empty module name; give comma-separated UNet "
                         "module names, e.g. mid_block,up_blocks.0")


def check_model_path(args: Args) -> None:
    """A --model that looks like a path (or exists) must be a diffusers pipeline directory: otherwise the hub client
    would call it an invalid repo id."""
    if args.tiny or args.random_weights:
        return
    path = Path(args.model).expanduser()
    looks_like_path = args.model.startswith(("/", ".", "~")) or args.model.count("/") > 1  # hub ids: "org/name"
    if not path.exists() and looks_like_path:
        raise UsageError(f"--model {args.model}: no such directory; give a diffusers pipeline directory (it holds "
                         f"model_index.json) or a hub id such as {SD15}")
    if path.exists() and not (path / "model_index.json").is_file():
        raise UsageError(f"--model {args.model}: not a diffusers pipeline directory (no model_index.json); give one, "
                         "e.g. a tiny run's base/ directory, or a hub id")


# What a run writes into --out-dir (eval.py adds eval*); a directory holding any of them is never written over.
RUN_OUTPUTS = ("config.json", CHECKPOINT, "metrics.jsonl", "training_curves.png", "base", "task[0-9]*_*", "eval.json",
               "eval.md", "eval_*.png")


def run_outputs(out: Path) -> list[str]:
    return sorted({p.name for pattern in RUN_OUTPUTS for p in out.glob(pattern) if not p.name.endswith(".tmp")})


def check_writable(out: Path) -> None:
    """--out-dir can be created and written to: probed with a temporary directory in its nearest existing parent,
    which is removed at once (so that /proc/foo, a read-only mount or a missing permission fail before any work)."""
    existing = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--out-dir {out}: {existing} is a file; give a directory path")
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as error:
        raise UsageError(f"--out-dir {out}: cannot write in {existing} ({error.strerror}); choose a writable "
                         "directory") from None


def check_out_dir(args: Args) -> bool:
    """--out-dir is a writable directory that holds this run's config (with --resume) or no run output at all.
    Returns whether the run is new (no config.json yet): --resume then starts it, as a preemptible job expects."""
    if not args.out_dir.strip():
        raise UsageError("--out-dir is empty; give a directory path, e.g. runs/rid")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file; give a directory path")
    check_writable(out)
    outputs = run_outputs(out) if out.is_dir() else []
    if "config.json" in outputs:
        if not args.resume:
            raise UsageError(f"--out-dir {out} already holds a run; add --resume to continue it, or choose another "
                             "directory")
        check_resume_config(args, out)
        return False
    if outputs:
        raise UsageError(f"--out-dir {out} holds run outputs ({', '.join(outputs[:4])}) but no config.json, so they "
                         "cannot be resumed and will not be overwritten; choose another directory")
    return True


def check_args(args: Args) -> bool:
    """Reject bad input with a UsageError that says what is wrong and how to fix it; everything that can be checked
    without the model. Returns whether --out-dir holds no run yet."""
    if args.tiny and args.random_weights:
        raise UsageError("--tiny and --random-weights exclude each other: give one")
    unknown = [name for name in reward_names(args) if name not in REWARDS]
    if unknown:
        raise UsageError(f"--rewards: unknown reward {unknown[0]!r}; known rewards: {', '.join(REWARDS)}")
    check_numbers(args)
    if args.ema_decay == 0 and (args.lambda_out > 0 or args.lambda_feat > 0):
        raise UsageError("--ema-decay 0 makes the teacher a copy of the student, so both distillation losses are 0 "
                         "while the teacher still costs a forward; give a decay in (0, 1], or --lambda-out 0 "
                         "--lambda-feat 0 for no distillation")
    check_feat_layer_names(args)
    check_trackers(args)
    check_model_path(args)
    return check_out_dir(args)


def read_config(path: Path) -> dict:
    """A run's config.json as a dict of Args fields; a damaged one, or one from elsewhere, is one line."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} cannot be read as JSON ({error}); it is damaged: restore it, or start a new run in "
                         "another directory") from None
    fields = {f.name for f in dataclasses.fields(Args)}
    if not isinstance(config, dict) or not config.keys() <= fields:
        extra = sorted(config.keys() - fields) if isinstance(config, dict) else type(config).__name__
        raise UsageError(f"{path} is not a rid.py config (unexpected {extra}); give a run directory written by rid.py")
    return config


def check_resume_config(args: Args, out: Path) -> None:
    """--resume continues a run only with the configuration it was started with (up to RESUME_MAY_DIFFER)."""
    saved, now = read_config(out / "config.json"), dataclasses.asdict(args)
    differing = [key for key in sorted(saved.keys() | now.keys())
                 if key not in RESUME_MAY_DIFFER and saved.get(key) != now.get(key)]
    if differing:
        changes = ", ".join(f"{flag(key)} ({saved.get(key)!r} -> {now.get(key)!r})" for key in differing)
        raise UsageError(f"--resume: the run in {out} was started with another configuration: {changes}; rerun with "
                         "its flags (see config.json) or choose another --out-dir")


# ----------------------------------------------------------------------------------------------------------------
# Models: Stable Diffusion from the hub, or the same classes with random weights, at tiny sizes or at SD1.5's.

def clip_tokenizer(tmp_dir: str) -> CLIPTokenizer:
    """Stable Diffusion's CLIP tokenizer, rebuilt from the BPE vocabulary that ships inside open_clip (no download).
    Gives the same token ids as SD1.5's own tokenizer; only the special tokens are spelt differently there."""
    bpe = open_clip.get_tokenizer("ViT-L-14")
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    Path(tmp_dir, "vocab.json").write_text(json.dumps({special.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    Path(tmp_dir, "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(f"{tmp_dir}/vocab.json", f"{tmp_dir}/merges.txt", model_max_length=77)


# Architectures built from code, each a set of config dicts in the order the models are built (the order fixes which
# random weights each model gets). TINY: SD1.5's classes at tiny sizes, for tests and --tiny. SD15_ARCHITECTURE:
# stable-diffusion-v1-5's own unet/, vae/ and text_encoder/ config.json (sizes and layer types; the keys not given
# here are the classes' defaults, which equal SD1.5's), for --random-weights.
TINY = {
    "unet": dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32),
    "vae": dict(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
    "text_encoder": dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32,
                         intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, vocab_size=49408),
}
SD15_ARCHITECTURE = {
    "unet": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64, in_channels=4,
                 out_channels=4, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "vae": dict(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
                layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
    "text_encoder": dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=768, intermediate_size=3072,
                         num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
                         projection_dim=768, hidden_act="quick_gelu", vocab_size=49408),
}


def random_pipeline(configs: dict) -> StableDiffusionPipeline:
    """SD1.5's classes built from `configs` (TINY or SD15_ARCHITECTURE) with random weights, seeded so that every
    run gets the same base; SD's tokenizer and noise schedule. Nothing is downloaded."""
    with seeded(0), tempfile.TemporaryDirectory() as tmp:
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(vae, text_encoder, clip_tokenizer(tmp), unet, scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_pipeline(args: Args, device: torch.device, path: str | Path | None = None) -> StableDiffusionPipeline:
    """The frozen base model with a DDIM scheduler, the same object in every mode. The VAE and the text encoder are
    in --mixed-precision's dtype; the UNet stays fp32, since its K gradient steps and the teacher run in fp32 (its
    sampling steps without gradients run in the low dtype under autocast, see low_precision).
    `path` loads a saved pipeline instead of building or downloading one (eval.py reloads a tiny run's base/)."""
    if (args.tiny or args.random_weights) and path is None:
        pipe = random_pipeline(TINY if args.tiny else SD15_ARCHITECTURE)  # fp32: the same weights in every precision
    else:
        source = path or args.model
        with fetching(f"--model {source}", f"pre-download it with `hf download {source}` on a machine with "
                      "network access, or pass a local diffusers directory with --model PATH"):
            pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    pipe.to(device)  # fp32, as loaded or built
    for module in (pipe.vae, pipe.text_encoder):
        # Not diffusers' ModelMixin.to(dtype): it warns "modules ... should be kept in float32: []" whenever it is
        # given a dtype, even for a model with no such module (none of SD1.5's has one); after that check it casts
        # with torch.nn.Module.to, as here.
        torch.nn.Module.to(module, WEIGHT_DTYPES[args.mixed_precision])
    return pipe


def check_model_args(args: Args, pipe: StableDiffusionPipeline) -> None:
    """Checks that need the model: the distilled layers exist and see the LoRA, the latent fits the UNet's
    downsampling, and the activations of --resolution x --batch-size can fit in memory."""
    names = {name for name, _ in pipe.unet.named_modules()}
    for layer in args.feat_layers.split(","):
        if layer not in names:
            raise UsageError(f"--feat-layers: the UNet has no module {layer!r}; try mid_block, up_blocks.0, ...")
    if args.lambda_feat > 0:
        check_feat_layers_see_lora(pipe.unet, args.feat_layers.split(","))
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if args.resolution % multiple:
        raise UsageError(f"--resolution must be a multiple of {multiple} for this model, got {args.resolution}")
    check_memory(args, pipe)


@torch.no_grad()
def module_order(unet: UNet2DConditionModel, names: set[str]) -> list[str]:
    """The modules in `names` in the order their forward passes finish, in one UNet call on the smallest latent."""
    order = []
    hooks = [unet.get_submodule(name).register_forward_hook(lambda *_, name=name: order.append(name)) for name in names]
    side = 2 ** len(unet.config.block_out_channels)  # 2x2 at the deepest level (GroupNorm needs more than 1 value)
    x = torch.zeros(1, unet.config.in_channels, side, side, device=unet.device, dtype=unet.dtype)
    text = torch.zeros(1, 1, unet.config.cross_attention_dim, device=unet.device, dtype=unet.dtype)
    try:
        unet(x, 1, encoder_hidden_states=text)
    finally:
        for hook in hooks:
            hook.remove()
    return order


def check_feat_layers_see_lora(unet: UNet2DConditionModel, layers: list[str]) -> None:
    """A feature layer that runs before every LoRA layer (conv_in, a down block without attention) has the same
    output for student and teacher, so its L_feat is 0 on every step by construction; one that never runs has none."""
    targets = {name for name, _ in unet.named_modules() if name.endswith(tuple("." + t for t in LORA_TARGETS))}
    order = module_order(unet, targets | set(layers))
    first_lora = next(i for i, name in enumerate(order) if name in targets)
    for layer in layers:
        if layer not in order:
            raise UsageError(f"--feat-layers: the UNet's forward pass never runs {layer!r}; give modules such as "
                             "mid_block, up_blocks.0")
        if order.index(layer) < first_lora:
            raise UsageError(f"--feat-layers: {layer} runs before every LoRA layer, so its output never changes and "
                             "L_feat would be 0 on every step; give modules after the first attention block, e.g. "
                             "mid_block, up_blocks.0 (or --lambda-feat 0)")


# The VAE decoder's last block works at full resolution with block_out_channels[0] channels; a training step holds at
# least this many such (B, C0, H, W) tensors at its peak. Measured on CPU (VmHWM over one tiny RID step, checkpointing
# on, after a warm-up step): 73 of them at 128 px batch 4 and at 256 px batch 2. 8 keeps the check a lower bound: it
# refuses only sizes that cannot fit, and leaves the rest to the allocator.
DECODER_FULL_RES_TENSORS = 8


def check_memory(args: Args, pipe: StableDiffusionPipeline) -> None:
    """Refuse a --resolution x --batch-size whose activations cannot fit in the device's memory, before allocating
    them: the decoder's full-resolution activations, (B, C0, H, W) each, against the GPU's or the machine's memory."""
    element = torch.finfo(pipe.vae.dtype).bits // 8
    need = (DECODER_FULL_RES_TENSORS * args.batch_size * pipe.vae.config.block_out_channels[0] * args.resolution ** 2
            * element)
    device = pipe.device
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else psutil.virtual_memory().total)
    if need > total:
        raise UsageError(f"--resolution {args.resolution} with --batch-size {args.batch_size} needs more than "
                         f"{need / 2 ** 30:.0f} GiB for the VAE decoder alone, and this {device.type} has "
                         f"{total / 2 ** 30:.0f} GiB; lower them (--grad-accum keeps the effective batch)")


# ----------------------------------------------------------------------------------------------------------------
# Precision. With --mixed-precision bf16/fp16, only what carries no distillation signal runs in the low dtype: the
# T-K sampling steps without gradients, the text encoder and the VAE. The K gradient steps, the teacher calls and the
# rewards run in IEEE fp32: L_out measures a student-teacher difference far below one bf16 ulp (~4e-3 at |eps| ~ 1),
# which bf16 (or TF32's 10-bit mantissa) would replace by rounding noise.

def low_precision(args: Args, device: torch.device):
    """--mixed-precision's autocast, for the fp32 UNet's calls without gradients; a no-op with --mixed-precision no."""
    dtype = WEIGHT_DTYPES[args.mixed_precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@contextlib.contextmanager
def full_precision(device: torch.device):
    """IEEE fp32: autocast off, and no TF32 in cuBLAS matmuls or cuDNN convolutions (PyTorch lets cuDNN
    convolutions use TF32 by default)."""
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def score(scorer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Rewards (B,) of images (B,3,H,W) in [0,1], in IEEE fp32 in training and evaluation alike: on the real
    aesthetic scale (about 5 to 7) bf16's resolution is about 0.03."""
    with full_precision(images.device):
        return scorer(images.float(), prompts).float()


# ----------------------------------------------------------------------------------------------------------------
# Sampling: DDIM with classifier-free guidance; gradients only through the last K steps (DRaFT-K).

@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """Frozen text encoder -> (2B, 77, D) embeddings, [uncond; cond], the order diffusers' pipeline uses."""
    cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, do_classifier_free_guidance=True)
    return torch.cat([uncond, cond])


def initial_latents(pipe: StableDiffusionPipeline, n: int, resolution: int, generator: torch.Generator):
    """x_T ~ N(0, I), (n, 4, resolution/8, resolution/8) for SD. Drawn on the CPU so seeds mean the same on any device.
    The DDIM chain runs in at least fp32, also when the UNet runs in bf16/fp16 (unet_eps casts at its boundary)."""
    side = resolution // pipe.vae_scale_factor
    x = torch.randn((n, pipe.unet.config.in_channels, side, side), generator=generator)
    return x.to(pipe.device, torch.promote_types(pipe.unet.dtype, torch.float32)) * pipe.scheduler.init_noise_sigma


def unet_eps(unet, x, t, text_emb, feat_layers=(), params=None):
    """One UNet call on the CFG batch. x (B,4,h,w), text_emb (2B,77,D) -> eps (2B,4,h,w) for [uncond; cond], and
    the outputs of the modules named in feat_layers (e.g. mid_block: (2B,C,h/2^d,w/2^d)). Features are returned,
    not left in a hook's buffer, so that activation checkpointing recomputes them with the graph. `params`
    (name -> tensor) replaces those parameters for this call only: that is how the EMA teacher runs."""
    features = {}

    def keep(name):
        def hook(module, inputs, output):
            features[name] = output[0] if isinstance(output, tuple) else output  # down blocks return (h, skips)
        return hook

    hooks = [unet.get_submodule(name).register_forward_hook(keep(name)) for name in feat_layers]
    try:
        # conv_in's dtype is the dtype the UNet's input meets; unet.dtype would walk every module on every call
        dtype = unet.conv_in.weight.dtype
        inputs, kwargs = (torch.cat([x, x]).to(dtype), t), {"encoder_hidden_states": text_emb.to(dtype)}
        out = functional_call(unet, params, inputs, kwargs, strict=False) if params else unet(*inputs, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return out.sample.to(x.dtype), [features[name].to(x.dtype) for name in feat_layers]


def guide(eps: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: (2B,...) [uncond; cond] -> eps_u + w (eps_c - eps_u), (B,...)."""
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + w * (eps_cond - eps_uncond)


def distillation_losses(eps, feats, eps_teacher, feats_teacher):
    """L_out = ||eps_S - eps_T||^2 and L_feat = mean over layers of ||h_S - h_T||^2 (each a mean over elements)."""
    l_out = F.mse_loss(eps, eps_teacher)
    l_feat = torch.stack([F.mse_loss(h, h_t) for h, h_t in zip(feats, feats_teacher)]).mean() if feats else 0 * l_out
    return l_out, l_feat


def checkpointed(enabled: bool, fn, *inputs):
    """fn(*inputs), in non-reentrant activation checkpointing if enabled: only the inputs and outputs are kept, and
    the backward pass runs fn once more. Reentrant checkpointing would drop the LoRA gradients."""
    return checkpoint(fn, *inputs, use_reentrant=False) if enabled else fn(*inputs)


def variance_noise(x: torch.Tensor, generator: torch.Generator, process: tuple[int, int]) -> torch.Tensor:
    """DDIM's noise for eta > 0, (B,4,h,w) like x: drawn for the global batch of B x processes from the shared
    generator (on the CPU, as x_T) and sliced as draw_batch slices x_T, so that N processes x B draw what one
    process x N*B would, not N copies of the same noise."""
    index, count = process
    n = x.shape[0]
    noise = torch.randn((n * count, *x.shape[1:]), generator=generator)
    return noise[index * n:(index + 1) * n].to(x.device, x.dtype)


def ddim_step(pipe, eps: torch.Tensor, t, x: torch.Tensor, args: Args, generator=None, process=(0, 1)):
    """x_t (B,4,h,w) -> x_{t-1} from the CFG batch's eps (2B,4,h,w): guidance, then the DDIM update (with this
    process's slice of the global batch's noise when --eta > 0)."""
    noise = variance_noise(x, generator, process) if args.eta > 0 else None
    return pipe.scheduler.step(guide(eps, args.guidance_scale), t, x, eta=args.eta, variance_noise=noise).prev_sample


def sample_latents(pipe, x, text_emb, args: Args, k: int, teacher=None, generator=None, process=(0, 1)):
    """DDIM from x_T (B,4,h,w) to x_0 latents. Steps 1..T-k run under no_grad in --mixed-precision's dtype with the
    LoRA folded into the weights (the fast path: they are most UNet calls and need no graph), the last k with
    gradients in fp32, each UNet call in activation checkpointing (unless --no-checkpointing). With a teacher
    (name -> LoRA tensor), also returns L_out and L_feat averaged over the k gradient steps; the teacher sees the
    same input as the student, detached. `generator` and `process` (index, count) give the noise for --eta > 0."""
    timesteps = pipe.scheduler.timesteps
    split = len(timesteps) - k
    with torch.no_grad(), adapters_folded(pipe.unet), low_precision(args, x.device):  # fold first, in fp32
        for t in timesteps[:split]:
            eps, _ = unet_eps(pipe.unet, pipe.scheduler.scale_model_input(x, t), t, text_emb)
            x = ddim_step(pipe, eps, t, x, args, generator, process)
    layers = args.feat_layers.split(",") if args.lambda_feat > 0 else ()
    losses = []
    for t in timesteps[split:]:
        x_in = pipe.scheduler.scale_model_input(x, t)
        with full_precision(x.device):
            eps, feats = checkpointed(args.checkpointing, unet_eps, pipe.unet, x_in, t, text_emb, layers)
            if teacher is not None:
                with torch.no_grad():
                    eps_t, feats_t = unet_eps(pipe.unet, x_in.detach(), t, text_emb, layers, params=teacher)
                losses.append(distillation_losses(eps, feats, eps_t, feats_t))
        x = ddim_step(pipe, eps, t, x, args, generator, process)
    l_out, l_feat = (torch.stack(terms).mean() for terms in zip(*losses)) if losses else (x.new_zeros(()),) * 2
    return x, l_out, l_feat


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode, (B,4,h,w) latents -> (B,3,H,W) pixels mapped from [-1,1] to [0,1] (once, here) and clamped to
    [0,1], as diffusers' postprocessing and the public reward trainers clamp: training scores the pixels that
    sampling and evaluation show. The clamp passes the gradient of pixels in [0,1] and zeroes it beyond."""
    pixels = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.to(latents.dtype) / 2 + 0.5
    return pixels.clamp(0, 1)


@torch.no_grad()
def generate(pipe, prompts: list[str], latents: torch.Tensor, args: Args, generator=None) -> torch.Tensor:
    """Images (B,3,H,W) in [0,1] for prompts and initial latents, no gradients (what diffusers' pipeline computes).
    `generator` draws the noise for --eta > 0 (default: a fresh one seeded with --seed), never the global RNG."""
    generator = torch.Generator().manual_seed(args.seed) if generator is None else generator
    x0, _, _ = sample_latents(pipe, latents, encode_prompts(pipe, prompts), args, k=0, generator=generator)
    return decode(pipe.vae, x0)


# ----------------------------------------------------------------------------------------------------------------
# RID: the adapter group and the EMA teacher.

def adapter_tensors(unet: UNet2DConditionModel, name: str) -> dict[str, torch.nn.Parameter]:
    """The LoRA tensors (A and B of every targeted layer) of adapter `name`, by parameter name."""
    return {n: p for n, p in unet.named_parameters() if f".{name}." in n}


def lora_layers(unet: UNet2DConditionModel) -> list[BaseTunerLayer]:
    """The UNet's layers that PEFT wrapped (every targeted linear), each holding its own copy of every adapter."""
    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(unet: UNet2DConditionModel, layers: list[BaseTunerLayer] | None = None):
    """Run the UNet without its LoRA adapters inside the block (the base column of samples.png; the fast path),
    then restore exactly the trained state. PEFT's enable_adapters(True) calls set_adapter, which makes every
    active adapter trainable again (earlier tasks' frozen adapters included), so requires_grad is saved and
    restored. Layer by layer rather than diffusers' unet.disable_adapters(), which walks every module by name."""
    layers = lora_layers(unet) if layers is None else layers
    lora = [p for m in layers for name in m.adapter_layer_names for p in getattr(m, name).parameters()]
    trainable = [p.requires_grad for p in lora]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield unet
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in zip(lora, trainable):
            p.requires_grad_(flag)


@contextlib.contextmanager
def adapters_folded(unet: UNet2DConditionModel):
    """For calls without gradients: every active adapter folded into its layer, W' = W + sum_a (alpha/r) B_a A_a,
    and the adapters switched off, so that a UNet call costs what the base model's does, whatever the number of
    tasks. W itself is kept aside and put back untouched afterwards (W += dW then W -= dW would drift by rounding).
    Costs one copy of the targeted weights while the block runs."""
    layers = [m for m in lora_layers(unet) if not m.disable_adapters]
    if not layers:  # no adapters yet, or already disabled (adapters_disabled)
        yield unet
        return
    with torch.no_grad():
        kept = [(m.get_base_layer().weight, m.get_base_layer().weight.data) for m in layers]
        for m, (weight, w) in zip(layers, kept):
            weight.data = (w + sum(m.get_delta_weight(name) for name in m.active_adapters)).to(w.dtype)  # 1 rounding
    try:
        with adapters_disabled(unet, layers):
            yield unet
    finally:
        for weight, w in kept:
            weight.data = w


def add_task_adapter(unet: UNet2DConditionModel, name: str, rank: int) -> dict[str, torch.nn.Parameter]:
    """Add a fresh LoRA adapter (B = 0, so the model is unchanged), keep every adapter active, and make only the new
    one trainable: earlier tasks' adapters stay frozen, bit for bit. Returns the trainable tensors by name (fp32)."""
    with warnings.catch_warnings():  # PEFT warns that a second adapter is being added: that is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS), adapter_name=name)
    unet.set_adapters(list(unet.peft_config))  # PEFT makes every active adapter trainable: re-freeze below
    trainable = adapter_tensors(unet, name)
    for n, p in unet.named_parameters():
        p.requires_grad_(n in trainable)
    for p in trainable.values():
        p.data = p.data.float()
    return trainable


def new_teacher(params: dict[str, torch.nn.Parameter], args: Args) -> dict[str, torch.Tensor] | None:
    """The EMA teacher at a task's start: a copy of the trainable LoRA tensors, i.e. the student as it is now. None
    when both distillation weights are 0 (plain fine-tuning needs no teacher and pays nothing for one)."""
    if args.lambda_out == 0 and args.lambda_feat == 0:
        return None
    return {n: p.detach().clone() for n, p in params.items()}


@torch.no_grad()
def ema_update(teacher: dict[str, torch.Tensor], student: dict[str, torch.nn.Parameter], decay: float) -> None:
    """theta_T <- mu * theta_T + (1 - mu) * theta_S, in place. lerp is exact at both ends (mu = 0 and mu = 1)."""
    torch._foreach_lerp_(list(teacher.values()), [student[name] for name in teacher], 1 - decay)


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """All adapters as one diffusers-format LoRA. sum_i B_i A_i = [B_1 .. B_n] [A_1; ..; A_n], so stacking A along
    the rank axis and B along its input axis gives one LoRA of rank sum r_i (scale 1, since every alpha = r)."""
    states = [get_peft_model_state_dict(unet, adapter_name=name) for name in unet.peft_config]
    stacked = {key: torch.cat([s[key] for s in states], dim=0 if ".lora_A." in key else 1) for key in states[0]}
    return convert_state_dict_to_diffusers(stacked)


# ----------------------------------------------------------------------------------------------------------------
# Training.

def draw_batch(pipe, prompts: list[str], args: Args, generator: torch.Generator, process: tuple[int, int] = (0, 1)):
    """Prompts (B,), x_T (B,4,h,w) and K for this process. Every process draws the same global batch of B x processes
    from the shared generator and keeps its own slice, so the processes see different prompts and noise, and N
    processes x B see exactly what one process x N*B would. K is drawn once per batch, never per denoising step."""
    index, count = process
    ids = torch.randint(len(prompts), (args.batch_size * count,), generator=generator)
    k = int(torch.randint(1, args.k + 1, (), generator=generator)) if args.random_k else args.k
    x_T = initial_latents(pipe, args.batch_size * count, args.resolution, generator)
    mine = slice(index * args.batch_size, (index + 1) * args.batch_size)
    return [prompts[i] for i in ids[mine]], x_T[mine], k


def train_step(pipe, scorer, prompts, teacher, args: Args, generator: torch.Generator, accelerator=None,
               scaler=None) -> dict:
    """Sample a batch with gradients through the last K steps, score it, and backpropagate
    L = L_reward + lambda_out L_out + lambda_feat L_feat, divided by --grad-accum (gradients add up over
    micro-batches) and multiplied by the fp16 loss scale if a grad scaler is given. Returns the rewards (B,), the loss
    terms (detached) and K."""
    process = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    batch, x_T, k = draw_batch(pipe, prompts, args, generator, process)
    x0, l_out, l_feat = sample_latents(pipe, x_T, encode_prompts(pipe, batch), args, k, teacher, generator, process)
    images = checkpointed(args.checkpointing, decode, pipe.vae, x0)                       # (B, 3, H, W)
    rewards = score(scorer, images, batch)                                                # (B,)
    l_reward = -args.reward_scale * rewards.mean()
    loss = l_reward + args.lambda_out * l_out + args.lambda_feat * l_feat
    with full_precision(x_T.device):  # the K steps' checkpoints are recomputed in here: as precise as their forward
        (loss / args.grad_accum if scaler is None else scaler.scale(loss / args.grad_accum)).backward()
    terms = {"loss": loss, "loss_reward": l_reward, "loss_out": l_out, "loss_feat": l_feat}
    return {"rewards": rewards.detach(), **{name: term.detach().float() for name, term in terms.items()}, "k": k}


LOSS_TERMS = ("loss", "loss_reward", "loss_out", "loss_feat")


def average_gradients(params: dict[str, torch.nn.Parameter], accelerator: Accelerator) -> None:
    """All-reduce (mean) the LoRA gradients across processes, in one flat call. Done by hand rather than through
    DDP: a new adapter joins at every task, and the K UNet calls run inside activation checkpointing with a teacher
    call beside them, which DDP's hooks handle badly. A no-op on one process."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params.values()]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(averaged.view_as(g))


def step_metrics(micro_batches: list[dict], accelerator: Accelerator) -> dict:
    """The optimizer step's metrics over all micro-batches of all processes: rewards gathered (B x processes x
    accumulation samples), loss terms averaged, K averaged over the micro-batches."""
    rewards = accelerator.gather(torch.cat([m["rewards"] for m in micro_batches]))
    terms = torch.stack([torch.stack([m[name] for name in LOSS_TERMS]) for m in micro_batches]).mean(0)  # (4,)
    terms = accelerator.reduce(terms, reduction="mean")
    return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            **dict(zip(LOSS_TERMS, terms.tolist())), "k": sum(m["k"] for m in micro_batches) / len(micro_batches)}


def task_adapter(unet: UNet2DConditionModel, args: Args, task: int) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA tensors of this task: a fresh adapter, unless it exists (the shared adapter after task 1,
    or an adapter rebuilt from a checkpoint, which is then the last one added and so the trainable one)."""
    name = "shared" if args.shared_adapter else f"task{task}"
    if name in getattr(unet, "peft_config", {}):
        return adapter_tensors(unet, name)
    return add_task_adapter(unet, name, args.lora_rank)


def is_finite(*values: float) -> bool:
    return all(math.isfinite(value) for value in values)


def optimizer_update(optimizer, params: dict[str, torch.nn.Parameter], scaler, teacher, args: Args,
                     loss: float) -> dict:
    """One optimizer step from the accumulated LoRA gradients: unscale them (fp16; a no-op for a disabled scaler),
    clip their norm, take the AdamW step and then the EMA teacher's, and zero them. An fp16 overflow (finite loss,
    non-finite gradient) takes no step and is left to the scaler, which lowers its scale; any other non-finite loss
    or gradient takes no step either and is reported as skipped. The scaler is updated after every step, taken or
    not, so that the next one can unscale again. Returns the gradient norm (unscaled, before clipping), skipped."""
    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params.values(), args.grad_clip))
    overflow = scaler.is_enabled() and is_finite(loss) and not is_finite(grad_norm)
    skipped = not overflow and not is_finite(loss, grad_norm)
    if not (overflow or skipped):  # one NaN would poison the LoRA, AdamW's moments and the teacher for good
        scaler.step(optimizer)
        if teacher is not None:
            ema_update(teacher, params, args.ema_decay)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, "skipped": skipped}


def resume_task(resume: dict, params: dict[str, torch.nn.Parameter], optimizer) -> tuple[int, dict | None]:
    """The step and EMA teacher of a checkpoint taken inside a task, with its AdamW state loaded into `optimizer`.
    Checkpoints are loaded onto the CPU: the teacher moves to its LoRA tensors' devices (functional_call and the EMA
    update use them together), and torch's load_state_dict moves AdamW's state to its parameters' devices."""
    optimizer.load_state_dict(resume["optimizer"])
    teacher = resume["teacher"]
    if teacher is not None:
        teacher = {n: t.to(params[n].device) for n, t in teacher.items()}
    return resume["step"], teacher


def train_task(pipe, scorer, prompts, params, args: Args, task: int, name: str, progress, accelerator, scaler,
               resume=None) -> None:
    """Optimise one reward for --steps-per-task steps, updating the EMA teacher after every step. A step whose loss or
    gradient is not finite is skipped (no update), logged and warned about; an fp16 loss-scale overflow is left to
    the grad scaler (see optimizer_update). `resume`: a checkpoint taken inside this task, whose step, optimizer and
    teacher are restored (the model, generators and scaler already are)."""
    teacher = new_teacher(params, args)
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    first = 0
    if resume is not None:
        first, teacher = resume_task(resume, params, optimizer)
    bar = tqdm(range(first, args.steps_per_task), desc=f"task {task} ({name})", initial=first,
               total=args.steps_per_task, dynamic_ncols=True, disable=not accelerator.is_main_process)
    recent_rewards = collections.deque(maxlen=args.log_every)  # the batch rewards of the last --log-every steps
    for step in bar:
        start = time.perf_counter()
        micro_batches = [train_step(pipe, scorer, prompts, teacher, args, progress.generator, accelerator, scaler)
                         for _ in range(args.grad_accum)]
        average_gradients(params, accelerator)
        metrics = step_metrics(micro_batches, accelerator)
        metrics.update(optimizer_update(optimizer, params, scaler, teacher, args, metrics["loss"]))
        if metrics["skipped"]:
            progress.bad_streak += 1
            if accelerator.is_main_process:
                tqdm.write(f"warning: task {task} step {step}: loss {metrics['loss']}, gradient norm "
                           f"{metrics['grad_norm']}; update skipped ({progress.bad_streak} in a row)", file=sys.stderr)
        else:
            progress.bad_streak = 0
        metrics = {"task": task, "reward": name, "step": step, "lr": optimizer.param_groups[0]["lr"], **metrics,
                   "seconds": time.perf_counter() - start}
        progress.log_line(json.dumps(metrics))
        accelerator.log(tracker_metrics(metrics), step=progress.lines)  # the global step, as in training_curves.png
        recent_rewards.append(metrics["reward_mean"])
        bar.set_postfix(reward=f"{metrics['reward_mean']:.4g}")
        if progress.bad_streak >= args.max_bad_steps:
            last = (f"the last good checkpoint ({progress.saved_at}) is intact in {progress.out / CHECKPOINT}"
                    if progress.saved_at != "none yet" else "no checkpoint was written yet")
            raise TrainingStopped(f"task {task} step {step}: {progress.bad_streak} steps in a row had a non-finite "
                                  f"loss or gradient (--max-bad-steps {args.max_bad_steps}); stopped; {last}")
        if (step + 1) % args.checkpoint_every == 0 and accelerator.is_main_process:
            save_checkpoint(pipe.unet, progress, task, step + 1, scaler, optimizer, teacher)
        if accelerator.is_main_process and ((step + 1) % args.log_every == 0 or step + 1 == args.steps_per_task):
            bar.write(summary(metrics, args, list(recent_rewards)))
        signum = stop_requested(accelerator)
        if signum:  # the step is complete: checkpoint it, so that --resume continues exactly here
            if accelerator.is_main_process:
                save_checkpoint(pipe.unet, progress, task, step + 1, scaler, optimizer, teacher)
            raise Interrupted(f"stopped by {signal.Signals(signum).name} after task {task}, step {step + 1}, "
                              f"checkpointed; rerun the same command with --resume to continue", signum)


# ----------------------------------------------------------------------------------------------------------------
# What a user sees while and after a run: the summary line, the trackers (TensorBoard, W&B), the list of outputs.

def summary(metrics: dict, args: Args, recent_rewards: list[float]) -> str:
    """The readable line printed every --log-every steps. A batch of a few images gives a reward that swings from
    step to step, so its mean over the last --log-every steps of this task (recent_rewards) stands beside it."""
    return (f"task {metrics['task']} {metrics['reward']} step {metrics['step'] + 1}/{args.steps_per_task}: "
            f"reward {metrics['reward_mean']:.4g} ({running_mean(recent_rewards)}) loss {metrics['loss']:.4g} "
            f"(out {metrics['loss_out']:.3g}, feat {metrics['loss_feat']:.3g}) grad {metrics['grad_norm']:.3g} "
            f"{metrics['seconds']:.2f}s/step")


def running_mean(values: list[float]) -> str:
    """'mean M over last n steps' of the finite values (a skipped step's NaN reward would hide every other one)."""
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return "no finite reward since the last line"
    return f"mean {statistics.fmean(finite):.4g} over last {len(finite)} step{'s' if len(finite) > 1 else ''}"


# --report-to: the trackers each choice starts, and the package each needs (wandb is not in requirements.txt).
TRACKERS = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}
LOGS = "logs"  # OUT/logs/rid/: TensorBoard's event files; OUT/logs/wandb/: W&B's local files


def check_trackers(args: Args) -> None:
    """--report-to's packages can be imported: a missing one is bad input, refused before anything is written."""
    for name in TRACKERS[args.report_to]:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UsageError(f"--report-to {args.report_to}: the {name} package is not installed; `pip install "
                             f"{name}`, or choose another --report-to") from None


def tracker_options(args: Args, out: Path) -> dict:
    """Accelerator(**...) keywords: the trackers of --report-to, logging under OUT/logs."""
    return dict(log_with=TRACKERS[args.report_to] or None,  # [] would warn that no tracker is installed
                project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / LOGS)))


def start_trackers(accelerator: Accelerator, args: Args, out: Path, first_step: int) -> None:
    """Start --report-to's trackers with the run's configuration (Accelerate does so on the main process only).
    first_step: the global step the run goes on from; on --resume TensorBoard hides what was logged from there on
    (purge_step), since those steps are run and logged again."""
    if "wandb" in TRACKERS[args.report_to] and accelerator.is_main_process:
        (out / LOGS).mkdir(exist_ok=True)
    accelerator.init_trackers("rid", config=dataclasses.asdict(args), init_kwargs={
        "tensorboard": {"purge_step": first_step}, "wandb": {"name": out.name, "dir": str(out / LOGS)}})


def tracker_metrics(metrics: dict) -> dict[str, float]:
    """One metrics.jsonl line as tracker scalars. The reward goes under its own name (reward/aesthetic, ...): every
    reward has its own scale, so one curve across tasks would mislead. The rest goes under train/."""
    reward = metrics["reward"]
    scalars = {f"reward/{reward}": metrics["reward_mean"], f"reward_std/{reward}": metrics["reward_std"]}
    return scalars | {f"train/{key}": float(value) for key, value in metrics.items()
                      if key not in ("reward", "reward_mean", "reward_std", "step")}


def log_image(accelerator: Accelerator, tag: str, image, step: int) -> None:
    """A picture (PIL) to every tracker: TensorBoard takes an (H, W, 3) uint8 array, W&B a wandb.Image (Accelerate's
    log_images wraps each image of the list in one)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, numpy.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image]}, step=step)


def where_outputs_went(args: Args, out: Path) -> str:
    """What a finished run printed last: where each output is, and the command to run next."""
    tasks = [out / f"task{i}_{name}" for i, name in enumerate(reward_names(args), start=1)]
    rows = [("LoRA after each task", [task / LORA_FILE for task in tasks]),
            ("sample grids", [task / "samples.png" for task in tasks]),
            ("metrics, a line a step", [out / "metrics.jsonl"]), ("training curves", [out / "training_curves.png"]),
            ("config, checkpoint", [out / "config.json", out / CHECKPOINT])]
    if args.tiny:
        rows.append(("tiny base pipeline", [out / "base"]))
    if "tensorboard" in TRACKERS[args.report_to]:
        rows.append(("TensorBoard", [f"tensorboard --logdir {shlex.quote(str(out / LOGS))}"]))
    if "wandb" in TRACKERS[args.report_to]:
        rows.append(("W&B local files", [out / LOGS / "wandb"]))
    lines = [f"done: {len(tasks)} task{'s' if len(tasks) > 1 else ''} in {out}"]
    for label, items in rows:
        lines += [f"  {label if i == 0 else '':<24}{item}" for i, item in enumerate(items)]
    return "\n".join(lines + [f"next: python eval.py {shlex.quote(str(out))}   # reward matrix, forgetting, structure "
                               "drift, eval_grid.png"])


def save_task(pipe, out: Path, task: int, name: str, prompts: list[str], args: Args):
    """The model after this task, in OUT/task{task}_{name}/: one diffusers LoRA file (pytorch_lora_weights.safetensors)
    and samples.png, the first 4 prompts from fixed x_T without the LoRA adapters (base) and with them. Then the
    run's training curves so far, OUT/training_curves.png. Returns the samples grid (a PIL image)."""
    grid_prompts = prompts[:4]
    latents = initial_latents(pipe, len(grid_prompts), args.resolution, torch.Generator().manual_seed(args.seed))
    with adapters_disabled(pipe.unet):
        base = generate(pipe, grid_prompts, latents, args)
    images = torch.stack([base, generate(pipe, grid_prompts, latents, args)], dim=1)            # (4, 2, 3, H, W)
    titles = figures.model_titles(reward_names(args))
    grid = figures.image_grid(images, [titles[0], titles[task]], [f"{p}\nseed {args.seed}" for p in grid_prompts])
    with atomic_dir(out / f"task{task}_{name}") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=lora_state_dict(pipe.unet))
        grid.save(tmp / "samples.png")
    curves = figures.training_curves(figures.read_metrics(out / "metrics.jsonl"), args.grad_clip)
    atomic_write(out / "training_curves.png", lambda f: curves.savefig(f, format="png"))
    return grid


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and resuming. A kill at any moment (SIGKILL included) must leave every file either complete or absent,
# and --resume must continue exactly where the last checkpoint was taken: same tensors, same random streams.

def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temporary file next to `path`, flush it to disk, then rename it over `path`: the rename
    is atomic, so `path` always holds either the old or the new content. RID_TEST_PAUSE_BEFORE_RENAME (seconds) holds
    the finished temporary file back, so that a test can kill the process in the middle of a checkpoint write."""
    tmp = path.with_name(path.name + ".tmp")
    with failed_write(path, tmp):
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        time.sleep(float(os.environ.get("RID_TEST_PAUSE_BEFORE_RENAME", 0)))
        os.replace(tmp, path)


@contextlib.contextmanager
def failed_write(path: Path, tmp: Path | None = None):
    """Turn a failed write inside the block (a full disk, a quota, a read-only file system) into one WriteFailed
    naming `path`, and remove the partial temporary file or directory `tmp`. torch.save reports a full disk as a
    RuntimeError from its zip writer ("unexpected pos"), safetensors as a SafetensorError."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        reason = getattr(error, "strerror", None)
        if not reason:  # torch's and safetensors' writers wrap the system's error in their own words
            existing = next(p for p in [path, *path.parents] if p.exists())
            reason = f"{str(error).splitlines()[0]}; {shutil.disk_usage(existing).free / 2 ** 20:.1f} MiB free there"
        raise WriteFailed(f"cannot write {path} ({reason})") from None


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary sibling directory to fill; it takes the name `path` only once complete. A kill between
    removing an old `path` and the rename leaves no directory, never a half one; the checkpoint taken before it was
    written lets --resume write it again."""
    tmp = path.with_name(path.name + ".tmp")
    with failed_write(path, tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_file(file)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)


@dataclass
class Progress:
    """Run state beside the model and optimizer that a checkpoint must hold: the generator of prompts, noise and K,
    how many metric lines are written, the current streak of non-finite steps, and the last checkpoint taken."""
    out: Path
    generator: torch.Generator
    log: TextIO | None = None
    lines: int = 0
    bad_streak: int = 0
    saved_at: str = "none yet"

    def log_line(self, line: str) -> None:
        """Append one metrics line (only the main process has a log; every process counts)."""
        if self.log is not None:
            with failed_write(self.out / "metrics.jsonl"):
                self.log.write(line + "\n")
                self.log.flush()
        self.lines += 1


def save_checkpoint(unet, progress: Progress, task: int, step: int, scaler, optimizer=None, teacher=None) -> None:
    """Everything needed to continue at step `step` of task `task`. The global torch RNG state is included because
    the next task's LoRA initialisation draws from it; the fp16 grad scaler's state (its loss scale) because it
    carries over from task to task."""
    with failed_write(progress.out / "metrics.jsonl"):
        os.fsync(progress.log.fileno())  # the metric lines the checkpoint counts are on disk before it is
    state = {"task": task, "step": step, "adapters": list(unet.peft_config),
             "lora": {n: p.detach() for n, p in unet.named_parameters() if "lora_" in n},
             "optimizer": optimizer.state_dict() if optimizer is not None else None, "teacher": teacher,
             "scaler": scaler.state_dict(),
             "generator": progress.generator.get_state(), "torch_rng": torch.get_rng_state(),
             "metric_lines": progress.lines, "bad_streak": progress.bad_streak}
    atomic_write(progress.out / CHECKPOINT, lambda f: torch.save(state, f))
    progress.saved_at = f"task {task}, step {step}"


def load_checkpoint(out: Path) -> dict | None:
    """The run's last checkpoint, or None if it was killed before writing one (it then restarts from the top)."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as error:
        raise UsageError(f"--resume: {path} cannot be read ({error}); delete it to restart the run from its "
                         "beginning") from None
    missing = sorted(CHECKPOINT_KEYS - checkpoint.keys()) if isinstance(checkpoint, dict) else ["all"]
    if missing:
        raise UsageError(f"--resume: {path} is not a rid.py checkpoint (missing {', '.join(missing)}); delete it to "
                         "restart the run from its beginning")
    return checkpoint


CHECKPOINT_KEYS = {"task", "step", "adapters", "lora", "optimizer", "teacher", "generator", "torch_rng",
                   "metric_lines", "bad_streak"}


def lora_shapes(unet: UNet2DConditionModel, adapters: list[str], rank: int) -> dict[str, tuple[int, ...]]:
    """The name and shape of every LoRA tensor that add_task_adapter gives `unet` for these adapters: for each
    targeted Linear (in -> out), A (rank, in) and B (out, rank)."""
    shapes = {}
    for name, module in unet.named_modules():
        if name.endswith(tuple("." + t for t in LORA_TARGETS)):
            for adapter in adapters:
                shapes[f"{name}.lora_A.{adapter}.weight"] = (rank, module.in_features)
                shapes[f"{name}.lora_B.{adapter}.weight"] = (module.out_features, rank)
    return shapes


def check_checkpoint(checkpoint: dict, unet: UNet2DConditionModel, args: Args, path: Path) -> None:
    """The checkpoint belongs to this run: its task and step are in range and its LoRA tensors have the names and
    shapes this model and --lora-rank give (a checkpoint copied from a run with another rank does not)."""
    if not (1 <= checkpoint["task"] <= len(reward_names(args)) and 0 <= checkpoint["step"] <= args.steps_per_task):
        raise UsageError(f"--resume: {path} is at task {checkpoint['task']}, step {checkpoint['step']}, outside this "
                         "run's tasks and steps; delete it to restart the run from its beginning")
    expected = lora_shapes(unet, checkpoint["adapters"], args.lora_rank)
    found = {name: tuple(tensor.shape) for name, tensor in checkpoint["lora"].items()}
    wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
    if wrong:
        raise UsageError(f"--resume: {path} does not fit this model and --lora-rank {args.lora_rank} ({wrong[0]}: "
                         f"{found.get(wrong[0], 'missing')}, expected {expected.get(wrong[0], 'none')}); it comes from "
                         "another run: delete it to restart")


def restore(unet, args: Args, progress: Progress, checkpoint: dict, scaler) -> None:
    """Rebuild the checkpoint's adapters, copy its LoRA tensors in, and restore the random streams, counters and the
    grad scaler (checkpoints written before the scaler was saved have none: it then starts afresh)."""
    for name in checkpoint["adapters"]:
        add_task_adapter(unet, name, args.lora_rank)
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, tensor in checkpoint["lora"].items():
            params[name].copy_(tensor)
    torch.set_rng_state(checkpoint["torch_rng"])
    progress.generator.set_state(checkpoint["generator"])
    if checkpoint.get("scaler"):  # empty for a disabled (not fp16) scaler
        scaler.load_state_dict(checkpoint["scaler"])
    progress.lines, progress.bad_streak = checkpoint["metric_lines"], checkpoint["bad_streak"]
    progress.saved_at = f"task {checkpoint['task']}, step {checkpoint['step']}"


def keep_lines(path: Path, n: int) -> None:
    """Cut `path` back to its first n lines: the steps after the checkpoint are run, and logged, again."""
    with failed_write(path):
        lines = path.read_text().splitlines(keepends=True)[:n] if path.exists() else []
    atomic_write(path, lambda f: f.write("".join(lines).encode()))


def write_run_files(args: Args, out: Path, pipe, new: bool) -> None:
    """config.json for a new run, and for --tiny the base pipeline, so that diffusers and eval.py can load base + LoRA
    later. Main process only."""
    if new:
        with failed_write(out):
            out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", lambda f: f.write(json.dumps(dataclasses.asdict(args), indent=2).encode()))
    if args.tiny and not (out / "base").exists():
        with atomic_dir(out / "base") as tmp:
            pipe.save_pretrained(tmp)


def resume_hint(progress: Progress) -> str:
    if progress.saved_at == "none yet":
        return "no checkpoint was written yet; rerun the same command with --resume to start again"
    return f"the last checkpoint ({progress.saved_at}) is intact; rerun the same command with --resume to continue"


def main(args: Args) -> StableDiffusionPipeline | None:
    """Train the reward sequence, or continue it with --resume; returns the pipeline with the trained adapters (None
    if a resumed run was already complete). Runs as one process (`python rid.py`) or data parallel (`accelerate
    launch rid.py`); only the main process writes. Everything is checked before the first byte is written."""
    args = resolve(args)
    new = check_args(args)
    prompts = read_prompts(args.prompts)
    out = Path(args.out_dir)
    checkpoint = load_checkpoint(out) if args.resume else None
    if checkpoint is not None and checkpoint["task"] > len(reward_names(args)):
        print(f"{out}: all {len(reward_names(args))} tasks are done; nothing to do", file=sys.stderr)
        return None
    # cpu=True without a GPU too: Accelerate recognises several CPU processes (gloo) only when told to use the CPU.
    # Precision is ours, not Accelerate's (see low_precision and full_precision), and so is fp16's grad scaler: one
    # for the whole run, whatever optimizer each task has.
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), mixed_precision="no",
                              **tracker_options(args, out))
    check_world_size(accelerator.num_processes)
    scaler = torch.amp.GradScaler(accelerator.device.type, enabled=args.mixed_precision == "fp16")
    is_main = accelerator.is_main_process
    pipe = load_pipeline(args, accelerator.device)
    check_model_args(args, pipe)
    if checkpoint is not None:
        check_checkpoint(checkpoint, pipe.unet, args, out / CHECKPOINT)
    if is_main:
        warn_long_prompts(pipe.tokenizer, prompts)
    scorers = {name: load_reward(name, accelerator.device, args.tiny) for name in dict.fromkeys(reward_names(args))}
    pipe.scheduler.set_timesteps(args.num_steps, device=accelerator.device)
    accelerator.wait_for_everyone()  # every process has checked --out-dir before the main one writes to it
    signum = stop_requested(accelerator)
    if signum:  # SIGTERM or Ctrl-C while the models were built
        raise Interrupted(f"stopped by {signal.Signals(signum).name} before training; nothing was written", signum)
    if is_main:
        if args.resume and new:
            print(f"--resume: {out} holds no run yet; starting it", file=sys.stderr)
        write_run_files(args, out, pipe, new)
        print(f"effective batch: {args.batch_size} per process x {accelerator.num_processes} processes x "
              f"{args.grad_accum} accumulation = {args.batch_size * accelerator.num_processes * args.grad_accum}")

    torch.manual_seed(args.seed)  # LoRA initialisation: the same on every process
    progress = Progress(out, torch.Generator().manual_seed(args.seed))  # prompts, noise, K: the same on every process
    if checkpoint is not None:
        restore(pipe.unet, args, progress, checkpoint, scaler)
        accelerator.print(f"resuming {out} at {progress.saved_at}", file=sys.stderr)
    elif args.resume and not new:
        accelerator.print(f"resuming {out}: it stopped before its first checkpoint, so it restarts from the top",
                          file=sys.stderr)
    try:
        train(pipe, scorers, prompts, args, progress, accelerator, scaler, checkpoint)
    except WriteFailed as error:
        raise WriteFailed(f"{error}; {resume_hint(progress)}") from None
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(where_outputs_went(args, out))
    return pipe


def train(pipe, scorers, prompts, args: Args, progress: Progress, accelerator, scaler, checkpoint) -> None:
    """Every task from the checkpoint's on: train it, then write its outputs and a checkpoint at the next task."""
    if accelerator.is_main_process:
        keep_lines(progress.out / "metrics.jsonl", progress.lines)
    start_trackers(accelerator, args, progress.out, first_step=progress.lines + 1)
    first_task = checkpoint["task"] if checkpoint else 1
    log = open(progress.out / "metrics.jsonl", "a") if accelerator.is_main_process else contextlib.nullcontext()
    with log as progress.log:
        for task, name in enumerate(reward_names(args), start=1):
            if task < first_task:
                continue  # done: its outputs were written before the checkpoint that follows it
            params = task_adapter(pipe.unet, args, task)
            inside = checkpoint if checkpoint and checkpoint["task"] == task and checkpoint["step"] > 0 else None
            train_task(pipe, scorers[name], prompts, params, args, task, name, progress, accelerator, scaler, inside)
            if accelerator.is_main_process:
                grid = save_task(pipe, progress.out, task, name, prompts, args)
                log_image(accelerator, f"samples/task{task}_{name}", grid, step=progress.lines)
                save_checkpoint(pipe.unet, progress, task + 1, 0, scaler)  # the next task starts with a fresh optimizer


# ----------------------------------------------------------------------------------------------------------------
# The command line: one line on stderr and a documented exit status for every bad input and fault.

def launcher_processes() -> int | None:
    """The --num_processes that `accelerate launch` was given, read from the parent process's command line (its
    single-process launcher passes nothing on to the script), or None when not started by accelerate launch."""
    try:
        command = psutil.Process(os.getppid()).cmdline()
    except psutil.Error:
        return None
    if not any(Path(part).name.startswith("accelerate") for part in command[:2]) or "launch" not in command:
        return None
    for i, part in enumerate(command):
        option, _, value = part.partition("=")
        if option in ("--num_processes", "--num-processes"):
            value = value or (command[i + 1] if i + 1 < len(command) else "")
            return int(value) if value.isdigit() else None
    return None


def check_world_size(processes: int) -> None:
    asked = launcher_processes()
    if asked is not None and asked != processes:
        raise UsageError(f"accelerate launch was asked for {asked} processes but started {processes} (without "
                         "--multi_gpu it starts one; on CPU use `python -m torch.distributed.run --nproc_per_node "
                         f"{asked} rid.py ...`)")


class DropLibraryNoise(logging.Filter):
    """Library warnings that would repeat what warn_long_prompts says once per prompt (diffusers repeats a truncated
    prompt's tail on every encode). Installed on their loggers when rid is imported. (diffusers' "should be kept in
    float32: []" is avoided at its source instead, in load_pipeline.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("The following part of your input was truncated",
                                                   "Token indices sequence length is longer"))


for _logger in ("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion", "transformers.tokenization_utils_base"):
    logging.getLogger(_logger).addFilter(DropLibraryNoise())


def warn_long_prompts(tokenizer, prompts: list[str]) -> None:
    """One short warning per prompt longer than the text encoder reads (77 tokens for SD's CLIP)."""
    limit = tokenizer.model_max_length
    for prompt in prompts:
        tokens = len(tokenizer(prompt, verbose=False).input_ids)
        if tokens > limit:
            short = prompt if len(prompt) <= 40 else prompt[:40] + "..."
            print(f"warning: prompt {short!r} has {tokens} tokens; the text encoder reads the first {limit}",
                  file=sys.stderr)


# Set by the first SIGTERM or SIGINT: the training loop finishes its step, writes a checkpoint and stops.
STOP_REQUESTS: list[int] = []
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_gracefully():
    """Inside the block, SIGTERM (what SLURM, Kubernetes and spot instances send before killing) and SIGINT (Ctrl-C)
    are recorded in STOP_REQUESTS instead of killing the process; a second one aborts at once (KeyboardInterrupt)."""
    def request(signum, frame):
        if STOP_REQUESTS:
            raise KeyboardInterrupt
        STOP_REQUESTS.append(signum)

    STOP_REQUESTS.clear()
    previous = {signum: signal.signal(signum, request) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        STOP_REQUESTS.clear()


def stop_requested(accelerator) -> int | None:
    """The signal that asked to stop, on any process (all processes stop after the same step), or None."""
    signum = STOP_REQUESTS[0] if STOP_REQUESTS else 0
    if accelerator.num_processes > 1:
        signum = int(accelerator.reduce(torch.tensor([signum], device=accelerator.device), reduction="sum").max())
    return signum or None


def cli(argv: list[str]) -> int:
    """python rid.py FLAGS: 0 done, 2 bad input, 3 diverged, 74 a write failed, 130/143 interrupted (SIGINT/SIGTERM),
    each failure one line on stderr."""
    try:
        with stop_gracefully():
            main(parse_args(argv))
        return 0
    except (UsageError, MissingWeights, TrainingStopped, WriteFailed) as error:
        print(f"rid.py: error: {error}", file=sys.stderr)
        return EXIT_STATUS[type(error)]
    except Interrupted as error:
        print(f"rid.py: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        print("rid.py: aborted; rerun the same command with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
