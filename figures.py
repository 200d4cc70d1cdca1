"""The pictures of a run: labelled image grids, training curves and the evaluation plot.

    image_grid        (rows, columns, 3, H, W) images -> samples.png (rid.py) and eval_grid.png (eval.py)
    training_curves   metrics.jsonl lines -> training_curves.png (rid.py at each task end, eval.py)
    eval_rewards      eval.py's result -> eval_rewards.png

Each returns a PIL image or a matplotlib Figure; the callers write the files (rid.py atomically). Figures use
matplotlib's object API, never pyplot: no global figure state and no display backend.
"""
import json
import math
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 128  # pixels: every image is upscaled by an integer factor until its shorter side is at least this
PAD = 4  # pixels of white between tiles and around the grid
FONT_SIZE = 16  # pixels; Pillow's built-in Aileron (ImageFont.load_default(size), Pillow >= 10.1): no font file
LABEL_WIDTH = 240  # pixels: the widest the column of row labels (prompt and seed) left of the tiles gets


# ----------------------------------------------------------------------------------------------------------------
# Image grids.

def model_titles(rewards: list[str]) -> list[str]:
    """Column titles of the models of a run: base, then the model after each task."""
    return ["base", *[f"after task {i} ({name})" for i, name in enumerate(rewards, start=1)]]


def upscale_factor(height: int, width: int, min_side: int = MIN_TILE) -> int:
    """The smallest integer factor that brings the shorter side to min_side pixels; 1 for images that large already."""
    return max(1, math.ceil(min_side / min(height, width)))


def to_pixels(image: torch.Tensor, factor: int) -> Image.Image:
    """(3, H, W) in [0, 1] -> an RGB image of (H * factor, W * factor): every pixel becomes a factor x factor block
    (nearest neighbour, so no pixel is invented). Quantised as torchvision's save_image does."""
    pixels = image.detach().float().cpu().mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    pixels = pixels.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def fit_lines(text: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """Wrap text at spaces into lines of at most `width` pixels; if it needs more than max_lines lines, keep
    max_lines and end the last one with an ellipsis. A word wider than a line is cut."""
    lines = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [lines[max_lines - 1] + "…"]
    return [shorten(line, font, width) for line in lines]


def shorten(line: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """The line cut to `width` pixels, ending with an ellipsis where it was cut."""
    if font.getlength(line) <= width:
        return line
    while line and font.getlength(line.rstrip("…") + "…") > width:
        line = line.rstrip("…")[:-1]
    return line.rstrip("…") + "…"


def fit_label(label: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """A row label, its lines separated by newlines: every line but the first (the seed) is kept, and the first (the
    prompt) is wrapped into the lines left and shortened with an ellipsis if it does not fit."""
    first, *rest = label.split("\n")
    rest = [shorten(line, font, width) for line in rest]
    return fit_lines(first, font, width, max(1, max_lines - len(rest))) + rest


def image_grid(images: torch.Tensor, column_titles: list[str], row_labels: list[str]) -> Image.Image:
    """images (R, C, 3, H, W) in [0, 1] -> one white RGB picture, black text: a title above each column (wrapped to
    the tile's width), a label left of each row (row_labels, see fit_label), and each image upscaled to a tile of
    (H * f, W * f) pixels, f = upscale_factor(H, W). The R x C tiles form the bottom-right block of the picture,
    PAD pixels apart and PAD from its right and bottom edges; the titles fill the strip above them, the labels the
    column left of them (as wide as the longest label line, at most LABEL_WIDTH pixels)."""
    rows, columns, _, height, width = images.shape
    assert len(column_titles) == columns and len(row_labels) == rows, "one title per column, one label per row"
    factor = upscale_factor(height, width)
    tile_h, tile_w = height * factor, width * factor
    font = ImageFont.load_default(size=FONT_SIZE)
    line_h = sum(font.getmetrics()) + 2  # ascent + descent + leading
    titles = [fit_lines(title, font, tile_w, 3) for title in column_titles]
    labels = [fit_label(label, font, LABEL_WIDTH - 3 * PAD, tile_h // line_h) for label in row_labels]
    header_h = max(len(lines) for lines in titles) * line_h + 2 * PAD
    label_w = math.ceil(max(font.getlength(line) for lines in labels for line in lines)) + 3 * PAD  # <= LABEL_WIDTH
    grid = Image.new("RGB", (label_w + columns * (tile_w + PAD) + PAD, header_h + rows * (tile_h + PAD)), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(titles):
        x = label_w + PAD + c * (tile_w + PAD) + tile_w // 2
        for i, line in enumerate(lines):  # bottom-aligned: the last line sits just above the tile
            draw.text((x, header_h - PAD - (len(lines) - i) * line_h), line, font=font, fill="black", anchor="mt")
    for r, lines in enumerate(labels):
        y = header_h + r * (tile_h + PAD)
        for i, line in enumerate(lines):
            draw.text((PAD, y + i * line_h), line, font=font, fill="black")
        for c in range(columns):
            grid.paste(to_pixels(images[r, c], factor), (label_w + PAD + c * (tile_w + PAD), y))
    return grid


# ----------------------------------------------------------------------------------------------------------------
# Training curves, from metrics.jsonl.

def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl: one dict per optimizer step, in the order they were taken. A damaged line (a crash cut it, or an
    editor did) is left out rather than crash the reader: the curves are a view, the checkpoint holds the state."""
    lines = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and METRIC_KEYS <= record.keys():
            lines.append(record)
    return lines


# What every line rid.py writes holds, and what the curves and eval.py's cost table read.
METRIC_KEYS = {"task", "reward", "step", "reward_mean", "reward_std", "loss", "loss_reward", "loss_out", "loss_feat",
               "grad_norm", "skipped", "seconds"}


def task_segments(lines: list[dict]) -> list[tuple[str, list[int], list[dict]]]:
    """Split the steps into tasks: (task label, global steps g = 1, 2, ... over the whole run, the task's lines)."""
    segments = []
    for g, line in enumerate(lines, start=1):
        label = f"task {line['task']}: {line['reward']}"
        if not segments or segments[-1][0] != label:
            segments.append((label, [], []))
        segments[-1][1].append(g)
        segments[-1][2].append(line)
    return segments


def spans_decades(values: list[float], decades: float = 2) -> bool:
    """Whether the positive finite values span at least `decades` powers of ten (then a log scale shows them)."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return bool(positive) and max(positive) >= 10 ** decades * min(positive)


def plot_terms(ax, segments, styles: dict[str, dict], log_if_spread: bool) -> None:
    """One line per metric key across the tasks, broken at task boundaries; styles[key]: its matplotlib keywords
    (label included). With log_if_spread and values spanning two decades, a log scale; values it cannot show
    (zeros, e.g. L_out at a task's first step) are then marked on the bottom edge, one row of markers per key,
    instead of silently dropped."""
    values = [line[key] for _, _, lines in segments for line in lines for key in styles]
    log = log_if_spread and spans_decades(values)
    if log:
        ax.set_yscale("log", nonpositive="mask")  # a zero is a gap, not a plunge to the axis's bottom
    bottom_edge = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for row, (key, style) in enumerate(styles.items()):
        style = {"linewidth": 1.2, "marker": ".", "markersize": 4, **style}  # a marker: a one-step task shows
        off_scale = f"{style['label']} ≤ 0 (off the log scale)"
        for _, steps, lines in segments:
            ys = [line[key] for line in lines]
            (drawn,) = ax.plot(steps, ys, **style)
            style = {**style, "color": drawn.get_color(), "label": None}  # one colour and legend entry per key
            non_positive = [g for g, y in zip(steps, ys) if y <= 0]
            if log and non_positive:
                ax.plot(non_positive, [0.04 + 0.08 * row] * len(non_positive), "v", color=drawn.get_color(),
                        transform=bottom_edge, markersize=6, label=off_scale)
                off_scale = None


def mark_tasks_and_skips(ax, segments, skipped: list[int]) -> None:
    """Dashed lines at the task boundaries; a red band over every skipped step (its update was not applied)."""
    for _, steps, _ in segments[1:]:
        ax.axvline(steps[0] - 0.5, color="0.3", linestyle="--", linewidth=1)
    for i, g in enumerate(skipped):
        ax.axvspan(g - 0.5, g + 0.5, color="red", alpha=0.25, linewidth=0,
                   label="skipped step (no update)" if i == 0 else None)


def legend_entries(axes) -> tuple[list, list[str]]:
    """The handles and labels of several axes, each label once."""
    entries = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    return list(entries.values()), list(entries)


def training_curves(lines: list[dict], grad_clip: float | None = None) -> Figure:
    """metrics.jsonl lines -> a figure against the global optimizer step g (1, 2, ... over all tasks).
    Top, one column of panels per task, since each reward has its own scale: reward_mean with a band of +- reward_std
    over the batch, and the total loss L with L_reward = -(s / sigma) mean r (linear: they can be negative).
    Below, full width, task boundaries dashed and labelled at the top: the raw distillation terms L_out and L_feat (log
    scale when they span two decades; exact zeros, e.g. at a task's first step where teacher = student, marked on the
    bottom edge); the gradient norm before clipping, with --grad-clip; K. Skipped steps (non-finite loss or gradient)
    are red bands on every panel."""
    segments = task_segments(lines)
    skipped = [g for g, line in enumerate(lines, start=1) if line.get("skipped")]
    fig = Figure(figsize=(12, 12), dpi=100, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.1)  # inches: a margin right of the legends
    per_task, whole_run = fig.subfigures(2, 1, height_ratios=[2, 2.6])
    per_task.suptitle("per task (each reward on its own scale)", fontsize="medium")
    panels = per_task.subplots(2, len(segments), squeeze=False)  # (2, tasks): rewards above, losses below
    for (rewards, losses), segment in zip(panels.T, segments):
        label, steps, task_lines = segment
        mean = [line["reward_mean"] for line in task_lines]
        std = [line["reward_std"] for line in task_lines]
        rewards.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25,
                             label="± std over the batch")
        rewards.plot(steps, mean, marker=".", label="batch mean")
        rewards.set(title=label, ylabel=f"reward ({task_lines[0]['reward']})")
        plot_terms(losses, [segment], {"loss": dict(label="L (total)", linewidth=4, alpha=0.4),
                                       "loss_reward": dict(label="L_reward\n= -(s/σ) mean r")}, log_if_spread=False)
        losses.set(ylabel="loss", xlabel="optimizer step (all tasks)")
        for ax in (rewards, losses):
            mark_tasks_and_skips(ax, [], [g for g in skipped if g in steps])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    for row in panels:  # one legend per row, right of its last panel
        row[-1].legend(*legend_entries(row), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small",
                       frameon=False)
    axes = whole_run.subplots(3, 1, sharex=True, height_ratios=[1, 1, 0.45])
    plot_terms(axes[0], segments, {"loss_out": dict(label="L_out"), "loss_feat": dict(label="L_feat")},
               log_if_spread=True)
    plot_terms(axes[1], segments, {"grad_norm": dict(label="gradient norm (before clipping)")}, log_if_spread=True)
    if grad_clip is not None:
        axes[1].axhline(grad_clip, color="0.3", linestyle=":", label=f"clipped to {grad_clip:g} (--grad-clip)")
    for _, steps, task_lines in segments:
        axes[2].step(steps, [line["k"] for line in task_lines], where="mid", color="black")
    axes[0].set_title("distillation terms (raw, before the lambdas)", loc="left", fontsize="medium")
    axes[1].set_title("gradient norm of the LoRA tensors", loc="left", fontsize="medium")
    axes[2].set(ylabel="K", ylim=(0, max(line["k"] for line in lines) + 1), xlabel="optimizer step (all tasks)")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        mark_tasks_and_skips(ax, segments, skipped)
        ax.grid(alpha=0.3)
        if ax is not axes[2]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    labels = axes[0].secondary_xaxis("top")
    labels.set_xticks([(steps[0] + steps[-1]) / 2 for _, steps, _ in segments], [s[0] for s in segments])
    labels.tick_params(length=0)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# The evaluation plot (eval.py).

def eval_rewards(result: dict) -> Figure:
    """Left: G[i][j] per reward across the sequence (forgetting shows as a fall after the reward's own task).
    Right: SSIM to the base images across the sequence. `result`: eval.py's eval.json."""
    fig = Figure(figsize=(11, 4), dpi=120, layout="tight")
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
        ax.set_xticks(list(x), result["rows"], rotation=20, ha="right", rotation_mode="anchor")  # ends at the tick
        ax.grid(alpha=0.3)
    return fig
