"""Reward Incremental Distillation (RID): reward-incremental LoRA fine-tuning of Stable Diffusion.

Rewards r_1, ..., r_N arrive one after another (tasks). For each task we fine-tune LoRA weights theta by
backpropagating the reward through the last K DDIM steps (DRaFT-K / AlignProp), and distil from an EMA teacher so
that the model keeps what earlier tasks taught it and its visual structure:

    L = L_reward + lambda_out * L_out + lambda_feat * L_feat                                       (train_step)
    L_reward = -(s / sigma_n) * mean_b r_n(x_0^b, c^b)   x_0 = decode(DDIM(x_T, c)), grads only in the last K steps;
               sigma_n = the reward's spread at the task's start                                 (reward_spread)
    L_out    = E_k || eps_S(sg(x_k), t_k, c) - eps_T(sg(x_k), t_k, c) ||^2                              (distil)
    L_feat   = E_k mean_l mean_b || h_S^l,b(sg(x_k), ...) - h_T^l,b(...) ||^2 / Var(h_T^l,b)        (scale_free_mse)
    theta_T <- mu * theta_T + (1 - mu) * theta_S            after every optimizer step (ema_update)

The distillation terms are a regression at the states x_k the sampler visits, taken as data (sg: stop-gradient),
k drawn once per batch (draw_distill_step): uniformly from the K gradient steps' inputs (an unbiased estimate of
their mean at the cost of one state), or with --distill-at trajectory from the whole DDIM chain.

Each task trains a fresh LoRA adapter while earlier ones stay active and frozen (the adapter group); the teacher
runs on the student's own UNet with its LoRA tensors swapped in (torch.func.functional_call), so it costs one copy
of the LoRA tensors, not a second UNet. With --lambda-out 0 --lambda-feat 0 --shared-adapter this is plain
sequential reward fine-tuning, the baseline.

The RIL/RID paper (arXiv 2411.17310) has no public code; everything more specific than its abstract (the loss
terms, the EMA schedule, which features are distilled) is our reading, with every choice a flag below.
Comparison methods from other papers (C-LoRA, generative distillation, backward progressive training, InfLoRA)
live in baselines.py and reach the training step through one seam, --baseline (baselines.Method).

    python rid.py --tiny --rewards aesthetic,hps        # the toy world's pretrained tiny models, CPU (README)
    python rid.py --rewards aesthetic,hps               # Stable Diffusion v1.5 on a GPU
    accelerate launch --multi_gpu --num_processes 4 rid.py --rewards aesthetic,hps --grad-accum 8   # data parallel
    python rid.py ... --resume                          # continue a killed run from its last checkpoint
"""
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cli as command_line  # rid.cli is the function at the end
from cli import option

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TOY_MODEL = str(Path(__file__).resolve().with_name("toy") / "pipeline")  # the toy world's pipeline (pretrain_toy.py)
REWARD_NAMES = ("aesthetic", "hps", "clip", "compressibility")  # rewards.REWARDS, which needs open_clip (a test checks)
LORA_TARGETS = "to_k,to_q,to_v,to_out.0"  # every attention projection, as AlignProp and DRaFT adapt


@dataclass
class Args:
    # The method: the reward sequence, truncated backprop, distillation from the EMA teacher, the adapters.
    rewards: str = option("aesthetic,hps", f"task order, comma-separated; known: {', '.join(REWARD_NAMES)}; a+b is "
                          "one task of several rewards at once, each in units of its spread (the joint reference)")
    k: int = option(1, "the last K DDIM steps carry gradients (1 <= K <= T)")
    random_k: bool = option(False, "draw K uniformly from 1..k once per batch")
    lambda_out: float = option(1.0, "weight of output (eps) distillation")
    lambda_feat: float = option(1.0, "weight of feature distillation (each image's MSE at each layer over the "
                                "variance of the teacher's activations of that image)")
    feat_layers: str = option("mid_block,up_blocks.0,up_blocks.1", "UNet modules whose outputs are distilled, "
                              "comma-separated")
    ema_decay: float | None = option(None, "teacher EMA decay mu in [0, 1]; horizon ~1/(1-mu) steps; 1 = frozen "
                                     "task-start teacher")
    reward_scale: float | None = option(None, "s in L_reward = -s * mean r / sigma")
    reward_norm: Literal["task-start-std", "none"] = option(
        "task-start-std", "sigma in L_reward: the reward's standard deviation over 16 pictures of the model at the "
        "task's start (so that the distillation weights mean the same for every reward), or 1")
    distill_at: Literal["gradient-steps", "trajectory"] = option(
        "gradient-steps", "where the teacher is compared, at one state drawn per batch: one of the K gradient steps, "
        "or one step of the whole DDIM chain (its no-grad state, detached: one more student call with gradients)")
    baseline: str = option("", "a comparison method from another paper, by name and settings, e.g. 'clora weight=1' "
                           "(baselines.py: clora, replay, progressive, inflora); empty: RID, or plain fine-tuning")
    lora_rank: int = option(4, "LoRA rank r of each adapter (alpha = r)")
    lora_targets: str = option(LORA_TARGETS, "UNet Linear layers that get LoRA, comma-separated, each a "
                               "name suffix (attn2.to_k,attn2.to_v: the cross-attention keys and values only)")
    shared_adapter: bool = option(False, "one LoRA adapter for all tasks instead of one each")
    # Sampling and optimisation.
    num_steps: int | None = option(None, "DDIM steps T")
    guidance_scale: float = option(7.5, "classifier-free guidance scale w (the toy world's best fidelity is at 7.5 "
                                   "too)")
    eta: float = option(0.0, "DDIM eta (0: deterministic)")
    steps_per_task: int | None = option(None, "optimizer steps per reward")
    batch_size: int | None = option(None, "prompts per process and micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step (gradient accumulation)")
    lr: float | None = option(None, "AdamW learning rate", aliases=["--learning-rate"])
    weight_decay: float = option(0.1, "AdamW weight decay (pulls LoRA towards the base)")
    grad_clip: float = option(5.0, "clip the LoRA gradient norm to this")
    resolution: int | None = option(None, "image side in pixels")
    seed: int = option(0, "random seed (LoRA init, prompts, noise)")
    # The run: models, inputs and outputs, resuming, precision and memory, logging (models.py, checks.py, session.py).
    tiny: bool = option(False, "the toy world: tiny pretrained models of SD's classes and toy reward towers, from toy/ "
                        "(no download; runs on a CPU in under a minute; docs/toy-world.md)")
    random_weights: bool = option(False, "SD1.5's architecture with random weights, built from code (no download; "
                                  "for benchmarks)")
    model: str | None = option(None, "diffusers Stable Diffusion pipeline (hub id or local directory)")
    prompts: str | None = option(None, "text file, one prompt a line (default: a built-in set; tiny: the toy world's "
                                 "training captions)")
    out_dir: str = option("runs/rid", "output directory (holds no run yet, unless --resume)")
    resume: bool = option(False, "continue the run in --out-dir from its last checkpoint")
    checkpoint_every: int = option(50, "write OUT/checkpoint.pt every this many steps (and at each task end)")
    max_bad_steps: int = option(5, "stop after this many consecutive steps with a non-finite loss or gradient (each "
                                "one is skipped)")
    checkpointing: bool = option(True, "activation checkpointing of the K gradient steps and the VAE decode: memory "
                                 "does not grow with K (on by default)", no_help="keep every activation of the K "
                                 "gradient steps instead: faster, memory grows with K")
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", "run the VAE, the text encoder and the T-K sampling steps without gradients in bf16/fp16; the K gradient "
        "steps, the teacher and the rewards stay fp32 (docs/precision.md)")
    cpu: bool = option(False, "run on the CPU even if a GPU is visible")
    log_every: int = option(10, "print a summary line every this many steps")
    report_to: Literal["none", "tensorboard", "wandb", "all"] = option(
        "none", "also log every metrics line and each task's samples.png to TensorBoard (offline, in OUT/logs) and/or "
        "Weights & Biases (pip install wandb), through Accelerate's trackers")


MODE_DEFAULTS = {
    # ema_decay: the teacher's horizon 1/(1-mu) at half a task, as the toy world's 0.9 is for its 20 steps
    # (docs/ril-benchmark.md: at tiny's lr, mu from 0.8 to 1 did alike within noise).
    "full": dict(model=SD15, steps_per_task=500, num_steps=50, batch_size=4, resolution=512, lr=4e-4, reward_scale=1.0,
                 ema_decay=0.996),
    # The toy world's pretrained models (docs/toy-world.md: how each value was chosen; lr: RID's best on the RIL
    # benchmark's validation captions at 20 steps a task, as it is plain fine-tuning's).
    "tiny": dict(model=TOY_MODEL, steps_per_task=20, num_steps=10, batch_size=2, resolution=32, lr=2e-3,
                 reward_scale=1.0, ema_decay=0.9),
}


def parse_args(argv: list[str]) -> Args:
    return command_line.parse(Args, argv, MODE_DEFAULTS, prog="rid.py", description=__doc__.split("\n")[0])


def resolve(args: Args) -> Args:
    """Fill the per-mode defaults (fields left at None) from MODE_DEFAULTS."""
    defaults = MODE_DEFAULTS["tiny" if args.tiny else "full"]
    return dataclasses.replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})


# The command line is parsed before the imports below (torch, diffusers, peft and open_clip take 6-12 s), so that
# --help and a mistyped flag answer at once.
if __name__ == "__main__":
    command_line.parse_or_exit("rid.py", parse_args, sys.argv[1:])  # parsed again by cli() below: a few milliseconds

import contextlib  # noqa: E402  (the heavy imports: after the command line is parsed)
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from torch.func import functional_call  # noqa: E402

from checks import check_args, check_model_args, choose_threads, exit_status, is_finite, read_prompts  # noqa: E402
from models import (WEIGHT_DTYPES, adapters_disabled, adapters_folded, backend_flags, load_pipeline,  # noqa: E402
                    recomputed, scorer_on, tf32_flags)
from session import Run, average_gradients, step_metrics, variance_noise  # noqa: E402
from runfiles import reward_names  # noqa: E402
from rewards import RewardSum, load_reward  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# Precision. With --mixed-precision bf16/fp16, only what carries no distillation signal runs in the low dtype: the
# T-K sampling steps without gradients, the text encoder and the VAE. The K gradient steps, the teacher calls and the
# rewards run in IEEE fp32: L_out measures a student-teacher difference far below one bf16 ulp (~4e-3 at |eps| ~ 1),
# which bf16 (or TF32's 10-bit mantissa) would replace by rounding noise.

@contextlib.contextmanager
def low_precision(args: Args, device: torch.device):
    """For the fp32 UNet's calls without gradients: --mixed-precision's autocast, or with --mixed-precision no, fp32
    with TF32 matmuls and convolutions (on a GPU that has them; PyTorch's default is TF32 for convolutions only):
    these steps carry no distillation signal, and TF32 runs the 45 % of a UNet call's FLOPs that are matmuls at
    tensor-core rate."""
    dtype = WEIGHT_DTYPES[args.mixed_precision]
    with backend_flags(tf32_flags(True)), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        yield


@contextlib.contextmanager
def full_precision(device: torch.device):
    """IEEE fp32: autocast off, and no TF32."""
    with backend_flags(tf32_flags(False)), torch.autocast(device.type, enabled=False):
        yield


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


def checkpointed(enabled: bool, unet, x, t, text_emb, feat_layers=()):
    """unet_eps(unet, x, t, text_emb, feat_layers), in activation checkpointing if enabled (models.recomputed): only x
    and the outputs are kept, and the backward pass runs the call once more. The LoRA gradients flow also at the
    first gradient step, whose x comes from the no-grad chain."""
    if not enabled:
        return unet_eps(unet, x, t, text_emb, feat_layers)

    def call(x):
        eps, feats = unet_eps(unet, x, t, text_emb, feat_layers)
        return eps, *feats
    eps, *feats = recomputed(unet, call, x)
    return eps, feats


def ddim_step(pipe, eps: torch.Tensor, t, x: torch.Tensor, args: Args, generator=None, process=(0, 1)):
    """x_t (B,4,h,w) -> x_{t-1} from the CFG batch's eps (2B,4,h,w): guidance, then the DDIM update (with this
    process's slice of the global batch's noise when --eta > 0)."""
    noise = variance_noise(x, generator, process) if args.eta > 0 else None
    return pipe.scheduler.step(guide(eps, args.guidance_scale), t, x, eta=args.eta, variance_noise=noise).prev_sample


def sample_latents(pipe, x, text_emb, args: Args, k: int, teacher=None, generator=None, process=(0, 1),
                   distill_step: int | None = None, backward=torch.Tensor.backward):
    """DDIM from x_T (B,4,h,w) to x_0 latents. Steps 1..T-k run under no_grad in --mixed-precision's dtype with the
    LoRA folded into the weights (the fast path: they are most UNet calls and need no graph), the last k with
    gradients in fp32, each UNet call in activation checkpointing (unless --no-checkpointing). With a teacher
    (name -> LoRA tensor), also returns the distillation terms (distil) at the state of DDIM step `distill_step`
    (an index into the T timesteps, draw_distill_step); `backward(loss)` is how the step backpropagates a loss, which
    distil uses for a student call of its own. `generator` and `process` (index, count) give the noise for --eta > 0.
    Returns x_0 and the loss terms {"loss_out", "loss_feat", ...}."""
    timesteps = pipe.scheduler.timesteps
    split = len(timesteps) - k
    visited = None  # (x_t, t) of the distilled step
    with torch.no_grad(), adapters_folded(pipe.unet), low_precision(args, x.device):  # fold first, in fp32
        for i, t in enumerate(timesteps[:split]):
            visited = (x, t) if i == distill_step else visited
            eps, _ = unet_eps(pipe.unet, pipe.scheduler.scale_model_input(x, t), t, text_emb)
            x = ddim_step(pipe, eps, t, x, args, generator, process)
    layers = args.feat_layers.split(",") if args.lambda_feat > 0 else ()
    first_call = None  # the student's call at the first gradient step, when that step is the one distilled
    for i, t in enumerate(timesteps[split:], start=split):
        visited = (x, t) if i == distill_step else visited
        # The first gradient step's input carries no graph (it comes from the no_grad chain), so its own call serves
        # distillation too; later steps' inputs depend on theta, and distil() calls the student again, detached.
        reuse = teacher is not None and i == distill_step == split
        with full_precision(x.device):
            eps, feats = checkpointed(args.checkpointing, pipe.unet, pipe.scheduler.scale_model_input(x, t), t,
                                      text_emb, layers if reuse else ())
        first_call = (eps, feats) if reuse else first_call
        x = ddim_step(pipe, eps, t, x, args, generator, process)
    if teacher is None or visited is None:
        return x, {"loss_out": x.new_zeros(()), "loss_feat": x.new_zeros(())}
    x_t, t = visited
    with full_precision(x.device):
        return x, distil(pipe.unet, pipe.scheduler.scale_model_input(x_t, t), t, text_emb, layers, teacher, args,
                         first_call, backward)


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode, (B,4,h,w) latents -> (B,3,H,W) pixels mapped from [-1,1] to [0,1] (once, here) and clamped to
    [0,1], as diffusers' postprocessing and the public reward trainers clamp: training scores the pixels that
    sampling and evaluation show. The clamp passes the gradient of pixels in [0,1] and zeroes it beyond."""
    pixels = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.to(latents.dtype) / 2 + 0.5
    return pixels.clamp(0, 1)


def decode_with_grad(vae: AutoencoderKL, latents: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """decode() for the reward's gradient, (B,4,h,w) -> (B,3,H,W). With checkpointing, one image at a time, each in
    its own activation checkpoint: the decoder's full-resolution activations are a step's largest (about 6 GiB per
    512-px image in fp32), and only one image's are alive at once, in the forward and in the recompute. The
    recompute runs in the backward pass, inside full_precision; it is put back to the forward's precision flags, so
    that it computes what the forward did."""
    if not checkpointing:
        return decode(vae, latents)
    as_forward = [(obj, name, getattr(obj, name)) for obj, name, _ in tf32_flags(False)]

    def one(z):
        with backend_flags(as_forward):
            return decode(vae, z)
    return torch.cat([recomputed(vae, one, z) for z in latents.split(1)])


@torch.no_grad()
def generate(pipe, prompts: list[str], latents: torch.Tensor, args: Args, generator=None) -> torch.Tensor:
    """Images (B,3,H,W) in [0,1] for prompts and initial latents, no gradients (what diffusers' pipeline computes).
    `generator` draws the noise for --eta > 0 (default: a fresh one seeded with --seed), never the global RNG."""
    generator = torch.Generator().manual_seed(args.seed) if generator is None else generator
    x0, _ = sample_latents(pipe, latents, encode_prompts(pipe, prompts), args, k=0, generator=generator)
    return decode(pipe.vae, x0)


# ----------------------------------------------------------------------------------------------------------------
# RID: the adapter group and the EMA teacher.

def adapter_tensors(unet: UNet2DConditionModel, name: str) -> dict[str, torch.nn.Parameter]:
    """The LoRA tensors (A and B of every targeted layer) of adapter `name`, by parameter name."""
    return {n: p for n, p in unet.named_parameters() if f".{name}." in n}


def add_task_adapter(unet: UNet2DConditionModel, name: str, rank: int, targets: str = LORA_TARGETS
                     ) -> dict[str, torch.nn.Parameter]:
    """Add a fresh LoRA adapter (B = 0, so the model is unchanged) on the Linear layers whose names end with one of
    `targets` (comma-separated), keep every adapter active, and make only the new one trainable: earlier tasks'
    adapters stay frozen, bit for bit. Returns the trainable tensors by name (fp32)."""
    with warnings.catch_warnings():  # PEFT warns that a second adapter is being added: that is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=targets.split(",")), adapter_name=name)
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
    """All adapters as one LoRA (PEFT's key names). sum_i B_i A_i = [B_1 .. B_n] [A_1; ..; A_n], so stacking A along
    the rank axis and B along its input axis gives one LoRA of rank sum r_i (scale 1, since every alpha = r)."""
    states = [get_peft_model_state_dict(unet, adapter_name=name) for name in unet.peft_config]
    return {key: torch.cat([s[key] for s in states], dim=0 if ".lora_A." in key else 1) for key in states[0]}


def adapter_name(args: Args, task: int) -> str:
    return "shared" if args.shared_adapter else f"task{task}"


def task_adapter(unet: UNet2DConditionModel, args: Args, task: int) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA tensors of this task: a fresh adapter, unless it exists (the shared adapter after task 1,
    or an adapter rebuilt from a checkpoint, which is then the last one added and so the trainable one)."""
    name = adapter_name(args, task)
    if name in getattr(unet, "peft_config", {}):
        return adapter_tensors(unet, name)
    return add_task_adapter(unet, name, args.lora_rank, args.lora_targets)


# ----------------------------------------------------------------------------------------------------------------
# Distillation: the student against the EMA teacher at visited states of the sampling chain.

def distil(unet, x_in, t, text_emb, layers, teacher, args: Args, first_call=None, backward=torch.Tensor.backward
           ) -> dict:
    """The distillation terms at one visited state x_in (B,4,h,w), taken as data (detached): the student's outputs
    there against the teacher's, which runs on the same UNet with its LoRA tensors swapped in, without gradients. So
    the gradient is that of a regression at the states the sampler visits, whatever K is. `first_call` = (eps, feats):
    the student's call that already saw exactly this state (the first gradient step's own), whose terms join the
    step's loss. Otherwise the student runs once more, and lambda_out L_out + lambda_feat L_feat is backpropagated at
    once, through the step's `backward`, and the terms come back detached: the call needs no activation checkpoint (a
    forward and a backward, not a forward, a recompute and a backward), and its activations are freed before the
    chain's backward, so the step's peak memory stays that of one UNet call's."""
    x_in = x_in.detach()
    with torch.no_grad():
        teacher_call = unet_eps(unet, x_in, t, text_emb, layers, params=teacher)
    if first_call is not None:
        return distillation_losses(*first_call, *teacher_call, layers)
    terms = distillation_losses(*unet_eps(unet, x_in, t, text_emb, layers), *teacher_call, layers)
    backward(args.lambda_out * terms["loss_out"] + args.lambda_feat * terms["loss_feat"])
    return {name: term.detach() for name, term in terms.items()}


def distillation_losses(eps, feats, eps_teacher, feats_teacher, layers=()) -> dict:
    """L_out = ||eps_S - eps_T||^2 (a mean over elements), and L_feat = mean over layers of scale_free_mse: so that
    every layer counts alike and one --lambda-feat means the same on any model and resolution. Each layer's term is
    returned too."""
    l_out = F.mse_loss(eps, eps_teacher)
    per_layer = {f"loss_feat/{name}": scale_free_mse(h, h_t) for name, h, h_t in zip(layers, feats, feats_teacher)}
    l_feat = torch.stack(list(per_layer.values())).mean() if per_layer else 0 * l_out
    return {"loss_out": l_out, "loss_feat": l_feat, **per_layer}


def scale_free_mse(h: torch.Tensor, h_teacher: torch.Tensor) -> torch.Tensor:
    """mean_b ||h^b - h_T^b||^2 / Var(h_T^b) for one layer's activations (2B, C, h, w): each image's MSE over the
    variance of the teacher's activations of that image (the rows of the CFG batch, each over its channels and
    positions), then the mean over images. A mean over images is what makes the objective the same however the batch
    is split: N processes x B, or --grad-accum micro-batches, optimise exactly what one process x N*B does (a
    variance over the micro-batch, as before, made their L_feat gradients differ by 35 % with a perturbed teacher)."""
    per_image = tuple(range(1, h.dim()))
    return ((h - h_teacher).pow(2).mean(per_image) / h_teacher.var(per_image).clamp_min(1e-12)).mean()


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


def draw_distill_step(pipe, args: Args, k: int, generator: torch.Generator) -> int:
    """The index (of the T DDIM steps) of the one state where the teacher is compared this batch: one of the K
    gradient steps, drawn uniformly, so that the term is an unbiased estimate of the mean over the K states at the
    cost of one state (at most one more student call, none when the first gradient step is drawn); or, with
    --distill-at trajectory, one of all T steps, so that the steps which set an image's structure are distilled too.
    With K = 1 at the gradient steps nothing is drawn: the run's random stream is as it always was."""
    steps = len(pipe.scheduler.timesteps)
    first = steps - k if args.distill_at == "gradient-steps" else 0
    return first if first == steps - 1 else int(torch.randint(first, steps, (), generator=generator))


def train_step(pipe, scorer, prompts, teacher, args: Args, generator: torch.Generator, accelerator=None,
               scaler=None, method=None, step: int = 0) -> dict:
    """Sample a batch with gradients through the last K steps, score it, and backpropagate
    L = L_reward + lambda_out L_out + lambda_feat L_feat (+ a comparison method's weighted terms: `method`, a
    baselines.Method, which may also set K at this step of the task), divided by --grad-accum (gradients add up over
    micro-batches) and multiplied by the fp16 loss scale if a grad scaler is given. Returns the rewards (B,), the
    loss terms (detached) and K."""
    process = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    batch, x_T, k = draw_batch(pipe, prompts, args, generator, process)
    k = method.k(k, step, args) if method is not None else k
    at = draw_distill_step(pipe, args, k, generator) if teacher is not None else None

    def backward(loss):  # this micro-batch's share of the step (--grad-accum), times fp16's loss scale if enabled
        (loss / args.grad_accum if scaler is None else scaler.scale(loss / args.grad_accum)).backward()
    x0, terms = sample_latents(pipe, x_T, encode_prompts(pipe, batch), args, k, teacher, generator, process, at,
                               backward)
    images = decode_with_grad(pipe.vae, x0, args.checkpointing)                           # (B, 3, H, W)
    rewards = score(scorer, images, batch)                                                # (B,)
    terms["loss_reward"] = -args.reward_scale * rewards.mean()
    # Terms that distil backpropagated already (a separate student call) come back detached: here they are the value
    loss = terms["loss_reward"] + args.lambda_out * terms["loss_out"] + args.lambda_feat * terms["loss_feat"]
    for name, (weight, term) in (method.losses(pipe, prompts, args, generator) if method is not None else {}).items():
        terms[name] = term
        loss = loss + weight * term
    with full_precision(x_T.device):  # the K steps' checkpoints are recomputed in here: as precise as their forward
        backward(loss)
    terms["loss"] = loss
    return {"rewards": rewards.detach(), **{name: term.detach().float() for name, term in terms.items()}, "k": k}


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


def train_task(pipe, scorer, prompts, params, args: Args, task: int, name: str, run: Run, method=None) -> None:
    """Optimise one reward for --steps-per-task steps, updating the EMA teacher after every step. A step whose loss or
    gradient is not finite is skipped (see optimizer_update); `run` logs each step, counts the skipped ones, writes
    checkpoints and continues a task from a checkpoint taken inside it (its step, optimizer and teacher). A
    comparison method (--baseline) first says which of the adapter's tensors train and prepares its terms."""
    if method is not None:
        params = method.start_task(pipe, params, task, prompts, args)
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    first, teacher, spread = run.start_task(task, name, params, optimizer, new_teacher(params, args),
                                            lambda: reward_spread(pipe, scorer, prompts, args, task))
    if isinstance(scorer, RewardSum):  # a joint task: each reward in units of its own spread, summed
        scorer.spreads.copy_(torch.tensor(spread))
        spread = 1.0
    task_args = dataclasses.replace(args, reward_scale=args.reward_scale / spread)  # L_reward in units of sigma_n
    for step in run.steps(first):
        micro_batches = [train_step(pipe, scorer, prompts, teacher, task_args, run.generator, run.accelerator,
                                    run.scaler, method, step) for _ in range(args.grad_accum)]
        average_gradients(params, run.accelerator)
        metrics = step_metrics(micro_batches, run.accelerator)
        metrics.update(optimizer_update(optimizer, params, run.scaler, teacher, args, metrics["loss"]))
        run.after_step(metrics)


SPREAD_IMAGES = 16  # pictures that measure a reward's spread at a task's start
SAMPLING_BATCH = 8  # pictures per call when sampling without gradients (the spread), as eval.py's --batch-size


def task_seed(seed: int, task: int) -> int:
    """The seed of what a task draws at its start, apart from the run's streams: seed * 1000 + task modulo 2^64, the
    range torch.Generator.manual_seed takes, so that every --seed in [0, 2^63) works (10^17 x 1000 overflowed after
    config.json was written) and seeds below 2^63 / 1000 keep the draws they always had."""
    return (seed * 1000 + task) % 2 ** 64


def reward_spread(pipe, scorer, prompts: list[str], args: Args, task: int) -> float | list[float]:
    """sigma_n, the unit of L_reward with --reward-norm task-start-std: the standard deviation of reward n over
    SPREAD_IMAGES pictures of the model as the task starts (prompts and x_T seeded by --seed and the task, the run's
    own random streams untouched). Rewards differ in scale by orders of magnitude (a CLIP cosine moves by hundredths,
    compressibility by bits per block); in these units one --lambda-out weighs the same against every reward, and a
    gain of 1 is eval.py's "1 base std". 1 with --reward-norm none. For a joint task (RewardSum), each of its
    rewards' spread, a list."""
    if args.reward_norm == "none":
        return 1.0
    parts = scorer.parts if isinstance(scorer, RewardSum) else scorer  # (B, J) or (B,)
    generator = torch.Generator().manual_seed(task_seed(args.seed, task))
    chosen = [prompts[i] for i in torch.randint(len(prompts), (SPREAD_IMAGES,), generator=generator)]
    latents = initial_latents(pipe, SPREAD_IMAGES, args.resolution, generator)
    rewards = []
    for start in range(0, SPREAD_IMAGES, SAMPLING_BATCH):  # no graph: more pictures per call than a training batch
        batch = slice(start, start + SAMPLING_BATCH)
        images = generate(pipe, chosen[batch], latents[batch], args, torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            rewards.append(score(parts, images, chosen[batch]))
    spread = torch.cat(rewards).std(0)
    return torch.where(spread.isfinite() & (spread > 1e-12), spread, 1.0).tolist()


def sample_prompts(prompts: list[str]) -> list[str]:
    """The 4 prompts samples.png shows: spread over the list (the toy world's seen captions are listed shape by shape
    and colour by colour, so the first four would all be red circles)."""
    return prompts[::max(1, len(prompts) // 4)][:4]


def samples(pipe, prompts: list[str], args: Args) -> torch.Tensor:
    """What samples.png shows of the model as it is: the prompts from fixed x_T (seeded with --seed), (n, 3, H, W).
    Inside adapters_disabled: the base model's, shown beside every task's."""
    latents = initial_latents(pipe, len(prompts), args.resolution, torch.Generator().manual_seed(args.seed))
    return generate(pipe, prompts, latents, args)


# ----------------------------------------------------------------------------------------------------------------
# The reward sequence.

def main(args: Args) -> StableDiffusionPipeline | None:
    """Train the reward sequence, or continue it with --resume; returns the pipeline with the trained adapters (None
    if a resumed run was already complete). Runs as one process (`python rid.py`) or data parallel (`accelerate
    launch rid.py`); only the main process writes. Everything is checked before the first byte is written."""
    args = resolve(args)
    new = check_args(args)
    method = comparison_method(args)
    prompts = read_prompts(args.prompts, args.tiny)
    threads = choose_threads()  # said once every check has passed
    run = Run(args, new)  # the checkpoint to resume from, the Accelerator, the fp16 grad scaler
    if run.finished:
        return None
    device = run.accelerator.device
    pipe = load_pipeline(args, device)
    check_model_args(args, pipe)
    scorers = {name: load_reward(name, "cpu", args.tiny) for name in dict.fromkeys(reward_names(args))}
    pipe.scheduler.set_timesteps(args.num_steps, device=device)
    torch.manual_seed(args.seed)  # LoRA initialisation: the same on every process
    run.open(pipe, prompts, add_task_adapter)  # checks that need the model, the run's files, the checkpoint restored
    if run.finished:  # by another --resume while the models were built
        return None
    run.accelerator.print(threads, file=sys.stderr)
    shown = sample_prompts(prompts)
    with adapters_disabled(pipe.unet):  # the base model's samples, once: the left column of every samples.png
        base = samples(pipe, shown, args) if run.is_main else None
    with run.training():
        for task, name in run.tasks():
            params = task_adapter(pipe.unet, args, task)
            with scorer_on(scorers[name], device) as scorer:  # only this task's reward tower on the device
                train_task(pipe, scorer, prompts, params, args, task, name, run, method)
            if run.is_main:
                run.task_end(torch.stack([base, samples(pipe, shown, args)], dim=1), shown, lora_state_dict(pipe.unet))
    return pipe


def comparison_method(args: Args):
    """--baseline: a comparison method's hooks (baselines.Method), checked before anything is written; None for RID
    and plain fine-tuning, which need none."""
    if not args.baseline:
        return None
    import baselines  # only runs that compare with another paper read it
    return baselines.build(args.baseline, args)


def cli(argv: list[str]) -> int:
    """python rid.py FLAGS: 0 done, 2 bad input, 3 diverged, 74 a write failed, 130/143 interrupted (SIGINT/SIGTERM),
    each failure one line on stderr."""
    return exit_status("rid.py", lambda: main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
