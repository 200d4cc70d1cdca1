"""The run around rid.py's loop: the Run object that rid.py calls at a few points, with what a user sees while and
after a run (the progress bar, the summary line, TensorBoard and W&B, the list of outputs) and the data-parallel glue
(LoRA gradients averaged across processes, the step's metrics gathered, each process's slice of DDIM's noise).

rid.py calls it at a few points: Run(...) before the models are built (the checkpoint to resume from, the
Accelerator), run.open(...) once they are (checks that need them, the lock and the run's files, restoring a
checkpoint), run.tasks() and run.steps(...) for the loops, run.after_step(...) after every optimizer step (metrics
line, trackers, summary line, bad-step streak, periodic checkpoint, stop request) and run.task_end(...) after each task
(its LoRA files and samples, the training curves, a checkpoint). It may import checks.py, runfiles.py, models.py,
figures.py and the libraries; only rid.py (and through it eval.py and benchmark.py) imports it.
"""
import collections
import contextlib
import dataclasses
import json
import math
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import TextIO

import numpy
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm import tqdm

import figures
from checks import (TRACKERS, Interrupted, TrainingStopped, UsageError, check_world_size, reward_names,
                    stop_requested, warn_long_prompts)
from runfiles import (CHECKPOINT, KOHYA_FILE, LORA_FILE, Progress, WriteFailed, atomic_dir, atomic_write,
                      check_checkpoint, keep_lines, load_checkpoint, lock_run_dir, move_stale_tasks, restore,
                      resume_hint, resume_task, save_checkpoint, write_lora, write_run_files)

# ----------------------------------------------------------------------------------------------------------------
# Data parallel: the LoRA gradients, the step's metrics and DDIM's noise across processes.

def average_gradients(params: dict[str, torch.nn.Parameter], accelerator: Accelerator) -> None:
    """All-reduce (mean) the LoRA gradients across processes, in one flat call. Done by hand rather than through
    DDP: a new adapter joins at every task, and the K UNet calls run inside activation checkpointing with a teacher
    call beside them, which DDP's hooks handle badly. A no-op on one process."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params.values()]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(averaged.view_as(g))


def step_metrics(micro_batches: list[dict], accelerator: Accelerator) -> dict:
    """The optimizer step's metrics over all micro-batches of all processes: rewards gathered (B x processes x
    accumulation samples), loss terms (every "loss..." key: the total, its terms and each feature layer's) averaged, K
    averaged over the micro-batches."""
    rewards = accelerator.gather(torch.cat([m["rewards"] for m in micro_batches]))
    names = [name for name in micro_batches[0] if name.startswith("loss")]
    terms = torch.stack([torch.stack([m[name] for name in names]) for m in micro_batches]).mean(0)  # (terms,)
    terms = accelerator.reduce(terms, reduction="mean")
    return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            **dict(zip(names, terms.tolist())), "k": sum(m["k"] for m in micro_batches) / len(micro_batches)}


def variance_noise(x: torch.Tensor, generator: torch.Generator, process: tuple[int, int]) -> torch.Tensor:
    """DDIM's noise for eta > 0, (B,4,h,w) like x: drawn for the global batch of B x processes from the shared
    generator (on the CPU, as x_T) and sliced as draw_batch slices x_T, so that N processes x B draw what one
    process x N*B would, not N copies of the same noise."""
    index, count = process
    n = x.shape[0]
    noise = torch.randn((n * count, *x.shape[1:]), generator=generator)
    return noise[index * n:(index + 1) * n].to(x.device, x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# What a user sees while and after a run: the summary line, the trackers (TensorBoard, W&B), the list of outputs.

def summary(metrics: dict, args, recent_rewards: list[float]) -> str:
    """The readable line printed every --log-every steps. A batch of a few images gives a reward that swings from
    step to step, so its mean over the last --log-every steps of this task (recent_rewards) stands beside it."""
    return (f"task {metrics['task']} {metrics['reward']} step {metrics['step'] + 1}/{args.steps_per_task}: "
            f"reward {metrics['reward_mean']:.4g} ({running_mean(recent_rewards)}) loss {metrics['loss']:.4g} "
            f"(out {metrics['loss_out']:.3g}, feat {metrics['loss_feat']:.3g}) grad {metrics['grad_norm']:.3g} "
            f"{metrics['seconds']:.2f}s/step")


def running_mean(values: list[float]) -> str:
    """'mean M over last n steps' of the finite values (a skipped step's NaN reward would hide every other one)."""
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return "no finite reward since the last line"
    return f"mean {statistics.fmean(finite):.4g} over last {len(finite)} step{'s' if len(finite) > 1 else ''}"


LOGS = "logs"  # OUT/logs/rid/: TensorBoard's event files; OUT/logs/wandb/: W&B's local files


def tracker_options(args, out: Path) -> dict:
    """Accelerator(**...) keywords: the trackers of --report-to, logging under OUT/logs."""
    return dict(log_with=TRACKERS[args.report_to] or None,  # [] would warn that no tracker is installed
                project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / LOGS)))


def start_trackers(accelerator: Accelerator, args, out: Path, first_step: int) -> None:
    """Start --report-to's trackers with the run's configuration (Accelerate does so on the main process only).
    first_step: the global step the run goes on from; on --resume TensorBoard hides what was logged from there on
    (purge_step), since those steps are run and logged again."""
    if "wandb" in TRACKERS[args.report_to] and accelerator.is_main_process:
        (out / LOGS).mkdir(exist_ok=True)
    accelerator.init_trackers("rid", config=dataclasses.asdict(args), init_kwargs={
        "tensorboard": {"purge_step": first_step}, "wandb": {"name": out.name, "dir": str(out / LOGS)}})


def tracker_metrics(metrics: dict) -> dict[str, float]:
    """One metrics.jsonl line as tracker scalars. The reward goes under its own name (reward/aesthetic, ...): every
    reward has its own scale, so one curve across tasks would mislead. The rest goes under train/ (a list, such as a
    joint task's reward spreads, one scalar per item)."""
    reward = metrics["reward"]
    scalars = {f"reward/{reward}": metrics["reward_mean"], f"reward_std/{reward}": metrics["reward_std"]}
    rest = {key: value for key, value in metrics.items() if key not in ("reward", "reward_mean", "reward_std", "step")}
    return scalars | {f"train/{key}" + (f"/{i}" if isinstance(value, list) else ""): float(item)
                      for key, value in rest.items() for i, item in enumerate(value if isinstance(value, list) else
                                                                                 [value])}


def log_image(accelerator: Accelerator, tag: str, image, step: int) -> None:
    """A picture (PIL) to every tracker: TensorBoard takes an (H, W, 3) uint8 array, W&B a wandb.Image (Accelerate's
    log_images wraps each image of the list in one)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, numpy.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image]}, step=step)


def where_outputs_went(args, out: Path) -> str:
    """What a finished run printed last: where each output is, and the command to run next."""
    tasks = [out / f"task{i}_{name}" for i, name in enumerate(reward_names(args), start=1)]
    rows = [("LoRA after each task", [task / LORA_FILE for task in tasks]),
            ("the same, kohya format", [task / KOHYA_FILE for task in tasks]),
            ("sample grids", [task / "samples.png" for task in tasks]),
            ("metrics, a line a step", [out / "metrics.jsonl"]), ("training curves", [out / "training_curves.png"]),
            ("config, checkpoint", [out / "config.json", out / CHECKPOINT])]
    if "tensorboard" in TRACKERS[args.report_to]:
        rows.append(("TensorBoard", [f"tensorboard --logdir {shlex.quote(str(out / LOGS))}"]))
    if "wandb" in TRACKERS[args.report_to]:
        rows.append(("W&B local files", [out / LOGS / "wandb"]))
    lines = [f"done: {len(tasks)} task{'s' if len(tasks) > 1 else ''} in {out}"]
    for label, items in rows:
        lines += [f"  {label if i == 0 else '':<24}{item}" for i, item in enumerate(items)]
    return "\n".join(lines + [f"next: python eval.py {shlex.quote(str(out))}   # reward matrix, forgetting, structure "
                               "drift, eval_grid.png"])


# ----------------------------------------------------------------------------------------------------------------
# The run: what rid.py's loop calls at a few points, and its parts.

def take_run_dir(accelerator: Accelerator, out: Path, new: bool) -> TextIO | None:
    """The main process locks OUT (lock_run_dir) and checks again, under the lock, that a new run's OUT is still free
    (another run may have written it while the models were built); every process stops if it cannot. Returns the
    lock (None on other processes), held as long as it stays open."""
    lock, refused = None, None
    if accelerator.is_main_process:
        try:
            lock = lock_run_dir(out)
            if new and (out / "config.json").exists():
                raise UsageError(f"--out-dir {out} was taken by another run while the models were built; choose "
                                 "another directory")
        except UsageError as error:
            refused = error
    failed = accelerator.reduce(torch.tensor([float(refused is not None)], device=accelerator.device),
                                reduction="sum").item() if accelerator.num_processes > 1 else bool(refused)
    if refused is not None:
        raise refused
    if failed:
        raise UsageError(f"--out-dir {out}: the main process could not take the run directory (see its message)")
    return lock


def recover_log(path: Path, progress: Progress) -> None:
    """metrics.jsonl cut back to the checkpoint's lines; if fewer survive (a damaged or deleted log), one line says
    what is lost, and the log goes on from what is there: training itself is intact in the checkpoint."""
    counted = progress.lines
    kept = keep_lines(path, counted)
    if kept < counted:
        print(f"warning: {path} holds {kept} of the {counted} lines the checkpoint counts (damaged or deleted); the "
              f"metrics of steps {kept + 1}-{counted} are lost, the training state is intact", file=sys.stderr)
        progress.lines = kept


class TaskLog:
    """One task's steps as the user and the logs see them: the progress bar, a metrics line per step (metrics.jsonl
    and the trackers), the summary line every --log-every steps, the counts of taken and skipped steps, and the two
    ends of a task that learned nothing (too many skipped steps in a row, or more skipped than taken)."""

    def __init__(self, args, progress: Progress, accelerator: Accelerator, task: int, name: str):
        self.args, self.progress, self.accelerator, self.task, self.name = args, progress, accelerator, task, name
        self.is_main = accelerator.is_main_process
        self.recent_rewards = collections.deque(maxlen=args.log_every)  # rewards of the last --log-every steps

    def steps(self, first: int):
        """The task's steps from `first` on, under a progress bar; each one timed for its metrics line."""
        self.bar = tqdm(range(first, self.args.steps_per_task), desc=f"task {self.task} ({self.name})", initial=first,
                        total=self.args.steps_per_task, dynamic_ncols=True, disable=not self.is_main)
        for self.step in self.bar:
            self.started = time.perf_counter()
            yield self.step
        self.check_learned()

    def record(self, metrics: dict, lr: float) -> None:
        """The step's metrics line, to metrics.jsonl and the trackers, the bar, and every --log-every steps the summary
        line; a skipped step counted first."""
        args, progress, step = self.args, self.progress, self.step
        self.count_bad_step(metrics)
        metrics = {"task": self.task, "reward": self.name, "step": step, "lr": lr,
                   "reward_spread": progress.spread, **metrics, "seconds": time.perf_counter() - self.started}
        progress.log_line(json.dumps(metrics))
        self.accelerator.log(tracker_metrics(metrics), step=progress.lines)  # the global step, as in the curves
        self.recent_rewards.append(metrics["reward_mean"])
        self.bar.set_postfix(reward=f"{metrics['reward_mean']:.4g}")
        self.check_streak()
        if self.is_main and ((step + 1) % args.log_every == 0 or step + 1 == args.steps_per_task):
            self.bar.write(summary(metrics, args, list(self.recent_rewards)))

    def count_bad_step(self, metrics: dict) -> None:
        """A skipped step (non-finite loss or gradient) extends the streak and is warned about; a taken one ends it."""
        if not metrics["skipped"]:
            self.progress.bad_streak = 0
            self.progress.taken += 1
            return
        self.progress.bad_streak += 1
        self.progress.skipped += 1
        if self.is_main:
            tqdm.write(f"warning: task {self.task} step {self.step}: loss {metrics['loss']}, gradient norm "
                       f"{metrics['grad_norm']}; update skipped ({self.progress.bad_streak} in a row)", file=sys.stderr)

    def check_streak(self) -> None:
        """--max-bad-steps non-finite steps in a row stop the run, the last good checkpoint intact."""
        progress, args = self.progress, self.args
        if progress.bad_streak >= args.max_bad_steps:
            last = (f"the last good checkpoint ({progress.saved_at}) is intact in {progress.out / CHECKPOINT}"
                    if progress.saved_at != "none yet" else "no checkpoint was written yet")
            raise TrainingStopped(f"task {self.task} step {self.step}: {progress.bad_streak} steps in a row had a "
                                  f"non-finite loss or gradient (--max-bad-steps {args.max_bad_steps}); stopped; "
                                  f"{last}")

    def check_learned(self) -> None:
        """A task whose steps were mostly skipped (non-finite loss or gradient each time, yet never --max-bad-steps in
        a row) learned nothing worth saving: it stops as a diverged run does, before its LoRA is written."""
        progress = self.progress
        if progress.skipped > progress.taken:
            raise TrainingStopped(f"task {self.task} ({self.name}): {progress.skipped} of its "
                                  f"{progress.skipped + progress.taken} steps had a non-finite loss or gradient and "
                                  "were skipped, so it learned next to nothing; stopped without saving it (lower --lr, "
                                  "--reward-scale or --guidance-scale)")


class Run:
    """The bookkeeping of one run around rid.py's loop: the checkpoint it resumes from, the Accelerator and the fp16
    grad scaler (one for the whole run, whatever optimizer each task has), the run directory (its lock and files),
    Progress (its log and counters), each task's TaskLog, checkpoints and stop requests. Only the main process
    writes."""

    def __init__(self, args, new: bool):
        """Before the models are built: `new` says --out-dir holds no run yet (check_args). A --resume of a complete
        run sets self.finished and builds nothing."""
        self.args, self.new, self.out = args, new, Path(args.out_dir)
        self.checkpoint = load_checkpoint(self.out) if args.resume else None
        self.finished = self.says_finished()
        if self.finished:
            return
        # cpu=True without a GPU too: Accelerate recognises several CPU processes (gloo) only when told to use the
        # CPU. Precision is rid.py's, not Accelerate's (rid.low_precision, rid.full_precision), and so is the scaler.
        self.accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), mixed_precision="no",
                                       **tracker_options(args, self.out))
        check_world_size(self.accelerator.num_processes)
        self.scaler = torch.amp.GradScaler(self.accelerator.device.type, enabled=args.mixed_precision == "fp16")
        self.is_main = self.accelerator.is_main_process

    def says_finished(self) -> bool:
        """Whether the checkpoint says every task is done (a --resume then has nothing to do), saying so."""
        tasks = len(reward_names(self.args))
        if self.checkpoint is None or self.checkpoint["task"] <= tasks:
            return False
        print(f"{self.out}: all {tasks} tasks are done; nothing to do", file=sys.stderr)
        return True

    def open(self, pipe, prompts: list[str], add_adapter) -> None:
        """Once the models are built and torch is seeded: the checks that need the model, then the lock and (main
        process) config.json, then the checkpoint's state restored (add_adapter: rid.add_task_adapter). Sets
        self.finished if another run finished this one while the models were built."""
        self.unet = pipe.unet
        self.check_checkpoint()
        if self.is_main:
            warn_long_prompts(pipe.tokenizer, prompts)
        self.accelerator.wait_for_everyone()  # every process has checked --out-dir before the main one writes to it
        signum = stop_requested(self.accelerator)
        if signum:  # SIGTERM or Ctrl-C while the models were built
            raise Interrupted(f"stopped by {signal.Signals(signum).name} before training; nothing was written", signum)
        self.lock = take_run_dir(self.accelerator, self.out, self.new)
        self.reread_checkpoint()
        if self.finished:
            if self.lock is not None:
                self.lock.close()
            return
        if self.is_main and self.args.resume and not self.new:
            moved = move_stale_tasks(self.out, self.checkpoint["task"] if self.checkpoint else 1)
            if moved:
                print(moved, file=sys.stderr)
        run_id = self.write_files() if self.is_main else None
        self.progress = Progress(self.out, torch.Generator().manual_seed(self.args.seed), run_id,  # same everywhere
                                 processes=self.accelerator.num_processes)
        if self.checkpoint is not None:
            restore(pipe.unet, self.args, self.progress, self.checkpoint, self.scaler, add_adapter)
            self.accelerator.print(f"resuming {self.out} at {self.progress.saved_at}", file=sys.stderr)
        elif self.args.resume and not self.new:
            self.accelerator.print(f"resuming {self.out}: it stopped before its first checkpoint, so it restarts from "
                                   "the top", file=sys.stderr)

    def reread_checkpoint(self) -> None:
        """The checkpoint read again now that the lock is held (every process, after the main one took it): another
        --resume may have gone on, or finished the run, while this one built its models, and continuing from the
        checkpoint read before would cut its metrics.jsonl back and write its later tasks over."""
        if not self.args.resume:
            return
        self.checkpoint = load_checkpoint(self.out)
        self.finished = self.says_finished()
        if not self.finished:
            self.check_checkpoint()

    def check_checkpoint(self) -> None:
        """The checkpoint to resume from, if any, belongs to this run and fits its model (runfiles.check_checkpoint)."""
        if self.checkpoint is not None:
            check_checkpoint(self.checkpoint, self.unet, self.args, self.out / CHECKPOINT,
                             self.accelerator.num_processes)

    def write_files(self) -> str | None:
        args = self.args
        if args.resume and self.new:
            print(f"--resume: {self.out} holds no run yet; starting it", file=sys.stderr)
        run_id = write_run_files(args, self.out, self.new)
        processes = self.accelerator.num_processes
        print(f"effective batch: {args.batch_size} per process x {processes} processes x {args.grad_accum} "
              f"accumulation = {args.batch_size * processes * args.grad_accum}")
        return run_id

    @property
    def generator(self) -> torch.Generator:
        """The generator of prompts, noise and K: the same on every process, and in every checkpoint."""
        return self.progress.generator

    @contextlib.contextmanager
    def training(self):
        """Around the task loop: metrics.jsonl cut back to the checkpoint's lines and open, the trackers started; a
        failed write says how to resume; at the end, the lock released and where every output went."""
        try:
            if self.is_main:
                recover_log(self.out / "metrics.jsonl", self.progress)
            start_trackers(self.accelerator, self.args, self.out, first_step=self.progress.lines + 1)
            log = open(self.out / "metrics.jsonl", "a") if self.is_main else contextlib.nullcontext()
            with log as self.progress.log:
                yield
        except WriteFailed as error:
            raise WriteFailed(f"{error}; {resume_hint(self.progress)}") from None
        finally:
            if self.lock is not None:
                self.lock.close()  # releases OUT's flock (the OS would at exit; tests run several runs in one process)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        self.accelerator.print(where_outputs_went(self.args, self.out))

    def tasks(self) -> list[tuple[int, str]]:
        """(task, reward name) from the checkpoint's task on: earlier tasks are done (their outputs were written before
        the checkpoint that follows them)."""
        first = self.checkpoint["task"] if self.checkpoint else 1
        return [(task, name) for task, name in enumerate(reward_names(self.args), start=1) if task >= first]

    def start_task(self, task: int, name: str, params, optimizer, teacher, spread):
        """The first step, the teacher and the reward's spread of this task: 0, `teacher` and spread(), unless the
        checkpoint was taken inside it: then its step, teacher and spread, with its AdamW state loaded into
        `optimizer` (the spread is measured on the model at the task's start, which a resumed task no longer has)."""
        self.task, self.name, self.optimizer = task, name, optimizer
        first = 0
        if self.checkpoint is not None and self.checkpoint["task"] == task and self.checkpoint["step"] > 0:
            first, teacher = resume_task(self.checkpoint, params, optimizer)
            self.progress.spread = self.checkpoint.get("reward_spread", 1.0)
        else:
            self.progress.taken = self.progress.skipped = 0
            self.progress.spread = spread()
        self.teacher = teacher
        self.log = TaskLog(self.args, self.progress, self.accelerator, task, name)
        return first, teacher, self.progress.spread

    def steps(self, first: int):
        return self.log.steps(first)

    def after_step(self, metrics: dict) -> None:
        """After each optimizer step: the task log (metrics line, trackers, summary line, bad-step streak), a
        checkpoint every --checkpoint-every steps, and a stop request."""
        self.log.record(metrics, self.optimizer.param_groups[0]["lr"])
        if (self.log.step + 1) % self.args.checkpoint_every == 0 and self.is_main:
            self.checkpoint_at(self.task, self.log.step + 1)
        self.stop_if_requested()

    def stop_if_requested(self) -> None:
        """After a complete step, a SIGTERM or SIGINT checkpoints it, so that --resume continues exactly here."""
        signum = stop_requested(self.accelerator)
        if signum:
            step = self.log.step + 1
            if self.is_main:
                self.checkpoint_at(self.task, step)
            raise Interrupted(f"stopped by {signal.Signals(signum).name} after task {self.task}, step {step}, "
                              f"checkpointed; rerun the same command with --resume to continue", signum)

    def checkpoint_at(self, task: int, step: int, inside_task: bool = True) -> None:
        """save_checkpoint at this point; inside a task with its optimizer and teacher, at a task's start without."""
        save_checkpoint(self.unet, self.progress, task, step, self.scaler, self.optimizer if inside_task else None,
                        self.teacher if inside_task else None)

    def task_end(self, images: torch.Tensor, prompts: list[str], lora: dict) -> None:
        """After each task (main process): OUT/task{n}_{reward}/ with the LoRA files and samples.png (images
        (n, 2, 3, H, W): prompts without and with the adapters), the training curves so far, the grid to the
        trackers, and a checkpoint at the next task's start (which gets a fresh optimizer)."""
        args, out, task = self.args, self.out, self.task
        titles = figures.model_titles(reward_names(args))
        grid = figures.image_grid(images, [titles[0], titles[task]], [f"{p}\nseed {args.seed}" for p in prompts])
        with atomic_dir(out / f"task{task}_{self.name}") as tmp:
            write_lora(tmp, lora, self.progress.run_id, task, self.name)
            grid.save(tmp / "samples.png")
        curves = figures.training_curves(figures.read_metrics(out / "metrics.jsonl"), args.grad_clip)
        atomic_write(out / "training_curves.png", lambda f: curves.savefig(f, format="png"))
        log_image(self.accelerator, f"samples/task{task}_{self.name}", grid, step=self.progress.lines)
        self.checkpoint_at(task + 1, 0, inside_task=False)
