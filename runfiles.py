"""What a run writes into its directory and reads back: atomic writes (every file complete or as it was), the lock that
makes one writer per directory, config.json and the run id, checkpoints and what resuming restores from them,
metrics.jsonl's recovery, and the LoRA files of each task.

A kill at any moment (SIGKILL included) must leave every file either complete or absent, and --resume must continue
exactly where the last checkpoint was taken: same tensors, same random streams. It may import models.py (the LoRA
shapes a checkpoint must have), cli.py and the libraries; checks.py and session.py build on it.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
import safetensors.torch
from safetensors import SafetensorError

from cli import UsageError, flag
from models import lora_shapes

# Fields that may change when a run is resumed: they do not change what is computed (cpu: not on a CPU run).
RESUME_MAY_DIFFER = ("resume", "out_dir", "log_every", "cpu", "checkpoint_every", "max_bad_steps", "checkpointing",
                     "report_to")
CHECKPOINT = "checkpoint.pt"
LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes into each task directory
KOHYA_FILE = "lora_kohya.safetensors"  # the same LoRA in kohya's format, for ComfyUI, A1111 / Forge and kohya's scripts


def reward_names(args) -> list[str]:
    return [name.strip() for name in args.rewards.split(",")]


class WriteFailed(RuntimeError):
    """A file could not be written (disk full, quota, read-only): one line naming it, exit status 74 (EX_IOERR); the
    file's previous version, and so the last checkpoint, is intact."""


# ----------------------------------------------------------------------------------------------------------------
# The run directory: what it holds, config.json and its run id.

# What a run writes into --out-dir (eval.py adds eval*; runs before the toy world also wrote base/); a directory holding
# any of them is never written over.
RUN_OUTPUTS = ("config.json", CHECKPOINT, "metrics.jsonl", "training_curves.png", "base", "task[0-9]*_*", "eval.json",
               "eval.md", "eval_*.png")


def run_outputs(out: Path) -> list[str]:
    return sorted({p.name for pattern in RUN_OUTPUTS for p in out.glob(pattern) if not p.name.endswith(".tmp")})


def read_config(path: Path, cls) -> dict:
    """A run's config.json as a dict of the fields of dataclass `cls` (rid.Args); a damaged one, or one from
    elsewhere, is one line."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} cannot be read as JSON ({error}); it is damaged: restore it, or start a new run in "
                         "another directory") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(config, dict) or not config.keys() <= fields | RUN_KEYS:
        extra = sorted(config.keys() - fields - RUN_KEYS) if isinstance(config, dict) else type(config).__name__
        raise UsageError(f"{path} is not a rid.py config (unexpected {extra}); give a run directory written by rid.py")
    return {key: value for key, value in config.items() if key not in RUN_KEYS}


def check_resume_config(args, out: Path) -> None:
    """--resume continues a run only with the configuration it was started with (up to RESUME_MAY_DIFFER), and on the
    base weights it was started on (a local --model's fingerprint, where config.json holds one: the same weights found
    at another path, as in a moved checkout, are the same model)."""
    saved, now = read_config(out / "config.json", type(args)), dataclasses.asdict(args)
    recorded, found = config_field(out, BASE_FINGERPRINT), base_fingerprint(args)
    if recorded is not None and recorded == found:  # the same base weights at another path: a moved checkout or copy
        saved["model"] = now["model"]
    differing = [key for key in sorted(saved.keys() | now.keys())
                 if key not in RESUME_MAY_DIFFER and saved.get(key) != now.get(key)]
    if differing:
        changes = ", ".join(f"{flag(key)} ({saved.get(key)!r} -> {now.get(key)!r})" for key in differing)
        raise UsageError(f"--resume: the run in {out} was started with another configuration: {changes}; rerun with "
                         "its flags (see config.json) or choose another --out-dir")
    if recorded is not None and recorded != found:
        raise UsageError(f"--resume: the base model at {args.model} changed since the run in {out} started (its files' "
                         f"fingerprint {recorded} -> {found}); the LoRA fits the old weights: restore them, or start a "
                         "new run in another directory")


FINGERPRINT_BYTES = 1 << 16  # read from each end of every file of a local --model


def base_fingerprint(args) -> str | None:
    """A fingerprint of a local --model directory, recorded in config.json: SHA-256 over every file's path, size and
    first and last FINGERPRINT_BYTES (the configs whole; a weights file changed only in its middle goes unseen, where
    hashing it whole would read gigabytes at every start). Not mtimes: a checkout or a copy changes them, and the
    weights stay. None for a hub id (its revision is the hub's) and --random-weights (built from code)."""
    path = Path(args.model).expanduser()
    if args.random_weights or not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(FINGERPRINT_BYTES)
            f.seek(max(size - FINGERPRINT_BYTES, 0))
            digest.update(f"{file.relative_to(path)}\0{size}\0".encode() + head + f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes and the one-writer lock.

def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temporary file next to `path`, flush it to disk, then rename it over `path`: the rename
    is atomic, so `path` always holds either the old or the new content. RID_TEST_PAUSE_BEFORE_RENAME (seconds) holds
    the finished temporary file back, so that a test can kill the process in the middle of a checkpoint write."""
    tmp = path.with_name(path.name + ".tmp")
    with failed_write(path, tmp):
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        time.sleep(float(os.environ.get("RID_TEST_PAUSE_BEFORE_RENAME", 0)))
        os.replace(tmp, path)


@contextlib.contextmanager
def failed_write(path: Path, tmp: Path | None = None):
    """Turn a failed write inside the block (a full disk, a quota, a read-only file system) into one WriteFailed
    naming `path`, and remove the partial temporary file or directory `tmp`. torch.save reports a full disk as a
    RuntimeError from its zip writer ("unexpected pos"), safetensors as a SafetensorError."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        written = partial_size(tmp)  # before the partial file is removed: how much was written, and what was free
        existing = next(p for p in [path, *path.parents] if p.exists())
        free = shutil.disk_usage(existing).free
        remove_partial(tmp)
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]  # torch/safetensors wrap the error
        space = f"{free / 2 ** 20:.1f} MiB were free there when {written / 2 ** 20:.1f} MiB of it had been written"
        raise WriteFailed(f"cannot write {path} ({reason}; {space})") from None


def partial_size(tmp: Path | None) -> int:
    """Bytes in the partial temporary file or directory of a failed write (0 if there is none, or it cannot be read)."""
    try:
        if tmp is None or not tmp.exists():
            return 0
        return sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else tmp.stat().st_size
    except OSError:
        return 0


def remove_partial(tmp: Path | None) -> None:
    """Remove the partial temporary file or directory of a failed write. On a read-only file system the removal fails
    too (EROFS), and must not replace the one line that says what failed with a traceback of its own."""
    if tmp is None:
        return
    with contextlib.suppress(OSError):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary sibling directory to fill; it takes the name `path` only once complete. A kill between
    removing an old `path` and the rename leaves no directory, never a half one; the checkpoint taken before it was
    written lets --resume write it again."""
    tmp = path.with_name(path.name + ".tmp")
    with failed_write(path, tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_file(file)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)


LOCK = ".rid.lock"  # OUT's lock file: holds the PID and program (rid.py, eval.py) writing OUT


def lock_run_dir(out: Path, option: str = "--out-dir", program: str = "rid.py run") -> TextIO:
    """One writer per run directory: an exclusive flock on OUT/.rid.lock, held while the returned file stays open
    and released by the OS when the process ends (kill -9 included, so no lock outlives its run). The holder writes its
    PID and `program` (rid.py, or eval.py, which writes its outputs into the run) into it; a second run, a --resume
    while the first runs, or a second eval.py, is refused naming them."""
    with failed_write(out / LOCK):
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid, _, holder = lock.read().strip().partition(" ")
        lock.close()
        raise UsageError(f"{option} {out} is being written by another {holder or 'rid.py run'} (PID {pid or 'unknown'}"
                         "); wait for it to end, or choose another directory") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()} {program}\n")
    lock.flush()
    return lock


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and what resuming restores from them.

@dataclass
class Progress:
    """Run state beside the model and optimizer that a checkpoint must hold: the run's id (config.json's), the generator
    of prompts, noise and K, how many metric lines are written, the current streak of non-finite steps, the current
    task's taken and skipped steps, the number of processes (the global batch and the draws depend on it), and the
    last checkpoint taken."""
    out: Path
    generator: torch.Generator
    run_id: str | None = None
    processes: int = 1
    log: TextIO | None = None
    lines: int = 0
    bad_streak: int = 0
    taken: int = 0
    skipped: int = 0
    spread: float = 1.0
    saved_at: str = "none yet"

    def log_line(self, line: str) -> None:
        """Append one metrics line (only the main process has a log; every process counts)."""
        if self.log is not None:
            with failed_write(self.out / "metrics.jsonl"):
                self.log.write(line + "\n")
                self.log.flush()
        self.lines += 1


def save_checkpoint(unet, progress: Progress, task: int, step: int, scaler, optimizer=None, teacher=None) -> None:
    """Everything needed to continue at step `step` of task `task`. The global torch RNG state is included because
    the next task's LoRA initialisation draws from it; the fp16 grad scaler's state (its loss scale) because it
    carries over from task to task."""
    with failed_write(progress.out / "metrics.jsonl"):
        os.fsync(progress.log.fileno())  # the metric lines the checkpoint counts are on disk before it is
    state = {"task": task, "step": step, "adapters": list(unet.peft_config),
             "lora": {n: p.detach() for n, p in unet.named_parameters() if "lora_" in n},
             "optimizer": optimizer.state_dict() if optimizer is not None else None, "teacher": teacher,
             "scaler": scaler.state_dict(),
             "generator": progress.generator.get_state(), "torch_rng": torch.get_rng_state(),
             "metric_lines": progress.lines, "bad_streak": progress.bad_streak, "run_id": progress.run_id,
             "task_steps": (progress.taken, progress.skipped), "reward_spread": progress.spread,
             "processes": progress.processes}
    atomic_write(progress.out / CHECKPOINT, lambda f: torch.save(state, f))
    progress.saved_at = f"task {task}, step {step}"


def load_checkpoint(out: Path) -> dict | None:
    """The run's last checkpoint, or None if it was killed before writing one (it then restarts from the top)."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    if path.stat().st_size == 0:
        raise UsageError(f"--resume: {path} is empty (0 bytes); delete it to restart the run from its beginning")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (unpickling arbitrary bytes can raise nearly anything)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UsageError(f"--resume: {path} cannot be read as a torch checkpoint ({reason}); delete it to restart the "
                         "run from its beginning") from None
    missing = sorted(CHECKPOINT_KEYS - checkpoint.keys()) if isinstance(checkpoint, dict) else ["all"]
    if missing:
        raise UsageError(f"--resume: {path} is not a rid.py checkpoint (missing {', '.join(missing)}); delete it to "
                         "restart the run from its beginning")
    return checkpoint


CHECKPOINT_KEYS = {"task", "step", "adapters", "lora", "optimizer", "teacher", "generator", "torch_rng",
                   "metric_lines", "bad_streak"}


def check_checkpoint(checkpoint: dict, unet: UNet2DConditionModel, args, path: Path, processes: int) -> None:
    """The checkpoint belongs to this run: it carries the run id of the run's config.json, it was written by as many
    processes as resume it, its task and step are in range, every task before its task has its directory (written
    before the checkpoint that follows it), and its LoRA tensors have the names and shapes this model and --lora-rank
    give."""
    run_id = read_run_id(path.parent)
    if checkpoint.get("run_id") != run_id:
        raise UsageError(f"--resume: {path} belongs to another run (run id {checkpoint.get('run_id')}, this run's "
                         f"config.json says {run_id}); delete it to restart this run from its beginning")
    written_by = checkpoint.get("processes", processes)  # checkpoints before it was recorded: not checkable
    if written_by != processes:
        raise UsageError(f"--resume: {path} was written by {written_by} process(es) and this run has {processes}; "
                         "--batch-size is per process, so the effective batch and every later draw would change: "
                         f"resume with {written_by} (accelerate launch --num_processes {written_by}), or delete the "
                         "checkpoint to restart")
    if not (1 <= checkpoint["task"] <= len(reward_names(args)) and 0 <= checkpoint["step"] <= args.steps_per_task):
        raise UsageError(f"--resume: {path} is at task {checkpoint['task']}, step {checkpoint['step']}, outside this "
                         "run's tasks and steps; delete it to restart the run from its beginning")
    for task, name in list(enumerate(reward_names(args), start=1))[:checkpoint["task"] - 1]:
        if not (path.parent / f"task{task}_{name}" / LORA_FILE).is_file():
            raise UsageError(f"--resume: {path} is at task {checkpoint['task']}, but task{task}_{name}/{LORA_FILE}, "
                             "which that implies, is missing; delete the checkpoint to restart the run from its "
                             "beginning")
    expected = lora_shapes(unet, checkpoint["adapters"], args.lora_rank, args.lora_targets)
    found = {name: tuple(tensor.shape) for name, tensor in checkpoint["lora"].items()}
    wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
    if wrong:
        raise UsageError(f"--resume: {path} does not fit this model and --lora-rank {args.lora_rank} ({wrong[0]}: "
                         f"{found.get(wrong[0], 'missing')}, expected {expected.get(wrong[0], 'none')}); it comes from "
                         "another run: delete it to restart")


def restore(unet, args, progress: Progress, checkpoint: dict, scaler, add_adapter) -> None:
    """Rebuild the checkpoint's adapters (add_adapter: rid.add_task_adapter), copy its LoRA tensors in, and restore
    the random streams, counters and the grad scaler (checkpoints written before the scaler was saved have none: it
    then starts afresh)."""
    for name in checkpoint["adapters"]:
        add_adapter(unet, name, args.lora_rank, args.lora_targets)
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, tensor in checkpoint["lora"].items():
            params[name].copy_(tensor)
    torch.set_rng_state(checkpoint["torch_rng"])
    progress.generator.set_state(checkpoint["generator"])
    if checkpoint.get("scaler"):  # empty for a disabled (not fp16) scaler
        scaler.load_state_dict(checkpoint["scaler"])
    progress.lines, progress.bad_streak = checkpoint["metric_lines"], checkpoint["bad_streak"]
    progress.taken, progress.skipped = checkpoint.get("task_steps", (0, 0))
    progress.saved_at = f"task {checkpoint['task']}, step {checkpoint['step']}"


def resume_task(resume: dict, params: dict[str, torch.nn.Parameter], optimizer) -> tuple[int, dict | None]:
    """The step and EMA teacher of a checkpoint taken inside a task, with its AdamW state loaded into `optimizer`.
    Checkpoints are loaded onto the CPU: the teacher moves to its LoRA tensors' devices (functional_call and the EMA
    update use them together), and torch's load_state_dict moves AdamW's state to its parameters' devices."""
    optimizer.load_state_dict(resume["optimizer"])
    teacher = resume["teacher"]
    if teacher is not None:
        teacher = {n: t.to(params[n].device) for n, t in teacher.items()}
    return resume["step"], teacher


# ----------------------------------------------------------------------------------------------------------------
# metrics.jsonl, the LoRA files and config.json.

def keep_lines(path: Path, n: int) -> int:
    """Cut `path` back to its first n lines, the ones the checkpoint counts: the steps after it are run, and logged,
    again. Only whole lines are kept (ending in a newline and holding a JSON object), up to the first damaged one, so a
    line cut by a crash is dropped rather than glued to the next record. Returns how many were kept: fewer than n
    when the log was damaged or deleted."""
    with failed_write(path):
        data = path.read_bytes() if path.exists() else b""
    lines = []
    for line in data.split(b"\n")[:-1][:n]:  # what follows the last newline is a partial line
        if not is_metrics_line(line):
            break
        lines.append(line + b"\n")
    atomic_write(path, lambda f: f.write(b"".join(lines)))
    return len(lines)


def is_metrics_line(line: bytes | str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# The safetensors metadata of each LoRA file beside diffusers' {"format": "pt"}: which run, task and reward it holds.
LORA_RUN, LORA_TASK, LORA_REWARD = "rid_run_id", "rid_task", "rid_reward"


def write_lora(directory: Path, lora: dict[str, torch.Tensor], run_id: str | None, task: int, reward: str) -> None:
    """A task's LoRA (PEFT's key names, rid.lora_state_dict) twice: in diffusers' format (LORA_FILE, for
    pipe.load_lora_weights) and in kohya's (KOHYA_FILE: lora_unet_... keys, lora_down/lora_up, an alpha per layer
    equal to its rank, so scale 1), which ComfyUI, A1111 / Forge and diffusers itself load. Each names its run, task
    and reward in its metadata, which eval.py checks (a file copied from another task is not evaluated as this one),
    and is written as every other output is, with the mode the umask gives (safetensors' save_file writes 600, which
    a service running as another user cannot read)."""
    metadata = {"format": "pt", LORA_TASK: str(task), LORA_REWARD: reward} | ({LORA_RUN: run_id} if run_id else {})

    def save(tensors: dict[str, torch.Tensor], path) -> None:
        Path(path).write_bytes(safetensors.torch.save(tensors, metadata))
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=convert_state_dict_to_diffusers(lora),
                                              save_function=save)
    save(convert_state_dict_to_kohya({f"unet.{key}": value for key, value in lora.items()}), directory / KOHYA_FILE)


STALE = "stale"  # OUT/stale/attempt<n>/: the task directories of an earlier attempt, moved aside by a restart


def task_number(directory: Path) -> int | None:
    """n of a task directory's name, task{n}_{reward} (None for another name, or a temporary directory)."""
    match = re.fullmatch(r"task(\d+)_.+", directory.name)
    return int(match[1]) if match and not directory.name.endswith(".tmp") and directory.is_dir() else None


def move_stale_tasks(out: Path, first: int) -> str | None:
    """A resumed run trains again from task `first` (the checkpoint's task; 1 without a checkpoint, deleted or never
    written): the task directories from there on are an earlier attempt's, which eval.py would take for this one's if
    this attempt stopped early. They go to OUT/stale/attempt<n>/, nothing lost; returns the line that says so."""
    stale = sorted((d for d in out.glob("task[0-9]*_*") if (task_number(d) or 0) >= first), key=task_number)
    if not stale:
        return None
    attempts = out / STALE
    aside = attempts / f"attempt{len(list(attempts.glob('attempt*'))) + 1 if attempts.is_dir() else 1}"
    with failed_write(aside):
        aside.mkdir(parents=True)
        for directory in stale:
            os.replace(directory, aside / directory.name)
    return (f"moved {', '.join(d.name for d in stale)} aside to {aside}: an earlier attempt wrote them, and this one "
            f"trains again from task {first}")


def write_run_files(args, out: Path, new: bool) -> str | None:
    """config.json for a new run (main process only), with a fresh run id that binds every checkpoint to the run:
    eval.py rebuilds the run's arguments, and so its base model (--model), from it. Returns the run's id."""
    if not new:
        return read_run_id(out)
    run_id = uuid.uuid4().hex
    config = {**dataclasses.asdict(args), RUN_ID: run_id, BASE_FINGERPRINT: base_fingerprint(args)}
    atomic_write(out / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
    return run_id


# config.json's keys beside rid.Args' fields: the run's id, and the fingerprint of a local --model (base_fingerprint).
RUN_ID, BASE_FINGERPRINT = "run_id", "base_fingerprint"
RUN_KEYS = {RUN_ID, BASE_FINGERPRINT}


def read_run_id(out: Path) -> str | None:
    """The run id in OUT/config.json (None for runs written before run ids existed, and for a damaged file)."""
    return config_field(out, RUN_ID)


def config_field(out: Path, key: str):
    """One of RUN_KEYS in OUT/config.json (None for runs written before it existed, and for a damaged file)."""
    try:
        return json.loads((out / "config.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def resume_hint(progress: Progress) -> str:
    if progress.saved_at == "none yet":
        return "no checkpoint was written yet; rerun the same command with --resume to start again"
    return f"the last checkpoint ({progress.saved_at}) is intact; rerun the same command with --resume to continue"
