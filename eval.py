"""Evaluate a reward-incremental run: the reward matrix, forgetting, structure drift, a plot and an image grid.

For the base model (row 0) and the model after each task i = 1..N (row i), generate images for fixed held-out prompts
and seeds, the same x_T for every row, and score each image with every reward j of the run (plus --extra-rewards):

    R[i][j]  = mean over prompts and seeds of r_j(images of row i)                        (N+1, J)  reward_matrix
    G[i][j]  = (R[i][j] - R[0][j]) / s_j,  s_j = std of r_j over the base images           (N+1, J)  gain_in_base_std
    final average reward = mean_j R[N][j]    over the run's own rewards                          final_average
    F_j      = max_{t_j <= i < N} R[i][j] - R[N][j],  t_j = the task that learned reward j          forgetting
    drift_i  = mean SSIM(images of row i, base images), same prompt and seed; 1 = same structure  structure_drift

Rewards have very different scales (compressibility is about -37, a tiny aesthetic score about 0.08), so every
number is also given in base standard deviations (G), where averages over rewards mean something.

    python eval.py runs/tiny                          # writes eval.json, eval.md, eval_rewards.png, eval_grid.png
    python eval.py --compare runs/plain runs/rid      # one Markdown table from the runs' eval.json
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

import rid
from rewards import REWARDS, load_reward

# Held out: none of these is among rid.py's training prompts.
EVAL_PROMPTS = [
    "a rabbit in a vegetable garden", "a steam train crossing a viaduct", "a snowy village at night",
    "a woman in a straw hat, portrait", "a hot air balloon over green fields", "a tiger resting in tall grass",
    "a wooden cabin by a lake", "a basket of bread on a kitchen table",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories written by rid.py (evaluated one after another)")
    parser.add_argument("--compare", action="store_true",
                        help="print one side-by-side Markdown table from the runs' eval.json instead of evaluating")
    parser.add_argument("--prompts", help="text file, one prompt a line (default: 8 built-in held-out prompts)")
    parser.add_argument("--num-prompts", type=int, help="use only the first this many prompts (default: all)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds; each gives every prompt one x_T")
    parser.add_argument("--extra-rewards", default="", help="rewards to score besides the run's own, comma-separated")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generation or scoring call")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# The run: its arguments and the LoRA file of each task.

def load_run(run: Path) -> tuple[rid.Args, list[Path]]:
    """The run's resolved rid.Args and its task directories (task{i}_{name}), checked to be complete."""
    if not (run / "config.json").is_file():
        raise rid.UsageError(f"{run}: no config.json; give a run directory written by rid.py")
    args = rid.resolve(rid.Args(**json.loads((run / "config.json").read_text())))
    tasks = [run / f"task{i}_{name}" for i, name in enumerate(rid.reward_names(args), start=1)]
    for task in tasks:
        if not (task / "pytorch_lora_weights.safetensors").is_file():
            raise rid.UsageError(f"{run}: incomplete run, {task.name}/pytorch_lora_weights.safetensors is missing "
                                 "(did rid.py finish?)")
    if args.tiny and not (run / "base" / "model_index.json").is_file():
        raise rid.UsageError(f"{run}: incomplete tiny run, base/model_index.json is missing")
    return args, tasks


def eval_settings(opts: argparse.Namespace) -> tuple[list[str], list[int], list[str]]:
    """The eval prompts, seeds and extra rewards from the flags, checked before any work starts."""
    if opts.num_prompts is not None and opts.num_prompts <= 0 or opts.batch_size <= 0:
        raise rid.UsageError("--num-prompts and --batch-size must be positive integers")
    prompts = (rid.read_prompts(opts.prompts) if opts.prompts else EVAL_PROMPTS)[:opts.num_prompts]
    try:
        seeds = [int(seed) for seed in opts.seeds.split(",")]
    except ValueError:
        raise rid.UsageError(f"--seeds must be comma-separated integers, e.g. 0,1; got {opts.seeds!r}") from None
    extra = [name.strip() for name in opts.extra_rewards.split(",") if name.strip()]
    unknown = [name for name in extra if name not in REWARDS]
    if unknown:
        raise rid.UsageError(f"--extra-rewards: unknown reward {unknown[0]!r}; known rewards: {', '.join(REWARDS)}")
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
            pipe.load_lora_weights(task)
        torch.manual_seed(0)  # the same DDIM noise in every row when eta > 0
        images = []
        for start in chunks:
            end = start + batch_size
            images.append(rid.generate(pipe, all_prompts[start:end], latents[start:end], args).cpu())
            bar.update()
        rows.append(torch.cat(images))
        pipe.unload_lora_weights()
    bar.close()
    return torch.stack(rows)


@torch.no_grad()
def score_rows(rows: torch.Tensor, prompts: list[str], scorers: dict, device, batch_size: int) -> torch.Tensor:
    """Every reward of every image: rows (M, B, 3, H, W), B prompts -> scores (M, B, J), J = len(scorers)."""
    scores = torch.zeros(*rows.shape[:2], len(scorers))
    bar = tqdm(total=rows.shape[0] * len(scorers), desc="scoring", dynamic_ncols=True)
    for j, scorer in enumerate(scorers.values()):
        for i, row in enumerate(rows):
            for start in range(0, len(prompts), batch_size):
                images = row[start:start + batch_size].to(device)
                scores[i, start:start + batch_size, j] = scorer(images, prompts[start:start + batch_size]).float().cpu()
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
    for line in (run / "metrics.jsonl").read_text().splitlines():
        step = json.loads(line)
        per_task.setdefault(f"task{step['task']}_{step['reward']}", []).append(step["seconds"])
    return {task: {"steps": len(s), "seconds": sum(s), "seconds_per_step": sum(s) / len(s)}
            for task, s in per_task.items()}


# ----------------------------------------------------------------------------------------------------------------
# Reports: eval.json, eval.md, the plot, the grid, and the comparison table.

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


def plot(result: dict, path: Path) -> None:
    """Left: G[i][j] per reward across the sequence (forgetting shows as a fall after the reward's own task).
    Right: SSIM to the base images across the sequence."""
    fig = Figure(figsize=(11, 4), layout="tight")  # no pyplot: no global figure state, no display backend
    ax_gain, ax_ssim = fig.subplots(1, 2)
    x = range(len(result["rows"]))
    for j, name in enumerate(result["rewards"]):
        ax_gain.plot(x, [row[j] for row in result["gain_in_base_std"]], marker="o", label=name)
        if result["learned_at"][j]:
            ax_gain.axvline(result["learned_at"][j], color=ax_gain.lines[-1].get_color(), alpha=0.2, linewidth=6)
    ax_gain.set(ylabel="reward change from base (base std)", title="rewards (bands: the task that trained each)")
    ax_gain.legend()
    ax_ssim.plot(x, result["structure_drift_ssim"], marker="o", color="black")
    ax_ssim.set(ylabel="mean SSIM to base images", title="structure drift", ylim=(None, 1.02))
    for ax in (ax_gain, ax_ssim):
        ax.set_xticks(list(x), result["rows"], rotation=20)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def save_grid(rows: torch.Tensor, path: Path) -> None:
    """rows (M, B, 3, H, W) -> one PNG, a row per prompt/seed and a column per model (base, task 1..N)."""
    save_image(make_grid(rows.transpose(0, 1).flatten(0, 1), nrow=rows.shape[0], padding=2, pad_value=1.0), path)


def evaluate(run: Path, prompts: list[str], seeds: list[int], extra: list[str], opts: argparse.Namespace) -> dict:
    """Generate, score and report one run; writes eval.json, eval.md, eval_rewards.png and eval_grid.png into it."""
    args, tasks = load_run(run)
    task_rewards = rid.reward_names(args)
    columns = list(dict.fromkeys(task_rewards + extra))
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = rid.load_pipeline(args, device, run / "base" if args.tiny else None)
    pipe.scheduler.set_timesteps(args.num_steps, device=device)
    scorers = {name: load_reward(name, device, args.tiny) for name in columns}

    rows = generate_rows(pipe, tasks, prompts, seeds, args, opts.batch_size)              # (N+1, S*P, 3, H, W)
    scores = score_rows(rows, prompts * len(seeds), scorers, device, opts.batch_size)      # (N+1, S*P, J)
    matrix, gain, learned = scores.mean(1), gain_in_base_std(scores), learned_at(columns, task_rewards)
    result = {
        "run": str(run), "rows": ["base", *[f"task{i} {name}" for i, name in enumerate(task_rewards, start=1)]],
        "rewards": columns, "prompts": prompts, "seeds": seeds, "learned_at": learned,
        "reward_matrix": matrix.tolist(), "base_std": scores[0].std(0).tolist(), "gain_in_base_std": gain.tolist(),
        "final_average_reward": final_average(matrix, columns, task_rewards),
        "final_average_gain": final_average(gain, columns, task_rewards),
        "forgetting": forgetting(matrix, learned), "forgetting_in_base_std": forgetting(gain, learned),
        "structure_drift_ssim": structure_drift(rows).tolist(), "cost": cost(run),
    }
    own = [f if name in task_rewards else None for name, f in zip(columns, result["forgetting_in_base_std"])]
    result["mean_forgetting_in_base_std"] = mean_defined(own)
    (run / "eval.json").write_text(json.dumps(result, indent=2))
    (run / "eval.md").write_text(report_markdown(result))
    plot(result, run / "eval_rewards.png")
    save_grid(rows, run / "eval_grid.png")
    print(f"wrote {run}/eval.json, eval.md, eval_rewards.png, eval_grid.png")
    return result


def compare(runs: list[Path]) -> str:
    """One Markdown table, a row per run from its eval.json, and a mean ± std row over the runs if several."""
    results = []
    for run in runs:
        if not (run / "eval.json").is_file():
            raise rid.UsageError(f"{run}: no eval.json; run `python eval.py {run}` first")
        results.append(json.loads((run / "eval.json").read_text()))
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


def main(argv=None) -> None:
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


if __name__ == "__main__":
    try:
        main()
    except rid.UsageError as error:
        print(f"eval.py: error: {error}", file=sys.stderr)
        sys.exit(2)
