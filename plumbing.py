"""Run plumbing for rid.py that teaches nothing about RID: bad input and exit statuses, the architectures built from
code, atomic writes, checkpoints and resuming, the run's log and counters, trackers, signals and process checks.

rid.py calls it at a few points: Run(...) before the models are built (the checkpoint to resume from, the
Accelerator), run.open(...) once they are (checks that need them, the run's files, restoring a checkpoint),
run.tasks() and run.steps(...) for the loops, run.after_step(...) after every optimizer step (metrics line,
trackers, summary line, bad-step streak, periodic checkpoint, stop request) and run.task_end(...) after each task
(its LoRA file and samples, the training curves, a checkpoint).
"""
import collections
import contextlib
import dataclasses
import fcntl
import importlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import diffusers
import numpy
import open_clip
import transformers
import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import figures
import toyworld
from cli import UsageError, flag
from rewards import REWARDS, MissingWeights, fetching, seeded

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
DEFAULT_PROMPTS = [
    "a photo of a cat", "a photo of a dog", "a horse in a field", "a red fox in the snow", "a lighthouse at dusk",
    "a bowl of ramen", "a bicycle leaning on a wall", "a portrait of an old fisherman", "a mountain lake at sunrise",
    "a city street in the rain", "a cup of coffee on a wooden table", "an owl on a branch", "a sailing boat at sea",
    "a vase of sunflowers", "a robot reading a book", "a castle on a hill", "a koala eating leaves",
    "a bridge over a river", "a plate of strawberries", "a desert with sand dunes",
]


# Fields that may change when a run is resumed: they do not change what is computed (cpu: not on a CPU run).
RESUME_MAY_DIFFER = ("resume", "out_dir", "log_every", "cpu", "checkpoint_every", "max_bad_steps", "checkpointing",
                     "report_to")
CHECKPOINT = "checkpoint.pt"
LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes into each task directory
KOHYA_FILE = "lora_kohya.safetensors"  # the same LoRA in kohya's format, for ComfyUI, A1111 / Forge and kohya's scripts


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


def reward_names(args) -> list[str]:
    return [name.strip() for name in args.rewards.split(",")]


def read_prompts(path: str | None, tiny: bool = False) -> list[str]:
    """One prompt a line from a UTF-8 text file; a binary or otherwise encoded file is refused, naming the byte.
    Without a file: DEFAULT_PROMPTS, or in tiny mode the captions of the toy world's seen combinations."""
    if path is None:
        return toyworld.world_prompts(toyworld.SEEN) if tiny else DEFAULT_PROMPTS
    if Path(path).is_dir():
        raise UsageError(f"--prompts {path}: is a directory; give a text file with one prompt a line")
    if Path(path).exists() and not Path(path).is_file():
        raise UsageError(f"--prompts {path}: not a regular file (a FIFO, socket or device, which would be read once or "
                         "block); give a text file with one prompt a line")
    if not Path(path).is_file():
        raise UsageError(f"--prompts {path}: no such file; give a text file with one prompt a line")
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"--prompts {path}: cannot be read ({error.strerror})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UsageError(f"--prompts {path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8, "
                         "e.g. `iconv -f utf-16 -t utf-8 FILE > FILE.utf8`")
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
    "lr": (lambda v: 0 < v <= 1, "in (0, 1] (AdamW's steps are about lr in size: beyond 1 a LoRA is destroyed)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "grad_clip": (lambda v: v > 0, "> 0 (a negative max norm flips the gradient, 0 trains nothing)"),
    "guidance_scale": (lambda v: 0 <= v <= 100, "in [0, 100] (SD is sampled at 3 to 15; beyond 100 every step "
                                                "overflows)"),
    "eta": (lambda v: 0 <= v <= 1, "in [0, 1] (0: deterministic DDIM, 1: DDPM's noise)"),
    "reward_scale": (lambda v: 0 < v <= 1e6, "in (0, 1e6] (0 trains nothing, a negative scale minimises the reward, "
                                             "beyond 1e6 the loss overflows fp16 and swamps distillation)"),
    "ema_decay": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lambda_out": (lambda v: v >= 0, ">= 0"),
    "lambda_feat": (lambda v: v >= 0, ">= 0"),
    "clora_weight": (lambda v: v >= 0, ">= 0"),
}


COUNT_LIMIT = 2 ** 31  # every count flag stays below it (torch's int32 indices, a step count a run can reach)


def check_numbers(args) -> None:
    """Integers positive and in range, floats finite and in their NUMBER_RANGES."""
    for name in ("steps_per_task", "num_steps", "batch_size", "grad_accum", "resolution", "lora_rank", "log_every",
                 "checkpoint_every", "max_bad_steps"):
        if not 0 < getattr(args, name) < COUNT_LIMIT:
            raise UsageError(f"{flag(name)} must be a positive integer below 2^31, got {getattr(args, name)}")
    if not 1 <= args.k <= args.num_steps:
        raise UsageError(f"--k must be between 1 and --num-steps ({args.num_steps}), got {args.k}")
    if not 0 <= args.seed < 2 ** 63:
        raise UsageError(f"--seed must be in [0, 2^63), got {args.seed}")
    for name, (within, condition) in NUMBER_RANGES.items():
        value = getattr(args, name)
        if not (math.isfinite(value) and within(value)):
            raise UsageError(f"{flag(name)} must be a finite number{' ' * bool(condition)}{condition}, got {value}")


def check_feat_layer_names(args) -> None:
    """Empty names ("", "mid_block,,") would name the whole UNet; the rest is checked on the model."""
    if any(not name.strip() for name in args.feat_layers.split(",")):
        raise UsageError(f"--feat-layers {args.feat_layers!r} holds an empty module name; give comma-separated UNet "
                         "module names, e.g. mid_block,up_blocks.0")


def check_model_path(args) -> None:
    """A --model that looks like a path (or exists) must be a diffusers pipeline directory: otherwise the hub client
    would call it an invalid repo id."""
    if args.random_weights:
        return
    path = Path(args.model).expanduser()
    looks_like_path = args.model.startswith(("/", ".", "~")) or args.model.count("/") > 1  # hub ids: "org/name"
    if not path.exists() and looks_like_path:
        raise UsageError(f"--model {args.model}: no such directory; give a diffusers pipeline directory (it holds "
                         "model_index.json) or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
    if path.exists() and not (path / "model_index.json").is_file():
        raise UsageError(f"--model {args.model}: not a diffusers pipeline directory (no model_index.json); give one, "
                         "e.g. toy/pipeline, or a hub id")
    if path.exists():
        try:
            index = json.loads((path / "model_index.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"--model {args.model}: its model_index.json cannot be read as JSON ({error}); restore the "
                             "directory (e.g. save_pretrained it again)") from None
        if not isinstance(index, dict) or "unet" not in index:
            raise UsageError(f"--model {args.model}: its model_index.json names no unet, so it is not a Stable "
                             "Diffusion pipeline; give one")


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


def check_name_lengths(path: Path, option: str) -> None:
    """Every component of `path`, and the longest name a run writes inside it, fit the file system's name limit
    (usually 255 bytes): otherwise the first write fails with ENAMETOOLONG deep inside a library."""
    parents = path.absolute().parents  # the path itself cannot be stat'ed if one of its names is too long
    limit = os.pathconf(next(p for p in parents if all(len(os.fsencode(q)) < 256 for q in p.parts) and p.exists()),
                        "PC_NAME_MAX")
    for part in path.parts:
        if len(os.fsencode(part)) + len(".tmp") > limit:
            raise UsageError(f"{option} {str(path)[:60]}...: the name {part[:20]}... is {len(os.fsencode(part))} "
                             f"bytes long, and this file system allows {limit} (with room for a .tmp suffix); "
                             "give a shorter path")


def check_out_dir(args) -> bool:
    """--out-dir is a writable directory that holds this run's config (with --resume) or no run output at all.
    Returns whether the run is new (no config.json yet): --resume then starts it, as a preemptible job expects."""
    if not args.out_dir.strip():
        raise UsageError("--out-dir is empty; give a directory path, e.g. runs/rid")
    out = Path(args.out_dir)
    check_name_lengths(out, "--out-dir")
    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out-dir {out} is a symbolic link to {os.readlink(out)}, which does not exist; create its "
                         "target or give another path")
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


def check_reward_names(names: list[str], option: str) -> None:
    """Every name is a reward of rewards.py; the message of the first unknown one lists the known ones."""
    unknown = [name for name in names if name not in REWARDS]
    if unknown:
        raise UsageError(f"{option}: unknown reward {unknown[0]!r}; known rewards: {', '.join(REWARDS)}")


def check_args(args) -> bool:
    """Reject bad input with a UsageError that says what is wrong and how to fix it; everything that can be checked
    without the model. Returns whether --out-dir holds no run yet."""
    if args.tiny and args.random_weights:
        raise UsageError("--tiny and --random-weights exclude each other: give one")
    check_reward_names(reward_names(args), "--rewards")
    check_numbers(args)
    if args.ema_decay == 0 and (args.lambda_out > 0 or args.lambda_feat > 0):
        raise UsageError("--ema-decay 0 makes the teacher a copy of the student, so both distillation losses are 0 "
                         "while the teacher still costs a forward; give a decay in (0, 1], or --lambda-out 0 "
                         "--lambda-feat 0 for no distillation")
    distilled = args.lambda_out > 0 or args.lambda_feat > 0
    if args.distill_at == "trajectory" and not distilled:
        raise UsageError("--distill-at trajectory says where the teacher is compared, but --lambda-out 0 "
                         "--lambda-feat 0 train without one; give a distillation weight, or drop --distill-at")
    if args.clora_weight > 0 and args.shared_adapter:
        raise UsageError("--clora-weight penalises a task's adapter where earlier tasks' adapters changed the "
                         "weights, and --shared-adapter has one adapter for all tasks; drop one of them")
    check_feat_layer_names(args)
    check_trackers(args)
    check_model_path(args)
    return check_out_dir(args)


def read_config(path: Path, cls) -> dict:
    """A run's config.json as a dict of the fields of dataclass `cls` (rid.Args); a damaged one, or one from
    elsewhere, is one line."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} cannot be read as JSON ({error}); it is damaged: restore it, or start a new run in "
                         "another directory") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(config, dict) or not config.keys() <= fields | {RUN_ID}:
        extra = sorted(config.keys() - fields - {RUN_ID}) if isinstance(config, dict) else type(config).__name__
        raise UsageError(f"{path} is not a rid.py config (unexpected {extra}); give a run directory written by rid.py")
    return {key: value for key, value in config.items() if key != RUN_ID}


def check_resume_config(args, out: Path) -> None:
    """--resume continues a run only with the configuration it was started with (up to RESUME_MAY_DIFFER)."""
    saved, now = read_config(out / "config.json", type(args)), dataclasses.asdict(args)
    differing = [key for key in sorted(saved.keys() | now.keys())
                 if key not in RESUME_MAY_DIFFER and saved.get(key) != now.get(key)]
    if differing:
        changes = ", ".join(f"{flag(key)} ({saved.get(key)!r} -> {now.get(key)!r})" for key in differing)
        raise UsageError(f"--resume: the run in {out} was started with another configuration: {changes}; rerun with "
                         "its flags (see config.json) or choose another --out-dir")


# ----------------------------------------------------------------------------------------------------------------
# Models: Stable Diffusion from the hub, or the same classes with random weights, at tiny sizes or at SD1.5's.

def clip_tokenizer(tmp_dir: str, model_max_length: int = 77) -> CLIPTokenizer:
    """Stable Diffusion's CLIP tokenizer, rebuilt from the BPE vocabulary that ships inside open_clip (no download).
    Gives the same token ids as SD1.5's own tokenizer; only the special tokens are spelt differently there."""
    bpe = open_clip.get_tokenizer("ViT-L-14")
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    Path(tmp_dir, "vocab.json").write_text(json.dumps({special.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    Path(tmp_dir, "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(f"{tmp_dir}/vocab.json", f"{tmp_dir}/merges.txt", model_max_length=model_max_length)


# SD1.5's own unet/, vae/ and text_encoder/ config.json (sizes and layer types; the keys not given here are the classes'
# defaults, which equal SD1.5's), for --random-weights, in the order the models are built (the order fixes which
# random weights each model gets).
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
    """SD1.5's classes built from `configs` (SD15_ARCHITECTURE) with random weights, seeded so that every run gets the
    same base; SD's tokenizer and noise schedule. Nothing is downloaded."""
    with seeded(0), tempfile.TemporaryDirectory() as tmp:
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(vae, text_encoder, clip_tokenizer(tmp), unet, scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


# What StableDiffusionPipeline.from_pretrained(..., safety_checker=None) reads from a diffusers repo: the configs, the
# tokenizer, the feature extractor's config and the fp32 safetensors weights (about 4.3 GB for SD1.5). A plain
# `hf download` of the SD1.5 repo also fetches its single-file checkpoints, .bin, fp16 and non-EMA variants and the
# safety checker: tens of GB.
PIPELINE_FILES = ("model_index.json", "scheduler/*", "tokenizer/*", "feature_extractor/*", "text_encoder/config.json",
                  "text_encoder/model.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                  "vae/config.json", "vae/diffusion_pytorch_model.safetensors")


def pipeline_download(model: str) -> str:
    """The command that fetches only PIPELINE_FILES of hub repo `model`."""
    return f"hf download {model} " + " ".join(f"--include {shlex.quote(pattern)}" for pattern in PIPELINE_FILES)


WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_pipeline(args, device: torch.device) -> StableDiffusionPipeline:
    """The frozen base model with a DDIM scheduler, the same object in every mode: --model (SD1.5 from the hub, or the
    toy world's pipeline folder in tiny mode) read by diffusers, or SD1.5's architecture built with random weights.
    The VAE and the text encoder are in --mixed-precision's dtype; the UNet stays fp32, since its K gradient steps and
    the teacher run in fp32 (its sampling steps without gradients run in the low dtype under autocast, see
    rid.low_precision). Weights are read as fp32 whatever dtype they are stored in (the toy world's are fp16)."""
    if args.random_weights:
        pipe = random_pipeline(SD15_ARCHITECTURE)  # fp32: the same weights in every precision
    else:
        diffusers.utils.logging.disable_progress_bar()  # the libraries' loading bars: a run shows its own progress
        transformers.utils.logging.disable_progress_bar()
        with fetching(f"--model {args.model}", f"pre-download it on a machine with network access with "
                      f"`{pipeline_download(args.model)}`, or pass a local diffusers directory with --model PATH"):
            pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32, safety_checker=None,
                                                           requires_safety_checker=False)
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


def check_model_args(args, pipe: StableDiffusionPipeline) -> None:
    """Checks that need the model: the distilled layers exist and see the LoRA, the latent fits the UNet's
    downsampling, the rank and T fit the model, and the activations of --resolution x --batch-size can fit in
    memory."""
    names = {name for name, _ in pipe.unet.named_modules()}
    for layer in args.feat_layers.split(","):
        if layer not in names:
            raise UsageError(f"--feat-layers: the UNet has no module {layer!r}; try mid_block, up_blocks.0, ...")
    if args.lambda_feat > 0:
        check_feat_layers_see_lora(pipe.unet, args.feat_layers.split(","))
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if args.resolution % multiple:
        raise UsageError(f"--resolution must be a multiple of {multiple} for this model, got {args.resolution}")
    widths = [min(m.in_features, m.out_features) for name, m in pipe.unet.named_modules()
              if name.endswith(tuple("." + t for t in LORA_TARGETS))]
    if args.lora_rank > min(widths):
        raise UsageError(f"--lora-rank {args.lora_rank} exceeds the narrowest LoRA layer of this UNet ({min(widths)} "
                         "features), where a rank cannot be more than full; give at most that")
    if args.num_steps > pipe.scheduler.config.num_train_timesteps:
        raise UsageError(f"--num-steps {args.num_steps} exceeds the {pipe.scheduler.config.num_train_timesteps} "
                         "timesteps the model was trained with; give at most that (SD is sampled with 20 to 50)")
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


# The VAE decoder's last block works at full resolution with block_out_channels[0] channels; decoding one image with
# gradients holds at least this many such (C0, H, W) tensors at its peak. Measured on CPU (VmHWM over one tiny RID
# step, checkpointing on, after a warm-up step, when the batch was decoded as one): 73 per image at 128 px batch 4 and
# at 256 px batch 2. 8 keeps the check a lower bound: it refuses only sizes that cannot fit, and leaves the rest to
# the allocator.
DECODER_FULL_RES_TENSORS = 8


def check_memory(args, pipe: StableDiffusionPipeline) -> None:
    """Refuse a --resolution x --batch-size whose activations cannot fit in the device's memory, before allocating
    them: the decoder's full-resolution activations, (C0, H, W) each, of the images decoded at once (one with
    checkpointing, rid.decode_with_grad; the batch without), against the GPU's or the machine's memory."""
    element = torch.finfo(pipe.vae.dtype).bits // 8
    at_once = 1 if args.checkpointing else args.batch_size
    need = DECODER_FULL_RES_TENSORS * at_once * pipe.vae.config.block_out_channels[0] * args.resolution ** 2 * element
    device = pipe.device
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else psutil.virtual_memory().total)
    if need > total:
        batch = "" if args.checkpointing else f" with --batch-size {args.batch_size} and --no-checkpointing"
        raise UsageError(f"--resolution {args.resolution}{batch} needs more than {need / 2 ** 30:.0f} GiB for the VAE "
                         f"decoder alone, and this {device.type} has {total / 2 ** 30:.0f} GiB; lower them "
                         "(--grad-accum keeps the effective batch)")



# ----------------------------------------------------------------------------------------------------------------
# Data parallel: the LoRA gradients, the step's metrics and DDIM's noise across processes.

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
    accumulation samples), loss terms (every "loss..." key: the total, its terms and each feature layer's) averaged, K
    averaged over the micro-batches."""
    rewards = accelerator.gather(torch.cat([m["rewards"] for m in micro_batches]))
    names = [name for name in micro_batches[0] if name.startswith("loss")]
    terms = torch.stack([torch.stack([m[name] for name in names]) for m in micro_batches]).mean(0)  # (terms,)
    terms = accelerator.reduce(terms, reduction="mean")
    return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            **dict(zip(names, terms.tolist())), "k": sum(m["k"] for m in micro_batches) / len(micro_batches)}


def variance_noise(x: torch.Tensor, generator: torch.Generator, process: tuple[int, int]) -> torch.Tensor:
    """DDIM's noise for eta > 0, (B,4,h,w) like x: drawn for the global batch of B x processes from the shared
    generator (on the CPU, as x_T) and sliced as draw_batch slices x_T, so that N processes x B draw what one
    process x N*B would, not N copies of the same noise."""
    index, count = process
    n = x.shape[0]
    noise = torch.randn((n * count, *x.shape[1:]), generator=generator)
    return noise[index * n:(index + 1) * n].to(x.device, x.dtype)


def is_finite(*values: float) -> bool:
    """Whether every value is finite: a step with a NaN or inf loss or gradient norm is skipped."""
    return all(math.isfinite(value) for value in values)


# ----------------------------------------------------------------------------------------------------------------
# Speed: the UNet without its adapters, and the fast path for the sampling steps without gradients
# (rid.sample_latents), which folds the LoRA into the weights so that no-grad calls cost what the base model's do.

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
        for p, was_trainable in zip(lora, trainable):
            p.requires_grad_(was_trainable)


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


# ----------------------------------------------------------------------------------------------------------------
# What a user sees while and after a run: the summary line, the trackers (TensorBoard, W&B), the list of outputs.

def summary(metrics: dict, args, recent_rewards: list[float]) -> str:
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


def check_trackers(args) -> None:
    """--report-to's packages can be imported: a missing one is bad input, refused before anything is written."""
    for name in TRACKERS[args.report_to]:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UsageError(f"--report-to {args.report_to}: the {name} package is not installed; `pip install "
                             f"{name}`, or choose another --report-to") from None


def tracker_options(args, out: Path) -> dict:
    """Accelerator(**...) keywords: the trackers of --report-to, logging under OUT/logs."""
    return dict(log_with=TRACKERS[args.report_to] or None,  # [] would warn that no tracker is installed
                project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / LOGS)))


def start_trackers(accelerator: Accelerator, args, out: Path, first_step: int) -> None:
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


def where_outputs_went(args, out: Path) -> str:
    """What a finished run printed last: where each output is, and the command to run next."""
    tasks = [out / f"task{i}_{name}" for i, name in enumerate(reward_names(args), start=1)]
    rows = [("LoRA after each task", [task / LORA_FILE for task in tasks]),
            ("the same, kohya format", [task / KOHYA_FILE for task in tasks]),
            ("sample grids", [task / "samples.png" for task in tasks]),
            ("metrics, a line a step", [out / "metrics.jsonl"]), ("training curves", [out / "training_curves.png"]),
            ("config, checkpoint", [out / "config.json", out / CHECKPOINT])]
    if "tensorboard" in TRACKERS[args.report_to]:
        rows.append(("TensorBoard", [f"tensorboard --logdir {shlex.quote(str(out / LOGS))}"]))
    if "wandb" in TRACKERS[args.report_to]:
        rows.append(("W&B local files", [out / LOGS / "wandb"]))
    lines = [f"done: {len(tasks)} task{'s' if len(tasks) > 1 else ''} in {out}"]
    for label, items in rows:
        lines += [f"  {label if i == 0 else '':<24}{item}" for i, item in enumerate(items)]
    return "\n".join(lines + [f"next: python eval.py {shlex.quote(str(out))}   # reward matrix, forgetting, structure "
                               "drift, eval_grid.png"])

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
        # Measured before the partial file is removed: how much was written, and what was free when the write failed
        written = (sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else tmp.stat().st_size
                   ) if tmp is not None and tmp.exists() else 0
        existing = next(p for p in [path, *path.parents] if p.exists())
        free = shutil.disk_usage(existing).free
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]  # torch/safetensors wrap the error
        space = f"{free / 2 ** 20:.1f} MiB were free there when {written / 2 ** 20:.1f} MiB of it had been written"
        raise WriteFailed(f"cannot write {path} ({reason}; {space})") from None


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


LOCK = ".rid.lock"  # OUT's lock file: holds the PID of the run writing OUT


def lock_run_dir(out: Path) -> TextIO:
    """One writer per run directory: an exclusive flock on OUT/.rid.lock, held while the returned file stays open
    and released by the OS when the process ends (kill -9 included, so no lock outlives its run). The holder writes its
    PID into it; a second run, or a --resume while the first runs, is refused naming that PID."""
    with failed_write(out / LOCK):
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise UsageError(f"--out-dir {out} is being written by another rid.py run (PID {holder}); wait for it to end, "
                         "or choose another directory") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


@dataclass
class Progress:
    """Run state beside the model and optimizer that a checkpoint must hold: the run's id (config.json's), the generator
    of prompts, noise and K, how many metric lines are written, the current streak of non-finite steps, the current
    task's taken and skipped steps, and the last checkpoint taken."""
    out: Path
    generator: torch.Generator
    run_id: str | None = None
    log: TextIO | None = None
    lines: int = 0
    bad_streak: int = 0
    taken: int = 0
    skipped: int = 0
    spread: float = 1.0
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
             "metric_lines": progress.lines, "bad_streak": progress.bad_streak, "run_id": progress.run_id,
             "task_steps": (progress.taken, progress.skipped), "reward_spread": progress.spread}
    atomic_write(progress.out / CHECKPOINT, lambda f: torch.save(state, f))
    progress.saved_at = f"task {task}, step {step}"


def load_checkpoint(out: Path) -> dict | None:
    """The run's last checkpoint, or None if it was killed before writing one (it then restarts from the top)."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    if path.stat().st_size == 0:
        raise UsageError(f"--resume: {path} is empty (0 bytes); delete it to restart the run from its beginning")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (unpickling arbitrary bytes can raise nearly anything)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UsageError(f"--resume: {path} cannot be read as a torch checkpoint ({reason}); delete it to restart the "
                         "run from its beginning") from None
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


def check_checkpoint(checkpoint: dict, unet: UNet2DConditionModel, args, path: Path) -> None:
    """The checkpoint belongs to this run: it carries the run id of the run's config.json, its task and step are in
    range, every task before its task has its directory (written before the checkpoint that follows it), and its
    LoRA tensors have the names and shapes this model and --lora-rank give."""
    run_id = read_run_id(path.parent)
    if checkpoint.get("run_id") != run_id:
        raise UsageError(f"--resume: {path} belongs to another run (run id {checkpoint.get('run_id')}, this run's "
                         f"config.json says {run_id}); delete it to restart this run from its beginning")
    if not (1 <= checkpoint["task"] <= len(reward_names(args)) and 0 <= checkpoint["step"] <= args.steps_per_task):
        raise UsageError(f"--resume: {path} is at task {checkpoint['task']}, step {checkpoint['step']}, outside this "
                         "run's tasks and steps; delete it to restart the run from its beginning")
    for task, name in list(enumerate(reward_names(args), start=1))[:checkpoint["task"] - 1]:
        if not (path.parent / f"task{task}_{name}" / LORA_FILE).is_file():
            raise UsageError(f"--resume: {path} is at task {checkpoint['task']}, but task{task}_{name}/{LORA_FILE}, "
                             "which that implies, is missing; delete the checkpoint to restart the run from its "
                             "beginning")
    expected = lora_shapes(unet, checkpoint["adapters"], args.lora_rank)
    found = {name: tuple(tensor.shape) for name, tensor in checkpoint["lora"].items()}
    wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
    if wrong:
        raise UsageError(f"--resume: {path} does not fit this model and --lora-rank {args.lora_rank} ({wrong[0]}: "
                         f"{found.get(wrong[0], 'missing')}, expected {expected.get(wrong[0], 'none')}); it comes from "
                         "another run: delete it to restart")


def restore(unet, args, progress: Progress, checkpoint: dict, scaler, add_adapter) -> None:
    """Rebuild the checkpoint's adapters (add_adapter: rid.add_task_adapter), copy its LoRA tensors in, and restore
    the random streams, counters and the grad scaler (checkpoints written before the scaler was saved have none: it
    then starts afresh)."""
    for name in checkpoint["adapters"]:
        add_adapter(unet, name, args.lora_rank)
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, tensor in checkpoint["lora"].items():
            params[name].copy_(tensor)
    torch.set_rng_state(checkpoint["torch_rng"])
    progress.generator.set_state(checkpoint["generator"])
    if checkpoint.get("scaler"):  # empty for a disabled (not fp16) scaler
        scaler.load_state_dict(checkpoint["scaler"])
    progress.lines, progress.bad_streak = checkpoint["metric_lines"], checkpoint["bad_streak"]
    progress.taken, progress.skipped = checkpoint.get("task_steps", (0, 0))
    progress.saved_at = f"task {checkpoint['task']}, step {checkpoint['step']}"


def resume_task(resume: dict, params: dict[str, torch.nn.Parameter], optimizer) -> tuple[int, dict | None]:
    """The step and EMA teacher of a checkpoint taken inside a task, with its AdamW state loaded into `optimizer`.
    Checkpoints are loaded onto the CPU: the teacher moves to its LoRA tensors' devices (functional_call and the EMA
    update use them together), and torch's load_state_dict moves AdamW's state to its parameters' devices."""
    optimizer.load_state_dict(resume["optimizer"])
    teacher = resume["teacher"]
    if teacher is not None:
        teacher = {n: t.to(params[n].device) for n, t in teacher.items()}
    return resume["step"], teacher


def keep_lines(path: Path, n: int) -> int:
    """Cut `path` back to its first n lines, the ones the checkpoint counts: the steps after it are run, and logged,
    again. Only whole lines are kept (ending in a newline and holding a JSON object), up to the first damaged one, so a
    line cut by a crash is dropped rather than glued to the next record. Returns how many were kept: fewer than n
    when the log was damaged or deleted."""
    with failed_write(path):
        data = path.read_bytes() if path.exists() else b""
    lines = []
    for line in data.split(b"\n")[:-1][:n]:  # what follows the last newline is a partial line
        if not is_metrics_line(line):
            break
        lines.append(line + b"\n")
    atomic_write(path, lambda f: f.write(b"".join(lines)))
    return len(lines)


def is_metrics_line(line: bytes | str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def write_lora(directory: Path, lora: dict[str, torch.Tensor]) -> None:
    """A task's LoRA (PEFT's key names, rid.lora_state_dict) twice: in diffusers' format (LORA_FILE, for
    pipe.load_lora_weights) and in kohya's (KOHYA_FILE: lora_unet_... keys, lora_down/lora_up, an alpha per layer
    equal to its rank, so scale 1), which ComfyUI, A1111 / Forge and diffusers itself load."""
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=convert_state_dict_to_diffusers(lora))
    save_file(convert_state_dict_to_kohya({f"unet.{key}": value for key, value in lora.items()}),
              directory / KOHYA_FILE)


def write_run_files(args, out: Path, new: bool) -> str | None:
    """config.json for a new run (main process only), with a fresh run id that binds every checkpoint to the run:
    eval.py rebuilds the run's arguments, and so its base model (--model), from it. Returns the run's id."""
    if not new:
        return read_run_id(out)
    run_id = uuid.uuid4().hex
    config = {**dataclasses.asdict(args), RUN_ID: run_id}
    atomic_write(out / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
    return run_id


RUN_ID = "run_id"  # config.json's key beside rid.Args' fields


def read_run_id(out: Path) -> str | None:
    """The run id in OUT/config.json (None for runs written before run ids existed, and for a damaged file)."""
    try:
        return json.loads((out / "config.json").read_text()).get(RUN_ID)
    except (OSError, ValueError, AttributeError):
        return None


def resume_hint(progress: Progress) -> str:
    if progress.saved_at == "none yet":
        return "no checkpoint was written yet; rerun the same command with --resume to start again"
    return f"the last checkpoint ({progress.saved_at}) is intact; rerun the same command with --resume to continue"

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
    prompt's tail on every encode). Installed on their loggers when plumbing is imported. (diffusers' "should be kept in
    float32: []" is avoided at its source instead, in load_pipeline.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("The following part of your input was truncated",
                                                   "Token indices sequence length is longer"))


for _logger in ("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
                "transformers.tokenization_utils_base"):
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


def exit_status(program: str, run) -> int:
    """Call run() with SIGTERM and SIGINT stopping it gracefully; returns the exit status: 0 done, 2 bad input,
    3 diverged, 74 a write failed, 130/143 interrupted (SIGINT/SIGTERM), each failure one line on stderr."""
    try:
        with stop_gracefully():
            run()
        return 0
    except (UsageError, MissingWeights, TrainingStopped, WriteFailed) as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return EXIT_STATUS[type(error)]
    except Interrupted as error:
        print(f"{program}: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        print(f"{program}: aborted; rerun the same command with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------------------------------------------
# The run: what rid.py's loop calls at a few points.

class Run:
    """The bookkeeping of one run around rid.py's loop: the checkpoint it resumes from, the Accelerator and the fp16
    grad scaler (one for the whole run, whatever optimizer each task has), the run's files, Progress (its log and
    counters), the progress bar, trackers, checkpoints and stop requests. Only the main process writes."""

    def __init__(self, args, new: bool):
        """Before the models are built: `new` says --out-dir holds no run yet (check_args). A --resume of a complete
        run sets self.finished and builds nothing."""
        self.args, self.new, self.out = args, new, Path(args.out_dir)
        self.checkpoint = load_checkpoint(self.out) if args.resume else None
        self.finished = self.checkpoint is not None and self.checkpoint["task"] > len(reward_names(args))
        if self.finished:
            print(f"{self.out}: all {len(reward_names(args))} tasks are done; nothing to do", file=sys.stderr)
            return
        # cpu=True without a GPU too: Accelerate recognises several CPU processes (gloo) only when told to use the
        # CPU. Precision is rid.py's, not Accelerate's (rid.low_precision, rid.full_precision), and so is the scaler.
        self.accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), mixed_precision="no",
                                       **tracker_options(args, self.out))
        check_world_size(self.accelerator.num_processes)
        self.scaler = torch.amp.GradScaler(self.accelerator.device.type, enabled=args.mixed_precision == "fp16")
        self.is_main = self.accelerator.is_main_process

    def open(self, pipe, prompts: list[str], add_adapter) -> None:
        """Once the models are built and torch is seeded: the checks that need the model, then (main process)
        config.json and a tiny run's base/, then the checkpoint's state restored (add_adapter: rid.add_task_adapter)."""
        self.unet = pipe.unet
        if self.checkpoint is not None:
            check_checkpoint(self.checkpoint, pipe.unet, self.args, self.out / CHECKPOINT)
        if self.is_main:
            warn_long_prompts(pipe.tokenizer, prompts)
        self.accelerator.wait_for_everyone()  # every process has checked --out-dir before the main one writes to it
        signum = stop_requested(self.accelerator)
        if signum:  # SIGTERM or Ctrl-C while the models were built
            raise Interrupted(f"stopped by {signal.Signals(signum).name} before training; nothing was written", signum)
        self.lock = self.take_lock()
        run_id = self.write_files() if self.is_main else None
        self.progress = Progress(self.out, torch.Generator().manual_seed(self.args.seed), run_id)  # same everywhere
        if self.checkpoint is not None:
            restore(pipe.unet, self.args, self.progress, self.checkpoint, self.scaler, add_adapter)
            self.accelerator.print(f"resuming {self.out} at {self.progress.saved_at}", file=sys.stderr)
        elif self.args.resume and not self.new:
            self.accelerator.print(f"resuming {self.out}: it stopped before its first checkpoint, so it restarts from "
                                   "the top", file=sys.stderr)

    def take_lock(self) -> TextIO | None:
        """The main process locks OUT (lock_run_dir) and checks again, under the lock, that a new run's OUT is still
        free (another run may have written it while the models were built); every process stops if it cannot."""
        lock, refused = None, None
        if self.is_main:
            try:
                lock = lock_run_dir(self.out)
                if self.new and (self.out / "config.json").exists():
                    raise UsageError(f"--out-dir {self.out} was taken by another run while the models were built; "
                                     "choose another directory")
            except UsageError as error:
                refused = error
        failed = self.accelerator.reduce(torch.tensor([float(refused is not None)], device=self.accelerator.device),
                                         reduction="sum").item() if self.accelerator.num_processes > 1 else bool(refused)
        if refused is not None:
            raise refused
        if failed:
            raise UsageError(f"--out-dir {self.out}: the main process could not take the run directory (see its "
                             "message)")
        return lock

    def write_files(self) -> str | None:
        args = self.args
        if args.resume and self.new:
            print(f"--resume: {self.out} holds no run yet; starting it", file=sys.stderr)
        run_id = write_run_files(args, self.out, self.new)
        processes = self.accelerator.num_processes
        print(f"effective batch: {args.batch_size} per process x {processes} processes x {args.grad_accum} "
              f"accumulation = {args.batch_size * processes * args.grad_accum}")
        return run_id

    @property
    def generator(self) -> torch.Generator:
        """The generator of prompts, noise and K: the same on every process, and in every checkpoint."""
        return self.progress.generator

    @contextlib.contextmanager
    def training(self):
        """Around the task loop: metrics.jsonl cut back to the checkpoint's lines and open, the trackers started; a
        failed write says how to resume; at the end, where every output went."""
        try:
            if self.is_main:
                self.recover_log()
            start_trackers(self.accelerator, self.args, self.out, first_step=self.progress.lines + 1)
            log = open(self.out / "metrics.jsonl", "a") if self.is_main else contextlib.nullcontext()
            with log as self.progress.log:
                yield
        except WriteFailed as error:
            raise WriteFailed(f"{error}; {resume_hint(self.progress)}") from None
        finally:
            if self.lock is not None:
                self.lock.close()  # releases OUT's flock (the OS would at exit; tests run several runs in one process)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        self.accelerator.print(where_outputs_went(self.args, self.out))

    def recover_log(self) -> None:
        """metrics.jsonl cut back to the checkpoint's lines; if fewer survive (a damaged or deleted log), one line
        says what is lost, and the log goes on from what is there: training itself is intact in the checkpoint."""
        path, counted = self.out / "metrics.jsonl", self.progress.lines
        kept = keep_lines(path, counted)
        if kept < counted:
            print(f"warning: {path} holds {kept} of the {counted} lines the checkpoint counts (damaged or deleted); "
                  f"the metrics of steps {kept + 1}-{counted} are lost, the training state is intact", file=sys.stderr)
            self.progress.lines = kept

    def tasks(self) -> list[tuple[int, str]]:
        """(task, reward name) from the checkpoint's task on: earlier tasks are done (their outputs were written before
        the checkpoint that follows them)."""
        first = self.checkpoint["task"] if self.checkpoint else 1
        return [(task, name) for task, name in enumerate(reward_names(self.args), start=1) if task >= first]

    def start_task(self, task: int, name: str, params, optimizer, teacher, spread):
        """The first step, the teacher and the reward's spread of this task: 0, `teacher` and spread(), unless the
        checkpoint was taken inside it: then its step, teacher and spread, with its AdamW state loaded into
        `optimizer` (the spread is measured on the model at the task's start, which a resumed task no longer has)."""
        self.task, self.name, self.optimizer = task, name, optimizer
        first = 0
        if self.checkpoint is not None and self.checkpoint["task"] == task and self.checkpoint["step"] > 0:
            first, teacher = resume_task(self.checkpoint, params, optimizer)
            self.progress.spread = self.checkpoint.get("reward_spread", 1.0)
        else:
            self.progress.taken = self.progress.skipped = 0
            self.progress.spread = spread()
        self.teacher = teacher
        return first, teacher, self.progress.spread

    def steps(self, first: int):
        """The task's steps from `first` on, under a progress bar; each one timed for its metrics line."""
        self.bar = tqdm(range(first, self.args.steps_per_task), desc=f"task {self.task} ({self.name})", initial=first,
                        total=self.args.steps_per_task, dynamic_ncols=True, disable=not self.is_main)
        self.recent_rewards = collections.deque(maxlen=self.args.log_every)  # rewards of the last --log-every steps
        for self.step in self.bar:
            self.started = time.perf_counter()
            yield self.step
        self.check_learned()

    def check_learned(self) -> None:
        """A task whose steps were mostly skipped (non-finite loss or gradient each time, yet never --max-bad-steps in
        a row) learned nothing worth saving: it stops as a diverged run does, before its LoRA is written."""
        progress = self.progress
        if progress.skipped > progress.taken:
            raise TrainingStopped(f"task {self.task} ({self.name}): {progress.skipped} of its "
                                  f"{progress.skipped + progress.taken} steps had a non-finite loss or gradient and were "
                                  "skipped, so it learned next to nothing; stopped without saving it (lower --lr, "
                                  "--reward-scale or --guidance-scale)")

    def after_step(self, metrics: dict) -> None:
        """After each optimizer step: the bad-step streak, the metrics line (metrics.jsonl and the trackers), the
        summary line every --log-every steps, a checkpoint every --checkpoint-every steps, and a stop request."""
        args, progress, step = self.args, self.progress, self.step
        self.count_bad_step(metrics)
        metrics = {"task": self.task, "reward": self.name, "step": step, "lr": self.optimizer.param_groups[0]["lr"],
                   "reward_spread": progress.spread, **metrics, "seconds": time.perf_counter() - self.started}
        progress.log_line(json.dumps(metrics))
        self.accelerator.log(tracker_metrics(metrics), step=progress.lines)  # the global step, as in the curves
        self.recent_rewards.append(metrics["reward_mean"])
        self.bar.set_postfix(reward=f"{metrics['reward_mean']:.4g}")
        if progress.bad_streak >= args.max_bad_steps:
            last = (f"the last good checkpoint ({progress.saved_at}) is intact in {progress.out / CHECKPOINT}"
                    if progress.saved_at != "none yet" else "no checkpoint was written yet")
            raise TrainingStopped(f"task {self.task} step {step}: {progress.bad_streak} steps in a row had a "
                                  f"non-finite loss or gradient (--max-bad-steps {args.max_bad_steps}); stopped; "
                                  f"{last}")
        if (step + 1) % args.checkpoint_every == 0 and self.is_main:
            self.checkpoint_at(self.task, step + 1)
        if self.is_main and ((step + 1) % args.log_every == 0 or step + 1 == args.steps_per_task):
            self.bar.write(summary(metrics, args, list(self.recent_rewards)))
        self.stop_if_requested()

    def count_bad_step(self, metrics: dict) -> None:
        """A skipped step (non-finite loss or gradient) extends the streak and is warned about; a taken one ends it."""
        if not metrics["skipped"]:
            self.progress.bad_streak = 0
            self.progress.taken += 1
            return
        self.progress.bad_streak += 1
        self.progress.skipped += 1
        if self.is_main:
            tqdm.write(f"warning: task {self.task} step {self.step}: loss {metrics['loss']}, gradient norm "
                       f"{metrics['grad_norm']}; update skipped ({self.progress.bad_streak} in a row)", file=sys.stderr)

    def stop_if_requested(self) -> None:
        """After a complete step, a SIGTERM or SIGINT checkpoints it, so that --resume continues exactly here."""
        signum = stop_requested(self.accelerator)
        if signum:
            if self.is_main:
                self.checkpoint_at(self.task, self.step + 1)
            raise Interrupted(f"stopped by {signal.Signals(signum).name} after task {self.task}, step {self.step + 1}, "
                              f"checkpointed; rerun the same command with --resume to continue", signum)

    def checkpoint_at(self, task: int, step: int, inside_task: bool = True) -> None:
        """save_checkpoint at this point; inside a task with its optimizer and teacher, at a task's start without."""
        save_checkpoint(self.unet, self.progress, task, step, self.scaler, self.optimizer if inside_task else None,
                        self.teacher if inside_task else None)

    def task_end(self, images: torch.Tensor, prompts: list[str], lora: dict) -> None:
        """After each task (main process): OUT/task{n}_{reward}/ with the LoRA file and samples.png (images
        (n, 2, 3, H, W): prompts without and with the adapters), the training curves so far, the grid to the
        trackers, and a checkpoint at the next task's start (which gets a fresh optimizer)."""
        args, out, task = self.args, self.out, self.task
        titles = figures.model_titles(reward_names(args))
        grid = figures.image_grid(images, [titles[0], titles[task]], [f"{p}\nseed {args.seed}" for p in prompts])
        with atomic_dir(out / f"task{task}_{self.name}") as tmp:
            write_lora(tmp, lora)
            grid.save(tmp / "samples.png")
        curves = figures.training_curves(figures.read_metrics(out / "metrics.jsonl"), args.grad_clip)
        atomic_write(out / "training_curves.png", lambda f: curves.savefig(f, format="png"))
        log_image(self.accelerator, f"samples/task{task}_{self.name}", grid, step=self.progress.lines)
        self.checkpoint_at(task + 1, 0, inside_task=False)
