"""The fair RIL benchmark on the toy world: does a method learn each new reward (plasticity) while keeping what the
earlier rewards taught and the base model's structure (stability), at what cost, beside the best that simpler
methods do at their own best settings?

    python ril_benchmark.py                        # every method, its sweep, two task budgets (README: time on 2 cores)
    python ril_benchmark.py --preset quick         # a few minutes: one budget, one seed, three settings a method

The task sequence is aesthetic -> hps -> compressibility, the RID paper's order; each reward has headroom on the base
model and each later one undoes part of what an earlier one asked for (hps moves the shape from the centre, which
aesthetic rewards, to a rule-of-thirds point; compressibility flattens the contrast that aesthetic rewards). Every
method is a list of settings, its sweep over its own strength knob (METHODS); every run is `rid.py --tiny` with
those flags, then evaluated on the validation and the test captions (toyworld.SPLITS; rid.py trains on a third
split). Settings are chosen on validation, results are reported on test:

  1. sweeps: every method x setting x --seeds, at each --budgets (optimizer steps per task);
  2. references, plain fine-tuning at each reference lr: every reward alone from the base (single-task: what
     learning it costs) and all rewards at once with the sum of their normalised losses (joint: the upper bound);
  3. selection, per budget and method, on validation: its best setting (highest ACC) and its setting at matched
     plasticity (closest to plain fine-tuning's plasticity at plain's best setting);
  4. the chosen settings with --report-seeds, on test: the tables, the frontier plot and the per-run matrices.

Every run directory is named by a hash of its resolved rid.py arguments and reused only if its config.json holds
exactly those; an evaluation is reused only if it was made with the same prompts, seeds and rewards. Ctrl-C or SIGTERM
stops every worker (a run inside rid.py checkpoints its step) and keeps what is complete: the same command continues.
Outputs in --out: ril.md (the tables), ril.json (every number), runs.md (every reported run's matrices), frontier.png
and ril.png (each reward across the tasks); each run's own files in runs/<hash>/.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import statistics
import sys
import time
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cli as command_line
from cli import option

SEQUENCE = "aesthetic,hps,compressibility"
PLAIN = dict(shared_adapter=True, lambda_out=0.0, lambda_feat=0.0)
GROUP = dict(lambda_out=0.0, lambda_feat=0.0)  # the adapter group alone: a fresh LoRA per task, no teacher
RID = dict(ema_decay=0.9, distill_at="gradient-steps")  # the knobs RID adds, given explicitly in every row
# The comparison methods of baselines.py, each with its own knob; their rows train the adapter group without RID's
# distillation, except backward progressive training, a schedule of K on top of plain fine-tuning.
# C-LoRA as its paper has it: LoRA on the cross-attention keys and values only, penalised where earlier tasks changed
# them. Its weight is calibrated on gradient norms: at weight 1 the penalty's gradient is as large as L_reward's a few
# steps into tasks 2 and 3 (norms 0.008-0.04 against 0.01-0.03 over 20 steps at lr 1e-2), so the sweep spans 0.1 to
# 100 times that (docs/ril-benchmark.md).
CLORA = dict(GROUP, lora_targets="attn2.to_k,attn2.to_v")


def both(weight: float) -> dict:
    return dict(lambda_out=weight, lambda_feat=weight)


def baseline(spec: str, **flags) -> dict:
    return dict(GROUP, baseline=spec, **flags)


# Each method: its strength knob (an rid.Args field, "lambda" for both distillation weights, "part", or a setting of
# its --baseline) and its sweep, {budget kind: [rid.py flags over the tiny defaults]}. "short" is the quick start's
# 20 steps a task, "long" any longer budget (the rows the headline rests on).
METHODS = {
    "plain": ("lr", {"short": [dict(PLAIN, lr=lr) for lr in (1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7e-3, 1e-2, 2e-2)],
                     "long": [dict(PLAIN, lr=lr) for lr in (1e-3, 2e-3, 3e-3, 5e-3)]}),
    "adapter group": ("lr", {"short": [dict(GROUP, lr=lr) for lr in (2e-3, 5e-3, 1e-2)]}),
    "EMA distillation": ("lambda", {
        "short": [dict(RID, **both(w), shared_adapter=True, lr=1e-2) for w in (0.3, 1, 3, 10)],
        "long": [dict(RID, **both(w), shared_adapter=True, lr=1e-2) for w in (1, 3)]
        + [dict(RID, **both(3), shared_adapter=True, lr=2e-3)]}),
    "RID": ("lambda", {"short": [dict(RID, **both(w), lr=1e-2) for w in (0.1, 0.3, 1, 3, 10)]
                       + [dict(RID, **both(1), lr=lr) for lr in (2e-3, 5e-3, 2e-2)],
                       "long": [dict(RID, **both(w), lr=1e-2) for w in (0.3, 1, 3, 10)]
                       + [dict(RID, **both(w), lr=2e-3) for w in (1, 3)]}),
    "RID parts": ("part", {"short": [part for lr in (1e-2, 2e-3) for part in (
        dict(RID, lambda_out=1.0, lambda_feat=0.0, lr=lr), dict(RID, lambda_out=0.0, lambda_feat=1.0, lr=lr),
        *[dict(RID, **both(1), ema_decay=mu, lr=lr) for mu in (0.8, 0.97, 1.0)])]}),
    "C-LoRA": ("baseline:weight", {
        "short": [dict(CLORA, baseline=f"clora weight={w:g}", lr=lr) for w, lr in ((0.1, 1e-2), (1, 1e-2), (10, 1e-2),
                                                                                (100, 1e-2), (10, 5e-3), (10, 2e-3))],
        "long": [dict(CLORA, baseline=f"clora weight={w:g}", lr=lr) for w, lr in ((1, 1e-2), (10, 1e-2), (10, 2e-3))]}),
    "generative distillation": ("baseline:weight", {
        "short": [baseline(f"replay weight={w:g}", lr=1e-2) for w in (0.3, 1, 3, 10)]
        + [baseline("replay weight=10", lr=lr) for lr in (5e-3, 2e-3)],
        "long": [baseline(f"replay weight={w:g}", lr=lr) for w, lr in ((1, 1e-2), (10, 1e-2), (10, 2e-3))]}),
    "InfLoRA": ("baseline:energy", {
        "short": [baseline(f"inflora energy={e:g}", lr=1e-2) for e in (0.8, 0.9, 0.95, 0.99)]
        + [baseline("inflora energy=0.9", lr=lr) for lr in (5e-3, 2e-3)]}),
    "backward progressive": ("baseline:start", {
        "short": [dict(PLAIN, baseline=f"progressive start={k} levels=4", lr=lr) for k, lr in
                  ((1, 5e-3), (5, 5e-3), (5, 2e-3))]}),
}
MERGED = "merged LoRAs"  # model soups: the single-task references' LoRAs summed, each with one of MERGE_WEIGHTS
MERGE_WEIGHTS = (1 / 3, 2 / 3, 1.0)
REFERENCE_LRS = (2e-3, 5e-3, 1e-2)  # plain fine-tuning's single-task and joint references, at each of these
# --preset quick's settings: around each method's best of the full benchmark (docs/ril-benchmark.md)
QUICK = ("plain lr=0.001", "plain lr=0.002", "plain lr=0.005", "RID lambda=1 lr=0.002", "RID lambda=3 lr=0.01",
         "RID lambda=10 lr=0.01", "C-LoRA weight=10 lr=0.002", "C-LoRA weight=10 lr=0.005")


@dataclass
class RILArgs:
    out: str = option("runs/ril", "the benchmark's directory: runs/, the tables, the plots")
    preset: Literal["full", "quick"] = option("full", "full: every method and sweep at --budgets; quick: budget 20, "
                                              "seed 0, three settings of plain and RID and two of C-LoRA")
    methods: str | None = option(None, "methods, or single settings by their labels ('plain lr=0.005'), "
                                 "comma-separated (METHODS; merged LoRAs merge the single-task references) [full: "
                                 "every method / quick: QUICK's settings]")
    budgets: str | None = option(None, "optimizer steps per task, comma-separated [full 20,60 / quick 20]; the first "
                                 "is the short budget's sweep, the others the long one's")
    seeds: str | None = option(None, "training seeds of the sweeps and references [full 0,1,2 / quick 0]")
    report_seeds: str | None = option(None, "training seeds of the chosen settings' test rows [full 0,1,2,3,4 / quick "
                                      "0]: the sweep's seeds and more")
    eval_seeds: str = option("0,1", "x_T seeds of the evaluation: each gives every validation and test caption one")
    workers: int = option(2, "runs side by side, one thread each")


PRESETS = {"full": dict(methods=",".join([*METHODS, MERGED]), budgets="20,60", seeds="0,1,2", report_seeds="0,1,2,3,4"),
           "quick": dict(methods=",".join(QUICK), budgets="20", seeds="0", report_seeds="0")}


@dataclass(frozen=True)
class Plan:
    """What the flags ask for, checked: methods (each whole, or only the settings named in `labels`), budgets and
    seeds as lists."""
    out: Path
    methods: tuple[str, ...]
    labels: frozenset[str]
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    report_seeds: tuple[int, ...]
    eval_seeds: tuple[int, ...]
    workers: int
    quick: bool


def integers(text: str, flag: str, low: int, high: int) -> tuple[int, ...]:
    """Comma-separated integers in [low, high), each once, or a one-line UsageError."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise command_line.UsageError(f"{flag} must be comma-separated integers, e.g. 0,1; got {text!r}") from None
    if not all(low <= v < high for v in values) or len(set(values)) < len(values):
        raise command_line.UsageError(f"{flag} must be different integers in [{low}, {high}); got {text}")
    return values


def parse_args(argv: list[str]) -> Plan:
    """The flags, each checked before any run starts (one line, exit status 2): methods known and not repeated,
    integer lists in range, --out writable."""
    opts = command_line.parse(RILArgs, argv, prog="ril_benchmark.py", description=__doc__.split("\n")[0])
    opts = dataclasses.replace(opts, **{k: v for k, v in PRESETS[opts.preset].items() if getattr(opts, k) is None})
    items = [m.strip() for m in opts.methods.split(",")]
    labels = {label(method, settings): method for method, (_, sweeps) in METHODS.items()
              for kind in sweeps.values() for settings in kind}
    unknown = [m for m in items if m not in METHODS and m != MERGED and m not in labels]
    if unknown or len(set(items)) < len(items):
        raise command_line.UsageError(f"--methods: unknown method or setting {unknown[0]!r}; methods: "
                                      f"{', '.join([*METHODS, MERGED])}, or a setting's label as the tables show it"
                                      if unknown else f"--methods names a method twice: {opts.methods}")
    methods = tuple(dict.fromkeys(labels.get(m, m) for m in items))
    if "plain" not in methods:
        raise command_line.UsageError("--methods must include plain: the references and the matched plasticity are "
                                      "plain fine-tuning's")
    if not 0 < opts.workers <= 64:
        raise command_line.UsageError(f"--workers must be in [1, 64]; got {opts.workers}")
    import checks  # after the flags parsed: torch and the libraries take seconds
    out = Path(opts.out)
    checks.check_name_lengths(out, "--out")
    checks.check_writable(out, "--out", out)
    return Plan(out, methods, frozenset(m for m in items if m in labels),
                integers(opts.budgets, "--budgets", 1, 10_000),
                integers(opts.seeds, "--seeds", 0, checks.SEED_LIMIT),
                integers(opts.report_seeds, "--report-seeds", 0, checks.SEED_LIMIT),
                integers(opts.eval_seeds, "--eval-seeds", 0, checks.SEED_LIMIT), opts.workers, opts.preset == "quick")


# ----------------------------------------------------------------------------------------------------------------
# The runs: each a set of rid.py flags and a seed, in a directory named by its resolved arguments.

@dataclass(frozen=True)
class Job:
    """One run: rid.py's flags over the tiny defaults, the directory they name, and the evaluation it needs."""
    kind: str           # "sweep", "single-task" or "joint"
    method: str         # the method, or "plain" for a reference
    budget: int
    setting: int        # the index in the method's sweep (references: in REFERENCE_LRS)
    seed: int
    flags: tuple        # ((rid.Args field, value), ...)

    @property
    def settings(self) -> dict:
        return dict(self.flags)


def resolved(job: Job) -> dict:
    """The run's full rid.Args as config.json records them, as a run's key (key_arguments)."""
    import rid
    return key_arguments(dataclasses.asdict(rid.resolve(rid.Args(tiny=True, **job.settings))))


def key_arguments(args: dict) -> dict:
    """What names a run: its rid.Args without --out-dir and --resume, and with the toy world's pipeline named
    "toy/pipeline" wherever the checkout lies (rid.py records the absolute path), so that a moved checkout, or
    another worktree of it, finds its runs; numbers as config.json records them."""
    import rid
    real = {f.name for f in dataclasses.fields(rid.Args) if f.type in (float, float | None)}
    # A sweep's weight of 1 is recorded as 1.0 (rid.Args' field is a float): one key for both spellings.
    key = {k: float(v) if k in real and type(v) is int else v
           for k, v in args.items() if k not in ("out_dir", "resume")}
    if key.get("tiny") and Path(key["model"]).parts[-2:] == ("toy", "pipeline"):
        key["model"] = "toy/pipeline"
    return key


def run_dir(out: Path, job: Job) -> Path:
    """OUT/runs/<12 hex digits of the SHA-256 of the resolved arguments>: other flags, or other rid.py defaults,
    name another directory. A merged LoRA (no training): OUT/merged/<budget>-<lr>-<weight>-seed<s>."""
    if job.kind == "merged":
        return out / "merged" / f"{job.budget}-lr{job.settings['lr']:g}-w{job.settings['merge']:.3g}-seed{job.seed}"
    key = hashlib.sha256(json.dumps(resolved(job), sort_keys=True).encode()).hexdigest()[:12]
    return out / "runs" / key


def sweep_settings(method: str, budget_kind: str, plan: "Plan") -> list[dict]:
    """The method's settings at this budget ("short" or "long") that the plan runs: all, or those named by label."""
    if method == MERGED:
        return [dict(lr=lr, merge=w) for lr in reference_lrs(plan.quick) for w in MERGE_WEIGHTS]
    sweeps = METHODS[method][1]
    by_label = any(label(method, s) in plan.labels for kind in sweeps.values() for s in kind)
    return [s for s in sweeps.get(budget_kind, []) if not by_label or label(method, s) in plan.labels]


def knob_value(method: str, settings: dict):
    """The value of the method's strength knob in these settings (the frontier's order)."""
    knob = "merge" if method == MERGED else METHODS[method][0]
    if knob == "lambda":
        return settings["lambda_out"]
    if knob == "merge":
        return settings["merge"]
    if knob.startswith("baseline:"):
        pairs = dict(pair.partition("=")[::2] for pair in settings["baseline"].split()[1:])
        return float(pairs[knob.removeprefix("baseline:")])
    if knob == "part":
        return ("lambda_out only" if settings["lambda_feat"] == 0 else "lambda_feat only" if settings["lambda_out"] == 0
                else f"mu={settings['ema_decay']}")
    return settings["lr"]


def label(method: str, settings: dict) -> str:
    """'plain lr=0.005', 'RID lambda=1 lr=0.01', ...: what a table row says of its setting."""
    knob = "merge" if method == MERGED else METHODS[method][0]
    value = knob_value(method, settings)
    text = f"{method} {value}" if knob == "part" else f"{method} {knob.removeprefix('baseline:')}={value:.3g}"
    return text + (f" lr={settings['lr']:g}" if knob != "lr" else "")


def sweep_jobs(plan: Plan, seeds: tuple[int, ...] | None = None) -> list[Job]:
    jobs = []
    for b, budget in enumerate(plan.budgets):
        for method in plan.methods:
            for i, settings in enumerate(sweep_settings(method, "short" if b == 0 else "long", plan)):
                jobs += [sweep_job(method, budget, i, settings, seed) for seed in seeds or plan.seeds]
    return jobs


def sweep_job(method: str, budget: int, setting: int, settings: dict, seed: int) -> Job:
    """One run of a method's setting: the task sequence; for merged LoRAs, the merge of the single-task runs."""
    if method == MERGED:
        return Job("merged", MERGED, budget, setting, seed, tuple(dict(settings, steps_per_task=budget).items()))
    flags = dict(settings, rewards=SEQUENCE, steps_per_task=budget, seed=seed)
    return Job("sweep", method, budget, setting, seed, tuple(flags.items()))


def reference_lrs(quick: bool) -> tuple[float, ...]:
    return REFERENCE_LRS[1:2] if quick else REFERENCE_LRS


def single_task_jobs(budget: int, lr: float, seed: int) -> list[Job]:
    """Plain fine-tuning on each reward alone from the base (the references, and what merged LoRAs merge)."""
    return [Job("single-task", "plain", budget, REFERENCE_LRS.index(lr), seed,
                tuple(dict(PLAIN, lr=lr, rewards=reward, steps_per_task=budget, seed=seed).items()))
            for reward in SEQUENCE.split(",")]


def reference_jobs(plan: Plan) -> list[Job]:
    """Plain fine-tuning at each reference lr: each reward alone (its budget), and all at once (the sequence's
    total budget, so the same number of optimizer steps)."""
    jobs = []
    n = len(SEQUENCE.split(","))
    for budget in plan.budgets:
        for lr in reference_lrs(plan.quick):
            for seed in plan.seeds:
                jobs += single_task_jobs(budget, lr, seed)
                flags = dict(PLAIN, lr=lr, rewards=SEQUENCE.replace(",", "+"), steps_per_task=n * budget, seed=seed)
                jobs.append(Job("joint", "plain", budget, REFERENCE_LRS.index(lr), seed, tuple(flags.items())))
    return jobs


def check_reusable(out: Path, jobs: list[Job]) -> None:
    """Before any training: a run directory that exists holds a run of exactly the job's resolved arguments (its
    config.json), else one line saying which field differs (exit status 2)."""
    import runfiles
    import rid
    for job in jobs:
        if job.kind == "merged":
            continue
        config = run_dir(out, job) / "config.json"
        if config.is_file():
            held = key_arguments(runfiles.read_config(config, rid.Args))
            asked = resolved(job)
            differ = sorted(k for k in asked if held.get(k) != asked[k])
            if differ:
                raise command_line.UsageError(
                    f"{config.parent} holds a run with other arguments ({differ[0]}: {held.get(differ[0])!r}, asked "
                    f"{asked[differ[0]]!r}); remove it, or give another --out")


# ----------------------------------------------------------------------------------------------------------------
# One job, in a worker process: train (or resume), then evaluate on each split.

BASES: dict = {}  # per worker: the base model's rows, (split, eval seeds, columns) -> rows and scores


def run_job(out: Path, job: Job, eval_seeds: tuple[int, ...], splits: tuple[str, ...]) -> dict:
    """rid.py --tiny with the job's flags (--resume if its directory holds a run: it continues a killed run, and a
    finished one has nothing to do), its messages in the run's log file; then its evaluation on the captions of each
    split asked for, unless eval_<split>.json holds one made with the same prompts, seeds and rewards."""
    import rid
    directory = run_dir(out, job)
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if job.kind == "merged":
        merge_run(out, job)
        for split in splits:
            evaluate_split(directory, split, eval_seeds)
        return {"seconds": time.perf_counter() - started}
    flags = [*flags_of(job.settings), "--tiny", "--out-dir", str(directory)]
    flags += ["--resume"] if (directory / "config.json").is_file() else []
    with open(log_file(directory), "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        status = rid.cli(flags)
    if status != 0:
        raise RuntimeError(f"rid.py exited {status} for {label_of(job)} seed {job.seed}: see {log_file(directory)}")
    for split in splits:
        evaluate_split(directory, split, eval_seeds)
    return {"seconds": time.perf_counter() - started}


def merge_run(out: Path, job: Job) -> None:
    """A merged LoRA as a one-task run that eval.py reads: the single-task runs' LoRAs (same budget, lr and seed)
    summed with the job's weight each (baselines.merge_loras), as task 1 of the joint task, beside the first single-task
    run's config.json with the rewards joined and the merged rank."""
    import baselines
    import runfiles
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    directory = run_dir(out, job)
    task = directory / f"task1_{SEQUENCE.replace(',', '+')}"
    if (task / runfiles.LORA_FILE).is_file():
        return
    sources = [run_dir(out, ref) for ref in single_task_jobs(job.budget, job.settings["lr"], job.seed)]
    loras = [load_file(src / f"task1_{src_job.settings['rewards']}" / runfiles.LORA_FILE)
             for src, src_job in zip(sources, single_task_jobs(job.budget, job.settings["lr"], job.seed))]
    merged = baselines.merge_loras(loras, [job.settings["merge"]] * len(loras))
    config = {key: value for key, value in json.loads((sources[0] / "config.json").read_text()).items()
              if key != runfiles.RUN_ID}  # the merge is no run of its own; its LoRA is of rank sum r_i
    config.update(rewards=SEQUENCE.replace(",", "+"), lora_rank=config["lora_rank"] * len(loras))
    runfiles.atomic_write(directory / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
    with runfiles.atomic_dir(task) as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers={k.removeprefix("unet."): v
                                                                         for k, v in merged.items()})


def log_file(directory: Path) -> Path:
    """Where a run's messages go: beside its directory, which rid.py wants empty for a new run."""
    return directory.with_name(directory.name + ".log")


def flags_of(settings: dict) -> list[str]:
    """rid.py flags for a dict of rid.Args fields (booleans as switches)."""
    out = []
    for name, value in settings.items():
        spelt = command_line.flag(name)
        out += ([spelt] if value else []) if isinstance(value, bool) else [spelt, str(value)]
    return out


def label_of(job: Job) -> str:
    if job.kind in ("sweep", "merged"):
        return label(job.method, job.settings)
    return f"{job.kind} {job.settings['rewards']} lr={job.settings['lr']:g}"


def evaluate_split(directory: Path, split: str, eval_seeds: tuple[int, ...]) -> dict:
    """The run's models on one split's captions x eval seeds, scored by every reward of the sequence: the reward
    matrix R (N+1, J), the base images' standard deviations, prompt fidelity (the judge, all three attributes right;
    seen and held-out combinations) and SSIM to the base images, per row. Written to eval_<split>.json (atomically);
    the base row is computed once per worker."""
    import torch
    import eval as evaluation
    import rid
    import runfiles
    import toyworld
    from rewards import load_reward
    path = directory / f"eval_{split}.json"
    prompts, columns = split_prompts(split), SEQUENCE.split(",")
    asked = {"prompts": prompts, "seeds": list(eval_seeds), "rewards": columns}
    if path.is_file():
        held = json.loads(path.read_text())
        if all(held.get(k) == v for k, v in asked.items()):
            return held
    args, tasks = evaluation.load_run(directory)
    device = torch.device("cpu")
    pipe = rid.load_pipeline(args, device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(args.num_steps, device=device)
    scorers = {name: load_reward(name, "cpu", True) for name in columns}
    all_prompts = prompts * len(eval_seeds)
    key = (split, tuple(eval_seeds), args.num_steps, args.guidance_scale, args.eta)
    with open(log_file(directory), "a") as log, contextlib.redirect_stderr(log):
        if key not in BASES:
            base = evaluation.generate_rows(pipe, [], prompts, list(eval_seeds), args, 30)
            BASES[key] = base, evaluation.score_rows(base, all_prompts, scorers, device, 30)
        base, base_scores = BASES[key]
        rows = torch.cat([base, evaluation.generate_rows(pipe, tasks, prompts, list(eval_seeds), args, 30, base=False)])
        scores = torch.cat([base_scores, evaluation.score_rows(rows[1:], all_prompts, scorers, device, 30)])
    correct = evaluation.judge_rows(rows, all_prompts, device)
    splits = [toyworld.split_of(p) for p in all_prompts]
    fidelity = evaluation.fidelity(correct, splits)
    result = {**asked, "reward_matrix": scores.mean(1).tolist(), "base_std": scores[0].std(0).tolist(),
              "fidelity_held_out": fidelity["held_out"]["all"], "fidelity_seen": fidelity["seen"]["all"],
              "fidelity": correct["all"].mean(1).tolist(),
              "ssim": evaluation.structure_drift(rows).tolist(), "seconds_per_step": seconds_per_step(directory)}
    runfiles.atomic_write(path, lambda f: f.write(json.dumps(result).encode()))
    if split == "test":  # what a person looks at: the first seed of every test caption, base and after each task
        import figures
        grid = figures.image_grid(rows[:, :len(prompts)].transpose(0, 1),
                                  figures.model_titles(rid.reward_names(args)), prompts)
        runfiles.atomic_write(directory / "grid_test.png", lambda f: grid.save(f, format="png"))
    return result


def seconds_per_step(directory: Path) -> float | None:
    """The median training step's seconds, from metrics.jsonl (None for a merged LoRA, which trains nothing)."""
    import figures
    if not (directory / "metrics.jsonl").is_file():
        return None
    return statistics.median(line["seconds"] for line in figures.read_metrics(directory / "metrics.jsonl"))


# ----------------------------------------------------------------------------------------------------------------
# Metrics: small pure functions of a run's reward matrix, in units of the base images' standard deviation.

def gains(result: dict) -> list[list[float]]:
    """G[i][j] = (R[i][j] - R[0][j]) / s_j, (N+1, J)."""
    return [[(r - r0) / s for r, r0, s in zip(row, result["reward_matrix"][0], result["base_std"])]
            for row in result["reward_matrix"]]


def sequence_metrics(g: list[list[float]], single_task: list[float] | None) -> dict:
    """GEM's and RWalk's metrics of one sequence run from G (N+1, J), task t training reward t-1: ACC = mean_j
    G[N][j]; BWT = mean_{j<N} (G[N][j] - G[j][j]); forgetting = mean_{j<N} (max_{j<=l<N} G[l][j] - G[N][j]);
    plasticity = mean_j (G[j][j] - G[j-1][j]), the own task's gain over the model before it; intransigence = mean_j
    (G*_j - G[j][j]), G*_j the single-task reference's gain on reward j (None without one)."""
    n = len(g) - 1
    own = [g[t][t - 1] for t in range(1, n + 1)]
    metrics = {
        "ACC": statistics.mean(g[n]),
        "BWT": statistics.mean(g[n][j - 1] - own[j - 1] for j in range(1, n)),
        "forgetting": statistics.mean(max(g[l][j - 1] for l in range(j, n)) - g[n][j - 1] for j in range(1, n)),
        "plasticity": statistics.mean(g[t][t - 1] - g[t - 1][t - 1] for t in range(1, n + 1)),
        "own gain": own,
    }
    if single_task is not None:
        metrics["intransigence"] = statistics.mean(ref - o for ref, o in zip(single_task, own))
    return metrics


def merged_metrics(g: list[list[float]], single_task: list[float]) -> dict:
    """A model of every reward at once (merged LoRAs): ACC = mean_j G[1][j], each reward's gain, and what it gives
    up against each reward alone (intransigence); nothing was learned in sequence, so nothing forgotten."""
    return {"ACC": statistics.mean(g[1]), "BWT": None, "forgetting": None, "plasticity": None, "own gain": g[1],
            "intransigence": statistics.mean(ref - o for ref, o in zip(single_task, g[1]))}


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float | None]) -> dict | None:
    """Mean and the half-width of its 95 % t-interval over runs (seeds); None where a run has no value."""
    if any(v is None for v in values):
        return None
    mean = statistics.mean(values)
    if len(values) < 2:
        return {"mean": mean, "ci": None, "n": len(values)}
    t = T_975.get(len(values) - 1, 1.96)
    return {"mean": mean, "ci": t * statistics.stdev(values) / math.sqrt(len(values)), "n": len(values)}


def run_metrics(result: dict, single_task: list[float] | None) -> dict:
    """Everything the tables read from one run's evaluation on one split."""
    g = gains(result)
    metrics = merged_metrics(g, single_task) if len(g) == 2 and len(g[0]) > 1 else sequence_metrics(g, single_task)
    return {**metrics, "gain": g, "fidelity held-out": result["fidelity_held_out"],
            "fidelity": result["fidelity"], "SSIM": result["ssim"], "s/step": result["seconds_per_step"]}


def matched(points: dict, target: float):
    """The key of `points` {key: plasticity} closest to the target plasticity."""
    return min(points, key=lambda key: abs(points[key] - target))


# ----------------------------------------------------------------------------------------------------------------
# The benchmark.

def load(out: Path, job: Job, split: str) -> dict:
    return json.loads((run_dir(out, job) / f"eval_{split}.json").read_text())


def references(out: Path, plan: Plan, budget: int, split: str) -> dict:
    """Per reference lr: the single-task gains G*_j (mean over seeds) and the joint run's final gains."""
    refs = {}
    for job in reference_jobs(plan):
        if job.budget != budget:
            continue
        g = gains(load(out, job, split))
        entry = refs.setdefault(job.settings["lr"], {"single-task": {}, "joint": []})
        if job.kind == "single-task":
            j = SEQUENCE.split(",").index(job.settings["rewards"])
            entry["single-task"].setdefault(j, []).append(g[1][j])
        else:
            entry["joint"].append(g[1])
    return {lr: {"single-task": [statistics.mean(e["single-task"][j]) for j in sorted(e["single-task"])],
                 "joint": [statistics.mean(col) for col in zip(*e["joint"])]} for lr, e in refs.items()}


def nearest_reference(refs: dict, lr: float) -> dict:
    return refs[min(refs, key=lambda ref_lr: abs(math.log(ref_lr / lr)))]


def summarise_setting(out: Path, jobs: list[Job], split: str, refs: dict) -> dict:
    """One method's setting over its seeds: every metric's mean and 95 % interval, and the mean gain matrix."""
    runs = [run_metrics(load(out, job, split), nearest_reference(refs, job.settings["lr"])["single-task"])
            for job in jobs]
    scalar = ("ACC", "BWT", "forgetting", "plasticity", "intransigence")
    summary = {name: mean_ci([r[name] for r in runs]) for name in scalar}
    for name in ("fidelity held-out", "fidelity", "SSIM"):
        summary[name] = [mean_ci([r[name][i] for r in runs]) for i in range(len(runs[0][name]))]
    summary["s/step"] = mean_ci([r["s/step"] for r in runs])
    summary["gain"] = [[statistics.mean(r["gain"][i][j] for r in runs) for j in range(len(runs[0]["gain"][0]))]
                       for i in range(len(runs[0]["gain"]))]
    summary["own gain"] = [statistics.mean(r["own gain"][t] for r in runs) for t in range(len(runs[0]["own gain"]))]
    summary["seeds"] = [job.seed for job in jobs]
    summary["runs"] = [str(run_dir(out, job).relative_to(out)) for job in jobs]
    return summary


def choose(out: Path, plan: Plan, jobs: list[Job], refs: dict) -> dict:
    """Per budget, on validation: each method's settings' summaries, its best (highest mean ACC) and its setting
    at matched plasticity (closest to plain's plasticity at plain's best); the target is that plasticity."""
    chosen = {}
    for budget in plan.budgets:
        sweeps = {}
        for method in plan.methods:
            by_setting = {}
            for job in jobs:
                if job.kind in ("sweep", "merged") and job.method == method and job.budget == budget:
                    by_setting.setdefault(job.setting, []).append(job)
            if by_setting:
                sweeps[method] = {i: summarise_setting(out, group, "validation", refs[budget]["validation"])
                                  for i, group in by_setting.items()}
        best = {m: max(s, key=lambda i: s[i]["ACC"]["mean"]) for m, s in sweeps.items()}
        target = sweeps["plain"][best["plain"]]["plasticity"]["mean"]
        at_target = {m: matched({i: v["plasticity"]["mean"] for i, v in s.items()}, target)
                     if m != MERGED else best[m] for m, s in sweeps.items()}  # merged LoRAs learn no sequence
        chosen[budget] = {"validation": sweeps, "best": best, "matched": at_target, "target plasticity": target}
    return chosen


def report_jobs(plan: Plan, chosen: dict) -> list[Job]:
    """The chosen settings (best and matched) with --report-seeds."""
    jobs = []
    for b, budget in enumerate(plan.budgets):
        for method in chosen[budget]["best"]:
            settings = sweep_settings(method, "short" if b == 0 else "long", plan)
            for i in sorted({chosen[budget]["best"][method], chosen[budget]["matched"][method]}):
                jobs += [sweep_job(method, budget, i, settings[i], seed) for seed in plan.report_seeds]
    return jobs


def run_all(plan: Plan, jobs: dict[Job, tuple[str, ...]]) -> None:
    """Every job not yet trained or evaluated on its splits (job -> the splits it is read on), --workers at a time;
    one line per finished job."""
    import checks
    check_reusable(plan.out, list(jobs))
    todo = [job for job, splits in jobs.items() if not all(evaluated(plan, job, split) for split in splits)]
    if not todo:
        return
    started = time.perf_counter()
    with checks.worker_pool(min(plan.workers, len(todo))) as pool:
        futures = {pool.submit(run_job, plan.out, job, plan.eval_seeds, jobs[job]): job for job in todo}
        for done, future in enumerate(as_completed(futures), start=1):
            job, seconds = futures[future], future.result()["seconds"]
            print(f"[{done}/{len(todo)}, {time.perf_counter() - started:.0f} s] {job.budget} steps/task, "
                  f"{label_of(job)}, seed {job.seed}: {seconds:.0f} s", flush=True)


def evaluated(plan: Plan, job: Job, split: str) -> bool:
    """The job's eval_<split>.json holds an evaluation with the prompts, seeds and rewards asked for."""
    path = run_dir(plan.out, job) / f"eval_{split}.json"
    if not path.is_file():
        return False
    held = json.loads(path.read_text())
    return (held.get("seeds") == list(plan.eval_seeds) and held.get("prompts") == list(split_prompts(split))
            and held.get("rewards") == SEQUENCE.split(","))


def split_prompts(split: str) -> list[str]:
    import toyworld
    return list(toyworld.SPLITS[split])


def main(plan: Plan) -> dict:
    """Sweeps and references, the choice on validation, the chosen settings' report seeds, then the tables and
    plots. A sweep run is evaluated on validation, a reference on both splits, a reported run on test."""
    plan.out.mkdir(parents=True, exist_ok=True)
    sweeps, refs_jobs = sweep_jobs(plan), reference_jobs(plan)
    trained = [job for job in sweeps if job.kind != "merged"]  # merged LoRAs merge the references: after them
    run_all(plan, {**{job: ("validation",) for job in trained}, **{job: ("validation", "test") for job in refs_jobs}})
    run_all(plan, {job: ("validation",) for job in sweeps if job.kind == "merged"})
    refs = {b: {s: references(plan.out, plan, b, s) for s in ("validation", "test")} for b in plan.budgets}
    chosen = choose(plan.out, plan, sweeps, refs)
    reports = report_jobs(plan, chosen)
    sources = [ref for job in reports if job.kind == "merged"
               for ref in single_task_jobs(job.budget, job.settings["lr"], job.seed)]
    splits = {job: ("validation", "test") if job in sweeps else ("test",) for job in reports}
    run_all(plan, {**{job: ("test",) for job in sources}, **{j: s for j, s in splits.items() if j.kind != "merged"}})
    run_all(plan, {j: s for j, s in splits.items() if j.kind == "merged"})
    result = tabulate(plan, chosen, reports, refs)
    write_outputs(plan, result)
    return result


def tabulate(plan: Plan, chosen: dict, reports: list[Job], refs: dict) -> dict:
    """Per budget: the test rows of each method's best and matched settings, the references, the validation
    sweeps (the frontier) and what was chosen."""
    result = {"sequence": SEQUENCE, "eval seeds": list(plan.eval_seeds), "budgets": {}}
    for b, budget in enumerate(plan.budgets):
        c = chosen[budget]
        rows = {}
        for method in c["best"]:
            settings = sweep_settings(method, "short" if b == 0 else "long", plan)
            for i in sorted({c["best"][method], c["matched"][method]}):
                group = [job for job in reports if job.method == method and job.budget == budget and job.setting == i]
                rows[label(method, settings[i])] = {
                    "method": method, "best": i == c["best"][method], "matched": i == c["matched"][method],
                    "validation plasticity": (c["validation"][method][i]["plasticity"] or {}).get("mean"),
                    **summarise_setting(plan.out, group, "test", refs[budget]["test"])}
        frontier = {method: [{"label": label(method, sweep_settings(method, "short" if b == 0 else "long",
                                                                    plan)[i]),
                              **{k: s[k] for k in ("ACC", "BWT", "forgetting", "plasticity", "intransigence",
                                                   "fidelity held-out", "SSIM", "own gain")}}
                             for i, s in sorted(c["validation"][method].items())]
                    for method in c["validation"]}
        result["budgets"][str(budget)] = {"test rows": rows, "references (test)": refs[budget]["test"],
                                          "references (validation)": refs[budget]["validation"],
                                          "target plasticity (validation)": c["target plasticity"],
                                          "frontier (validation)": frontier}
    return result


def cell(stat: dict | None, digits: int = 2) -> str:
    if stat is None:
        return "–"
    ci = "" if stat["ci"] is None else f" ± {stat['ci']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{ci}"


def tables(result: dict) -> str:
    """The Markdown report: per budget, the test rows (best and matched settings), the references, the sweeps."""
    names = result["sequence"].split(",")
    parts = [f"# The RIL benchmark: {' -> '.join(names)}",
             "Gains in base standard deviations of each reward on the test captions; mean ± 95 % t-interval over the "
             "training seeds. ACC: final average gain; BWT: mean change of each earlier reward from right after its "
             "task to the end; forgetting: mean drop from its best to the end; plasticity: each task's own gain over "
             "the model before it; intransigence: the single-task reference's gain minus the own-task gain; "
             "fidelity: the judge's accuracy on held-out combinations (all three attributes) after each task; SSIM "
             "to the base images after each task."]
    for budget, b in result["budgets"].items():
        parts.append(f"## {budget} steps per task")
        parts.append(f"Chosen on validation: each method's best setting (highest ACC, B) and its setting at matched "
                     f"plasticity (closest to plain's {b['target plasticity (validation)']:.2f} base std, M).")
        header = ["setting", "chosen", "ACC", "BWT", "forgetting", "plasticity", "intransigence",
                  "fidelity held-out after 1, 2, 3", "SSIM after 3", "s/step", "seeds"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        plain_step = next(r["s/step"]["mean"] for r in b["test rows"].values() if r["method"] == "plain")
        for name, r in b["test rows"].items():
            chosen = ("B" if r["best"] else "") + ("M" if r["matched"] else "")
            fid = ", ".join(f"{f['mean']:.2f}" for f in r["fidelity held-out"][1:])
            cost = "–" if r["s/step"] is None else f"{r['s/step']['mean'] / plain_step:.2f}x"
            lines.append("| " + " | ".join([name, chosen, cell(r["ACC"]), cell(r["BWT"]), cell(r["forgetting"]),
                                             cell(r["plasticity"]), cell(r["intransigence"]), fid,
                                             cell(r["SSIM"][-1]), cost, str(len(r["seeds"]))]) + " |")
        parts.append("\n".join(lines))
        ref_lines = ["| reference (plain, test) | lr | " + " | ".join(names) + " | ACC |", "|---|---|" + "---|" *
                     (len(names) + 1)]
        for lr, ref in sorted(b["references (test)"].items()):
            ref_lines.append(f"| single-task (each alone) | {lr:g} | " + " | ".join(f"{v:.2f}" for v in
                             ref["single-task"]) + " | – |")
            ref_lines.append(f"| joint (all at once) | {lr:g} | " + " | ".join(f"{v:.2f}" for v in ref["joint"]) +
                             f" | {statistics.mean(ref['joint']):.2f} |")
        parts.append("\n".join(ref_lines))
        sweep_lines = ["| setting (validation) | ACC | forgetting | plasticity | own gain per task | fidelity "
                       "held-out after 3 | SSIM after 3 |", "|---|---|---|---|---|---|---|"]
        for method, points in b["frontier (validation)"].items():
            for p in points:
                sweep_lines.append(f"| {p['label']} | {cell(p['ACC'])} | {cell(p['forgetting'])} | "
                                   f"{cell(p['plasticity'])} | {', '.join(f'{v:.2f}' for v in p['own gain'])} | "
                                   f"{cell(p['fidelity held-out'][-1])} | {cell(p['SSIM'][-1])} |")
        parts.append("The sweeps on validation (the frontier):\n\n" + "\n".join(sweep_lines))
    return "\n\n".join(parts) + "\n"


def run_matrices(result: dict) -> str:
    """Every reported setting's mean gain matrix on test, and its runs."""
    names = result["sequence"].split(",")
    parts = ["# Per-run matrices of the RIL benchmark's reported settings (test captions, mean over seeds)"]
    for budget, b in result["budgets"].items():
        for name, r in b["test rows"].items():
            lines = [f"## {name}, {budget} steps per task (seeds {', '.join(map(str, r['seeds']))})",
                     "| model | " + " | ".join(names) + " | fidelity held-out | SSIM |",
                     "|---|" + "---|" * (len(names) + 2)]
            for i, row in enumerate(r["gain"]):
                title = "base" if i == 0 else "merged" if r["method"] == MERGED else f"after {names[i - 1]}"
                lines.append(f"| {title} | " + " | ".join(f"{v:.2f}" for v in row) +
                             f" | {r['fidelity held-out'][i]['mean']:.2f} | {r['SSIM'][i]['mean']:.2f} |")
            lines.append("runs: " + ", ".join(f"`{path}`" for path in r["runs"]))
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_outputs(plan: Plan, result: dict) -> None:
    import runfiles
    outputs = {"ril.json": lambda f: f.write(json.dumps(result, indent=2).encode()),
               "ril.md": lambda f: f.write(tables(result).encode()),
               "runs.md": lambda f: f.write(run_matrices(result).encode()),
               "frontier.png": lambda f: frontier_plot(result).savefig(f, format="png"),
               "ril.png": lambda f: gains_plot(result).savefig(f, format="png")}
    for name, write in outputs.items():
        runfiles.atomic_write(plan.out / name, write)
    print(tables(result))
    print(f"wrote {plan.out}/" + ", ".join(outputs))


COLOURS = {"plain": "black", "adapter group": "grey", "EMA distillation": "tab:blue", "RID": "tab:red",
           "RID parts": "tab:pink", "C-LoRA": "tab:green", "generative distillation": "tab:purple",
           "InfLoRA": "tab:orange", "backward progressive": "tab:brown", MERGED: "tab:olive"}


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (plasticity, forgetting) no other point beats on both (more plasticity and less forgetting), in the
    order of their plasticity: a method's stability-plasticity frontier."""
    front = [p for p in points if not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in points)]
    return sorted(front)


FRONTIER_TICKS = (-1, -0.5, -0.2, 0, 0.1, 0.2, 0.5, 1, 2, 5)


def frontier_plot(result: dict):
    """Per budget, every setting of every method on validation: plasticity against forgetting (means over seeds; their
    intervals are in ril.md), each method's frontier (pareto) as a line; the settings chosen for the test rows
    enlarged and labelled. Lower right is better: more learned, less forgotten. Both axes symmetric-log."""
    from matplotlib.figure import Figure
    budgets = result["budgets"]
    fig = Figure(figsize=(10 * len(budgets), 6.5), dpi=110, layout="tight")
    for ax, (budget, b) in zip(fig.subplots(1, len(budgets), squeeze=False)[0], budgets.items()):
        numbers = {name: i for i, name in enumerate(b["test rows"], start=1)}  # the chosen settings, numbered
        for method, points in b["frontier (validation)"].items():
            if method == MERGED:  # no sequence: no plasticity or forgetting to place it by
                continue
            xy = [(p["plasticity"]["mean"], p["forgetting"]["mean"]) for p in points]
            colour = COLOURS.get(method)
            ax.scatter(*zip(*xy), color=colour, s=14, alpha=0.6)
            ax.plot(*zip(*pareto(xy)), color=colour, linewidth=1.5, label=method)
            for p, (x, y) in zip(points, xy):
                if p["label"] in numbers:
                    ax.scatter([x], [y], color=colour, s=90, edgecolors="black", zorder=3)
                    ax.annotate(str(numbers[p["label"]]), (x, y), fontsize=6, ha="center", va="center", zorder=4,
                                color="white", weight="bold")
        key = "\n".join(f"{i}  {name}" for name, i in numbers.items() if b["test rows"][name]["method"] != MERGED)
        ax.text(1.02, 1.0, key, transform=ax.transAxes, fontsize=7, va="top", family="monospace")
        ax.axvline(b["target plasticity (validation)"], color="black", linestyle=":", linewidth=1,
                   label="matched plasticity (plain's best)")
        ax.set(xlabel="plasticity: own-task gain over the model before the task (base std)",
               ylabel="forgetting: mean drop of earlier rewards (base std)",
               title=f"{budget} steps per task, validation captions (numbered: chosen for the test rows)")
        # symmetric-log axes: the settings that keep the pictures crowd near (0.5, 0) on linear ones
        ax.set_xscale("symlog", linthresh=0.2)
        ax.set_yscale("symlog", linthresh=0.2)
        ax.set_xticks(FRONTIER_TICKS, [f"{t:g}" for t in FRONTIER_TICKS])
        ax.set_yticks(FRONTIER_TICKS, [f"{t:g}" for t in FRONTIER_TICKS])
        ax.autoscale()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    return fig


def gains_plot(result: dict):
    """Per budget and reward: its gain after each task, a line per reported setting (test, mean over seeds)."""
    from matplotlib.figure import Figure
    names = result["sequence"].split(",")
    budgets = result["budgets"]
    fig = Figure(figsize=(5 * len(names), 4.5 * len(budgets)), dpi=100, layout="tight")
    axes = fig.subplots(len(budgets), len(names), squeeze=False)
    for row, (budget, b) in zip(axes, budgets.items()):
        for j, (ax, reward) in enumerate(zip(row, names)):
            for name, r in b["test rows"].items():
                x = [0, len(names)] if r["method"] == MERGED else range(len(r["gain"]))  # merged: base, the end
                ax.plot(x, [g[j] for g in r["gain"]], marker="o", label=name,
                        color=COLOURS.get(r["method"]), linestyle="-" if r["best"] else "--")
            ax.axvline(j + 1, color="grey", alpha=0.2, linewidth=8)
            ax.set(title=f"{reward}, {budget} steps/task (band: its task)", ylabel="gain from base (base std)")
            ax.set_xticks(range(len(names) + 1), ["base", *[f"after {n}" for n in names]])
            ax.grid(alpha=0.3)
        row[-1].legend(fontsize=7)
    return fig


def cli(argv: list[str]) -> int:
    """python ril_benchmark.py FLAGS (checks.tool_status: 2 bad input before any run, 130/143 interrupted with every
    complete run kept, 1 a run failed, its log named)."""
    import checks
    return checks.tool_status("ril_benchmark.py", lambda: main(parse_args(argv)))


if __name__ == "__main__":
    command_line.parse_or_exit("ril_benchmark.py", parse_args, sys.argv[1:])
    sys.exit(cli(sys.argv[1:]))
