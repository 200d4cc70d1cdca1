"""Bad input and faults: every check that can refuse a run before it writes anything (flags, prompts, the output
directory, what needs the model), each a one-line UsageError saying what is wrong and how to fix it; the exit status
of every failure, and SIGTERM/SIGINT turned into a checkpointed stop.

It may import runfiles.py (what a run directory holds), models.py, the toy world's prompts, rewards.py's names, cli.py
and the libraries; session.py and the programs build on it.
"""
import contextlib
import gc
import importlib
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

import toyworld
from cli import UsageError, flag
from models import lora_targets
from rewards import REWARDS, MissingWeights, parts_of
from runfiles import WriteFailed, check_resume_config, reward_names, run_outputs

DEFAULT_PROMPTS = [
    "a photo of a cat", "a photo of a dog", "a horse in a field", "a red fox in the snow", "a lighthouse at dusk",
    "a bowl of ramen", "a bicycle leaning on a wall", "a portrait of an old fisherman", "a mountain lake at sunrise",
    "a city street in the rain", "a cup of coffee on a wooden table", "an owl on a branch", "a sailing boat at sea",
    "a vase of sunflowers", "a robot reading a book", "a castle on a hill", "a koala eating leaves",
    "a bridge over a river", "a plate of strawberries", "a desert with sand dunes",
]


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite steps): one line on stderr, exit status 3, checkpoint intact."""


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT: the current step was finished and checkpointed; exit status 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.status = 128 + signum


EXIT_STATUS = {UsageError: 2, MissingWeights: 2, TrainingStopped: 3, WriteFailed: 74}


# ----------------------------------------------------------------------------------------------------------------
# Flags and files, checked before the models are built.

def read_prompts(path: str | None, tiny: bool = False) -> list[str]:
    """One prompt a line from a UTF-8 text file; a binary or otherwise encoded file is refused, naming the byte.
    Without a file: DEFAULT_PROMPTS, or in tiny mode the toy world's training captions (toyworld.SPLITS)."""
    if path is None:
        return list(toyworld.SPLITS["train"]) if tiny else DEFAULT_PROMPTS
    check_name_lengths(Path(path), "--prompts", written=False)
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
    # Lines end at newlines only: str.splitlines also splits at U+2028, U+0085, \x0b and \x0c, inside a prompt.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {path}: the file holds no prompt; write one prompt a line")
    invisible = next((i for i, line in enumerate(lines, start=1) if line.strip() and not visible(line)), None)
    if invisible is not None:
        shown = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, '')}".strip() for c in dict.fromkeys(
            lines[invisible - 1].strip()))
        raise UsageError(f"--prompts {path}: line {invisible} holds no visible character (only {shown}); remove it or "
                         "write a prompt there")
    return prompts


def visible(text: str) -> bool:
    """Whether text has a character that shows: a letter, digit, punctuation mark or symbol (emoji included), not
    only format characters such as the zero-width space, marks or spaces."""
    return any(unicodedata.category(c)[0] in "LNPS" for c in text)


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
    "lambda_out": (lambda v: 0 <= v <= 1e6, "in [0, 1e6] (beyond, the reward no longer counts and fp16 overflows)"),
    "lambda_feat": (lambda v: 0 <= v <= 1e6, "in [0, 1e6] (beyond, the reward no longer counts and fp16 overflows)"),
}


COUNT_LIMIT = 2 ** 31  # every count flag stays below it (torch's int32 indices, a step count a run can reach)
SEED_LIMIT = 2 ** 63  # torch.Generator.manual_seed takes a 64-bit seed


def check_counts(args, names: tuple[str, ...]) -> None:
    """Each count flag is a positive integer below COUNT_LIMIT (rid.py's and benchmark.py's)."""
    for name in names:
        if not 0 < getattr(args, name) < COUNT_LIMIT:
            raise UsageError(f"{flag(name)} must be a positive integer below 2^31, got {getattr(args, name)}")


def check_numbers(args) -> None:
    """Integers positive and in range, floats finite and in their NUMBER_RANGES."""
    check_counts(args, ("steps_per_task", "num_steps", "batch_size", "grad_accum", "resolution", "lora_rank",
                        "log_every", "checkpoint_every", "max_bad_steps"))
    if not 1 <= args.k <= args.num_steps:
        raise UsageError(f"--k must be between 1 and --num-steps ({args.num_steps}), got {args.k}")
    if not 0 <= args.seed < SEED_LIMIT:
        raise UsageError(f"--seed must be in [0, 2^63), got {args.seed}")
    for name, (within, condition) in NUMBER_RANGES.items():
        value = getattr(args, name)
        if not (math.isfinite(value) and within(value)):
            raise UsageError(f"{flag(name)} must be a finite number{' ' * bool(condition)}{condition}, got {value}")
    if args.lr * args.weight_decay >= 1:
        raise UsageError(f"--weight-decay {args.weight_decay} with --lr {args.lr}: AdamW multiplies every weight by "
                         "1 - lr x weight decay each step, which must stay above 0; lower one of them")


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
    check_name_lengths(path, "--model", written=False)
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
            raise UsageError(f"--model {args.model}: its model_index.json cannot be read as JSON ({error}); restore "
                             "the directory (e.g. save_pretrained it again)") from None
        if not isinstance(index, dict) or "unet" not in index:
            raise UsageError(f"--model {args.model}: its model_index.json names no unet, so it is not a Stable "
                             "Diffusion pipeline; give one")


def check_writable(directory: Path, option: str, given: Path) -> None:
    """`directory` (--out-dir, or the folder of an output file `given`) can be created and written to: probed with a
    temporary directory in its nearest existing parent, which is removed at once (so that /proc/foo, a read-only
    mount or a missing permission fail before any work)."""
    existing = next(p for p in [directory.absolute(), *directory.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{option} {given}: {existing} is a file; give a directory path")
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as error:
        raise UsageError(f"{option} {given}: cannot write in {existing} ({error.strerror}); choose a writable "
                         "directory") from None


def check_not_dangling(path: Path, option: str) -> None:
    """A symbolic link whose target does not exist would be written through, or fail, only after the work."""
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{option} {path} is a symbolic link to {os.readlink(path)}, which does not exist; create "
                         "its target or give another path")


def check_name_lengths(path: Path, option: str, written: bool = True) -> None:
    """Every component of `path` fits the file system's name limit (usually 255 bytes), with room for the .tmp
    suffix of an atomic write if the path is `written`: otherwise the first stat or write fails with ENAMETOOLONG
    deep inside a library."""
    parents = path.absolute().parents  # the path itself cannot be stat'ed if one of its names is too long
    limit = os.pathconf(next(p for p in parents if all(len(os.fsencode(q)) < 256 for q in p.parts) and p.exists()),
                        "PC_NAME_MAX")
    room = len(".tmp") if written else 0
    for part in path.parts:
        if len(os.fsencode(part)) + room > limit:
            raise UsageError(f"{option} {str(path)[:60]}...: the name {part[:20]}... is {len(os.fsencode(part))} "
                             f"bytes long, and this file system allows {limit}"
                             f"{' (with room for a .tmp suffix)' * written}; give a shorter path")


def check_output_file(path: Path, option: str) -> None:
    """A file a program writes at its end (benchmark.py --json) can be written: checked before the work."""
    check_name_lengths(path, option)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file path")
    check_not_dangling(path, option)
    if not path.absolute().parent.is_dir():  # atomic_write creates no directories
        raise UsageError(f"{option} {path}: no directory {path.absolute().parent}; create it or give another path")
    check_writable(path.absolute().parent, option, path)


def check_device(name: str | None) -> torch.device:
    """--device as a torch device that exists here (default: cuda if available, else cpu)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); give cpu, "
                         "or a GPU that exists")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: this program runs on cpu or cuda")
    return device


def check_out_dir(args) -> bool:
    """--out-dir is a writable directory that holds this run's config (with --resume) or no run output at all.
    Returns whether the run is new (no config.json yet): --resume then starts it, as a preemptible job expects."""
    if not args.out_dir.strip():
        raise UsageError("--out-dir is empty; give a directory path, e.g. runs/rid")
    out = Path(args.out_dir)
    check_name_lengths(out, "--out-dir")
    check_not_dangling(out, "--out-dir")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file; give a directory path")
    check_writable(out, "--out-dir", out)
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
    """Every name is a reward of rewards.py, or several joined by '+' (a joint task), each once; the message of the
    first unknown one lists the known ones."""
    unknown = [part for name in names for part in parts_of(name) if part not in REWARDS]
    if unknown:
        raise UsageError(f"{option}: unknown reward {unknown[0]!r}; known rewards: {', '.join(REWARDS)}")
    repeated = [name for name in names if len(set(parts_of(name))) < len(parts_of(name))]
    if repeated:
        raise UsageError(f"{option}: {repeated[0]!r} names a reward twice; a joint task sums different rewards")


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
    check_feat_layer_names(args)
    check_trackers(args)
    check_model_path(args)
    return check_out_dir(args)


# ----------------------------------------------------------------------------------------------------------------
# Checks that need the model.

def check_model_args(args, pipe: StableDiffusionPipeline) -> None:
    """Checks that need the model: the LoRA targets are Linear layers, the distilled layers exist and see the LoRA,
    the latent fits the UNet's downsampling, the rank and T fit the model, and the activations of --resolution x
    --batch-size can fit in memory."""
    targets = lora_targets(pipe.unet, args.lora_targets)
    if not targets or not all(isinstance(m, torch.nn.Linear) for m in targets.values()):
        raise UsageError(f"--lora-targets {args.lora_targets}: " + ("no module of this UNet's ends with one of these" if
                         not targets else f"{next(n for n, m in targets.items() if not isinstance(m, torch.nn.Linear))}"
                         " is not a Linear layer") + "; give Linear layer names such as to_k,to_v or attn2.to_k")
    names = {name for name, _ in pipe.unet.named_modules()}
    for layer in args.feat_layers.split(","):
        if layer not in names:
            raise UsageError(f"--feat-layers: the UNet has no module {layer!r}; try mid_block, up_blocks.0, ...")
    if args.lambda_feat > 0:
        check_feat_layers_see_lora(pipe.unet, args.feat_layers.split(","), args.lora_targets)
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if args.resolution % multiple:
        raise UsageError(f"--resolution must be a multiple of {multiple} for this model, got {args.resolution}")
    widths = [min(m.in_features, m.out_features) for m in targets.values()]
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


def check_feat_layers_see_lora(unet: UNet2DConditionModel, layers: list[str], lora: str) -> None:
    """A feature layer that runs before every LoRA layer (conv_in, a down block without attention) has the same
    output for student and teacher, so its L_feat is 0 on every step by construction; one that never runs has none."""
    targets = set(lora_targets(unet, lora))
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
# Faults while running: non-finite steps, trackers, the launcher, long prompts, signals, and the exit statuses.

def choose_threads() -> str:
    """Set torch's CPU threads at start-up, once, and say so: OMP_NUM_THREADS if the user set it, else the cores this
    process may use that are free now (busy under 50 % over 0.2 s; at least 1). OpenMP threads that share a core with
    another busy process wait for each other at every parallel region: a tiny run with two threads on two cores, one
    of them busy, ran 7x slower than with one (docs/performance.md)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{threads()} (OMP_NUM_THREADS)"
    usable = set(psutil.Process().cpu_affinity())
    busy = psutil.cpu_percent(interval=0.2, percpu=True)
    free = sum(1 for cpu, load in enumerate(busy) if cpu in usable and load < 50)
    torch.set_num_threads(max(1, free))
    return f"{threads()} ({free} of {len(usable)} cores free; OMP_NUM_THREADS overrides)"


def threads() -> str:
    n = torch.get_num_threads()
    return f"{n} CPU thread{'s' if n > 1 else ''}"


def is_finite(*values: float) -> bool:
    """Whether every value is finite: a step with a NaN or inf loss or gradient norm is skipped."""
    return all(math.isfinite(value) for value in values)


# --report-to: the trackers each choice starts, and the package each needs (wandb is not in requirements.txt).
TRACKERS = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}


def check_trackers(args) -> None:
    """--report-to's packages can be imported: a missing one is bad input, refused before anything is written."""
    for name in TRACKERS[args.report_to]:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UsageError(f"--report-to {args.report_to}: the {name} package is not installed; `pip install "
                             f"{name}`, or choose another --report-to") from None


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
    prompt's tail on every encode). Installed on their loggers when checks.py is imported. (diffusers' "should be kept
    in float32: []" is avoided at its source instead, in load_pipeline.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("The following part of your input was truncated",
                                                   "Token indices sequence length is longer"))


for _logger in ("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
                "transformers.tokenization_utils_base"):
    logging.getLogger(_logger).addFilter(DropLibraryNoise())


def warn_long_prompts(tokenizer, prompts: list[str]) -> None:
    """One short warning line about the prompts longer than the text encoder reads (77 tokens for SD's CLIP): the
    prompt, or how many there are and the first (a file of 1,000 such prompts was 1,000 lines)."""
    limit = tokenizer.model_max_length
    counts = [(prompt, len(tokenizer(prompt, verbose=False).input_ids)) for prompt in prompts]
    long = [(prompt, tokens) for prompt, tokens in counts if tokens > limit]
    if not long:
        return
    prompt, tokens = long[0]
    short = prompt if len(prompt) <= 40 else prompt[:40] + "..."
    which = (f"prompt {short!r} has" if len(long) == 1 else
             f"{len(long)} prompts are too long; the first, {short!r}, has")
    print(f"warning: {which} {tokens} tokens; the text encoder reads the first {limit}", file=sys.stderr)


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
        # one number for every process
        signum = int(accelerator.reduce(torch.tensor([signum], device=accelerator.device), reduction="max"))
    return signum or None


def worker_init() -> None:
    """A pool worker: its own session, so that a Ctrl-C at the terminal reaches only the parent, which then stops each
    worker once (worker_pool); SIGTERM unwinds it (SystemExit) rather than killing it, so that what it holds is let go
    (tqdm's lock is a named semaphore, reported leaked otherwise); one thread, since the workers share the cores."""
    os.setsid()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    os.environ["OMP_NUM_THREADS"] = "1"  # what choose_threads() in a job then keeps
    torch.set_num_threads(1)


@contextlib.contextmanager
def worker_pool(workers: int):
    """A pool of `workers` spawned processes for programs that run many jobs (ril_benchmark.py, pretrain_toy.py).
    SIGINT or SIGTERM to the parent sends every worker one SIGTERM (a rid.py run inside one finishes its step, writes
    a checkpoint and stops; anything else stops at once, and every file is written atomically, so a job's outputs are
    complete or absent), cancels the jobs not started, waits for the workers and raises Interrupted (exit status
    130/143); the caller's rerun continues from what is complete."""
    def stop(signum, frame):
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}; every finished job is kept: run the same "
                          "command again to continue", signum)

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init)
    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield pool
    except Interrupted:
        for signum in STOP_SIGNALS:  # the workers' ends must not be interrupted again
            signal.signal(signum, signal.SIG_IGN)
        for worker in multiprocessing.active_children():
            worker.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        gc.collect()  # the pool's queues and their semaphores go now, not at exit, where they would be reported leaked
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def tool_status(program: str, run) -> int:
    """The exit status of a tool that runs jobs in a worker_pool (ril_benchmark.py, pretrain_toy.py): 0 done, 2 bad
    input, 74 a write failed, 130/143 interrupted (every finished job kept), 1 a job failed (its log named), each
    failure one line on stderr."""
    try:
        run()
        return 0
    except (UsageError, MissingWeights, WriteFailed) as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return EXIT_STATUS[type(error)]
    except Interrupted as error:
        print(f"{program}: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:  # outside a pool: Ctrl-C between the jobs, every file written atomically
        print(f"{program}: interrupted; every finished job is kept: run the same command again to continue",
              file=sys.stderr)
        return 130
    except RuntimeError as error:  # a job failed: its own message says where its log is
        print(f"{program}: error: {error}", file=sys.stderr)
        return 1


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
