"""Comparison methods from other papers, beside RID, each carried over to reward backprop on Stable Diffusion and
reached through one seam: `rid.py --baseline "NAME key=value ..."` (class Method; rid.train_task and rid.train_step
call its hooks, and nothing else in rid.py knows these methods).

    rid.py --tiny --baseline "clora weight=1" --lambda-out 0 --lambda-feat 0 --lora-targets attn2.to_k,attn2.to_v
    rid.py --tiny --baseline "replay weight=1" --lambda-out 0 --lambda-feat 0
    rid.py --tiny --baseline "progressive start=7 levels=4" --lambda-out 0 --lambda-feat 0 --shared-adapter
    rid.py --tiny --baseline "inflora energy=0.95" --lambda-out 0 --lambda-feat 0

- clora (C-LoRA, Smith et al. 2023, Continual Diffusion): a penalty on the new adapter's change of each weight
  where earlier adapters changed it, || |sum_{a<n} B_a A_a| * (B_n A_n) ||^2; the paper adapts the cross-attention
  keys and values only (--lora-targets attn2.to_k,attn2.to_v).
- replay (generative distillation, Masip et al. 2023): at each task's start the model is frozen as the teacher (the
  adapter group's new adapter at B = 0); every
  step it draws replay latents with a few DDIM steps (2, as the paper), re-noises each at a random timestep with
  fresh noise, and the student matches the teacher's noise prediction there. RID's --distill-at trajectory instead
  distils at the student's own visited states, with an EMA teacher.
- progressive (B^2-DiffuRL's backward progressive training, Hu et al. 2025): the trained window always ends at the
  clean image and grows backwards in stages over a task, K = start .. T in `levels` levels. Its branch-based
  sampling is not carried over: a per-group reward baseline changes nothing in a pathwise (reward-backprop)
  gradient, since d/dtheta of a baseline that does not depend on the sample is zero, and the continuations of one
  branch differ only with DDIM eta > 0.
- inflora (InfLoRA, Liang and Li 2024): the new task's LoRA down-projection A is fixed, not trained, to the input
  directions earlier tasks leave unused: at a task's start, each LoRA layer's input covariance is measured on the
  model as it is then (on the task's prompts); the directions holding `energy` of it are the earlier tasks'
  subspace, and A is the top eigenvectors of the covariance projected off it; only B trains. In task 1 nothing is
  protected: A is the top input directions.
Merged per-reward LoRAs (model soups; no sequential training) are made from single-task runs: merge_loras().

Every method keeps no state a checkpoint would need: what it measures at a task's start it measures again, on the
same model, when a run resumes inside the task.
"""
import contextlib

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

import rid
from checks import UsageError
from models import adapters_disabled, lora_targets


class Method:
    """The seam. start_task: at a task's start, the tensors to train (of the task's adapter, `params`); k: the
    number of gradient steps of a batch at this step of the task; losses: the method's terms, {name: (weight,
    term)}, added to rid.py's L."""

    def start_task(self, pipe, params: dict, task: int, prompts: list[str], args) -> dict:
        return params

    def k(self, k: int, step: int, args) -> int:
        return k

    def losses(self, pipe, prompts: list[str], args, generator: torch.Generator) -> dict:
        return {}


# ----------------------------------------------------------------------------------------------------------------
# C-LoRA.

@torch.no_grad()
def past_deltas(unet, current: str) -> dict[str, torch.Tensor]:
    """C-LoRA's record of what earlier tasks changed: for every LoRA layer, |sum_a B_a A_a| (out, in) over the other
    adapters a (scale 1: alpha = r). Constant during a task; empty for a first or a shared adapter."""
    deltas = {}
    for name, module in lora_modules(unet).items():
        earlier = [a for a in module.lora_A if a != current]
        if earlier:
            deltas[name] = sum(module.lora_B[a].weight @ module.lora_A[a].weight for a in earlier).abs()
    return deltas


def clora_penalty(unet, current: str, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """C-LoRA's self-regularisation: sum over layers of || |sum_{a<n} B_a A_a| * (B_n A_n) ||^2, elementwise: the
    new adapter may change the weights freely only where earlier tasks did not."""
    modules = dict(unet.named_modules())
    terms = [(deltas[name] * (modules[name].lora_B[current].weight @ modules[name].lora_A[current].weight)).pow(2).sum()
             for name in deltas]
    return torch.stack(terms).sum() if terms else unet.conv_in.weight.new_zeros(())  # task 1: nothing to protect


def lora_modules(unet) -> dict:
    """The LoRA layers (PEFT's tuner layers) by name."""
    return {name: m for name, m in unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}


class CLoRA(Method):
    def __init__(self, weight: float):
        self.weight = weight

    def start_task(self, pipe, params, task, prompts, args):
        self.adapter = rid.adapter_name(args, task)
        self.deltas = past_deltas(pipe.unet, self.adapter)
        return params

    def losses(self, pipe, prompts, args, generator):
        return {"loss_clora": (self.weight, clora_penalty(pipe.unet, self.adapter, self.deltas))}


# ----------------------------------------------------------------------------------------------------------------
# Generative distillation.

class Replay(Method):
    """Masip et al.'s generative distillation: replay latents drawn by the task-start teacher in `steps` DDIM steps,
    re-noised at a random timestep each, and the student's noise prediction regressed on the teacher's there."""

    def __init__(self, weight: float, steps: int):
        self.weight, self.steps = weight, steps

    def start_task(self, pipe, params, task, prompts, args):
        # The model as the task started, frozen: the new adapter with B = 0 (whatever A is), so that a run resumed
        # inside the task has the same teacher.
        self.teacher = {n: torch.zeros_like(p) if ".lora_B." in n else p.detach().clone() for n, p in params.items()}
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(self.steps, device=pipe.device)
        return params

    @torch.no_grad()
    def replay(self, pipe, text_emb: torch.Tensor, args, generator: torch.Generator) -> torch.Tensor:
        """The teacher's replay latents x_0, (B,4,h,w), from fresh x_T in self.steps DDIM steps (eta 0)."""
        x = rid.initial_latents(pipe, text_emb.shape[0] // 2, args.resolution, generator)
        for t in self.scheduler.timesteps:
            eps, _ = rid.unet_eps(pipe.unet, self.scheduler.scale_model_input(x, t), t, text_emb, params=self.teacher)
            x = self.scheduler.step(rid.guide(eps, args.guidance_scale), t, x).prev_sample
        return x

    def losses(self, pipe, prompts, args, generator):
        ids = torch.randint(len(prompts), (args.batch_size,), generator=generator)
        text_emb = rid.encode_prompts(pipe, [prompts[i] for i in ids])                     # (2B, L, D)
        x0 = self.replay(pipe, text_emb, args, generator)
        t = torch.randint(pipe.scheduler.config.num_train_timesteps, (len(x0),), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = pipe.scheduler.add_noise(x0, noise, t)                                       # fresh noise, random t
        t2 = torch.cat([t, t])                                                             # the CFG batch's
        with rid.full_precision(x0.device):
            eps, _ = rid.checkpointed(args.checkpointing, pipe.unet, x_t, t2, text_emb)
            with torch.no_grad():
                eps_teacher, _ = rid.unet_eps(pipe.unet, x_t, t2, text_emb, params=self.teacher)
        return {"loss_replay": (self.weight, F.mse_loss(eps, eps_teacher))}


# ----------------------------------------------------------------------------------------------------------------
# Backward progressive training.

class Progressive(Method):
    """B^2-DiffuRL's schedule: K rises from `start` to T (--num-steps) in `levels` equal stages over the task, the
    window always ending at the clean image; --k is ignored."""

    def __init__(self, start: int, levels: int):
        self.start, self.levels = start, levels

    def k(self, k, step, args):
        level = min(self.levels - 1, step * self.levels // args.steps_per_task)               # 0 .. levels-1
        return self.start + round(level * (args.num_steps - self.start) / max(1, self.levels - 1))


# ----------------------------------------------------------------------------------------------------------------
# InfLoRA.

INPUT_IMAGES = 8  # pictures whose sampling passes measure each LoRA layer's input covariance


@torch.no_grad()
def input_covariances(pipe, prompts: list[str], args, task: int) -> dict[str, torch.Tensor]:
    """Each LoRA layer's uncentred input covariance X^T X / n, (in, in), over every UNet call of INPUT_IMAGES
    pictures (all T DDIM steps, both CFG halves), prompts and x_T seeded by --seed and the task."""
    generator = torch.Generator().manual_seed(args.seed * 1000 + task)
    chosen = [prompts[i] for i in torch.randint(len(prompts), (INPUT_IMAGES,), generator=generator)]
    sums, counts = {}, {}

    def record(name):
        def hook(module, inputs):
            x = inputs[0].detach().float().flatten(0, -2)                                   # (tokens, in)
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + len(x)
        return hook

    targets = lora_targets(pipe.unet, args.lora_targets)
    hooks = [module.register_forward_pre_hook(record(name)) for name, module in targets.items()]
    try:
        rid.generate(pipe, chosen, rid.initial_latents(pipe, INPUT_IMAGES, args.resolution, generator), args)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: sums[name] / counts[name] for name in targets}


def interference_free_basis(covariance: torch.Tensor, rank: int, energy: float | None) -> torch.Tensor:
    """InfLoRA's A, (rank, in): the top `rank` eigenvectors of the covariance after projecting off the subspace of
    its top eigenvectors that hold `energy` of its trace (the earlier tasks' inputs); with energy None (task 1),
    the top eigenvectors themselves."""
    values, vectors = torch.linalg.eigh(covariance.double())                              # ascending
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    if energy is not None:
        kept = int((values.cumsum(0) / values.sum().clamp_min(1e-30) < energy).sum()) + 1
        old = vectors[:, :kept]                                                           # (in, m)
        projector = torch.eye(len(values), dtype=old.dtype) - old @ old.T
        _, vectors = torch.linalg.eigh(projector @ covariance.double() @ projector)
        vectors = vectors.flip(1)
    return vectors[:, :rank].T.float()


class InfLoRA(Method):
    def __init__(self, energy: float):
        self.energy = energy

    def start_task(self, pipe, params, task, prompts, args):
        adapter = rid.adapter_name(args, task)
        modules = lora_modules(pipe.unet)
        earlier = [a for a in pipe.unet.peft_config if a != adapter]
        trained = [module.lora_B[adapter].weight for module in modules.values()]
        kept = [b.detach().clone() for b in trained]
        with torch.no_grad():  # the model as the task started (B = 0), also on a resume inside the task
            for b in trained:
                b.zero_()
            with contextlib.nullcontext() if earlier else adapters_disabled(pipe.unet):
                covariances = input_covariances(pipe, prompts, args, task)
            for b, k in zip(trained, kept):
                b.copy_(k)
        for name, module in modules.items():
            a = interference_free_basis(covariances[name], args.lora_rank, self.energy if earlier else None)
            module.lora_A[adapter].weight.data.copy_(a)
        return {n: p for n, p in params.items() if ".lora_B." in n}  # A stays fixed


# ----------------------------------------------------------------------------------------------------------------
# Merged per-reward LoRAs.

def merge_loras(loras: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """One LoRA whose weight change is sum_i w_i B_i A_i, from LoRAs of the same layers (PEFT's key names, or
    diffusers' file format: lora.down = A, lora.up = B; alpha = rank): A stacked along the rank axis, B scaled and
    stacked along its input axis (rid.lora_state_dict's stacking, with weights)."""
    def is_a(key):
        return ".lora_A." in key or ".lora.down." in key
    return {key: torch.cat([lora[key] * (1 if is_a(key) else w) for lora, w in zip(loras, weights)],
                           dim=0 if is_a(key) else 1) for key in loras[0]}


# ----------------------------------------------------------------------------------------------------------------
# --baseline "NAME key=value ...": each method's settings, their defaults and ranges.

SPECS = {
    "clora": (CLoRA, {"weight": (float, 1.0, lambda v: 0 < v <= 1e6)}),
    "replay": (Replay, {"weight": (float, 1.0, lambda v: 0 < v <= 1e6), "steps": (int, 2, lambda v: 1 <= v <= 50)}),
    "progressive": (Progressive, {"start": (int, 1, lambda v: v >= 1), "levels": (int, 4, lambda v: v >= 1)}),
    "inflora": (InfLoRA, {"energy": (float, 0.95, lambda v: 0 < v < 1)}),
}


def build(spec: str, args) -> Method:
    """The method --baseline names, with its settings checked against it and against rid.py's flags: one UsageError
    line for anything wrong (exit status 2, before anything is written)."""
    name, *pairs = spec.split()
    if name not in SPECS:
        raise UsageError(f"--baseline: unknown method {name!r}; known: {', '.join(SPECS)}")
    cls, fields = SPECS[name]
    values = {key: default for key, (_, default, _) in fields.items()}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if key not in fields:
            raise UsageError(f"--baseline {name}: unknown setting {key!r}; it has {', '.join(fields)}")
        kind, _, valid = fields[key]
        try:
            values[key] = kind(text)
        except ValueError:
            raise UsageError(f"--baseline {name}: {key} must be {kind.__name__}, got {text!r}") from None
        if not valid(values[key]):
            raise UsageError(f"--baseline {name}: {key}={text} is out of range")
    if name in ("clora", "inflora", "replay") and args.shared_adapter:
        raise UsageError(f"--baseline {name} works on the adapter group (a new adapter per task, the earlier ones "
                         "kept); drop --shared-adapter")
    if name == "progressive" and values["start"] > args.num_steps:
        raise UsageError(f"--baseline progressive: start={values['start']} exceeds --num-steps {args.num_steps}")
    return cls(**values)
