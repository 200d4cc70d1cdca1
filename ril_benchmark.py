"""The RIL benchmark on the toy world: does plain sequential reward fine-tuning forget, does RID help, and which of
its parts do it.

    python ril_benchmark.py                         # every method x 3 seeds (README: time on 2 cores)
    python ril_benchmark.py --methods plain,rid --seeds 0 --steps-per-task 4    # a quick look

Every method is a set of rid.py flags (METHODS) on top of rid.py's tiny defaults. For each method and seed,
`rid.py --tiny` trains the task sequence and `eval.py` evaluates it (reward matrix, forgetting, prompt fidelity,
SSIM to the base images), --workers runs side by side with one thread each; runs already evaluated are kept. Then,
over seeds, one table (OUT/ril.md, OUT/ril.json) and a plot of each reward across the tasks per method
(OUT/ril.png). The per-run matrices and image grids stay in OUT/<method>/seed<s>/.
"""
import json
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cli as command_line
from cli import option

# Each method: rid.py flags over the tiny defaults. The knobs RID adds are given explicitly in every row, so that a
# row means the same after the defaults change (they were chosen from this table: docs/ril-benchmark.md).
RID = dict(lambda_out=1.0, lambda_feat=1.0, ema_decay=0.9, distill_at="gradient-steps")
NO_DISTILLATION = dict(lambda_out=0.0, lambda_feat=0.0)
METHODS = {
    "plain": dict(shared_adapter=True, **NO_DISTILLATION),           # the baseline: sequential fine-tuning
    "adapter group": dict(NO_DISTILLATION),                          # a fresh LoRA per task, earlier ones frozen
    "EMA distillation": dict(RID, shared_adapter=True),              # distillation alone, one shared adapter
    "RID": dict(RID),                                                # both
    "RID frozen teacher": dict(RID, ema_decay=1.0),                 # the task-start teacher (LwF-like)
    "RID trajectory": dict(RID, distill_at="trajectory"),           # distilled at a step drawn from the whole chain
    "RID mu=0.8": dict(RID, ema_decay=0.8),                         # the teacher's horizon: 5, 10, 33 steps
    "RID mu=0.97": dict(RID, ema_decay=0.97),
    "RID lambda x10": dict(RID, lambda_out=10.0, lambda_feat=10.0),  # how hard the teacher pulls
    "RID lambda x100": dict(RID, lambda_out=100.0, lambda_feat=100.0),
    # Smith et al. 2023's self-regularisation. Its weight: at 1 the penalty reached 4.5e-3 by the end of a 20-step
    # task; 1000 makes it a few units, the size of what L_reward moves in a task (in units of sigma).
    "C-LoRA": dict(NO_DISTILLATION, clora_weight=1e3),
}


@dataclass
class RILArgs:
    out: str = option("runs/ril", "the benchmark's directory: a run per method and seed, and the table and plot")
    rewards: str = option("aesthetic,compressibility,clip", "the task sequence (chosen before any RID result: "
                          "compressibility rewards flat pictures, which undoes aesthetic's contrast and size; clip "
                          "asks for the prompt back)")
    methods: str = option(",".join(METHODS), "methods to run, comma-separated (see METHODS)")
    seeds: str = option("0,1,2", "training seeds, comma-separated")
    steps_per_task: int | None = option(None, "optimizer steps per task (default: rid.py's tiny default)")
    eval_seeds: str = option("0,1", "eval.py --seeds: each gives every eval prompt one x_T")
    workers: int = option(2, "runs side by side, one thread each")


def parse_args(argv: list[str]) -> RILArgs:
    opts = command_line.parse(RILArgs, argv, prog="ril_benchmark.py", description=__doc__.split("\n")[0])
    unknown = [m for m in opts.methods.split(",") if m not in METHODS]
    if unknown:
        raise command_line.UsageError(f"--methods: unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
    if opts.workers <= 0 or (opts.steps_per_task is not None and opts.steps_per_task <= 0):
        raise command_line.UsageError("--workers and --steps-per-task must be positive integers")
    return opts


def flags(settings: dict) -> list[str]:
    """rid.py flags for a dict of rid.Args fields (booleans as switches)."""
    out = []
    for name, value in settings.items():
        spelt = command_line.flag(name)
        out += ([spelt] if value else []) if isinstance(value, bool) else [spelt, str(value)]
    return out


def run_dir(opts: RILArgs, method: str, seed: int) -> Path:
    return Path(opts.out) / method.replace(" ", "-").replace("=", "") / f"seed{seed}"


def run_and_evaluate(opts: RILArgs, method: str, seed: int) -> Path:
    """One method and seed: rid.py --tiny (or --resume, if a run was interrupted), then eval.py; in a worker
    process with one thread. An evaluated run is kept as it is."""
    import torch
    torch.set_num_threads(1)
    import eval as evaluation
    import rid
    out = run_dir(opts, method, seed)
    if (out / "eval.json").is_file():
        return out
    settings = {"tiny": True, "rewards": opts.rewards, "seed": seed, **METHODS[method]}
    if opts.steps_per_task is not None:
        settings["steps_per_task"] = opts.steps_per_task
    resume = ["--resume"] if (out / "config.json").is_file() else []
    if rid.cli([*flags(settings), "--out-dir", str(out), *resume]) != 0:
        raise RuntimeError(f"rid.py failed for {method}, seed {seed}: see the messages above")
    if evaluation.cli([str(out), "--seeds", opts.eval_seeds]) != 0:
        raise RuntimeError(f"eval.py failed for {method}, seed {seed}: see the messages above")
    return out


def seconds_per_step(result: dict) -> float:
    cost = result["cost"].values()
    return sum(c["seconds"] for c in cost) / sum(c["steps"] for c in cost)


def summarise(results: dict[str, list[dict]]) -> dict:
    """Per method, over seeds: the final average gain and mean forgetting (base std), prompt fidelity after the last
    task (the judge, all three attributes, seen and held-out), SSIM to base, seconds per step over plain's, and the
    gain matrix G[i][j] (mean over seeds)."""
    plain = statistics.mean(seconds_per_step(r) for r in results.get("plain", next(iter(results.values()))))
    summary = {}
    for method, runs in results.items():
        columns = {
            "final average gain": [r["final_average_gain"] for r in runs],
            "mean forgetting": [r["mean_forgetting_in_base_std"] for r in runs],
            "fidelity seen": [r["fidelity"]["seen"]["all"][-1] for r in runs],
            "fidelity held-out": [r["fidelity"]["held_out"]["all"][-1] for r in runs],
            "SSIM to base": [r["structure_drift_ssim"][-1] for r in runs],
            "s/step vs plain": [seconds_per_step(r) / plain for r in runs],
        }
        gains = [r["gain_in_base_std"] for r in runs]
        summary[method] = {
            "flags": " ".join(flags(METHODS[method])), "seeds": len(runs), "rewards": runs[0]["rewards"],
            "rows": runs[0]["rows"], **{name: stats(values) for name, values in columns.items()},
            "gain_in_base_std": [[statistics.mean(g[i][j] for g in gains) for j in range(len(gains[0][0]))]
                                 for i in range(len(gains[0]))],
            "base fidelity seen": runs[0]["fidelity"]["seen"]["all"][0],
            "base fidelity held-out": runs[0]["fidelity"]["held_out"]["all"][0],
        }
    return summary


def stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


COLUMNS = ("final average gain", "mean forgetting", "fidelity seen", "fidelity held-out", "SSIM to base",
           "s/step vs plain")


def table(summary: dict) -> str:
    def cell(s):
        return f"{s['mean']:.3g} ± {s['std']:.2g}"
    header = ["method", *COLUMNS, "flags"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([method, *[cell(row[c]) for c in COLUMNS], f"`{row['flags']}`"]) + " |"
              for method, row in summary.items()]
    first = next(iter(summary.values()))
    return "\n".join(lines) + (f"\n\nmean ± std over {first['seeds']} seeds; base model: fidelity seen "
                               f"{first['base fidelity seen']:.3g}, held-out {first['base fidelity held-out']:.3g}.\n")


def plot(summary: dict):
    """One panel per reward: its gain from base (base std) after each task, a line per method."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    first = next(iter(summary.values()))
    rewards, rows = first["rewards"], first["rows"]
    fig = Figure(figsize=(5 * len(rewards), 4.5), dpi=110, layout="tight")
    axes = fig.subplots(1, len(rewards), squeeze=False)[0]
    colours = colormaps["tab20"].colors  # 20 colours: one per method, where the default cycle repeats after 10
    for j, (ax, reward) in enumerate(zip(axes, rewards)):
        for i, (method, row) in enumerate(summary.items()):
            ax.plot(range(len(rows)), [g[j] for g in row["gain_in_base_std"]], marker="o", label=method,
                    color=colours[2 * i % 20 + (2 * i // 20)], linestyle="-" if i % 2 == 0 else "--")
        ax.axvline(j + 1, color="grey", alpha=0.2, linewidth=8)
        ax.set(title=f"{reward} (band: its task)", ylabel="gain from base (base std), mean over seeds")
        ax.set_xticks(range(len(rows)), ["base", *[f"after {i}" for i in range(1, len(rows))]])
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    return fig


def main(opts: RILArgs) -> dict:
    seeds = [int(s) for s in opts.seeds.split(",")]
    methods = opts.methods.split(",")
    todo = [(m, s) for m in methods for s in seeds if not (run_dir(opts, m, s) / "eval.json").is_file()]
    if todo:  # runs already evaluated are kept, and need no worker
        with ProcessPoolExecutor(min(opts.workers, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(run_and_evaluate, opts, m, s) for m, s in todo]
            for job in jobs:
                job.result()
    runs = {(m, s): run_dir(opts, m, s) for m in methods for s in seeds}
    results = {m: [json.loads((runs[m, s] / "eval.json").read_text()) for s in seeds] for m in methods}
    summary = summarise(results)
    out = Path(opts.out)
    (out / "ril.json").write_text(json.dumps(summary, indent=2))
    (out / "ril.md").write_text(table(summary))
    plot(summary).savefig(out / "ril.png")
    print(table(summary))
    print(f"wrote {out}/ril.md, ril.json, ril.png")
    return summary


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args(sys.argv[1:])) and 0)
    except command_line.UsageError as error:
        print(f"ril_benchmark.py: error: {error}", file=sys.stderr)
        sys.exit(2)
