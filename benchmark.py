"""Benchmark: the cost of one optimizer step, RID against plain fine-tuning, and peak memory against K.

    python benchmark.py --tiny                                   # tiny models, CPU, about a minute
    python benchmark.py --random-weights --resolution 128 --num-steps 20 --batch-size 1   # CPU, reduced
    python benchmark.py --random-weights                         # SD1.5 architecture at 512 px (a GPU)

Everything is measured in one process on one model, batch and T, configurations interleaved round by round so that a
busy machine slows all of them alike; medians over --repeats rounds after one warm-up round, and each ratio the median
of its two configurations' ratio within a round (benchmark.paired). A step is the loop's own
(rid.train_step, then rid.optimizer_update); a minimal loop written as directly as diffusers allows is the yardstick.
"""
import contextlib
import gc
import itertools
import json
import logging
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cli as command_line  # benchmark.cli is the function at the end


@dataclass
class BenchmarkArgs:
    tiny: bool = field(default=False, metadata={"help": "the toy world's tiny models (as rid.py --tiny)"})
    random_weights: bool = field(default=False, metadata={"help": "SD1.5's architecture with random weights"})
    resolution: int | None = field(default=None, metadata={"help": "image side in pixels [rid.py's default for the "
                                                                    "mode]"})
    num_steps: int | None = field(default=None, metadata={"help": "DDIM steps T [rid.py's default for the mode]"})
    batch_size: int | None = field(default=None, metadata={"help": "prompts per step [rid.py's default for the mode]"})
    ks: str = field(default="1,5,10", metadata={"help": "the K values to measure, comma-separated"})
    reward: Literal["aesthetic", "compressibility"] = field(default="aesthetic", metadata={
        "help": "aesthetic: the CLIP ViT-L/14 tower of the real step (random weights with --random-weights); "
                "compressibility: no tower"})
    mixed_precision: Literal["no", "bf16"] = field(default="no", metadata={
        "help": "rid.py's precision policy to time (bf16: see docs/precision.md)"})
    repeats: int = field(default=3, metadata={"help": "timed rounds (the median is reported)"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)"})
    json: str | None = field(default=None, metadata={"help": "also write the results to this JSON file"})
    decode: bool = field(default=False, metadata={
        "help": "measure only the decode with gradients instead: rid.py's (one activation checkpoint per image) "
                "against one checkpoint over the batch (the minimal loop's) and none, peak memory and seconds"})
    trl: bool = field(default=False, metadata={
        "help": "also time trl's AlignPropTrainer step on the same model, batch, T, CFG and reward (the public "
                "reward-backprop trainer; removed in trl 0.24: pip install trl==0.23.1 in its own environment)"})
    flops: bool = field(default=False, metadata={
        "help": "count the FLOPs of one step's parts instead (torch's FlopCounterMode on the meta device: no "
                "weights, no time) and where each runs under rid.py's precision policy"})


def parse_args(argv: list[str]) -> BenchmarkArgs:
    opts = command_line.parse(BenchmarkArgs, argv, prog="benchmark.py", description=__doc__.split("\n")[0])
    if opts.tiny and opts.random_weights:
        raise command_line.UsageError("--tiny and --random-weights exclude each other: give one")
    return opts


# Parsed before the imports below (torch, diffusers, open_clip take seconds), so that --help and a mistyped flag
# answer at once; cli() parses again.
if __name__ == "__main__":
    command_line.parse_or_exit("benchmark.py", parse_args, sys.argv[1:])

import open_clip  # noqa: E402
import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402
from tqdm import tqdm  # noqa: E402

import checks  # noqa: E402
import runfiles  # noqa: E402
import rid  # noqa: E402
from eval import fmt, markdown_table  # noqa: E402
from rewards import TOWER_CONFIGS, Aesthetic, MissingWeights, clip_tower, load_reward, seeded  # noqa: E402

BENCH_METHODS = {"plain": dict(lambda_out=0.0, lambda_feat=0.0, shared_adapter=True), "rid": {}}  # rid: defaults


def bench_args(opts: BenchmarkArgs, method: str, k: int, checkpointing: bool = True) -> rid.Args:
    """rid.Args of one benchmark configuration: the mode's defaults, the benchmark's model, batch and T."""
    sizes = {name: getattr(opts, name) for name in ("resolution", "num_steps", "batch_size")}
    args = rid.Args(tiny=opts.tiny, random_weights=opts.random_weights, rewards=opts.reward, k=k,
                    mixed_precision=opts.mixed_precision, checkpointing=checkpointing, **BENCH_METHODS[method], **sizes)
    return rid.resolve(args)


def bench_scorer(opts: BenchmarkArgs, device: torch.device) -> torch.nn.Module:
    """The benchmark's reward. With --random-weights, aesthetic is the real scorer's architecture (OpenAI CLIP
    ViT-L/14 and the 768-1024-128-64-16-1 MLP) with random weights: a real step's cost, no download."""
    if opts.random_weights and opts.reward == "aesthetic":
        with seeded(1):
            scorer = Aesthetic(clip_tower(TOWER_CONFIGS["aesthetic"]), dim=768)
        return scorer.requires_grad_(False).eval().to(device)
    return load_reward(opts.reward, device, opts.tiny)


def bench_setup(opts: BenchmarkArgs, device: torch.device, tasks: int = 1):
    """The model with `tasks` LoRA adapters (the last one trainable; earlier ones frozen with non-zero B, as after
    training, so that they cost what trained adapters cost), the scorer, and AdamW over the trainable LoRA."""
    args = bench_args(opts, "rid", 1)
    pipe = rid.load_pipeline(args, device)
    rid.check_model_args(args, pipe)
    pipe.scheduler.set_timesteps(args.num_steps, device=device)
    torch.manual_seed(args.seed)
    for task in range(1, tasks + 1):
        params = rid.task_adapter(pipe.unet, args, task=task)
        with torch.no_grad():
            for name, p in params.items():
                if task < tasks and "lora_B" in name:
                    p.add_(0.01 * torch.randn_like(p))
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    return pipe, params, bench_scorer(opts, device), optimizer


@contextlib.contextmanager
def distilled_at(step: int | None):
    """RID's distilled state forced to DDIM step `step` inside the block (None: drawn, as in training). RID draws one
    of the K gradient steps per batch, and the first costs one student call less than the others: a median over a
    few rounds would report whichever the rounds drew, so the benchmark times both and weighs them as the draw does."""
    drawn = rid.draw_distill_step
    rid.draw_distill_step = drawn if step is None else lambda *_: step
    try:
        yield
    finally:
        rid.draw_distill_step = drawn


def optimizer_step(pipe, scorer, params, teacher, optimizer, args: rid.Args, generator) -> None:
    """One optimizer step as rid.train_task takes it: train_step (sample with gradients through the last K steps,
    score, backward), then rid.optimizer_update (gradient clipping, AdamW, and for RID the EMA teacher update)."""
    scaler = torch.amp.GradScaler(enabled=False)  # the benchmark runs in fp32: no loss scaling, nothing to keep
    metrics = rid.train_step(pipe, scorer, checks.DEFAULT_PROMPTS, teacher, args, generator, scaler=scaler)
    rid.optimizer_update(optimizer, params, scaler, teacher, args, metrics["loss"].item())


def minimal_loss(pipe, scorer, args: rid.Args, generator) -> torch.Tensor:
    """The yardstick for rid.py's own overhead: a plain step's loss written as directly as diffusers allows, i.e.
    the loop every reward-backprop trainer has. The same batch (rid.draw_batch), prompt embeddings, decode and fp32
    reward (rid.score) as rid.py, the UNet called directly with its adapters active, the last k calls and the
    decode in non-reentrant activation checkpointing as rid.py's default; none of rid.py's fast path."""
    prompts, x, k = rid.draw_batch(pipe, checks.DEFAULT_PROMPTS, args, generator)
    emb = rid.encode_prompts(pipe, prompts)

    def guided_eps(x_in, t):
        eps_uncond, eps_cond = pipe.unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=emb).sample.chunk(2)
        return eps_uncond + args.guidance_scale * (eps_cond - eps_uncond)

    timesteps = pipe.scheduler.timesteps
    for i, t in enumerate(timesteps):
        x_in = pipe.scheduler.scale_model_input(x, t)
        if i < len(timesteps) - k:
            with torch.no_grad():
                eps = guided_eps(x_in, t)
        else:
            eps = checkpoint(guided_eps, x_in, t, use_reentrant=False)
        x = pipe.scheduler.step(eps, t, x, eta=args.eta, generator=generator).prev_sample
    images = checkpoint(rid.decode, pipe.vae, x, use_reentrant=False)
    return -args.reward_scale * rid.score(scorer, images, prompts).mean()


def minimal_step(pipe, scorer, params, optimizer, args: rid.Args, generator) -> None:
    """minimal_loss, backward, clipping and AdamW: a plain step without rid.py."""
    minimal_loss(pipe, scorer, args, generator).backward()
    torch.nn.utils.clip_grad_norm_(params.values(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trl_step(opts: BenchmarkArgs, k: int, device: torch.device):
    """One optimizer step of trl 0.23.1's AlignPropTrainer on its own copy of the benchmark's model, as a function:
    trl's DDIM loop with LoRA r4 on the same layers, every UNet call with gradients in checkpointing and the latents
    detached before the last K (truncated_backprop_timestep = T - K), the same reward, CFG, batch, lr and clipping."""
    import tempfile
    from accelerate import PartialState
    try:
        from trl import AlignPropConfig, AlignPropTrainer
        from trl.models.modeling_sd_base import DefaultDDPOStableDiffusionPipeline
    except ImportError:
        raise checks.UsageError("--trl needs trl 0.23.1 (its AlignPropTrainer is gone from 0.24): pip install "
                                "trl==0.23.1 in its own virtual environment") from None
    args = bench_args(opts, "plain", k)
    sd = object.__new__(DefaultDDPOStableDiffusionPipeline)  # its __init__ downloads by name; this is the same model
    sd.sd_pipeline, sd.use_lora = rid.load_pipeline(args, device), True
    config = AlignPropConfig(sample_num_steps=args.num_steps, sample_guidance_scale=args.guidance_scale, sample_eta=0.0,
                             train_batch_size=args.batch_size, truncated_backprop_rand=False,
                             truncated_backprop_timestep=args.num_steps - k, train_learning_rate=args.lr,
                             train_max_grad_norm=args.grad_clip, mixed_precision="no", log_with=None,
                             project_kwargs={"project_dir": tempfile.mkdtemp()})
    scorer = bench_scorer(opts, device)
    prompts = itertools.cycle(checks.DEFAULT_PROMPTS)
    PartialState()  # trl logs through Accelerate before it builds its Accelerator
    trainer = AlignPropTrainer(config, lambda images, batch, metadata: (scorer(images, list(batch)), {}),
                               lambda: (next(prompts), {}), sd)
    sd.sd_pipeline.set_progress_bar_config(disable=True)
    return lambda: trainer.step(0, 0)


def synchronized_seconds(fn, device: torch.device) -> float:
    """Wall-clock seconds of fn(), with the GPU's queued work finished before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def step_times(opts: BenchmarkArgs, ks: list[int], device: torch.device) -> dict[str, list[float]]:
    """Seconds of one optimizer step for each (method, K), and of one sampling pass (rid.generate: T steps without
    gradients and the decode), all on the same model, batch and T, round by round. One warm-up round, then --repeats
    rounds; each round runs every configuration once, back to back, so that a busy machine slows every configuration
    alike (and paired() compares them within each round)."""
    pipe, params, scorer, optimizer = bench_setup(opts, device)
    jobs = {}
    for k in ks:
        for method in BENCH_METHODS:
            args = bench_args(opts, method, k)
            teacher = rid.new_teacher(params, args)
            step = (pipe, scorer, params, teacher, optimizer, args, torch.Generator().manual_seed(0))
            if method == "rid" and k > 1:  # the distilled state: the first gradient step's (free) and a later one
                at = {"first": args.num_steps - k, "later": args.num_steps - 1}
                for state in at:
                    jobs[f"rid K={k} {state} state"] = lambda step=step, at=at[state]: distilled(at, step)
            else:
                jobs[f"{method} K={k}"] = lambda step=step: optimizer_step(*step)
        # --no-checkpointing: no recompute in the backward, for the memory the table beside it states
        off = (pipe, scorer, params, None, optimizer, bench_args(opts, "plain", k, checkpointing=False),
               torch.Generator().manual_seed(0))
        jobs[f"plain K={k} checkpointing off"] = lambda off=off: optimizer_step(*off)
        if opts.mixed_precision == "no":  # the minimal loop has no precision policy: compared in fp32 only
            minimal = (pipe, scorer, params, optimizer, bench_args(opts, "plain", k), torch.Generator().manual_seed(0))
            jobs[f"minimal K={k}"] = lambda minimal=minimal: minimal_step(*minimal)
        if opts.trl:
            jobs[f"trl K={k}"] = trl_step(opts, k, device)
    pipe3, params3, _, optimizer3 = bench_setup(opts, device, tasks=3)  # task 3: two frozen adapters, one trained
    args = bench_args(opts, "rid", ks[0])  # plain trains one shared adapter: its task 3 is its task 1
    step = (pipe3, scorer, params3, rid.new_teacher(params3, args), optimizer3, args, torch.Generator().manual_seed(0))
    jobs[f"rid K={ks[0]} task 3"] = lambda step=step: optimizer_step(*step)
    sample_args = bench_args(opts, "plain", 1)
    prompts = checks.DEFAULT_PROMPTS[:sample_args.batch_size]
    latents = rid.initial_latents(pipe, len(prompts), sample_args.resolution, torch.Generator().manual_seed(0))
    jobs["sampling"] = lambda: rid.generate(pipe, prompts, latents, sample_args)
    seconds = {name: [] for name in jobs}
    for round_ in tqdm(range(1 + opts.repeats), desc="timing rounds", dynamic_ncols=True):
        for name, job in jobs.items():
            elapsed = synchronized_seconds(job, device)
            if round_ > 0:  # round 0 warms up: first-call allocations, kernel selection, caches
                seconds[name].append(elapsed)
    for k in ks:  # RID's expected step over the uniform draw of the distilled state among the K gradient steps
        if k > 1:
            first, later = seconds.pop(f"rid K={k} first state"), seconds.pop(f"rid K={k} later state")
            seconds[f"rid K={k}"] = [(f + (k - 1) * s) / k for f, s in zip(first, later)]
    return seconds


def distilled(at: int, step: tuple) -> None:
    with distilled_at(at):
        optimizer_step(*step)


def resident_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_above_baseline(step, device: torch.device) -> int | None:
    """Peak memory in bytes of one call of step() above what is held before it, after one warm-up call, so that
    one-time allocations (AdamW's moments, the libraries' kernel caches) are not counted. On a GPU: the allocator's
    peak, torch.cuda.max_memory_allocated. On CPU: the kernel's peak resident set size (VmHWM), reset before the
    call by writing 5 to /proc/self/clear_refs; the callers run this in a fresh process whose malloc returns every
    large block to the kernel when it is freed, so that resident memory follows the live tensors. None if out of
    memory."""
    try:
        step()  # warm-up
    except torch.OutOfMemoryError:
        return None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        before = resident_kib("VmRSS") * 1024
    try:
        step()
    except torch.OutOfMemoryError:
        return None
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_kib("VmHWM") * 1024
    return peak - before


def peak_training_memory(opts: BenchmarkArgs, k: int, checkpointing: bool) -> int | None:
    """Peak memory in bytes of one RID optimizer step above what is held before it (the weights, LoRA, teacher and
    AdamW state), i.e. what training at this K adds (peak_above_baseline), with the distilled state at the last
    gradient step: the most a step holds (one more student call there when K > 1)."""
    device = checks.check_device(opts.device)
    pipe, params, scorer, optimizer = bench_setup(opts, device)
    args = bench_args(opts, "rid", k, checkpointing)
    teacher, generator = rid.new_teacher(params, args), torch.Generator().manual_seed(0)
    step = (pipe, scorer, params, teacher, optimizer, args, generator)
    return peak_above_baseline(lambda: distilled(args.num_steps - 1, step), device)


@contextlib.contextmanager
def child_environment(**variables: str):
    """Set environment variables for the processes started inside the block (this process's own malloc has read
    its settings at start-up already), and restore the environment after it."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def peak_memories(opts: BenchmarkArgs, ks: list[int]) -> dict[str, int | None]:
    """peak_training_memory for every K, checkpointing on and off, each in its own fresh (spawned) process, so that
    no configuration inherits another's memory. In those processes glibc's malloc serves every block of 64 KiB or
    more with mmap and unmaps it when freed (MALLOC_MMAP_THRESHOLD_; setting it also stops glibc from raising the
    threshold on its own): freed tensors then leave the resident set at once instead of staying cached in the heap.
    A process killed for lack of memory (the CPU's OOM killer) gives None, as a GPU OOM does."""
    results = {}
    for k in ks:
        for checkpointing in (True, False):
            name = f"K={k} checkpointing {'on' if checkpointing else 'off'}"
            with child_environment(MALLOC_MMAP_THRESHOLD_="65536"), \
                    ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                try:
                    results[name] = pool.submit(peak_training_memory, opts, k, checkpointing).result()
                except BrokenProcessPool:
                    results[name] = None
            print(f"peak memory, {name}: {fmt(mib(results[name]))} MiB", file=sys.stderr)
    return results


def mib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2 ** 20


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def paired(result: dict, a: str, b: str) -> float | None:
    """Configuration a's time over b's: the median over rounds of their ratio within each round. The two ran back to
    back, so the ratio cancels what drifts from round to round on a shared machine (another job's load, a VM's
    neighbours), which a ratio of medians keeps. None if b was not timed."""
    rounds = result["rounds"]
    return statistics.median(x / y for x, y in zip(rounds[a], rounds[b])) if b in rounds else None


def benchmark_tables(result: dict) -> str:
    """The benchmark's results as two Markdown tables: time against K, a minimal loop and sampling; memory against
    K with checkpointing on and off, and plain's time with it off; and the time of RID's task 3 (two frozen adapters)
    against its task 1."""
    t, seconds, memory = result["num_steps"], result["seconds"], result["peak_memory_bytes"]
    time_rows, memory_rows = [], []
    for k in result["ks"]:
        plain, rid_, floor = f"plain K={k}", f"rid K={k}", (t + 3 * k) / t
        sampled = paired(result, plain, "sampling")
        time_rows.append([str(k), seconds[plain], seconds[rid_], paired(result, rid_, plain),
                          paired(result, plain, f"minimal K={k}"), paired(result, plain, f"trl K={k}"), sampled, floor,
                          sampled / floor, paired(result, rid_, "sampling") / floor])
        on, off = memory[f"K={k} checkpointing on"], memory[f"K={k} checkpointing off"]
        first_on, first_off = (memory[f"K={result['ks'][0]} checkpointing {c}"] for c in ("on", "off"))
        plain_off = f"plain K={k} checkpointing off"
        memory_rows.append([str(k), mib(on), ratio(on, first_on), mib(off), ratio(off, first_off), seconds[plain_off],
                            paired(result, plain_off, plain), paired(result, plain_off, f"trl K={k}")])
    first = result["ks"][0]
    task3 = seconds[f"rid K={first} task 3"]
    return "\n\n".join([
        f"{result['model']}, {result['resolution']} px, batch {result['batch_size']}, T={t}, reward "
        f"{result['reward']}, --mixed-precision {result['precision']}, {result['device']}; seconds: medians of "
        f"{result['repeats']} rounds, ratios: medians of each round's ratio; one sampling pass: "
        f"{seconds['sampling']:.4g} s",
        markdown_table(["K", "plain s/step", "RID s/step", "RID / plain", "plain / minimal loop", "plain / trl",
                        "plain / sampling", "floor (T+3K)/T", "plain / sampling / floor", "RID / sampling / floor"],
                       time_rows),
        f"RID at K={first}, task 3 (two frozen adapters) / task 1: {task3:.4g} s / {seconds[f'rid K={first}']:.4g} s"
        f", paired {paired(result, f'rid K={first} task 3', f'rid K={first}'):.3f}",
        markdown_table(["K", "peak MiB, checkpointing on", f"on / on at K={first}", "peak MiB, checkpointing off",
                        f"off / off at K={first}", "plain s/step, checkpointing off", "off / on", "off / trl"],
                       memory_rows)])


DECODES = {"none": lambda vae, z: rid.decode(vae, z),
           "one checkpoint over the batch": lambda vae, z: checkpoint(rid.decode, vae, z, use_reentrant=False),
           "one checkpoint per image (rid.py)": lambda vae, z: rid.decode_with_grad(vae, z, True)}


def decode_step(opts: BenchmarkArgs, mode: str):
    """The VAE of the model (random weights with --random-weights), and one decode with gradients and its backward
    in `mode` (DECODES), at --resolution and --batch-size, in fp32."""
    args = bench_args(opts, "rid", 1)
    pipe = rid.load_pipeline(args, checks.check_device(opts.device))
    side = args.resolution // pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch_size, 4, side, side, generator=generator).to(pipe.device)
    weights = torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=generator).to(pipe.device)

    def step():
        latents = z.clone().requires_grad_(True)
        images = DECODES[mode](pipe.vae, latents)
        with rid.full_precision(pipe.device):
            (images * weights).sum().backward()
    return step


def decode_memory(opts: BenchmarkArgs, mode: str) -> int | None:
    """Peak memory in bytes of one decode step above what is held before it (peak_above_baseline; run in a fresh
    process)."""
    return peak_above_baseline(decode_step(opts, mode), checks.check_device(opts.device))


def decode_figures(opts: BenchmarkArgs) -> dict:
    """Each decode's peak memory (a fresh process each, as peak_memories) and seconds (medians of --repeats rounds,
    interleaved, after a warm-up round), for --resolution and --batch-size."""
    memory = {}
    for mode in DECODES:
        with child_environment(MALLOC_MMAP_THRESHOLD_="65536"), \
                ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            memory[mode] = pool.submit(decode_memory, opts, mode).result()
    steps = {mode: decode_step(opts, mode) for mode in DECODES}
    seconds, device = {mode: [] for mode in DECODES}, checks.check_device(opts.device)
    for round_ in range(1 + opts.repeats):
        for mode, step in steps.items():
            elapsed = synchronized_seconds(step, device)
            if round_ > 0:
                seconds[mode].append(elapsed)
    return {mode: {"peak_mib": mib(memory[mode]), "seconds": statistics.median(seconds[mode])} for mode in DECODES}


def forward_flops(fn) -> tuple[float, float]:
    """(convolution, matmul) FLOPs of fn() on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        fn()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    conv = counts.get("aten.convolution", 0)
    return conv, counter.get_total_flops() - conv


def flop_counts(opts: BenchmarkArgs) -> dict:
    """The FLOPs of one optimizer step at K = the first of --ks, part by part, on the model's architecture built on the
    meta device, and how many of them rid.py runs in IEEE fp32 (the K gradient steps, the teacher and the backward
    pass) and how many in TF32 or --mixed-precision's dtype (the T-K steps without gradients, the decode's forward and
    recompute; its backward too with --mixed-precision bf16/fp16, whose VAE weights are in that dtype). A backward
    costs about two forwards; a checkpointed call runs its forward twice."""
    args = bench_args(opts, "rid", int(opts.ks.split(",")[0]))
    with torch.device("meta"):
        pipe = rid.load_pipeline(args, torch.device("meta"))
        logging.disable(logging.WARNING)  # open_clip: "initialized randomly", as intended
        tower = open_clip.create_model(TOWER_CONFIGS["aesthetic"], output_dict=True, device="meta")
        logging.disable(logging.NOTSET)
        scorer = Aesthetic(tower, dim=768)  # the real aesthetic scorer's architecture
    side, b, t, k = args.resolution // 8, args.batch_size, args.num_steps, args.k
    meta = dict(device="meta")
    x = torch.zeros(2 * b, 4, side, side, **meta)
    text = torch.zeros(2 * b, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim, **meta)
    unet = forward_flops(lambda: pipe.unet(x, torch.tensor(1, **meta), encoder_hidden_states=text))
    decode = forward_flops(lambda: pipe.vae.decode(torch.zeros(1, 4, side, side, dtype=pipe.vae.dtype, **meta)))
    images = torch.zeros(b, 3, args.resolution, args.resolution, **meta)
    reward = forward_flops(lambda: scorer(images, checks.DEFAULT_PROMPTS[:b])) if opts.reward == "aesthetic" \
        else (0.0, 0.0)
    parts = {  # (conv, matmul) x count, and the precision it runs in
        "UNet, T-K steps without gradients": (unet, t - k, "TF32 / low dtype"),
        "UNet, K gradient steps (forward, recompute, backward)": (unet, 4 * k, "IEEE fp32"),
        "UNet, RID's teacher (at the one state drawn per batch)": (unet, 1, "IEEE fp32"),
        # the drawn state is a later gradient step's in (K-1)/K of the batches: the student runs once more there,
        # backpropagated at once (rid.distil), so without a checkpoint's recompute
        "UNet, RID's student at that state (forward, backward)": (unet, 3 * (k - 1) / k, "IEEE fp32"),
        "VAE decode (forward and recompute)": (decode, 2 * b, "TF32 / low dtype"),
        "VAE decode backward": (decode, 2 * b, "IEEE fp32" if args.mixed_precision == "no" else "low dtype"),
        "reward (forward and backward)": (reward, 3, "IEEE fp32"),
    }
    rows = {name: {"conv_tflop": c * n / 1e12, "matmul_tflop": m * n / 1e12, "precision": precision}
            for name, ((c, m), n, precision) in parts.items()}
    return {"resolution": args.resolution, "batch_size": b, "num_steps": t, "k": k, "parts": rows,
            "unet_forward_tflop": sum(unet) / 1e12, "unet_conv_share": unet[0] / sum(unet),
            "decode_per_image_tflop": sum(decode) / 1e12}


def flop_table(result: dict) -> str:
    rows = [[name, p["conv_tflop"], p["matmul_tflop"], p["conv_tflop"] + p["matmul_tflop"], p["precision"]]
            for name, p in result["parts"].items()]
    total = sum(r[3] for r in rows)
    ieee = sum(r[3] for r in rows if r[4] == "IEEE fp32")
    return "\n\n".join([
        f"{result['resolution']} px, batch {result['batch_size']}, T={result['num_steps']}, K={result['k']}: one UNet "
        f"forward on the CFG batch {result['unet_forward_tflop']:.3g} TFLOP ({100 * result['unet_conv_share']:.0f} % "
        f"convolutions), one VAE decode {result['decode_per_image_tflop']:.3g} TFLOP per image",
        markdown_table(["part of one RID step", "conv TFLOP", "matmul TFLOP", "TFLOP", "runs in"], rows),
        f"total {total:.4g} TFLOP, of which {ieee:.4g} in IEEE fp32 ({100 * ieee / total:.0f} %)"])


def benchmark(opts: BenchmarkArgs) -> dict:
    """Run the benchmark; print its tables (and write --json). Returns every number. Every flag is checked first."""
    args = bench_args(opts, "rid", 1)
    t = args.num_steps
    checks.check_counts(args, ("resolution", "num_steps", "batch_size"))  # the mode's defaults filled in
    checks.check_counts(opts, ("repeats",))
    ks = [int(k) for k in opts.ks.split(",") if k.strip().isdigit()]
    if len(ks) != len(opts.ks.split(",")) or not all(1 <= k <= t for k in ks):
        raise checks.UsageError(f"--ks must be comma-separated integers between 1 and --num-steps ({t}), got "
                                f"{opts.ks!r}")
    device = checks.check_device(opts.device)
    if opts.json:
        checks.check_output_file(Path(opts.json), "--json")
    if opts.decode:
        result = decode_figures(opts)
        print(markdown_table(["decode with gradients", "peak MiB", "seconds"],
                             [[mode, r["peak_mib"], r["seconds"]] for mode, r in result.items()]))
    elif opts.flops:
        result = flop_counts(opts)
        print(flop_table(result))
    else:
        model = ("toy world" if opts.tiny else "SD1.5 architecture, random weights" if opts.random_weights
                 else args.model)
        where = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"cpu, {checks.threads()}")
        # Memory first: each configuration runs in a fresh process, and would find the GPU memory that this process's
        # caching allocator keeps after the timing runs taken (the timings need no memory of their own).
        memory = peak_memories(opts, ks)
        result = {"model": model, "device": where, "resolution": args.resolution, "batch_size": args.batch_size,
                  "num_steps": t, "ks": ks, "reward": opts.reward, "repeats": opts.repeats,
                  "precision": opts.mixed_precision, "peak_memory_bytes": memory,
                  "rounds": step_times(opts, ks, device)}
        result["seconds"] = {name: statistics.median(values) for name, values in result["rounds"].items()}
        print(benchmark_tables(result))
    if opts.json:
        runfiles.atomic_write(Path(opts.json), lambda f: f.write(json.dumps(result, indent=2).encode()))
    return result


def cli(argv: list[str]) -> int:
    """python benchmark.py ...: 0 done, 2 bad input, 74 a write failed, 130 Ctrl-C; each failure one line on stderr."""
    try:
        benchmark(parse_args(argv))
        return 0
    except (checks.UsageError, MissingWeights, runfiles.WriteFailed) as error:
        print(f"benchmark.py: error: {error}", file=sys.stderr)
        return checks.EXIT_STATUS[type(error)]
    except KeyboardInterrupt:
        print("benchmark.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
