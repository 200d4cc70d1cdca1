"""Evaluate a reward-incremental run: the reward matrix, forgetting, structure drift, plots and an image grid.

For the base model (row 0) and the model after each task i = 1..N (row i), generate images for fixed held-out prompts
and seeds, the same x_T for every row, and score each image with every reward j of the run (plus --extra-rewards):

    R[i][j]  = mean over prompts and seeds of r_j(images of row i)                        (N+1, J)  reward_matrix
    G[i][j]  = (R[i][j] - R[0][j]) / s_j,  s_j = std of r_j over the base images           (N+1, J)  gain_in_base_std
    final average reward = mean_j R[N][j]    over the run's own rewards                          final_average
    F_j      = max_{t_j <= i < N} R[i][j] - R[N][j],  t_j = the task that learned reward j          forgetting
    drift_i  = mean SSIM(images of row i, base images), same prompt and seed; 1 = same structure  structure_drift

Rewards have very different scales (compressibility is about -37, a tiny aesthetic score about 0.08), so every
number is also given in base standard deviations (G), where averages over rewards mean something.

    python eval.py runs/tiny                          # writes eval.json, eval.md, eval_*.png, training_curves.png
    python eval.py --compare runs/plain runs/rid      # one Markdown table from the runs' eval.json
    python eval.py --benchmark --tiny                 # seconds per step and peak memory, plain vs RID, K = 1, 5, 10
"""
import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.checkpoint import checkpoint
from torchmetrics.functional.image import structural_similarity_index_measure
from tqdm import tqdm

import figures
import plumbing
import rid
from rewards import REWARDS, TOWER_CONFIGS, Aesthetic, MissingWeights, clip_tower, load_reward, seeded

# Held out: none of these is among rid.py's training prompts.
EVAL_PROMPTS = [
    "a rabbit in a vegetable garden", "a steam train crossing a viaduct", "a snowy village at night",
    "a woman in a straw hat, portrait", "a hot air balloon over green fields", "a tiger resting in tall grass",
    "a wooden cabin by a lake", "a basket of bread on a kitchen table",
]


class ArgumentParser(plumbing.OneLineErrors, argparse.ArgumentParser):
    """argparse with one-line errors (plumbing.OneLineErrors)."""


def parse_args(argv) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n")[0],
                            epilog="`python eval.py --benchmark --help`: the performance benchmark")
    parser.add_argument("runs", nargs="+", help="run directories written by rid.py (evaluated one after another)")
    parser.add_argument("--compare", action="store_true",
                        help="print one side-by-side Markdown table from the runs' eval.json instead of evaluating")
    parser.add_argument("--prompts", help="text file, one prompt a line (default: 8 built-in held-out prompts)")
    parser.add_argument("--num-prompts", type=int, help="use only the first this many prompts (default: all)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds; each gives every prompt one x_T")
    parser.add_argument("--extra-rewards", default="", help="rewards to score besides the run's own, comma-separated")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generation or scoring call")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return parser.parse_flags(argv)


# ----------------------------------------------------------------------------------------------------------------
# The run: its arguments and the LoRA file of each task.

def load_run(run: Path) -> tuple[rid.Args, list[Path]]:
    """The run's resolved rid.Args and its task directories (task{i}_{name}), checked to be complete."""
    if not (run / "config.json").is_file():
        raise plumbing.UsageError(f"{run}: no config.json; give a run directory written by rid.py")
    args = rid.resolve(rid.Args(**plumbing.read_config(run / "config.json", rid.Args)))
    tasks = [run / f"task{i}_{name}" for i, name in enumerate(rid.reward_names(args), start=1)]
    for task in tasks:
        if not (task / plumbing.LORA_FILE).is_file():
            raise plumbing.UsageError(f"{run}: incomplete run, {task.name}/{plumbing.LORA_FILE} is missing "
                                 "(did rid.py finish?)")
        check_lora_file(task / "pytorch_lora_weights.safetensors")
    if args.tiny and not (run / "base" / "model_index.json").is_file():
        raise plumbing.UsageError(f"{run}: incomplete tiny run, base/model_index.json is missing")
    return args, tasks


def check_lora_file(path: Path) -> None:
    """The file is a complete safetensors file: safe_open checks that its header parses and covers the whole file."""
    try:
        with safe_open(path, "pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise plumbing.UsageError(f"{path} cannot be read ({error}); it is damaged or truncated: rerun that task with "
                             "rid.py --resume from a checkpoint, or train the run again") from None


def eval_settings(opts: argparse.Namespace) -> tuple[list[str], list[int], list[str]]:
    """The eval prompts, seeds and extra rewards from the flags, checked before any work starts."""
    if opts.num_prompts is not None and opts.num_prompts <= 0 or opts.batch_size <= 0:
        raise plumbing.UsageError("--num-prompts and --batch-size must be positive integers")
    prompts = (rid.read_prompts(opts.prompts) if opts.prompts else EVAL_PROMPTS)[:opts.num_prompts]
    try:
        seeds = [int(seed) for seed in opts.seeds.split(",")]
    except ValueError:
        raise plumbing.UsageError(f"--seeds must be comma-separated integers, e.g. 0,1; got {opts.seeds!r}") from None
    extra = [name.strip() for name in opts.extra_rewards.split(",") if name.strip()]
    unknown = [name for name in extra if name not in REWARDS]
    if unknown:
        raise plumbing.UsageError(f"--extra-rewards: unknown reward {unknown[0]!r}; known rewards: {', '.join(REWARDS)}")
    return prompts, seeds, extra


# ----------------------------------------------------------------------------------------------------------------
# Images and scores.

def generate_rows(pipe, tasks: list[Path], prompts: list[str], seeds: list[int], args: rid.Args, batch_size: int):
    """Images of the base model and after each task: (N+1, S*P, 3, H, W) in [0,1], image s*P + p = prompt p, seed s.
    Every row starts from the same x_T; task i's LoRA file holds the adapters of tasks 1..i, stacked."""
    latents = torch.cat([rid.initial_latents(pipe, len(prompts), args.resolution, torch.Generator().manual_seed(s))
                         for s in seeds])
    all_prompts = prompts * len(seeds)
    chunks = range(0, len(all_prompts), batch_size)
    bar = tqdm(total=(len(tasks) + 1) * len(chunks), desc="generating", dynamic_ncols=True)
    rows = []
    for task in [None, *tasks]:
        if task is not None:
            # The UNet's LoRA alone: pipe.load_lora_weights also looks for text-encoder LoRA keys, which rid.py never
            # trains, and warns on every load that there are none.
            pipe.unet.load_lora_adapter(task, weight_name=plumbing.LORA_FILE, prefix="unet", adapter_name=task.name)
        generator = torch.Generator().manual_seed(0)  # the same DDIM noise in every row when eta > 0
        images = []
        for start in chunks:
            end = start + batch_size
            images.append(rid.generate(pipe, all_prompts[start:end], latents[start:end], args, generator).cpu())
            bar.update()
        rows.append(torch.cat(images))
        if task is not None:
            pipe.unet.unload_lora()
    bar.close()
    return torch.stack(rows)


@torch.no_grad()
def score_rows(rows: torch.Tensor, prompts: list[str], scorers: dict, device, batch_size: int) -> torch.Tensor:
    """Every reward of every image: rows (M, B, 3, H, W), B prompts -> scores (M, B, J), J = len(scorers). In fp32,
    as in training (rid.score)."""
    scores = torch.zeros(*rows.shape[:2], len(scorers))
    bar = tqdm(total=rows.shape[0] * len(scorers), desc="scoring", dynamic_ncols=True)
    for j, scorer in enumerate(scorers.values()):
        for i, row in enumerate(rows):
            for start in range(0, len(prompts), batch_size):
                images = row[start:start + batch_size].to(device)
                batch_prompts = prompts[start:start + batch_size]
                scores[i, start:start + batch_size, j] = rid.score(scorer, images, batch_prompts).cpu()
            bar.update()
    bar.close()
    return scores


def structure_drift(rows: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of each row's images against the base row's (row 0) for the same prompt and seed:
    rows (M, B, 3, H, W) in [0,1] -> (M,); 1 means the same structure, and row 0 is exactly 1."""
    base = rows[0]
    return torch.stack([structural_similarity_index_measure(row, base, data_range=1.0, reduction="none").mean()
                        for row in rows])


# ----------------------------------------------------------------------------------------------------------------
# Metrics: small pure functions of the reward matrix.

def gain_in_base_std(scores: torch.Tensor) -> torch.Tensor:
    """G[i][j] = (R[i][j] - R[0][j]) / s_j from per-image scores (M, B, J), s_j = std over the base images (M, J)."""
    matrix = scores.mean(1)
    return (matrix - matrix[0]) / scores[0].std(0)


def learned_at(columns: list[str], task_rewards: list[str]) -> list[int]:
    """t_j: the first task (1-based) that trained reward j, or 0 (the base row) for a reward no task trained."""
    return [task_rewards.index(name) + 1 if name in task_rewards else 0 for name in columns]


def forgetting(matrix: torch.Tensor, learned: list[int]) -> list[float | None]:
    """F_j = max_{t_j <= i < N} R[i][j] - R[N][j] for R (N+1, J), rows base, after task 1..N.
    The max starts at the row where reward j was learned (t_j): before that there is nothing to forget. It is
    None where that range is empty, i.e. for a reward first learned by the last task."""
    last = matrix.shape[0] - 1
    return [(matrix[t:last, j].max() - matrix[last, j]).item() if t < last else None for j, t in enumerate(learned)]


def final_average(matrix: torch.Tensor, columns: list[str], task_rewards: list[str]) -> float:
    """mean_j R[N][j] over the run's own rewards (extra rewards are reported, not averaged)."""
    return matrix[-1, [columns.index(name) for name in dict.fromkeys(task_rewards)]].mean().item()


def mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def cost(run: Path) -> dict | None:
    """Training cost per task from metrics.jsonl: optimizer steps, total and mean seconds per step."""
    if not (run / "metrics.jsonl").is_file():
        return None
    per_task = {}
    for step in figures.read_metrics(run / "metrics.jsonl"):
        per_task.setdefault(f"task{step['task']}_{step['reward']}", []).append(step["seconds"])
    return {task: {"steps": len(s), "seconds": sum(s), "seconds_per_step": sum(s) / len(s)}
            for task, s in per_task.items()}


# ----------------------------------------------------------------------------------------------------------------
# Reports: eval.json, eval.md and the comparison table (the pictures are figures.py's).

def fmt(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def mean_std(values: list[float]) -> str:
    """'mean ± sample standard deviation' of the values, or what there is of it."""
    if len(values) < 2:
        return fmt(values[0] if values else None)
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) if isinstance(c, str) else fmt(c) for c in row) + " |"
                              for row in rows])


def report_markdown(result: dict) -> str:
    columns, labels = result["rewards"], result["rows"]

    def by_row(header, *columns_of_values):
        return markdown_table(header, [[label, *values] for label, *values in zip(labels, *columns_of_values)])

    summary = [["final average reward (raw)", result["final_average_reward"]],
               ["final average gain (base std)", result["final_average_gain"]],
               ["mean forgetting (base std)", result["mean_forgetting_in_base_std"]],
               ["SSIM to base after the last task", result["structure_drift_ssim"][-1]]]
    forgetting_rows = zip(columns, map(str, result["learned_at"]), result["forgetting"],
                          result["forgetting_in_base_std"])
    parts = [f"# Evaluation of `{result['run']}`",
             f"{len(result['prompts'])} prompts x seeds {result['seeds']}, the same x_T in every row.",
             "## Summary", markdown_table(["metric", "value"], summary),
             "## Reward matrix R[i][j] (mean over images)", by_row(["model", *columns], *zip(*result["reward_matrix"])),
             "## Change from base in base standard deviations, G[i][j]",
             by_row(["model", *columns], *zip(*result["gain_in_base_std"])),
             "## Forgetting F_j = max over rows from t_j to N-1 of R[i][j], minus R[N][j]",
             markdown_table(["reward", "learned at task", "F_j (raw)", "F_j (base std)"], list(forgetting_rows)),
             "## Structure drift: mean SSIM to the base images (1 = same structure)",
             by_row(["model", "SSIM"], result["structure_drift_ssim"])]
    if result["cost"]:
        parts += ["## Training cost (metrics.jsonl)",
                  markdown_table(["task", "steps", "seconds", "seconds/step"],
                                 [[task, str(c["steps"]), c["seconds"], c["seconds_per_step"]]
                                  for task, c in result["cost"].items()])]
    return "\n\n".join(parts) + "\n"


def evaluate(run: Path, prompts: list[str], seeds: list[int], extra: list[str], opts: argparse.Namespace) -> dict:
    """Generate, score and report one run; writes eval.json, eval.md, eval_rewards.png, eval_grid.png and (from its
    metrics.jsonl) training_curves.png into it."""
    args, tasks = load_run(run)
    task_rewards = rid.reward_names(args)
    columns = list(dict.fromkeys(task_rewards + extra))
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = rid.load_pipeline(args, device, run / "base" if args.tiny else None)
    plumbing.warn_long_prompts(pipe.tokenizer, prompts)
    pipe.scheduler.set_timesteps(args.num_steps, device=device)
    scorers = {name: load_reward(name, device, args.tiny) for name in columns}

    rows = generate_rows(pipe, tasks, prompts, seeds, args, opts.batch_size)              # (N+1, S*P, 3, H, W)
    scores = score_rows(rows, prompts * len(seeds), scorers, device, opts.batch_size)      # (N+1, S*P, J)
    matrix, gain, learned = scores.mean(1), gain_in_base_std(scores), learned_at(columns, task_rewards)
    result = {
        "run": str(run), "rows": figures.model_titles(task_rewards),  # the grid's column titles
        "rewards": columns, "prompts": prompts, "seeds": seeds, "learned_at": learned,
        "reward_matrix": matrix.tolist(), "base_std": scores[0].std(0).tolist(), "gain_in_base_std": gain.tolist(),
        "final_average_reward": final_average(matrix, columns, task_rewards),
        "final_average_gain": final_average(gain, columns, task_rewards),
        "forgetting": forgetting(matrix, learned), "forgetting_in_base_std": forgetting(gain, learned),
        "structure_drift_ssim": structure_drift(rows).tolist(), "cost": cost(run),
    }
    own = [f if name in task_rewards else None for name, f in zip(columns, result["forgetting_in_base_std"])]
    result["mean_forgetting_in_base_std"] = mean_defined(own)
    labels = [f"{prompt}\nseed {seed}" for seed in seeds for prompt in prompts]  # image s*P + p: prompt p, seed s
    grid = figures.image_grid(rows.transpose(0, 1), result["rows"], labels)
    outputs = {"eval.json": lambda f: f.write(json.dumps(result, indent=2).encode()),
               "eval.md": lambda f: f.write(report_markdown(result).encode()),
               "eval_rewards.png": lambda f: figures.eval_rewards(result).savefig(f, format="png"),
               "eval_grid.png": lambda f: grid.save(f, format="png")}
    if (run / "metrics.jsonl").is_file():
        curves = figures.training_curves(figures.read_metrics(run / "metrics.jsonl"), args.grad_clip)
        outputs["training_curves.png"] = lambda f: curves.savefig(f, format="png")
    for name, write in outputs.items():  # each complete or as it was: a full disk is one line (exit status 74)
        plumbing.atomic_write(run / name, write)
    written = ", ".join(outputs)
    print(f"wrote {run}/{written}")
    return result


EVAL_KEYS = ("rewards", "reward_matrix", "final_average_reward", "final_average_gain", "mean_forgetting_in_base_std",
             "structure_drift_ssim", "cost")


def read_eval(run: Path) -> dict:
    """A run's eval.json, checked to hold what --compare reads; a damaged one is one line."""
    if not (run / "eval.json").is_file():
        raise plumbing.UsageError(f"{run}: no eval.json; run `python eval.py {run}` first")
    try:
        result = json.loads((run / "eval.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise plumbing.UsageError(f"{run}/eval.json cannot be read as JSON ({error}); run `python eval.py {run}` again") \
            from None
    missing = [key for key in EVAL_KEYS if key not in result] if isinstance(result, dict) else list(EVAL_KEYS)
    if missing:
        raise plumbing.UsageError(f"{run}/eval.json lacks {', '.join(missing)}; run `python eval.py {run}` again")
    return result


def compare(runs: list[Path]) -> str:
    """One Markdown table, a row per run from its eval.json, and a mean ± std row over the runs if several."""
    results = []
    for run in runs:
        results.append(read_eval(run))
    columns = list(dict.fromkeys(name for r in results for name in r["rewards"]))

    def values(r):
        final = dict(zip(r["rewards"], r["reward_matrix"][-1]))
        seconds = sum(c["seconds"] for c in r["cost"].values()) if r["cost"] else None
        return [r["final_average_reward"], r["final_average_gain"], r["mean_forgetting_in_base_std"],
                r["structure_drift_ssim"][-1], *[final.get(name) for name in columns], seconds]

    rows = [values(r) for r in results]
    table = [[str(run), *row] for run, row in zip(runs, rows)]
    if len(rows) > 1:
        table.append([f"mean ± std over {len(rows)} runs", *[mean_std([v for v in column if v is not None])
                                                            for column in zip(*rows)]])
    header = ["run", "final avg reward", "final avg gain (base std)", "mean forgetting (base std)",
              "SSIM to base (final)", *[f"{name} (final)" for name in columns], "train seconds"]
    return markdown_table(header, table)


def main(argv: list[str]) -> None:
    if "--benchmark" in argv:  # the performance benchmark (end of this file) has flags of its own
        benchmark(parse_benchmark_args(argv))
        return
    opts = parse_args(argv)
    runs = [Path(run) for run in opts.runs]
    if opts.compare:
        print(compare(runs))
        return
    prompts, seeds, extra = eval_settings(opts)
    for run in runs:
        load_run(run)  # refuse an incomplete run before evaluating any
    for run in runs:
        evaluate(run, prompts, seeds, extra, opts)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark (issue 4): the cost of one optimizer step, RID against plain fine-tuning, and peak memory against K.
#
#     python eval.py --benchmark --tiny                                   # tiny models, CPU, about a minute
#     python eval.py --benchmark --random-weights --resolution 128 --num-steps 20 --batch-size 1   # CPU, reduced
#     python eval.py --benchmark --random-weights                         # SD1.5 architecture at 512 px (a GPU)
#
# Everything is measured in one process on one model, batch and T, configurations interleaved round by round so
# that a busy machine slows all of them alike; medians over --repeats rounds after one warm-up round.

BENCH_METHODS = {"plain": dict(lambda_out=0.0, lambda_feat=0.0, shared_adapter=True), "rid": {}}  # rid: defaults


def parse_benchmark_args(argv) -> argparse.Namespace:
    parser = ArgumentParser(prog="eval.py --benchmark", description="Seconds per optimizer step of plain "
                                     "fine-tuning and of RID, peak memory against K, and a training step against a "
                                     "sampling pass; one model, batch and T.")
    parser.add_argument("--benchmark", action="store_true", required=True, help="run the benchmark")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="tiny random models (as rid.py --tiny)")
    mode.add_argument("--random-weights", action="store_true", help="SD1.5's architecture with random weights")
    parser.add_argument("--resolution", type=int, help="image side in pixels [rid.py's default for the mode]")
    parser.add_argument("--num-steps", type=int, help="DDIM steps T [rid.py's default for the mode]")
    parser.add_argument("--batch-size", type=int, help="prompts per step [rid.py's default for the mode]")
    parser.add_argument("--ks", default="1,5,10", help="the K values to measure, comma-separated")
    parser.add_argument("--reward", default="aesthetic", choices=["aesthetic", "compressibility"],
                        help="aesthetic: the CLIP ViT-L/14 tower of the real step (random weights with "
                             "--random-weights); compressibility: no tower")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"],
                        help="rid.py's precision policy to time (bf16: see README, Precision)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser.parse_flags(argv)


def bench_args(opts: argparse.Namespace, method: str, k: int, checkpointing: bool = True) -> rid.Args:
    """rid.Args of one benchmark configuration: the mode's defaults, the benchmark's model, batch and T."""
    sizes = {name: getattr(opts, name) for name in ("resolution", "num_steps", "batch_size")}
    args = rid.Args(tiny=opts.tiny, random_weights=opts.random_weights, rewards=opts.reward, k=k,
                    mixed_precision=opts.mixed_precision, checkpointing=checkpointing, **BENCH_METHODS[method], **sizes)
    return rid.resolve(args)


def bench_scorer(opts: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The benchmark's reward. With --random-weights, aesthetic is the real scorer's architecture (OpenAI CLIP
    ViT-L/14 and the 768-1024-128-64-16-1 MLP) with random weights: a real step's cost, no download."""
    if opts.random_weights and opts.reward == "aesthetic":
        with seeded(1):
            scorer = Aesthetic(clip_tower(TOWER_CONFIGS["aesthetic"]), dim=768)
        return scorer.requires_grad_(False).eval().to(device)
    return load_reward(opts.reward, device, opts.tiny)


def bench_setup(opts: argparse.Namespace, device: torch.device, tasks: int = 1):
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


def optimizer_step(pipe, scorer, params, teacher, optimizer, args: rid.Args, generator) -> None:
    """One optimizer step as rid.train_task takes it: train_step (sample with gradients through the last K steps,
    score, backward), then rid.optimizer_update (gradient clipping, AdamW, and for RID the EMA teacher update)."""
    scaler = torch.amp.GradScaler(enabled=False)  # the benchmark runs in fp32: no loss scaling, nothing to keep
    metrics = rid.train_step(pipe, scorer, plumbing.DEFAULT_PROMPTS, teacher, args, generator, scaler=scaler)
    rid.optimizer_update(optimizer, params, scaler, teacher, args, metrics["loss"].item())


def minimal_loss(pipe, scorer, args: rid.Args, generator) -> torch.Tensor:
    """The yardstick for rid.py's own overhead: a plain step's loss written as directly as diffusers allows, i.e.
    the loop every reward-backprop trainer has. The same batch (rid.draw_batch), prompt embeddings, decode and fp32
    reward (rid.score) as rid.py, the UNet called directly with its adapters active, the last k calls and the
    decode in non-reentrant activation checkpointing as rid.py's default; none of rid.py's fast path."""
    prompts, x, k = rid.draw_batch(pipe, plumbing.DEFAULT_PROMPTS, args, generator)
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


def synchronized_seconds(fn, device: torch.device) -> float:
    """Wall-clock seconds of fn(), with the GPU's queued work finished before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def step_times(opts: argparse.Namespace, ks: list[int], device: torch.device) -> dict[str, float]:
    """Median seconds of one optimizer step for each (method, K), and of one sampling pass (rid.generate: T steps
    without gradients and the decode), all on the same model, batch and T. One warm-up round, then --repeats rounds;
    each round runs every configuration once, so that a busy machine slows every configuration alike."""
    pipe, params, scorer, optimizer = bench_setup(opts, device)
    jobs = {}
    for k in ks:
        for method in BENCH_METHODS:
            args = bench_args(opts, method, k)
            teacher = rid.new_teacher(params, args)
            step = (pipe, scorer, params, teacher, optimizer, args, torch.Generator().manual_seed(0))
            jobs[f"{method} K={k}"] = lambda step=step: optimizer_step(*step)
        if opts.mixed_precision == "no":  # the minimal loop has no precision policy: compared in fp32 only
            minimal = (pipe, scorer, params, optimizer, bench_args(opts, "plain", k), torch.Generator().manual_seed(0))
            jobs[f"minimal K={k}"] = lambda minimal=minimal: minimal_step(*minimal)
    pipe3, params3, _, optimizer3 = bench_setup(opts, device, tasks=3)  # task 3: two frozen adapters, one trained
    args = bench_args(opts, "rid", ks[0])  # plain trains one shared adapter: its task 3 is its task 1
    step = (pipe3, scorer, params3, rid.new_teacher(params3, args), optimizer3, args, torch.Generator().manual_seed(0))
    jobs[f"rid K={ks[0]} task 3"] = lambda step=step: optimizer_step(*step)
    sample_args = bench_args(opts, "plain", 1)
    prompts = plumbing.DEFAULT_PROMPTS[:sample_args.batch_size]
    latents = rid.initial_latents(pipe, len(prompts), sample_args.resolution, torch.Generator().manual_seed(0))
    jobs["sampling"] = lambda: rid.generate(pipe, prompts, latents, sample_args)
    seconds = {name: [] for name in jobs}
    for round_ in tqdm(range(1 + opts.repeats), desc="timing rounds", dynamic_ncols=True):
        for name, job in jobs.items():
            elapsed = synchronized_seconds(job, device)
            if round_ > 0:  # round 0 warms up: first-call allocations, kernel selection, caches
                seconds[name].append(elapsed)
    return {name: statistics.median(values) for name, values in seconds.items()}


def resident_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_training_memory(opts: argparse.Namespace, k: int, checkpointing: bool) -> int | None:
    """Peak memory in bytes of one RID optimizer step above what is held before it (the weights, LoRA, teacher and
    AdamW state), i.e. what training at this K adds. One warm-up step first, so that one-time allocations (AdamW's
    moments, the libraries' kernel caches) are not counted. On a GPU: the allocator's peak,
    torch.cuda.max_memory_allocated. On CPU: the kernel's peak resident set size (VmHWM), reset before the step by
    writing 5 to /proc/self/clear_refs; peak_memories runs this in a fresh process whose malloc returns every large
    block to the kernel when it is freed, so that resident memory follows the live tensors. None if out of memory."""
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe, params, scorer, optimizer = bench_setup(opts, device)
    args = bench_args(opts, "rid", k, checkpointing)
    teacher, generator = rid.new_teacher(params, args), torch.Generator().manual_seed(0)
    try:
        optimizer_step(pipe, scorer, params, teacher, optimizer, args, generator)  # warm-up
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
        optimizer_step(pipe, scorer, params, teacher, optimizer, args, generator)
    except torch.OutOfMemoryError:
        return None
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_kib("VmHWM") * 1024
    return peak - before


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


def peak_memories(opts: argparse.Namespace, ks: list[int]) -> dict[str, int | None]:
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


def benchmark_tables(result: dict) -> str:
    """The benchmark's results as two Markdown tables: time against K, a minimal loop and sampling; memory against
    K; and the time of RID's task 3 (two frozen adapters) against its task 1."""
    t, seconds, memory = result["num_steps"], result["seconds"], result["peak_memory_bytes"]
    time_rows, memory_rows = [], []
    for k in result["ks"]:
        plain, rid_, floor = seconds[f"plain K={k}"], seconds[f"rid K={k}"], (t + 3 * k) / t
        time_rows.append([str(k), plain, rid_, rid_ / plain, ratio(plain, seconds.get(f"minimal K={k}")),
                          plain / seconds["sampling"], floor, plain / seconds["sampling"] / floor,
                          rid_ / seconds["sampling"] / floor])
        on, off = memory[f"K={k} checkpointing on"], memory[f"K={k} checkpointing off"]
        first_on, first_off = (memory[f"K={result['ks'][0]} checkpointing {c}"] for c in ("on", "off"))
        memory_rows.append([str(k), mib(on), ratio(on, first_on), mib(off), ratio(off, first_off)])
    first = result["ks"][0]
    task3 = seconds[f"rid K={first} task 3"]
    return "\n\n".join([
        f"{result['model']}, {result['resolution']} px, batch {result['batch_size']}, T={t}, reward "
        f"{result['reward']}, --mixed-precision {result['precision']}, {result['device']}; medians of "
        f"{result['repeats']} rounds; one sampling pass: "
        f"{seconds['sampling']:.4g} s",
        markdown_table(["K", "plain s/step", "RID s/step", "RID / plain", "plain / minimal loop", "plain / sampling",
                        "floor (T+3K)/T", "plain / sampling / floor", "RID / sampling / floor"], time_rows),
        f"RID at K={first}, task 3 (two frozen adapters) / task 1: {task3:.4g} s / {seconds[f'rid K={first}']:.4g} s"
        f" = {task3 / seconds[f'rid K={first}']:.3f}",
        markdown_table(["K", "peak MiB, checkpointing on", f"on / on at K={first}", "peak MiB, checkpointing off",
                        f"off / off at K={first}"], memory_rows)])


def benchmark(opts: argparse.Namespace) -> dict:
    """Run the benchmark; print its tables (and write --json). Returns every number."""
    args = bench_args(opts, "rid", 1)
    t = args.num_steps
    ks = [int(k) for k in opts.ks.split(",") if k.strip().isdigit()]
    if len(ks) != len(opts.ks.split(",")) or not all(1 <= k <= t for k in ks) or opts.repeats <= 0:
        raise plumbing.UsageError(f"--ks must be comma-separated integers between 1 and --num-steps ({t}), and --repeats "
                             f"positive; got --ks {opts.ks} --repeats {opts.repeats}")
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = "tiny" if opts.tiny else "SD1.5 architecture, random weights" if opts.random_weights else args.model
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    result = {"model": model, "device": where, "resolution": args.resolution, "batch_size": args.batch_size,
              "num_steps": t, "ks": ks, "reward": opts.reward, "repeats": opts.repeats, "precision": opts.mixed_precision,
              "seconds": step_times(opts, ks, device), "peak_memory_bytes": peak_memories(opts, ks)}
    print(benchmark_tables(result))
    if opts.json:
        plumbing.atomic_write(Path(opts.json), lambda f: f.write(json.dumps(result, indent=2).encode()))
    return result


def cli(argv: list[str]) -> int:
    """python eval.py ...: 0 done, 2 bad input, 74 a write failed, 130 Ctrl-C; each failure one line on stderr."""
    try:
        main(argv)
        return 0
    except (plumbing.UsageError, MissingWeights, plumbing.WriteFailed) as error:
        print(f"eval.py: error: {error}", file=sys.stderr)
        return plumbing.EXIT_STATUS[type(error)]
    except KeyboardInterrupt:  # every output is written whole (atomic_write) or not at all
        print("eval.py: interrupted; the outputs written so far are complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
