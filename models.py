"""The models: Stable Diffusion as a diffusers pipeline (SD1.5 from the hub, or a local folder such as the toy world's
toy/pipeline), or SD1.5's architecture built from code with random weights; the UNet's LoRA layers, with the fast
path that folds them into the weights for the sampling steps without gradients; and activation checkpointing
(`recomputed`) for the steps with gradients.

It may import the libraries and rewards.py (the tokenizer's vocabulary, the one-line missing-weights message), and
nothing else of the project: the method (rid.py) and the run's bookkeeping (runfiles, checks, session) build on it.
"""
import contextlib
import copy
import json
import shlex
import tempfile
from pathlib import Path

import diffusers
import open_clip
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rewards import TOY_DIR, TOY_HINT, MissingWeights, fetching, seeded


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


def tf32_flags(enabled: bool) -> list[tuple[object, str, object]]:
    """(object, attribute, value) that turn TF32 on or off in cuBLAS matmuls and cuDNN convolutions: torch >= 2.9's
    fp32_precision API, or the allow_tf32 flags of torch 2.6-2.8, where setting fp32_precision raises
    AttributeError."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(cudnn, "conv"):
        precision = "tf32" if enabled else "ieee"
        return [(matmul, "fp32_precision", precision), (cudnn.conv, "fp32_precision", precision)]
    return [(matmul, "allow_tf32", enabled), (cudnn, "allow_tf32", enabled)]


@contextlib.contextmanager
def backend_flags(flags: list[tuple[object, str, object]]):
    """Set the flags inside the block, and put back what they were."""
    saved = [getattr(obj, name) for obj, name, _ in flags]
    for obj, name, value in flags:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for (obj, name, _), value in zip(flags, saved):
            setattr(obj, name, value)


def restore_hint(model: str) -> str:
    """How to get back a damaged or incomplete pipeline: the toy world's from git or pretrain_toy.py, a local
    directory from wherever it was saved, a hub id's cache by downloading it again."""
    path = Path(model).expanduser()
    if path.resolve().is_relative_to(TOY_DIR.resolve()):
        return TOY_HINT
    if path.is_dir():
        return f"restore {model} (save_pretrained it again, or copy it back), or pass another --model"
    return f"download it again with `{pipeline_download(model)}`"


# The files of a local Stable Diffusion directory that from_pretrained reads: each component's config and the stem of
# its weights (.safetensors, or an older pipeline's .bin).
COMPONENT_FILES = {"unet": ("config.json", "diffusion_pytorch_model"),
                   "vae": ("config.json", "diffusion_pytorch_model"), "text_encoder": ("config.json", "model"),
                   "tokenizer": ("tokenizer_config.json", None), "scheduler": ("scheduler_config.json", None)}


def check_pipeline_files(path: Path, model: str) -> None:
    """Every file of a local pipeline directory that from_pretrained reads is there and whole: each component's config
    and weights present, every JSON file a JSON object, every safetensors file's header readable. A missing, empty,
    truncated or garbled one is named in one line; diffusers would call a missing UNet weight
    diffusion_pytorch_model.bin, or fail with a 20-40-line traceback, and the download hint would name the hub."""
    for component, (config, weights) in COMPONENT_FILES.items():
        folder = path / component
        needed = [folder / config]
        if weights and not any(folder.glob(f"{weights}*.bin")):
            needed.append(folder / f"{weights}.safetensors")
        for file in needed:
            if not file.is_file():
                raise MissingWeights(f"--model {model}: {file} is missing; {restore_hint(model)}")
        for file in sorted(folder.glob("*.json")):
            check_json_object(file, model)
        for file in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(file, "pt"):
                    pass
            except (SafetensorError, OSError) as error:
                raise MissingWeights(f"--model {model}: {file} cannot be read ({str(error)[:100]}); it is damaged or "
                                     f"truncated: {restore_hint(model)}") from None


def check_json_object(file: Path, model: str) -> None:
    """A config (or tokenizer) file is a JSON object: `[]`, `null` or a cut file would fail deep in the libraries."""
    try:
        content = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MissingWeights(f"--model {model}: {file} cannot be read as JSON ({error}); {restore_hint(model)}"
                             ) from None
    if not isinstance(content, dict):
        raise MissingWeights(f"--model {model}: {file} holds a JSON {type(content).__name__}, not the object of a "
                             f"config; {restore_hint(model)}")


def check_tokenizer(pipe: StableDiffusionPipeline, model: str) -> None:
    """The tokenizer fits the text encoder: its vocabulary is the encoder's embedding table and it reads at most the
    encoder's positions. transformers builds a 2-token tokenizer without tokenizer.json (the run then trains
    prompt-blind) and one that reads 10^30 tokens without tokenizer_config.json (a crash at the first prompt, after the
    run's files are written), without a word."""
    vocabulary, rows = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().num_embeddings
    length, positions = pipe.tokenizer.model_max_length, pipe.text_encoder.config.max_position_embeddings
    if vocabulary != rows:
        raise MissingWeights(f"--model {model}: its tokenizer has {vocabulary} tokens but its text encoder embeds "
                             f"{rows} (is tokenizer/tokenizer.json, or vocab.json, missing or damaged?); "
                             f"{restore_hint(model)}")
    if length > positions:
        raise MissingWeights(f"--model {model}: its tokenizer reads {length} tokens but its text encoder has "
                             f"{positions} positions (is tokenizer/tokenizer_config.json missing or damaged?); "
                             f"{restore_hint(model)}")


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
        local = Path(args.model).expanduser().is_dir()
        if local:
            check_pipeline_files(Path(args.model).expanduser(), args.model)
        how = restore_hint(args.model) if local else (f"pre-download it on a machine with network access with "
                                                      f"`{pipeline_download(args.model)}`, or pass a local diffusers "
                                                      "directory with --model PATH")
        # A local directory whose files passed check_pipeline_files can still hold a config of wrong fields or weights
        # of other shapes, which the libraries report as any of a dozen exception types.
        with fetching(f"--model {args.model}", how, errors=(Exception,) if local else (OSError, ValueError)):
            pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32, safety_checker=None,
                                                           requires_safety_checker=False)
        check_tokenizer(pipe, args.model)
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


# ----------------------------------------------------------------------------------------------------------------
# The LoRA layers, and the fast path for the sampling steps without gradients (rid.sample_latents), which folds the
# LoRA into the weights so that no-grad calls cost what the base model's do.

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


def lora_targets(unet: UNet2DConditionModel, targets: str) -> dict[str, torch.nn.Module]:
    """The modules that add_task_adapter adapts: those whose names end with one of `targets` (comma-separated, as
    PEFT's target_modules match)."""
    suffixes = tuple("." + t for t in targets.split(","))
    return {name: module for name, module in unet.named_modules() if name.endswith(suffixes)}


def lora_shapes(unet: UNet2DConditionModel, adapters: list[str], rank: int, targets: str) -> dict[str, tuple[int, ...]]:
    """The name and shape of every LoRA tensor that add_task_adapter gives `unet` for these adapters: for each
    targeted Linear (in -> out), A (rank, in) and B (out, rank)."""
    shapes = {}
    for name, module in lora_targets(unet, targets).items():
        for adapter in adapters:
            shapes[f"{name}.lora_A.{adapter}.weight"] = (rank, module.in_features)
            shapes[f"{name}.lora_B.{adapter}.weight"] = (module.out_features, rank)
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# Activation checkpointing.

class Recompute(torch.autograd.Function):
    """fn(*inputs) run without autograd, keeping only its inputs; in the backward pass, fn again with autograd, and
    the gradients through that call. The trainable weights that fn uses come after the inputs, as inputs of their
    own, so that their gradients flow also where no input needs one."""

    @staticmethod
    def forward(ctx, fn, n_inputs: int, *tensors):
        ctx.fn, ctx.params = fn, tensors[n_inputs:]
        ctx.save_for_backward(*tensors[:n_inputs])
        ctx.set_materialize_grads(False)  # an output that no loss used gets None, not a tensor of zeros
        return fn(*tensors[:n_inputs])

    @staticmethod
    def backward(ctx, *grads):
        needed = ctx.needs_input_grad[2:]
        inputs = [x.detach().requires_grad_(need) for x, need in zip(ctx.saved_tensors, needed)]
        with torch.enable_grad():
            outputs = ctx.fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        used = [i for i, grad in enumerate(grads) if grad is not None]  # the outputs that a loss used
        wrt = [x for x, need in zip([*inputs, *ctx.params], needed) if need]
        found = iter(torch.autograd.grad([outputs[i] for i in used], wrt, [grads[i] for i in used], allow_unused=True))
        return None, None, *(next(found) if need else None for need in needed)


def recomputed(module: torch.nn.Module, fn, *inputs: torch.Tensor):
    """fn(*inputs), a tensor or a tuple of tensors, in activation checkpointing: only the inputs and outputs are kept,
    and the backward pass runs fn once more. fn may use `module`'s trainable weights (their gradients flow, whether
    or not an input needs one: torch's reentrant checkpointing drops them where none does) and no other tensor that
    needs a gradient. The recompute replays neither random numbers (fn must draw none: the UNet and VAE here have no
    dropout) nor precision settings: it runs under the autocast and TF32 flags in force where the backward runs
    (rid.py backpropagates inside full_precision, the precision of its gradient steps; its decode puts the forward's
    flags back itself). torch's non-reentrant checkpointing computes the same, but runs a Python hook for each tensor
    the call saves, in the forward and again in the recompute (about a thousand in a UNet call), and keeps the
    call's autograd graph: a tiny UNet call's forward and backward cost 1.71x its cost without checkpointing that
    way, and 1.44x this way (docs/performance.md)."""
    return Recompute.apply(fn, len(inputs), *inputs, *(p for p in module.parameters() if p.requires_grad))


# ----------------------------------------------------------------------------------------------------------------
# The reward towers' place: one on the device at a time.

@contextlib.contextmanager
def scorer_on(scorer: torch.nn.Module, device: torch.device):
    """The scorer on `device` for the block: a copy of it there, emptied afterwards, the scorer itself staying on the
    CPU. So a GPU holds one reward tower at a time (aesthetic,hps,clip keep ViT-L and ViT-H, ~5.7 GB fp32), while
    the CPU copies load once. On the CPU the scorer itself serves."""
    if device.type == "cpu":
        yield scorer
        return
    on_device = copy.deepcopy(scorer).to(device)
    try:
        yield on_device
    finally:
        on_device.to("meta")  # frees its device memory even while the caller's `as` name still refers to it
        if device.type == "cuda":
            torch.cuda.empty_cache()
