"""Differentiable reward models for reward-backprop fine-tuning.

Every scorer is an `nn.Module` called as `scorer(images, prompts) -> rewards`, with `images` a (B, 3, H, W) tensor of
pixels in [0, 1], `prompts` a list of B strings and `rewards` a (B,) tensor. Nothing here runs under `no_grad` or
clamps: gradients must flow from the reward back to the pixels, and from there through the VAE and the last K
denoising steps into the LoRA weights. Scorers are frozen (`requires_grad=False`) and in eval mode.

`load_reward(name, device, tiny)` builds one by name. With `tiny=True` the same classes are built around the toy
world's towers (pretrain_toy.py trains them on its pictures): the same open_clip configs at toy sizes (`clip_tower`),
their weights in toy/ in the layouts of the released files, read by the same loaders. Only sizes and weights differ
from the real models. Callers score in fp32 with autocast off (rid.score), in training and evaluation alike.

Where the real weights come from:
- aesthetic: the LAION "improved aesthetic predictor" MLP `sac+logos+ava1-l14-linearMSE.pth` (AESTHETIC_URL, cached
  by torch.hub) over OpenAI CLIP ViT-L/14 (open_clip `ViT-L-14-quickgelu`, pretrained="openai").
- hps: HPSv2.1, `HPS_v2.1_compressed.pt` from the hub repo `xswu/HPSv2`, loaded into open_clip `ViT-H-14`.
- clip: OpenAI CLIP ViT-L/14, as for aesthetic (loaded once if both are used).
- compressibility: no weights.
In tiny mode, toy/open_clip_model.safetensors (open_clip's checkpoint layout, as the hub's OpenAI ViT-L/14),
toy/aesthetic_mlp.pth (the predictor's layout) and toy/HPS_v2.1_toy.pt (HPSv2's {"state_dict": ...}).
"""
import contextlib
import functools
import logging
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from torch import nn

AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac+logos+ava1-l14-linearMSE.pth")
HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0,1] -> CLIP's input, normalised with the OpenAI CLIP mean/std (both towers' training statistics)."""
    mean = torch.tensor(OPENAI_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize with antialiasing: PIL's bicubic resize (which the official pipelines use) in torch ops."""
    return F.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False)


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """OpenAI CLIP's preprocessing (torchvision Resize(size) + CenterCrop(size), as in `clip.load` and open_clip's
    'shortest' mode) in differentiable torch ops, before normalisation: the shorter side is resized to `size`, the
    longer to int(size * long / short) as torchvision truncates, then the centre size x size is kept.
    (B,3,H,W) in [0,1] -> (B,3,size,size)."""
    h, w = images.shape[-2:]
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = resize(images, new_h, new_w)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def letterbox(images: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's preprocessing (open_clip's 'longest' mode: ResizeKeepRatio(longest=1) + CenterCropOrPad with zeros) in
    differentiable torch ops, before normalisation: the longer side is resized to `size`, and the shorter side is
    zero-padded to `size`, centred. For square images this equals centre_crop. (B,3,H,W) in [0,1] -> (B,3,size,size)."""
    h, w = images.shape[-2:]
    ratio = max(h / size, w / size)
    new_h, new_w = round(h / ratio), round(w / ratio)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(resize(images, new_h, new_w), (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))


def encode_image(clip: nn.Module, images: torch.Tensor, preprocess) -> torch.Tensor:
    """L2-normalised CLIP image embedding, (B,3,H,W) in [0,1] -> (B, D), differentiable; `preprocess` is
    centre_crop or letterbox, to the tower's input size."""
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pixels = normalise(preprocess(images, size)).to(next(clip.parameters()).dtype)
    return F.normalize(clip.encode_image(pixels), dim=-1)


class Aesthetic(nn.Module):
    """LAION improved aesthetic predictor: a linear MLP over the normalised CLIP image embedding.
    Layer indices match the released checkpoint (`layers.{0,2,4,6,7}`; 1, 3, 5 are dropouts)."""

    def __init__(self, clip: nn.Module, dim: int):
        super().__init__()
        self.clip = clip
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, images, prompts):
        return self.layers(encode_image(self.clip, images, centre_crop)).squeeze(-1)


class TextImageCosine(nn.Module):
    """Cosine similarity of normalised image and prompt embeddings (HPSv2 and CLIP score; no logit scale), with the
    preprocessing of the official scorer: letterbox for HPSv2, centre_crop for OpenAI CLIP.
    The text side needs no gradient: it runs under no_grad, once per prompt and dtype (training and evaluation reuse a
    fixed set of prompts), and the image side keeps its graph."""

    def __init__(self, clip: nn.Module, tokenizer, preprocess):
        super().__init__()
        self.clip, self.tokenizer, self.preprocess = clip, tokenizer, preprocess
        self.text_cache: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    @torch.no_grad()
    def text_features(self, prompts: list[str], device) -> torch.Tensor:
        """Normalised prompt embeddings (B, D), each computed once per prompt and tower dtype, then kept."""
        dtype = next(self.clip.parameters()).dtype
        missing = [p for p in dict.fromkeys(prompts) if (p, dtype) not in self.text_cache]
        if missing:
            features = F.normalize(self.clip.encode_text(self.tokenizer(missing).to(device)), dim=-1)
            self.text_cache.update({(p, dtype): f.cpu() for p, f in zip(missing, features)})
        return torch.stack([self.text_cache[p, dtype] for p in prompts]).to(device)

    def forward(self, images, prompts):
        image_features = encode_image(self.clip, images, self.preprocess)
        return (image_features * self.text_features(prompts, images.device).to(image_features.dtype)).sum(-1)


# JPEG's standard luminance quantisation table (quality 50), row-major over the 8x8 DCT frequencies.
JPEG_LUMA_Q = torch.tensor([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=torch.float32).view(8, 8)


def dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n): the 2-D DCT of a block X is D @ X @ D.T."""
    k, i = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    d = torch.cos(torch.pi * (2 * i + 1) * k / (2 * n)) * (2 / n) ** 0.5
    d[0] /= 2 ** 0.5
    return d


class Compressibility(nn.Module):
    """Weight-free proxy for JPEG compressibility (DDPO's reward is the negative JPEG file size in kB).

    JPEG codes each 8x8 block of luma as DCT coefficients divided by a quantisation table; the entropy-coded size
    grows roughly with log2(1 + |coefficient / q|) per AC coefficient. Summing that over the AC coefficients gives
    an estimate of the bits per block, and the reward is its negative mean. Unlike the real file size it has no
    rounding step, so it is differentiable almost everywhere (|.| has a subgradient at 0). Prompts are ignored."""

    def __init__(self):
        super().__init__()
        self.register_buffer("dct", dct_matrix())
        self.register_buffer("q", JPEG_LUMA_Q)

    def forward(self, images, prompts):
        luma = 255 * (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]) - 128   # (B, H, W)
        h, w = luma.shape[-2] // 8 * 8, luma.shape[-1] // 8 * 8
        blocks = luma[:, :h, :w].unfold(1, 8, 8).unfold(2, 8, 8)                                # (B, H/8, W/8, 8, 8)
        coefficients = self.dct.to(luma.dtype) @ blocks @ self.dct.to(luma.dtype).T
        bits = torch.log2(1 + (coefficients / self.q.to(luma.dtype)).abs())
        ac_bits = bits.sum((-1, -2)) - bits[..., 0, 0]                                          # (B, H/8, W/8)
        return -ac_bits.mean((1, 2))


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with its own CPU random state, leaving the caller's untouched (tiny models built from code)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# The open_clip model config of each reward's tower. OpenAI's CLIP weights were trained with QuickGELU: open_clip's
# plain "ViT-L-14" config builds nn.GELU and only warns when it loads them, so the aesthetic MLP would score
# embeddings it was never trained on. HPSv2.1 was trained from open_clip's ViT-H-14, which is GELU.
TOWER_CONFIGS = {"aesthetic": "ViT-L-14-quickgelu", "clip": "ViT-L-14-quickgelu", "hps": "ViT-H-14"}
# The toy world's towers (pretrain_toy.py trains them on its pictures): the same configs (activation, block layout) with
# only these sizes replaced, and the files their weights are in, each in the layout of its released counterpart.
TOY_TOWER = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16,
                                             "patch_size": 4},
             "text_cfg": {"width": 32, "heads": 2, "layers": 2}}
TOY_DIR = Path(__file__).parent / "toy"
OPENAI_TOWER, AESTHETIC_MLP, HPS_CHECKPOINT = "open_clip_model.safetensors", "aesthetic_mlp.pth", "HPS_v2.1_toy.pt"


def clip_tower(config: str, sizes: dict | None = None, pretrained: str | None = None) -> nn.Module:
    """The open_clip CLIP of model config `config` (see TOWER_CONFIGS), built by open_clip.create_model, with the
    weights of `pretrained` (a tag such as "openai", or a checkpoint file); with `sizes` (e.g. TOY_TOWER), the same
    config with those sizes replaced, so that the activation and the rest of the architecture come from the real
    config at any size."""
    if sizes:
        real = open_clip.get_model_config(config)
        sizes = {"embed_dim": sizes["embed_dim"],
                 **{cfg: {**real[cfg], **sizes[cfg]} for cfg in ("vision_cfg", "text_cfg")}}
    muted = logging.root.manager.disable
    if pretrained is None:  # open_clip warns that the model is initialised randomly: intended (loaded next, or a test)
        logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(config, pretrained=pretrained, output_dict=True, **(sizes or {}))
    finally:
        logging.disable(muted)


class MissingWeights(Exception):
    """Weights that are neither cached nor downloadable (offline, or a wrong name): one line saying how to get them."""


@contextlib.contextmanager
def fetching(what: str, how: str, errors: tuple = (OSError, ValueError)):
    """Turn a failed download or a missing file inside the block into a one-line MissingWeights naming `what` and
    saying `how` to get it. The libraries' loggers report such a failure over several lines (and open_clip again
    before re-raising), so logging is muted while fetching: the user gets one message, ours."""
    logging.disable(logging.ERROR)
    try:
        yield
    except errors as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MissingWeights(f"cannot load {what} ({reason[:200]}); {how}") from None
    finally:
        logging.disable(logging.NOTSET)


TOY_HINT = "restore toy/ from git (`git checkout -- toy`) or rerun `python pretrain_toy.py`"


@contextlib.contextmanager
def toy_weights(name: str):
    """The path of a toy-world weight file (toy/) to load inside the block: missing, or failing to load (empty,
    truncated, garbled: torch, safetensors and open_clip raise a dozen exception types), it is one MissingWeights
    naming it and saying how to restore it."""
    path = TOY_DIR / name
    if not path.is_file():
        raise MissingWeights(f"cannot load the toy model {path} (no such file); {TOY_HINT}")
    with fetching(f"the toy model {path}", TOY_HINT, errors=(Exception,)):
        yield str(path)


@functools.cache
def openai_vit_l14(tiny: bool) -> nn.Module:
    """OpenAI CLIP ViT-L/14 (768-d embedding, QuickGELU), loaded once for both `aesthetic` and `clip`; with `tiny`,
    the toy world's tower of the same config, read from open_clip's own checkpoint layout by the same loader."""
    if tiny:
        with toy_weights(OPENAI_TOWER) as path:
            return clip_tower(TOWER_CONFIGS["clip"], TOY_TOWER, pretrained=path)
    # open_clip re-raises download errors as RuntimeError
    with fetching("OpenAI CLIP ViT-L/14 (open_clip ViT-L-14-quickgelu, pretrained='openai')",
                  "pre-download it with `hf download timm/vit_large_patch14_clip_224.openai "
                  "open_clip_model.safetensors` on a machine with network access", errors=(OSError, RuntimeError)):
        return clip_tower(TOWER_CONFIGS["clip"], pretrained="openai")


def load_aesthetic_mlp(scorer: Aesthetic, path) -> Aesthetic:
    """Load the released predictor's MLP (a state dict with keys `layers.{0,2,4,6,7}.{weight,bias}`, saved from
    cuda, hence map_location) strictly into `scorer`."""
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    scorer.layers.load_state_dict({k.removeprefix("layers."): v for k, v in state_dict.items()})
    return scorer


def load_hps_weights(clip: nn.Module, path) -> nn.Module:
    """Load an HPSv2 checkpoint (`{"state_dict": open_clip CLIP state dict}`) strictly into `clip`."""
    clip.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    return clip


def cached_download(url: str) -> Path:
    """Download `url` once into torch.hub's checkpoint cache; return the local path."""
    path = Path(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1])
    if not path.exists():
        with fetching(url, f"download it on a machine with network access and copy it to {path}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path))  # writes a temporary file, then renames it
    return path


def aesthetic(tiny: bool) -> nn.Module:
    if not tiny:
        mlp = cached_download(AESTHETIC_URL)
        return load_aesthetic_mlp(Aesthetic(openai_vit_l14(tiny), dim=768), mlp)
    scorer = Aesthetic(openai_vit_l14(tiny), dim=TOY_TOWER["embed_dim"])
    with toy_weights(AESTHETIC_MLP) as mlp:
        return load_aesthetic_mlp(scorer, mlp)


def hps(tiny: bool) -> nn.Module:
    if tiny:
        with toy_weights(HPS_CHECKPOINT) as path:
            clip = load_hps_weights(clip_tower(TOWER_CONFIGS["hps"], TOY_TOWER), path)
    else:
        with fetching(f"{HPS_FILE} from hub repo {HPS_REPO}",
                      f"pre-download it with `hf download {HPS_REPO} {HPS_FILE}`"):
            path = hf_hub_download(HPS_REPO, HPS_FILE)  # before building ViT-H-14, so that a missing file fails at once
        clip = load_hps_weights(clip_tower(TOWER_CONFIGS["hps"]), path)
    return TextImageCosine(clip, open_clip.get_tokenizer(TOWER_CONFIGS["hps"]), letterbox)


def clip_score(tiny: bool) -> nn.Module:
    return TextImageCosine(openai_vit_l14(tiny), open_clip.get_tokenizer(TOWER_CONFIGS["clip"]), centre_crop)


def compressibility(tiny: bool) -> nn.Module:
    return Compressibility()


REWARDS = {"aesthetic": aesthetic, "hps": hps, "clip": clip_score, "compressibility": compressibility}


class RewardSum(nn.Module):
    """Several rewards as one task (a task named "aesthetic+hps+compressibility": the RIL benchmark's joint
    reference, every reward at once): sum_j r_j / sigma_j, each reward in units of its own spread sigma_j, which
    rid.py measures at the task's start (reward_spread) and puts in `spreads`."""

    def __init__(self, scorers: dict[str, nn.Module]):
        super().__init__()
        self.scorers = nn.ModuleDict(scorers)
        self.register_buffer("spreads", torch.ones(len(scorers)))

    def parts(self, images, prompts) -> torch.Tensor:
        """Each reward of the images, (B, J)."""
        return torch.stack([scorer(images, prompts) for scorer in self.scorers.values()], dim=-1)

    def forward(self, images, prompts):
        return (self.parts(images, prompts) / self.spreads).sum(-1)


def parts_of(name: str) -> list[str]:
    """The rewards of a task: one, or several joined by '+' (RewardSum)."""
    return name.split("+")


def load_reward(name: str, device: torch.device | str, tiny: bool = False) -> nn.Module:
    """Build the scorer `name` (see REWARDS; several joined by '+': their RewardSum), frozen, in eval mode, on
    `device`."""
    unknown = [part for part in parts_of(name) if part not in REWARDS]
    if unknown:
        raise KeyError(f"unknown reward {unknown[0]!r}; known rewards: {', '.join(REWARDS)}")
    parts = parts_of(name)
    scorer = REWARDS[name](tiny) if len(parts) == 1 else RewardSum({part: REWARDS[part](tiny) for part in parts})
    return scorer.requires_grad_(False).eval().to(device)
