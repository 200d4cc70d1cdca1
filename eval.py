"""Evaluate a reward-incremental run: the reward matrix, forgetting, structure drift, plots and an image grid.

For the base model (row 0) and the model after each task i = 1..N (row i), generate images for fixed prompts (full
scale: none is a training prompt; tiny: seen and held-out toy-world captions) and seeds, the same x_T for every row,
and score each image with every reward j of the run (plus --extra-rewards):

    R[i][j]  = mean over prompts and seeds of r_j(images of row i)                        (N+1, J)  reward_matrix
    G[i][j]  = (R[i][j] - R[0][j]) / s_j,  s_j = std of r_j over the base images           (N+1, J)  gain_in_base_std
    final average reward = mean_j R[N][j]    over the run's own rewards                          final_average
    F_j      = max_{t_j <= i < N} R[i][j] - R[N][j],  t_j = the task that learned reward j          forgetting
    drift_i  = mean SSIM(images of row i, base images), same prompt and seed; 1 = same structure  structure_drift

    fidelity = the judge's accuracy (toyworld.Judge: shape, colour, background, all three) per row, on prompts of
               seen and of held-out combinations: toy-world runs only                                  fidelity
    CI         95 % bootstrap intervals over images (prompt and seed pairs, the same draw for every row)   bootstrap

Rewards have very different scales (compressibility is about -37, a tiny aesthetic score about 0.08), so every
number is also given in base standard deviations (G), where averages over rewards mean something.

    python eval.py runs/tiny                          # writes eval.json, eval.md, eval_*.png, training_curves.png
    python eval.py --compare runs/plain runs/rid      # one Markdown table from the runs' eval.json
"""
import contextlib
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cli as command_line  # eval.cli is the function at the end


@dataclass
class EvalArgs:
    runs: list[str] = field(default_factory=list, metadata={
        "help": "run directories written by rid.py (evaluated one after another)", "positional": True, "nargs": "+"})
    compare: bool = field(default=False, metadata={
        "help": "print one side-by-side Markdown table from the runs' eval.json instead of evaluating"})
    prompts: str | None = field(default=None, metadata={
        "help": "text file, one prompt a line (default: 8 built-in held-out prompts; tiny runs: 10 seen and 10 "
                "held-out toy-world captions)"})
    num_prompts: int | None = field(default=None, metadata={
        "help": "use only the first this many prompts (default: all; tiny runs: half of them seen captions, half "
                "held-out)"})
    seeds: str = field(default="0,1,2,3", metadata={"help": "comma-separated seeds; each gives every prompt one x_T"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the confidence intervals"})
    extra_rewards: str = field(default="", metadata={"help": "rewards to score besides the run's own, comma-separated"})
    batch_size: int = field(default=8, metadata={"help": "images per generation or scoring call"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)"})


def parse_args(argv: list[str]) -> EvalArgs:
    return command_line.parse(EvalArgs, argv, prog="eval.py", description=__doc__.split("\n")[0],
                              epilog="The performance benchmark is its own program: python benchmark.py --help")


# Parsed before the imports below (torch, diffusers, open_clip take seconds), so that --help and a mistyped flag
# answer at once; cli() parses again.
if __name__ == "__main__":
    command_line.parse_or_exit("eval.py", parse_args, sys.argv[1:])

import torch  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from torchmetrics.functional.image import structural_similarity_index_measure  # noqa: E402
from tqdm import tqdm  # noqa: E402

import figures  # noqa: E402
import checks  # noqa: E402
import runfiles  # noqa: E402
import rid  # noqa: E402
import toyworld  # noqa: E402
from rewards import MissingWeights, load_reward, parts_of, toy_weights  # noqa: E402

MAX_BOOTSTRAP = 100_000  # resamples: about 0.2 ms each on a 2-row toy run, and every draw is kept for the percentiles

# Held out: none of these is among rid.py's training prompts.
EVAL_PROMPTS = [
    "a rabbit in a vegetable garden", "a steam train crossing a viaduct", "a snowy village at night",
    "a woman in a straw hat, portrait", "a hot air balloon over green fields", "a tiger resting in tall grass",
    "a wooden cabin by a lake", "a basket of bread on a kitchen table",
]


def default_prompts(args: rid.Args, num_prompts: int | None) -> list[str]:
    """The mode's eval prompts, or the first num_prompts of them; in tiny mode the first half of that many from the
    seen captions and the rest from the held-out ones, so that any number evaluates both splits."""
    if not args.tiny or num_prompts is None:
        return (toyworld.EVAL_PROMPTS if args.tiny else EVAL_PROMPTS)[:num_prompts]
    split = {name: [p for p in toyworld.EVAL_PROMPTS if toyworld.split_of(p) == name] for name in ("seen", "held_out")}
    return split["seen"][:(num_prompts + 1) // 2] + split["held_out"][:num_prompts // 2]


# ----------------------------------------------------------------------------------------------------------------
# The run: its arguments and the LoRA file of each task.

def load_run(run: Path) -> tuple[rid.Args, list[Path]]:
    """The run's resolved rid.Args and its task directories (task{i}_{name}), checked to be complete."""
    checks.check_name_lengths(run, "run directory", written=False)
    if not (run / "config.json").is_file():
        raise checks.UsageError(f"{run}: no config.json; give a run directory written by rid.py")
    args = rid.resolve(rid.Args(**runfiles.read_config(run / "config.json", rid.Args)))
    try:  # an edited config.json is checked as rid.py checks its flags
        checks.check_reward_names(rid.reward_names(args), "rewards")
        checks.check_numbers(args)
    except checks.UsageError as error:
        raise checks.UsageError(f"{run}/config.json holds a value rid.py would refuse ({error}); restore it") from None
    tasks = [run / f"task{i}_{name}" for i, name in enumerate(rid.reward_names(args), start=1)]
    check_finished(run, len(tasks))
    for i, (task, name) in enumerate(zip(tasks, rid.reward_names(args)), start=1):
        if not (task / runfiles.LORA_FILE).is_file():
            raise checks.UsageError(f"{run}: incomplete run, {task.name}/{runfiles.LORA_FILE} is missing "
                                 "(did rid.py finish?)")
        rank = args.lora_rank * (1 if args.shared_adapter else i)  # the adapters of tasks 1..i, stacked
        check_lora_file(task / runfiles.LORA_FILE, runfiles.read_run_id(run), i, name, rank)
    return args, tasks


def check_finished(run: Path, tasks: int) -> None:
    """A run whose checkpoint is inside its tasks stopped early: its task directories from the checkpoint's task on
    are absent (a restart moves an earlier attempt's aside) or about to be written again, so it is not evaluated."""
    checkpoint = runfiles.load_checkpoint(run)
    if checkpoint is not None and checkpoint["task"] <= tasks:
        raise checks.UsageError(f"{run}: unfinished run, stopped at task {checkpoint['task']}, step "
                                f"{checkpoint['step']}; finish it (rid.py with its flags and --resume), then evaluate")


def check_lora_file(path: Path, run_id: str | None, task: int, reward: str, rank: int) -> None:
    """The file is a complete safetensors file (safe_open checks that its header parses and covers the whole file)
    holding this run's task `task`: its metadata names them (files written before it did have none) and its stacked
    rank is the task's. A LoRA file copied from another task or run would be scored as this one without a word."""
    try:
        with safe_open(path, "pt") as f:
            held = f.metadata() or {}
            found = next(f.get_slice(key).get_shape()[0] for key in f.keys() if key.endswith(".lora.down.weight"))
    except (SafetensorError, OSError, StopIteration) as error:
        raise checks.UsageError(f"{path} cannot be read ({error or 'no LoRA tensor'}); it is damaged or truncated: "
                                "rerun that task with rid.py --resume from a checkpoint, or train the run again"
                                ) from None
    expected = {runfiles.LORA_RUN: run_id, runfiles.LORA_TASK: str(task), runfiles.LORA_REWARD: reward}
    other = {key: value for key, value in expected.items() if key in held and held[key] != value}
    if other or found != rank:
        holds = (f"task {held.get(runfiles.LORA_TASK)} ({held.get(runfiles.LORA_REWARD)}) of run "
                 f"{held.get(runfiles.LORA_RUN)}" if other else f"a LoRA of rank {found}")
        raise checks.UsageError(f"{path} holds {holds}, not task {task} ({reward}) of this run (run {run_id}, rank "
                                f"{rank}); copy the right file back, or train the run again")


def eval_settings(opts: EvalArgs) -> tuple[list[str] | None, list[int], list[str]]:
    """The eval prompts (None: each run's mode's default, default_prompts), seeds and extra rewards from the flags,
    checked before any work starts."""
    if opts.num_prompts is not None and opts.num_prompts <= 0 or opts.batch_size <= 0 or opts.bootstrap <= 0:
        raise checks.UsageError("--num-prompts, --batch-size and --bootstrap must be positive integers")
    if opts.bootstrap > MAX_BOOTSTRAP:
        raise checks.UsageError(f"--bootstrap {opts.bootstrap}: each resample costs time and memory, give at most "
                                f"{MAX_BOOTSTRAP} (the default is 1000)")
    prompts = rid.read_prompts(opts.prompts)[:opts.num_prompts] if opts.prompts else None
    try:
        seeds = [int(seed) for seed in opts.seeds.split(",")]
    except ValueError:
        raise checks.UsageError(f"--seeds must be comma-separated integers, e.g. 0,1; got {opts.seeds!r}") from None
    if not all(0 <= seed < checks.SEED_LIMIT for seed in seeds):
        raise checks.UsageError(f"--seeds must each be in [0, 2^63), as rid.py's --seed; got {opts.seeds}")
    n_prompts = len(prompts) if prompts is not None else opts.num_prompts or len(EVAL_PROMPTS)
    if n_prompts * len(seeds) < 2:
        raise checks.UsageError("one prompt with one seed gives one image per model, and gains are in units of the "
                                  "base images' standard deviation: give at least two prompts or seeds")
    extra = [name.strip() for name in opts.extra_rewards.split(",") if name.strip()]
    checks.check_reward_names(extra, "--extra-rewards")
    checks.check_device(opts.device)
    return prompts, seeds, extra


# ----------------------------------------------------------------------------------------------------------------
# Images and scores.

def generate_rows(pipe, tasks: list[Path], prompts: list[str], seeds: list[int], args: rid.Args, batch_size: int,
                  base: bool = True):
    """Images of the base model and after each task: (N+1, S*P, 3, H, W) in [0,1], image s*P + p = prompt p, seed s
    (without the base row: (N, S*P, 3, H, W)). Every row starts from the same x_T; task i's LoRA file holds the
    adapters of tasks 1..i, stacked."""
    latents = torch.cat([rid.initial_latents(pipe, len(prompts), args.resolution, torch.Generator().manual_seed(s))
                         for s in seeds])
    all_prompts = prompts * len(seeds)
    chunks = range(0, len(all_prompts), batch_size)
    models = [None, *tasks] if base else tasks
    bar = tqdm(total=len(models) * len(chunks), desc="generating", dynamic_ncols=True)
    rows = []
    for task in models:
        if task is not None:
            # The UNet's LoRA alone: pipe.load_lora_weights also looks for text-encoder LoRA keys, which rid.py never
            # trains, and warns on every load that there are none.
            pipe.unet.load_lora_adapter(task, weight_name=runfiles.LORA_FILE, prefix="unet", adapter_name=task.name)
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
    """Every reward of every image: rows (M, B, 3, H, W), B prompts -> scores (M, B, J), J = len(scorers), the
    scorers (on the CPU) each copied to the device for its turn. In fp32, as in training (rid.score)."""
    scores = torch.zeros(*rows.shape[:2], len(scorers))
    bar = tqdm(total=rows.shape[0] * len(scorers), desc="scoring", dynamic_ncols=True)
    for j, scorer in enumerate(scorers.values()):
        with rid.scorer_on(scorer, device) as on_device:  # one reward tower on the device at a time
            for i, row in enumerate(rows):
                for start in range(0, len(prompts), batch_size):
                    images = row[start:start + batch_size].to(device)
                    batch_prompts = prompts[start:start + batch_size]
                    scores[i, start:start + batch_size, j] = rid.score(on_device, images, batch_prompts).cpu()
                bar.update()
    bar.close()
    return scores


def structure_drift(rows: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of each row's images against the base row's (row 0) for the same prompt and seed:
    rows (M, B, 3, H, W) in [0,1] -> (M,); 1 means the same structure, and row 0 is exactly 1."""
    base = rows[0]
    return torch.stack([structural_similarity_index_measure(row, base, data_range=1.0, reduction="none").mean()
                        for row in rows])


def toy_judge(prompts: list[str], device) -> toyworld.Judge | None:
    """The toy world's judge on `device`, or None unless every prompt is a toy-world caption. evaluate() loads it
    before generating, so that a damaged judge.safetensors is one line at once, not after every image is made."""
    if any(toyworld.split_of(prompt) is None for prompt in prompts):
        return None
    with toy_weights(toyworld.JUDGE) as path:
        return toyworld.load_judge(path).to(device)


def judge_rows(rows: torch.Tensor, prompts: list[str], device, judge=None) -> dict[str, torch.Tensor] | None:
    """Prompt fidelity of every image: rows (M, B, 3, H, W), B prompts -> {attribute: (M, B) 0/1} for shape, colour,
    background and all three, by the toy world's judge (loaded by toy_judge unless given); None unless every prompt
    is a toy-world caption."""
    judge = toy_judge(prompts, device) if judge is None else judge
    if judge is None:
        return None
    per_row = [toyworld.judge_correct(judge, row.to(device), prompts) for row in rows]
    return {name: torch.stack([row[name] for row in per_row]) for name in per_row[0]}


# ----------------------------------------------------------------------------------------------------------------
# Metrics: small pure functions of the reward matrix.

def gain_in_base_std(scores: torch.Tensor) -> torch.Tensor:
    """G[i][j] = (R[i][j] - R[0][j]) / s_j from per-image scores (M, B, J), s_j = std over the base images (M, J)."""
    matrix = scores.mean(1)
    return (matrix - matrix[0]) / scores[0].std(0)


def trained_rewards(task_rewards: list[str]) -> list[str]:
    """The rewards the tasks train, each once: a joint task (a+b) trains each of its rewards."""
    return list(dict.fromkeys(part for task in task_rewards for part in parts_of(task)))


def learned_at(columns: list[str], task_rewards: list[str]) -> list[int]:
    """t_j: the first task (1-based) that trained reward j (alone or in a joint task), or 0 (the base row) for a
    reward no task trained."""
    return [next((t for t, task in enumerate(task_rewards, start=1) if name in parts_of(task)), 0) for name in columns]


def forgetting(matrix: torch.Tensor, learned: list[int]) -> list[float | None]:
    """F_j = max_{t_j <= i < N} R[i][j] - R[N][j] for R (N+1, J), rows base, after task 1..N.
    The max starts at the row where reward j was learned (t_j): before that there is nothing to forget. It is
    None where that range is empty, i.e. for a reward first learned by the last task."""
    last = matrix.shape[0] - 1
    return [(matrix[t:last, j].max() - matrix[last, j]).item() if t < last else None for j, t in enumerate(learned)]


def plasticity(matrix: torch.Tensor, learned: list[int]) -> list[float | None]:
    """P_j = R[t_j][j] - R[t_j - 1][j]: what the task that trained reward j gained on it over the model before that
    task (None for a reward no task trained). Unlike G[t_j][j], it does not count what earlier tasks did to reward j."""
    return [(matrix[t, j] - matrix[t - 1, j]).item() if t > 0 else None for j, t in enumerate(learned)]


def final_average(matrix: torch.Tensor, columns: list[str], task_rewards: list[str]) -> float:
    """mean_j R[N][j] over the run's own rewards (extra rewards are reported, not averaged)."""
    return matrix[-1, [columns.index(name) for name in trained_rewards(task_rewards)]].mean().item()


def mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def fidelity(correct: dict[str, torch.Tensor] | None, splits: list[str]) -> dict | None:
    """The judge's accuracy per row, F[split][attribute] = (M,) list, from per-image correctness {attribute: (M, B)}
    and each image's split ("seen" or "held_out" combination)."""
    if correct is None:
        return None
    return {split: {name: c[:, [i for i, s in enumerate(splits) if s == split]].mean(1).tolist()
                    for name, c in correct.items()} for split in dict.fromkeys(splits)}


def headline(scores, correct, splits, learned: list[int], columns: list[str], task_rewards: list[str]) -> dict:
    """The numbers that get confidence intervals, from per-image scores (M, B, J) and judge correctness."""
    gain = gain_in_base_std(scores)
    forgotten = forgetting(gain, learned)
    return {"gain_in_base_std": gain.tolist(), "final_average_gain": final_average(gain, columns, task_rewards),
            "plasticity_in_base_std": plasticity(gain, learned), "forgetting_in_base_std": forgotten,
            "mean_forgetting_in_base_std": mean_defined([f for name, f in zip(columns, forgotten)
                                                         if name in trained_rewards(task_rewards)]),
            "fidelity": fidelity(correct, splits)}


def bootstrap(scores, correct, splits: list[str], n: int, measure) -> dict:
    """95 % percentile intervals [lo, hi] of every number measure(scores, correct, splits) returns, over n resamples
    of the images with replacement: the same images in every row (rows share x_T, so their differences are
    paired), drawn within each split so that each keeps its size. Seeded: the same run gives the same intervals."""
    generator = torch.Generator().manual_seed(0)
    strata = [torch.tensor([i for i, s in enumerate(splits) if s == split]) for split in dict.fromkeys(splits)]
    draws = []
    for _ in range(n):
        idx = torch.cat([stratum[torch.randint(len(stratum), (len(stratum),), generator=generator)]
                         for stratum in strata])
        picked = None if correct is None else {name: c[:, idx] for name, c in correct.items()}
        draws.append(measure(scores[:, idx], picked, [splits[i] for i in idx]))
    return intervals(draws)


def intervals(draws: list):
    """[2.5 %, 97.5 %] percentiles leaf by leaf over a list of equally nested dicts/lists of numbers (None stays)."""
    first = draws[0]
    if isinstance(first, dict):
        return {key: intervals([d[key] for d in draws]) for key in first}
    if isinstance(first, list):
        return [intervals([d[i] for d in draws]) for i in range(len(first))]
    if first is None:
        return None
    values = torch.tensor(draws, dtype=torch.float64)
    return [values.quantile(0.025).item(), values.quantile(0.975).item()]


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


def with_ci(value, interval) -> str:
    """'value [lo, hi]', the 95 % bootstrap interval beside the value."""
    return fmt(value) if interval is None else f"{fmt(value)} [{fmt(interval[0])}, {fmt(interval[1])}]"


def fidelity_table(result: dict) -> list[str]:
    """The judge's accuracy per row and split, with intervals; nothing for runs whose prompts are not toy captions."""
    if result["fidelity"] is None:
        return []
    header, cells = ["model"], [[label] for label in result["rows"]]
    for split, accuracy in result["fidelity"].items():
        for name, values in accuracy.items():
            header.append(f"{split} {name}")
            for row, (value, interval) in enumerate(zip(values, result["ci"]["fidelity"][split][name])):
                cells[row].append(with_ci(value, interval))
    return ["## Prompt fidelity: the judge's accuracy (shape, colour, background, all three) on seen and held-out "
            "combinations", markdown_table(header, cells)]


def report_markdown(result: dict) -> str:
    columns, labels, ci = result["rewards"], result["rows"], result["ci"]

    def by_row(header, *columns_of_values):
        return markdown_table(header, [[label, *values] for label, *values in zip(labels, *columns_of_values)])

    summary = [["final average reward (raw)", result["final_average_reward"]],
               ["final average gain (base std)", with_ci(result["final_average_gain"], ci["final_average_gain"])],
               ["mean forgetting (base std)", with_ci(result["mean_forgetting_in_base_std"],
                                                      ci["mean_forgetting_in_base_std"])],
               ["SSIM to base after the last task", result["structure_drift_ssim"][-1]]]
    gains = [[with_ci(g, i) for g, i in zip(row, row_ci)]
             for row, row_ci in zip(result["gain_in_base_std"], ci["gain_in_base_std"])]
    forgetting_rows = zip(columns, map(str, result["learned_at"]),
                          map(with_ci, result["plasticity_in_base_std"], ci["plasticity_in_base_std"]),
                          result["forgetting"],
                          map(with_ci, result["forgetting_in_base_std"], ci["forgetting_in_base_std"]))
    parts = [f"# Evaluation of `{result['run']}`",
             f"{len(result['prompts'])} prompts x seeds {result['seeds']}, the same x_T in every row; [lo, hi]: 95 % "
             "bootstrap intervals over the images.",
             "## Summary", markdown_table(["metric", "value"], summary),
             "## Reward matrix R[i][j] (mean over images)", by_row(["model", *columns], *zip(*result["reward_matrix"])),
             "## Change from base in base standard deviations, G[i][j]", by_row(["model", *columns], *zip(*gains)),
             "## Plasticity P_j = G[t_j][j] - G[t_j - 1][j] (what its own task gained) and forgetting F_j = max over "
             "rows from t_j to N-1 of R[i][j], minus R[N][j]",
             markdown_table(["reward", "learned at task", "P_j (base std)", "F_j (raw)", "F_j (base std)"],
                            list(forgetting_rows)),
             *fidelity_table(result),
             "## Structure drift: mean SSIM to the base images (1 = same structure)",
             by_row(["model", "SSIM"], result["structure_drift_ssim"])]
    if result["cost"]:
        parts += ["## Training cost (metrics.jsonl)",
                  markdown_table(["task", "steps", "seconds", "seconds/step"],
                                 [[task, str(c["steps"]), c["seconds"], c["seconds_per_step"]]
                                  for task, c in result["cost"].items()])]
    return "\n\n".join(parts) + "\n"


def evaluate(run: Path, prompts: list[str] | None, seeds: list[int], extra: list[str], opts: EvalArgs) -> dict:
    """Generate, score and judge one run; writes eval.json, eval.md, eval_rewards.png, eval_grid.png and (from its
    metrics.jsonl) training_curves.png into it. prompts=None: the run's mode's default prompts."""
    args, tasks = load_run(run)
    prompts = prompts or default_prompts(args, opts.num_prompts)
    task_rewards = rid.reward_names(args)
    columns = list(dict.fromkeys(trained_rewards(task_rewards) + extra))
    device = checks.check_device(opts.device)
    pipe = rid.load_pipeline(args, device)
    checks.warn_long_prompts(pipe.tokenizer, prompts)
    pipe.scheduler.set_timesteps(args.num_steps, device=device)
    scorers = {name: load_reward(name, "cpu", args.tiny) for name in columns}
    judge = toy_judge(prompts, device)

    rows = generate_rows(pipe, tasks, prompts, seeds, args, opts.batch_size)              # (N+1, S*P, 3, H, W)
    scores = score_rows(rows, prompts * len(seeds), scorers, device, opts.batch_size)      # (N+1, S*P, J)
    correct = judge_rows(rows, prompts * len(seeds), device, judge)                       # {attribute: (N+1, S*P)}
    splits = [toyworld.split_of(prompt) or "all" for prompt in prompts * len(seeds)]
    matrix, learned = scores.mean(1), learned_at(columns, task_rewards)

    def measure(scores, correct, splits):
        return headline(scores, correct, splits, learned, columns, task_rewards)

    result = {
        "run": str(run), "rows": figures.model_titles(task_rewards),  # the grid's column titles
        "rewards": columns, "prompts": prompts, "seeds": seeds, "learned_at": learned,
        "reward_matrix": matrix.tolist(), "base_std": scores[0].std(0).tolist(),
        "final_average_reward": final_average(matrix, columns, task_rewards), "forgetting": forgetting(matrix, learned),
        **measure(scores, correct, splits),
        "structure_drift_ssim": structure_drift(rows).tolist(), "cost": cost(run),
        "ci": bootstrap(scores, correct, splits, opts.bootstrap, measure),
    }
    labels = [f"{prompt}\nseed {seeds[0]}" for prompt in prompts]  # the first seed of every prompt
    grid = figures.image_grid(rows[:, :len(prompts)].transpose(0, 1), result["rows"], labels)
    outputs = {"eval.json": lambda f: f.write(json.dumps(result, indent=2).encode()),
               "eval.md": lambda f: f.write(report_markdown(result).encode()),
               "eval_rewards.png": lambda f: figures.eval_rewards(result).savefig(f, format="png"),
               "eval_grid.png": lambda f: grid.save(f, format="png")}
    if (run / "metrics.jsonl").is_file():
        curves = figures.training_curves(figures.read_metrics(run / "metrics.jsonl"), args.grad_clip)
        outputs["training_curves.png"] = lambda f: curves.savefig(f, format="png")
    for name, write in outputs.items():  # each complete or as it was: a full disk is one line (exit status 74)
        runfiles.atomic_write(run / name, write)
    written = ", ".join(outputs)
    print(f"wrote {run}/{written}")
    return result


EVAL_KEYS = ("rewards", "reward_matrix", "final_average_reward", "final_average_gain", "mean_forgetting_in_base_std",
             "structure_drift_ssim", "cost")


def read_eval(run: Path) -> dict:
    """A run's eval.json, checked to hold what --compare reads; a damaged one is one line."""
    checks.check_name_lengths(run, "--compare", written=False)
    if not (run / "eval.json").is_file():
        raise checks.UsageError(f"{run}: no eval.json; run `python eval.py {run}` first")
    try:
        result = json.loads((run / "eval.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise checks.UsageError(f"{run}/eval.json cannot be read as JSON ({error}); run `python eval.py {run}` "
                                  "again") from None
    missing = [key for key in EVAL_KEYS if key not in result] if isinstance(result, dict) else list(EVAL_KEYS)
    if missing:
        raise checks.UsageError(f"{run}/eval.json lacks {', '.join(missing)}; run `python eval.py {run}` again")
    return result


# What the runs of one --compare must share in their eval.json, and its name in the message ("rows": the models).
COMPARABLE = {"rows": "tasks", "rewards": "rewards", "prompts": "prompts", "seeds": "seeds"}


def check_comparable(runs: list[Path], results: list[dict]) -> None:
    """The runs of one --compare are different runs of one task sequence, evaluated alike: a mean ± std over runs
    that count one run twice, or that were evaluated on other rewards, prompts or seeds, means nothing."""
    seen = {}
    for run in runs:
        if seen.setdefault(run.resolve(), run) is not run:
            raise checks.UsageError(f"--compare: {run} is given twice (as {seen[run.resolve()]}); give each run once")
    for run, result in zip(runs[1:], results[1:]):
        for key, what in COMPARABLE.items():
            if result.get(key) != results[0].get(key):
                values = "" if key == "prompts" else f" ({result.get(key)} against {results[0].get(key)})"
                raise checks.UsageError(f"--compare: {run} was evaluated on other {what} than {runs[0]}{values}; "
                                        "compare runs of one task sequence evaluated alike (eval.py with the same "
                                        "flags)")


def compare(runs: list[Path]) -> str:
    """One Markdown table, a row per run from its eval.json, and a mean ± std row over the runs if several."""
    results = [read_eval(run) for run in runs]
    check_comparable(runs, results)
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
    opts = parse_args(argv)
    runs = [Path(run) for run in opts.runs]
    if opts.compare:
        print(compare(runs))
        return
    prompts, seeds, extra = eval_settings(opts)
    threads = checks.choose_threads()
    for run in runs:
        load_run(run)  # refuse an incomplete run, or one that cannot take the outputs, before evaluating any
        checks.check_writable(run, "run directory", run)
    print(threads, file=sys.stderr)
    for run in runs:
        # Under the run's lock: a second eval.py of the run (the two would share their outputs' temporary files) or a
        # rid.py writing it is refused in one line.
        with contextlib.closing(runfiles.lock_run_dir(run, "run directory", "eval.py")):
            evaluate(run, prompts, seeds, extra, opts)


def cli(argv: list[str]) -> int:
    """python eval.py ...: 0 done, 2 bad input, 74 a write failed, 130 Ctrl-C; each failure one line on stderr."""
    try:
        main(argv)
        return 0
    except (checks.UsageError, MissingWeights, runfiles.WriteFailed) as error:
        print(f"eval.py: error: {error}", file=sys.stderr)
        return checks.EXIT_STATUS[type(error)]
    except KeyboardInterrupt:  # every output is written whole (atomic_write) or not at all
        print("eval.py: interrupted; the outputs written so far are complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
