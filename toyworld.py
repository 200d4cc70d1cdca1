"""The toy world: a procedural world of captioned 32x32 pictures, and the judge that reads them.

A picture is one shape (circle, square or upright triangle) in one colour on a background of another colour, at a
random position and size, captioned "a red circle on a black background". Every colour is used for shapes and
for backgrounds; HELD_OUT combinations never appear in any training, so that prompt fidelity can be measured on
compositions the models have not seen. Everything is drawn from a seeded generator: no files. The judge (Judge) is an
attribute classifier of shape, colour and background that no training run optimises: eval.py's prompt fidelity.

Tiny mode's models are pretrained on this world by pretrain_toy.py into toy/ (docs/toy-world.md).
"""
import itertools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

SIZE = 32  # pixels per side
COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "white": (1, 1, 1),
           "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")
# (shape, colour, background) triples never drawn in training: each shape, colour and background still appears in
# training in other combinations, so generating these tests composition, not vocabulary.
HELD_OUT = (("circle", "red", "blue"), ("circle", "white", "green"), ("circle", "black", "yellow"),
            ("square", "green", "red"), ("square", "yellow", "black"), ("square", "blue", "white"),
            ("triangle", "blue", "yellow"), ("triangle", "red", "white"), ("triangle", "white", "black"),
            ("triangle", "green", "blue"))
COMBINATIONS = tuple((s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, COLOURS) if c != b)
SEEN = tuple(combo for combo in COMBINATIONS if combo not in HELD_OUT)


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """caption()'s inverse: (shape, colour, background), or None for a prompt that is not a toy-world caption."""
    words = text.split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    combo = (words[2], words[1], words[5])
    return combo if combo in COMBINATIONS else None


# ----------------------------------------------------------------------------------------------------------------
# Drawing. Shapes are drawn at 4x resolution and averaged down, so edges are anti-aliased like a photograph's.

SUPERSAMPLE = 4


def shape_masks(shapes: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Coverage (B, SIZE, SIZE) in [0,1] of shapes (B,) (indices into SHAPES) with centres (B, 2) (x, y) and radii
    (B,) in pixels. A circle of radius r, a square of half-side r*0.9 (about the circle's area), an upright
    isosceles triangle of half-base r*1.15 and height 2r*1.15 centred on its box."""
    n = SIZE * SUPERSAMPLE
    grid = (torch.arange(n, dtype=torch.float32) + 0.5) / SUPERSAMPLE                      # pixel coordinates
    y, x = grid.view(1, n, 1), grid.view(1, 1, n)
    cx, cy, r = centre[:, 0].view(-1, 1, 1), centre[:, 1].view(-1, 1, 1), radius.view(-1, 1, 1)
    circle = (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
    square = ((x - cx).abs() <= 0.9 * r) & ((y - cy).abs() <= 0.9 * r)
    h = 1.15 * r                                                                            # half-height, half-base
    depth = (y - (cy - h)) / (2 * h)                                                        # 0 at apex, 1 at base
    triangle = (depth >= 0) & (depth <= 1) & ((x - cx).abs() <= h * depth)
    masks = torch.stack([circle, square, triangle], 1)[torch.arange(len(shapes)), shapes].float()
    return F.avg_pool2d(masks.unsqueeze(1), SUPERSAMPLE).squeeze(1)


def draw(shapes, colours, backgrounds, centre, radius) -> torch.Tensor:
    """Pictures (B, 3, SIZE, SIZE) in [0,1]: each shape's coverage blends its colour over the background."""
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)                    # (6, 3)
    mask = shape_masks(shapes, centre, radius).unsqueeze(1)                                 # (B, 1, H, W)
    fg, bg = palette[colours].view(-1, 3, 1, 1), palette[backgrounds].view(-1, 3, 1, 1)
    return mask * fg + (1 - mask) * bg


def toy_aesthetic(colours, backgrounds, centre, radius) -> torch.Tensor:
    """The toy aesthetic score (B,) in [0, 10], a stated procedural property of a picture: contrast (the RGB
    distance of shape and background, over the largest possible), centring (1 at the centre, 0 at a corner) and
    size (the shape's radius over the largest drawn), weighted 0.5, 0.3, 0.2. It is learned by a regression head
    (rewards.Aesthetic) over a CLIP tower that has only ever seen toy-world pictures, so it can be hacked: a
    generator can push its pictures off the world (textures, several shapes, colours never drawn) to where the head
    extrapolates high scores that no real picture of the world has."""
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    contrast = (palette[colours] - palette[backgrounds]).norm(dim=-1) / math.sqrt(3)
    offset = (centre - SIZE / 2).norm(dim=-1) / (math.sqrt(2) * SIZE / 2)
    size = radius / RADIUS[1]
    return 10 * (0.5 * contrast + 0.3 * (1 - offset) + 0.2 * size)


RADIUS = (5.0, 11.0)  # the shapes' radius in pixels is drawn uniformly from this range


def toy_preference(centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """The toy human preference (B,) in [0, 1], a stated property of a picture that the toy hps learns from pairwise
    choices: a lower-third composition with room above, half for how low the shape's centre (B, 2) sits (its height
    over the picture's) and half for how small it is (radius (B,) from the largest drawn, 1, to the smallest, 0). The
    world draws positions and sizes uniformly, so the base model does not maximise it, and it conflicts with the toy
    aesthetic, which asks for a large shape at the centre."""
    low = centre[:, 1] / SIZE
    small = (RADIUS[1] - radius) / (RADIUS[1] - RADIUS[0])
    return 0.5 * low + 0.5 * small


def sample_world(n: int, generator: torch.Generator, combinations=SEEN) -> dict:
    """n random pictures of the given (shape, colour, background) combinations, with everything that made them:
    images (n,3,32,32) in [0,1], captions, the attribute indices (shape, colour, background), the geometry
    (centre (n,2) and radius (n,) in pixels), the toy aesthetic score and the toy preference. Shapes lie wholly
    inside the picture."""
    picks = torch.randint(len(combinations), (n,), generator=generator)
    return draw_world([combinations[i] for i in picks], generator)


def draw_world(combos: list[tuple[str, str, str]], generator: torch.Generator) -> dict:
    """sample_world's pictures for given combinations: only the geometry is drawn (so two calls with the same
    combinations give pairs of pictures that differ only in where the shape is and how large)."""
    shape_ids, colour_ids = {s: i for i, s in enumerate(SHAPES)}, {c: i for i, c in enumerate(COLOURS)}
    n = len(combos)
    shapes = torch.tensor([shape_ids[s] for s, _, _ in combos])
    colours = torch.tensor([colour_ids[c] for _, c, _ in combos])
    backgrounds = torch.tensor([colour_ids[b] for _, _, b in combos])
    radius = RADIUS[0] + (RADIUS[1] - RADIUS[0]) * torch.rand(n, generator=generator)
    margin = 1.2 * radius.unsqueeze(1)                                                       # the triangle's reach
    centre = margin + (SIZE - 2 * margin) * torch.rand(n, 2, generator=generator)
    return {"images": draw(shapes, colours, backgrounds, centre, radius), "captions": [caption(*c) for c in combos],
            "shape": shapes, "colour": colours, "background": backgrounds, "centre": centre, "radius": radius,
            "aesthetic": toy_aesthetic(colours, backgrounds, centre, radius),
            "preference": toy_preference(centre, radius)}


def world_prompts(combinations) -> list[str]:
    return [caption(*combo) for combo in combinations]


# The prompt splits of fine-tuning, so that settings are chosen on other captions than results are reported on:
# training (rid.py --tiny's prompts), validation (where the RIL benchmark chooses each method's settings) and test
# (what eval.py and the benchmark report). The seen combinations are dealt 60 / 10 / 10 by position (the list runs
# shape by shape, colour by colour, so every split has each shape and most colours); the held-out ones, which no
# model was pretrained on, 5 / 5 to validation and test.
SPLITS = {
    "train": world_prompts([c for i, c in enumerate(SEEN) if i % 8 not in (3, 7)]),
    "validation": world_prompts([c for i, c in enumerate(SEEN) if i % 8 == 3] + list(HELD_OUT[0::2])),
    "test": world_prompts([c for i, c in enumerate(SEEN) if i % 8 == 7] + list(HELD_OUT[1::2])),
}
EVAL_PROMPTS = SPLITS["test"]  # eval.py's default prompts for a tiny run: 10 seen, then 5 held-out combinations


def split_of(prompt: str) -> str | None:
    """"seen" or "held_out" for a toy-world caption, None for any other prompt."""
    combo = parse_caption(prompt)
    return None if combo is None else "held_out" if combo in HELD_OUT else "seen"


# ----------------------------------------------------------------------------------------------------------------
# The judge: an attribute classifier of shape, colour and background, for prompt fidelity. No training run
# optimises it; it is trained on the seen combinations only (every attribute has its own head, so it reads the
# held-out combinations too: pretraining measures that).

class Judge(torch.nn.Module):
    """A small CNN: (B,3,32,32) pixels in [0,1] -> logits for shape (B,3), colour (B,6) and background (B,6)."""

    def __init__(self, width: int = 32):
        super().__init__()
        def block(c_in, c_out):
            return [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.GroupNorm(8, c_out), torch.nn.SiLU()]
        self.features = torch.nn.Sequential(*block(3, width), *block(width, width), torch.nn.MaxPool2d(2),
                                            *block(width, 2 * width), *block(2 * width, 2 * width),
                                            torch.nn.MaxPool2d(2), *block(2 * width, 4 * width),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.heads = torch.nn.ModuleDict({"shape": torch.nn.Linear(4 * width, len(SHAPES)),
                                          "colour": torch.nn.Linear(4 * width, len(COLOURS)),
                                          "background": torch.nn.Linear(4 * width, len(COLOURS))})

    def forward(self, images):
        h = self.features(images * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}


ATTRIBUTES = ("shape", "colour", "background")
JUDGE = "judge.safetensors"  # the judge's weights in toy/ (pretrain_toy.py trains it)


def attribute_targets(prompts: list[str]) -> dict[str, torch.Tensor]:
    """The attribute indices (B,) each prompt asks for (prompts must be toy-world captions)."""
    combos = [parse_caption(p) for p in prompts]
    colours = list(COLOURS)
    return {"shape": torch.tensor([SHAPES.index(s) for s, _, _ in combos]),
            "colour": torch.tensor([colours.index(c) for _, c, _ in combos]),
            "background": torch.tensor([colours.index(b) for _, _, b in combos])}


@torch.no_grad()
def judge_correct(judge: Judge, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per image (B,), whether the judge sees each attribute that its prompt asks for, and all three ("all")."""
    logits = judge(images.float())
    targets = attribute_targets(prompts)
    correct = {name: (logits[name].argmax(-1).cpu() == targets[name]).float() for name in ATTRIBUTES}
    return {**correct, "all": torch.stack(list(correct.values())).prod(0)}


def load_judge(path: Path) -> Judge:
    judge = Judge()
    judge.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def judge_accuracy(judge: Judge, n: int, generator: torch.Generator) -> dict:
    """The judge's accuracy on fresh pictures, of seen and of held-out combinations."""
    result = {}
    for split, combinations in (("seen", SEEN), ("held_out", HELD_OUT)):
        world = sample_world(n, generator, combinations)
        correct = judge_correct(judge, world["images"], world["captions"])
        result[split] = {name: round(value.mean().item(), 4) for name, value in correct.items()}
    return result
