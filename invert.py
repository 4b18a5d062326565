#!/usr/bin/env python3
"""Invert layers of a pretrained CNN: find images whose activations there match a photo's.

Mahendran & Vedaldi, "Understanding Deep Image Representations by Inverting Them" (CVPR 2015), with
the normalised objective of their IJCV 2016 follow-up.

    python invert.py --image_path reference_images/astronaut.jpg --model alexnet --layer_name features_4
    python invert.py --model vgg16 --layer_name features_4 features_9 features_16 features_23

From Python, on any nn.Module:

    from invert import invert
    result = invert(model, model.features[4], photo_tensor, objective="seed", epochs=100)
"""
import argparse
import contextlib
import csv
import dataclasses
import difflib
import functools
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import signal
import stat
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import filelock  # installed with torch
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFile, ImageOps, PngImagePlugin
from torch import nn
from torchvision import transforms
from tqdm import tqdm

try:
    import resource  # `ulimit -v`, for the memory estimate; absent on Windows
except ImportError:
    resource = None

# ---------------------------------------------------------------- constants

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_IMAGE = Path(__file__).resolve().parent / "reference_images" / "astronaut.jpg"
OBJECTIVES = ("seed", "paper")
TASKS = ("invert", "caricature", "maximize")
UNIT_SCOPES = ("neuron", "channel")
OPTIMIZERS = ("sgd", "adam", "lbfgs")
PARAMS = ("pixel", "fft")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# The paper's pixel scales in its mean-subtracted 0-255 units (IJCV 2016): B, a typical pixel's RGB
# norm (the box constraint is 2B), and V, a typical difference between neighbouring pixels.
PAPER_B, PAPER_V = 80.0, 80.0 / 6.5
# --C auto: the paper's weight of the feature term, kept up to this layer stride, then falling
# with the stride's square (measured on the trained stand-in: tests/README.md)
PAPER_C, FULL_C_STRIDE = 100.0, 4
# --C auto with --task maximize: the unit's activation at 1 is within 3 % of the stride rule's, with
# a cleaner background (tests/README.md)
MAXIMIZE_C = 1.0
# The plateau rule ends runs early only at layers of this stride or less: deeper layers' losses stall
# at the first stage's rate while their pictures still gain from the last stage (tests/README.md).
PLATEAU_STRIDE = 2
# The paper's two stages: this share of the iterations, then the rest at --decay_factor times the rate.
FIRST_STAGE = Fraction(6, 7)
# What --objective decides when a flag is not given. seed: the original design's whole method.
# paper: the normalised terms, on the parameterisation and optimizer measured best for them. A
# Fraction is a share of --epochs.
OBJECTIVE_DEFAULTS = {
    "seed": {"optimizer": "sgd", "param": "pixel", "lambda_alpha": 1e-5, "lambda_tv": 1e-5, "C": 1.0,
             "decay_epochs": 200, "plateau": 0.0, "surrogate": "off"},
    "paper": {"optimizer": "adam", "param": "fft", "lambda_alpha": 1.0, "lambda_tv": 1.0, "C": "auto",
              "decay_epochs": FIRST_STAGE, "plateau": 0.01, "surrogate": "on"},
}
# Learning rates per (objective, optimizer, param), measured on a trained VGG16-BN (tests/README.md).
# The seed's 1e-2 leaves the image as noise; 1e2, the value its own comment gives, measured best.
DEFAULT_LRS = {
    ("seed", "sgd", "pixel"): 100.0, ("seed", "adam", "pixel"): 0.1, ("seed", "lbfgs", "pixel"): 1.0,
    ("paper", "sgd", "pixel"): 3.0, ("paper", "adam", "pixel"): 0.1, ("paper", "lbfgs", "pixel"): 1.0,
    ("seed", "sgd", "fft"): 0.003, ("seed", "adam", "fft"): 0.01, ("seed", "lbfgs", "fft"): 1.0,
    ("paper", "sgd", "fft"): 0.003, ("paper", "adam", "fft"): "auto", ("paper", "lbfgs", "fft"): 1.0,
}
# --lr auto: this rate, and half of it at layers of stride AUTO_LR_STRIDE or more (tests/README.md)
AUTO_LR, AUTO_LR_STRIDE = 0.01, 4
# lucent's square root of ImageNet's colour correlation, for --param fft
COLOUR_CORRELATION_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
# .item() makes a GPU wait, so there the loss is checked for NaN only this often (every step on a CPU)
GPU_CHECK_EVERY = 25
# --batch_size auto: rows per batch at most (on a CPU, a GPU), beyond which a batch no longer gains per
# image (tests/README.md), and the share of the free memory a batch may take by the estimate
BATCH_CAP, MEMORY_SHARE = (2, 32), 0.5
# --samples: the spread picture is white where the samples' standard deviation is this many grey levels
SPREAD_WHITE = 64
# every job's table of results, in --output_dir, rebuilt at most this often while a job runs, and at its end
INDEX, INDEX_EVERY = "index.csv", 60.0
INDEX_COLUMNS = ("image_path", "model", "layer_name", "task", "unit", "status", "png", "feature_error",
                 "projection", "cosine", "unit_activation", "photo_activation", "photo_max", "rec_loss",
                 "alpha_loss", "tv_loss", "iterations", "stopped", "seconds", "precision", "device",
                 "mean_png", "spread_png", "spread", "photo_top1", "preimage_top1", "top1_agree",
                 "photo_probability", "field_box", "error")
# --units all: the first this many units (channels) of the layer
ALL_UNITS = 25
# every picture this tool writes carries this PNG text (a GIF comment), so that folder listings leave it out
MARK = "invert.py"
# the plateau rule compares each image's loss with its loss this many iterations before
PLATEAU_WINDOW = 10
# the largest weight (C, lambdas) and prior exponent (alpha, beta) whose terms stay inside float32
MAX_WEIGHT, MAX_EXPONENT = 1e30, 12.0
# --surrogate on: through each row's first stage, a ReLU's backward leaks this slope (tests/README.md)
SURROGATE_LEAK = 0.1
SURROGATES = ("on", "off")
# L-BFGS keeps this many past steps and gradients; Adam's beta2 and epsilon are torch's defaults
LBFGS_HISTORY = 10
ADAM_BETA2, ADAM_EPSILON = 0.999, 1e-8
# what torchvision models raise for an input size they cannot take (ViT asserts, convs raise)
FORWARD_ERRORS = (RuntimeError, AssertionError, ValueError)


class UsageError(Exception):
    """A problem with the user's input or settings: reported as one line, exit code 2."""


class RowError(UsageError):
    """Rows of a batch that cannot be inverted, whatever the settings: `reasons` maps each to why."""

    def __init__(self, reasons: dict):
        self.reasons = reasons
        told = [f"row {row}: {reason}" for row, reason in reasons.items()]
        super().__init__("; ".join(told) if len(reasons) > 1 else next(iter(reasons.values())))


def shown(text) -> str:
    """A path or message as one printable line: control characters and undecodable bytes escaped."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in str(text))


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one short line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class _LayerReached(Exception):
    """Raised by the layer hook so that the forward pass stops at the hooked layer."""


# ---------------------------------------------------------------- settings


class Checked:
    """An argparse type: `kind`, finite, for which `test` holds (or 'auto'); holds() checks API values."""

    def __init__(self, kind: type, test: Callable, requirement: str, auto: bool = False):
        self.kind, self.test, self.requirement, self.auto = kind, test, requirement, auto
        self.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages

    def __call__(self, text: str):
        value = text if self.auto and text == "auto" else self.kind(text)
        if not self.holds(value):
            raise argparse.ArgumentTypeError(f"must be {self.requirement}, got {text}")
        return value

    def holds(self, value) -> bool:
        """Whether `value` is acceptable."""
        if self.kind is str:
            return isinstance(value, str) and bool(self.test(value))
        number = isinstance(value, int if self.kind is int else (int, float)) and not isinstance(value, bool)
        return self.auto and value == "auto" or number and math.isfinite(value) and self.test(value)

    def or_auto(self) -> "Checked":
        """The same type, also taking 'auto' (a value chosen from the layer's stride)."""
        return Checked(self.kind, self.test, f"{self.requirement} or auto", auto=True)


positive_int = Checked(int, lambda value: value > 0, "a positive integer")
non_negative_int = Checked(int, lambda value: value >= 0, "an integer >= 0")
seed_int = Checked(int, lambda value: 0 <= value < 2 ** 64, "an integer from 0 to 2^64 - 1")
positive_float = Checked(float, lambda value: value > 0, "> 0")
# beyond these, a weighted term overflows float32 (about 3.4e38)
weight = Checked(float, lambda value: 0 <= value <= MAX_WEIGHT, f"from 0 to {MAX_WEIGHT:g}")
positive_weight = Checked(float, lambda value: 0 < value <= MAX_WEIGHT, f"> 0 and at most {MAX_WEIGHT:g}")
# below 1 the alpha-norm and TV are not norms and their gradients are infinite at 0; above
# MAX_EXPONENT a pixel at the box's edge (2B = 160) raised to it overflows float32
exponent = Checked(float, lambda value: 1 <= value <= MAX_EXPONENT, f"from 1 to {MAX_EXPONENT:g}")
below_one = Checked(float, lambda value: 0 <= value < 1, ">= 0 and < 1")
decay = Checked(float, lambda value: 0 < value <= 1, "> 0 and at most 1")
channel_group = Checked(str, lambda text: text == "all" or re.fullmatch(r"\d+:\d+", text) and int(
    text.split(":")[0]) < int(text.split(":")[1]), "all or A:B, A < B")


def setting(default, help: str, **argparse_options):
    """A field of Settings: its default, its help, and how argparse reads and checks it."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to invert: each field a keyword of invert() and a flag; None takes the objective's default."""

    task: str = setting("invert", "invert: match the photo's activations; caricature: start from the photo "
                        "and push its activations further along themselves, -<phi(x), phi0> / ||phi0||^2 "
                        "(its files end in _caricature); "
                        "maximize: drive one unit of the layer (--units) as high as the priors allow, "
                        "-phi_unit(x) / rms(phi0), phi0 the photo's (with --surrogate on, the layer's own "
                        "ReLUs leak too in the first stage, so that a unit that starts off can rise)",
                        choices=TASKS)
    window: int = setting(0, "invert and caricature: only the central KxK positions of the layer's grid (of "
                          "tokens, for a ViT) count in the data term; 0: all", type=non_negative_int)
    channels: str = setting("all", "invert and caricature: only channels A to B-1 count in the data term "
                            "(of a ViT's grid tokens: a part never holds its class token)",
                            type=channel_group)
    unit_scope: str = setting("neuron", "maximize: a unit is its channel's neuron at the centre of the grid, "
                              "or its whole channel (the mean)", choices=UNIT_SCOPES)
    objective: str = setting("paper", "seed: the original design's method (SGD on pixels, lambdas "
                             "1e-5); paper: the IJCV 2016 normalised loss with box constraint and two "
                             "stages (see the README)", choices=OBJECTIVES)
    optimizer: Optional[str] = setting(None, "sgd: SGD with momentum; adam: Adam with --momentum as "
                                       "beta1; lbfgs: L-BFGS, one step per iteration", choices=OPTIMIZERS)
    param: Optional[str] = setting(None, "pixel: optimise pixels; fft: optimise a decorrelated-colour "
                                   "spectrum, as lucent does", choices=PARAMS)
    alpha: float = setting(6.0, "exponent of the alpha-norm prior", type=exponent)
    beta: float = setting(2.0, "exponent of the total-variation prior", type=exponent)
    lambda_alpha: Optional[float] = setting(None, "weight of the alpha-norm prior", type=weight)
    lambda_tv: Optional[float] = setting(None, "weight of the total-variation prior", type=weight)
    C: Union[float, str, None] = setting(None, f"weight C of the feature term (the paper used 1 to 300); "
                                         f"'auto': {PAPER_C:g} up to a layer stride of {FULL_C_STRIDE}, "
                                         f"then {PAPER_C:g} * ({FULL_C_STRIDE} / stride)^2, so that the "
                                         f"priors weigh more where the layer keeps less ({MAXIMIZE_C:g} for "
                                         "--task maximize)", type=positive_weight.or_auto())
    jitter: Union[int, str] = setting(0, "random shift of the image each iteration, 0 to N pixels on "
                                      "each axis, until the first learning-rate decay; 'auto' is the "
                                      "authors' choice, a quarter of the layer's stride less one",
                                      type=non_negative_int.or_auto())
    epochs: int = setting(200, "optimisation iterations: exactly this many with --plateau 0, else at most",
                          type=positive_int)
    plateau: Optional[float] = setting(None, f"end an image's first stage once its lowest loss has not "
                                       f"fallen by this fraction over the last {PLATEAU_WINDOW} iterations, "
                                       f"at layers of stride {PLATEAU_STRIDE} or less; a last stage at "
                                       f"--decay_factor times the rate, {(1 - FIRST_STAGE) / FIRST_STAGE} as "
                                       "long as the first, follows, and the image is done. 0 runs exactly "
                                       "--epochs iterations", type=below_one)
    surrogate: Optional[str] = setting(None, "on: in each image's first stage, the backward pass goes "
                                       "through each max-pool below the inverted layer as an average "
                                       "pool's would, and through each ReLU as a leaky ReLU's would; "
                                       "forward values, and so the feature error, stay the network's "
                                       "own. Deep layers gain most (see the README)", choices=SURROGATES)
    lr: Union[float, str, None] = setting(None, f"learning rate; 'auto': {AUTO_LR:g}, and "
                                          f"{AUTO_LR / 2:g} at layers of stride {AUTO_LR_STRIDE} or more",
                                          type=positive_float.or_auto())
    momentum: float = setting(0.9, "SGD momentum, or Adam's beta1", type=below_one)
    decay_factor: float = setting(0.1, "learning-rate multiplier at each decay", type=decay)
    decay_epochs: Optional[int] = setting(None, "iterations between learning-rate decays", type=positive_int)
    precision: str = setting("auto", "the forward pass's precision; losses stay fp32 (auto: bf16 where "
                             "the hardware runs it natively, AMX or AVX512-BF16 CPUs and bf16 GPUs, "
                             "else fp32; fp16 needs CUDA)", choices=PRECISIONS)
    samples: int = setting(1, "pre-images per (photo, layer), each from its own starting noise: what they "
                           "share is what the layer keeps, where they differ what it discards. The "
                           "command line also writes their mean and their spread", type=positive_int)
    seed: int = setting(2023, "random seed for Python, torch and each image's own generator", type=seed_int)


def resolve(settings: Settings, device: torch.device) -> Settings:
    """The settings with each None replaced by its default and the precision chosen for `device`."""
    for field in dataclasses.fields(Settings):  # what argparse checks, for values from the Python API
        value = getattr(settings, field.name)
        choices, kind = field.metadata.get("choices"), field.metadata.get("type")
        if value is not None and choices and value not in choices:
            raise UsageError(f"--{field.name} {value!r} is not one of {', '.join(choices)}")
        if value is not None and kind and not kind.holds(value):
            raise UsageError(f"--{field.name} must be {kind.requirement}, got {value!r}")
    given = {name: value for name, value in dataclasses.asdict(settings).items() if value is not None}
    chosen = {**OBJECTIVE_DEFAULTS[settings.objective], **given}
    chosen.setdefault("lr", DEFAULT_LRS[chosen["objective"], chosen["optimizer"], chosen["param"]])
    if isinstance(chosen["decay_epochs"], Fraction):  # a share of --epochs: decided where it is used
        chosen["decay_epochs"] = None
    chosen["precision"] = resolve_precision(chosen["precision"], device)
    if chosen["task"] == "maximize" and (chosen["window"] or chosen["channels"] != "all"):
        raise UsageError("--window and --channels are for --task invert and caricature, not maximize")
    return Settings(**chosen)


def decay_iterations(settings: Settings) -> int:
    """The iterations between learning-rate decays: --decay_epochs, else the paper's first stage."""
    return settings.decay_epochs or max(1, round(settings.epochs * FIRST_STAGE))


def default_help(name: str) -> str:
    """How a setting whose default is None gets its value, in words for --help."""
    def words(value):
        if isinstance(value, Fraction):
            return f"{value} of --epochs"
        return f"{value:g}" if isinstance(value, float) else str(value)

    if name == "lr":
        return ", ".join(f"{words(rate)} for {' + '.join(key)}" for key, rate in DEFAULT_LRS.items())
    return ", ".join(f"{words(OBJECTIVE_DEFAULTS[objective][name])} with --objective {objective}"
                     for objective in OBJECTIVES)


def resolve_precision(spec: str, device: torch.device) -> str:
    """Turn --precision into fp32, bf16 or fp16 for this device."""
    if spec == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32")
    # natively, bf16 is faster and within 0.01 SSIM of fp32 at every benchmark layer (tests/README.md)
    return spec if spec != "auto" else "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    """Whether this device runs bf16 in hardware: AMX or AVX512-BF16 on a CPU, bf16 units on a GPU."""
    if device.type == "cuda":
        with contextlib.suppress(TypeError):  # torch before 2.3 lacks including_emulation, counts only native
            return torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.cuda.is_bf16_supported()
    # private helpers, absent from older torch: then assume no
    checks = [getattr(torch.cpu, f"_is_{name}_supported", None) for name in ("amx_tile", "avx512_bf16")]
    return device.type == "cpu" and any(check() for check in checks if check is not None)


# ---------------------------------------------------------------- images


def read_bytes(path, flag: str = "--image_path") -> bytes:
    """A file's bytes; UsageError naming `flag` if they cannot be read."""
    try:
        return Path(path).read_bytes()
    except (OSError, MemoryError) as error:
        why = {FileNotFoundError: ": no such file", IsADirectoryError: " is a directory, not a file",
               PermissionError: ": permission denied"}.get(type(error),
                                                           f" cannot be read ({one_line(error)})")
        raise UsageError(f"{flag} {path}{why}") from None


def load_image(path, data: Optional[bytes] = None) -> Image.Image:
    """An image file (or its bytes `data`) as upright 8-bit RGB; UsageError if it cannot be read."""
    data = read_bytes(path) if data is None else data
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = ImageOps.exif_transpose(opened)  # a loaded copy, upright
            if image.mode in SIXTEEN_BIT_MODES:  # 16-bit grey, rescaled; transparency laid on white
                image = image.convert("I").point(lambda value: value / 256).convert("L")
            if image.mode in TRANSPARENT_MODES or "transparency" in image.info:
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise UsageError(f"--image_path {path} is too large to decode safely ({error})") from None
    except MemoryError:
        raise UsageError(f"--image_path {path} is too large to decode in the memory available") from None
    except Exception as error:  # Pillow's decoders raise many types for damaged or hostile data
        raise UsageError(f"--image_path {path} is not a readable image ({one_line(error)})") from None


def load_photo(path, size: int, data: Optional[bytes] = None) -> torch.Tensor:
    """Open a photo and preprocess it, refusing first a resize that would not fit in memory."""
    image = load_image(path, data)
    # Resize scales the shorter side to `size` before the crop: a long strip becomes very long
    check_memory(3 * size * size * max(image.size) / min(image.size), torch.device("cpu"),
                 f"resizing {path} to --input_size {size}", "use a smaller --input_size")
    return preprocess(image, size)


class Photo(NamedTuple):
    """A photo as planned: its hash, or why it cannot be used; its bytes if a pipe or saved activations."""

    sha256: Optional[str]
    error: Optional[str]
    data: Optional[bytes]


def read_photo(path: str, size: int, features: bool = False) -> Photo:
    """Read a photo (or saved activations) once, hash it, and check that it decodes and fits in memory."""
    try:
        data = read_bytes(path, "--features" if features else "--image_path")
        load_features(data, path) if features else load_photo(path, size, data)
    except UsageError as error:
        return Photo(None, str(error), None)
    kept = data if features or not stat.S_ISREG(os.stat(path).st_mode) else None
    return Photo(hashlib.sha256(data).hexdigest(), None, kept)


def load_features(data: bytes, path: str) -> torch.Tensor:
    """Saved activations: a float tensor that torch.save wrote; UsageError if the file holds anything else."""
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a file refused anyway
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle beyond tensors, or not a torch file at all
        raise UsageError(f"--features {path} is not a tensor that torch.save wrote ({one_line(error)})") \
            from None
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        kind = f"{tensor.dtype} values" if isinstance(tensor, torch.Tensor) else f"a {type(tensor).__name__}"
        raise UsageError(f"--features {path} holds {kind}, not a float tensor")
    return tensor.float()


def ours(path) -> bool:
    """Whether an image file is a picture this tool wrote: a PNG or GIF with its mark."""
    with contextlib.suppress(Exception), Image.open(path) as opened:
        return opened.info.get("Software") == MARK or opened.info.get("comment") == MARK.encode()
    return False


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """Resize, centre-crop and normalise a photo into a 1x3xSxS tensor, as the seed does."""
    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(image).unsqueeze(0)


def displayed(tensor: torch.Tensor) -> torch.Tensor:
    """Normalised Nx3xHxW images as they are shown: the ImageNet normalisation undone, clamped to [0, 1]."""
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))
    return (tensor.detach().float().cpu() * std + mean).clamp(0, 1)


def deprocess(tensor: torch.Tensor) -> Image.Image:
    """Undo the ImageNet normalisation of a 1x3xHxW tensor, clamp to [0, 1] and return a PIL image."""
    return transforms.functional.to_pil_image(displayed(tensor)[0])


def mean_and_spread(samples: torch.Tensor) -> tuple:
    """A row's samples' mean picture, spread picture (per-pixel std in grey levels) and mean spread."""
    pictures = displayed(samples)
    spread = 255 * pictures.std(0, correction=0).mean(0)
    shade = (255 * spread / SPREAD_WHITE).clamp(0, 255).round().byte()  # rounded: its scale is read off
    return (transforms.functional.to_pil_image(pictures.mean(0)), transforms.functional.to_pil_image(shade),
            spread.mean().item())


def montage(original: Optional[Image.Image], tiles: list) -> Image.Image:
    """A grid of labelled tiles: the original first (if any), then each (label, picture) in order."""
    tiles = [("original", original), *tiles] if original else tiles
    side, label_height = tiles[0][1].width, 16
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new("RGB", (columns * side, rows * (side + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (label, picture) in enumerate(tiles):
        left, top = (index % columns) * side, (index // columns) * (side + label_height)
        grid.paste(picture.resize((side, side)), (left, top))
        draw.text((left + 4, top + side + 2), label, fill="black")
    return grid


# ---------------------------------------------------------------- models and layers


def pretrained_weights(name: str, weights: str):
    """torchvision's weights `weights` (DEFAULT or an enum name) of `name`; None for a file or 'none'."""
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose from {', '.join(names)}"
        raise UsageError(f"unknown --model {name!r}; {hint}")
    if weights.lower() == "none" or looks_like_path(weights):
        return None
    enum = torchvision.models.get_model_weights(name)
    if weights not in enum.__members__:
        raise UsageError(f"--weights {weights!r} is not a file, 'none', or one of {name}'s weights: "
                         f"{', '.join(enum.__members__)}")
    return enum[weights]


def weights_identity(name: str, weights: str) -> tuple:
    """(The weights' identity in records: a file's sha256, torchvision's URL or 'none'; a file's bytes)."""
    chosen = pretrained_weights(name, weights)
    if chosen is not None or weights.lower() == "none":
        return "none" if chosen is None else chosen.url, None
    data = read_bytes(weights, "--weights")
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def load_model(name: str, weights: str, progress: bool = True, data: Optional[bytes] = None) -> nn.Module:
    """Torchvision model `name`, frozen, with DEFAULT, enum, state-dict-file (or `data`) or no weights."""
    chosen = pretrained_weights(name, weights)
    model = load_pretrained(name, chosen, progress) if chosen is not None else random_model(name)
    if weights.lower() == "none":
        print(f"warning: --weights none: {name} is randomly initialised, so the result does not "
              "show what a trained network sees", file=sys.stderr)
    elif chosen is None:
        load_state_dict_file(model, name, Path(weights), data)
    return model.eval().requires_grad_(False)


def random_model(name: str) -> nn.Module:
    """Build a randomly initialised model, without torchvision's notice about future init defaults."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet and inception_v3 print one
        return torchvision.models.get_model(name, weights=None)


def looks_like_path(weights: str) -> bool:
    """Whether --weights names a file rather than a torchvision weights enum member."""
    return os.sep in weights or "/" in weights or Path(weights).suffix != "" or Path(weights).exists()


def load_pretrained(name: str, chosen, progress: bool) -> nn.Module:
    """`name` with torchvision's weights `chosen`, downloaded once to TORCH_HOME; read safely first."""
    file = os.path.basename(urllib.parse.urlparse(chosen.url).path)
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / file
    damaged = f"cannot read cached weights {checkpoint} ({{}}); delete it to download again"
    cached = checkpoint.exists()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stdout if progress else io.StringIO()):
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # of a file refused anyway
            chosen.get_state_dict(progress=progress, check_hash=True, weights_only=True)
    except Exception as error:  # a refused download (URLError is an OSError), a bad hash, a damaged file
        if cached:
            raise UsageError(damaged.format(one_line(error))) from None
        raise UsageError(f"could not download {name} weights {checkpoint.name} from {chosen.url} "
                         f"({one_line(error)}); put that file in {checkpoint.parent}/ (the cache under "
                         "TORCH_HOME), or pass --weights PATH to a state-dict file, or --weights none for "
                         "random weights") from None
    try:
        return torchvision.models.get_model(name, weights=chosen, progress=progress)
    except Exception as error:  # read safely a moment ago: changed since
        raise UsageError(damaged.format(one_line(error))) from None


def load_state_dict_file(model: nn.Module, name: str, path: Path, data: Optional[bytes] = None) -> None:
    """Load a state-dict file (or its bytes) into `model`, weights_only; UsageError if it misfits."""
    data = read_bytes(path, "--weights") if data is None else data
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a file refused anyway
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"--weights {path} was refused: it holds Python objects beyond tensors, and "
                         "only plain state dicts are loaded (a pickle could run code)") from None
    except Exception as error:  # torch.load raises many types for files that are not checkpoints
        raise UsageError(f"--weights {path} is not a PyTorch state-dict file ({one_line(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                              for key, value in state.items()):
        raise UsageError(f"--weights {path} is not a state dict (a mapping of names to tensors)")
    expected = model.state_dict()
    problems = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in (
        ("missing keys", sorted(expected.keys() - state.keys())),
        ("unexpected keys", sorted(state.keys() - expected.keys())),
        ("shape mismatches", sorted(key for key in expected.keys() & state.keys()
                                    if expected[key].shape != state[key].shape))) if keys]
    if problems:  # a DataParallel checkpoint's "module." prefix shows in the first two
        raise UsageError(f"--weights {path} does not fit {name}: {', '.join(problems)}")
    model.load_state_dict(state)


def seed_form(name: str) -> str:
    """The seed's spelling of a dotted module name: features.4 -> features_4."""
    return name.replace(".", "_")


def resolve_layer(model: nn.Module, layer_name: str) -> tuple:
    """Return (dotted name, module) for `features_4`, `features.4`, `layer3.1.conv2` and the like."""
    dotted = [name for name, _ in model.named_modules() if name]
    # a module's real name wins over another module's underscored spelling
    spellings = {**{seed_form(name): name for name in reversed(dotted)}, **{name: name for name in dotted}}
    if layer_name not in spellings:
        valid = [seed_form(name) for name in dotted]
        close = difflib.get_close_matches(layer_name, valid, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"unknown --layer_name {layer_name!r}; {hint}valid names: {', '.join(valid)}")
    return spellings[layer_name], model.get_submodule(spellings[layer_name])


@contextlib.contextmanager
def forward_hooks(hooks: dict):
    """Register each module's forward hook in `hooks` (module -> hook) for the block, then remove it."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_batches(model: nn.Module, layers: Sequence[nn.Module], images: torch.Tensor,
                  alive: Optional[list] = None) -> list:
    """Per layer in the order they ran, (the layer, its rows, their outputs); `alive`: the batch's rows."""
    # `alive`, if given, is kept equal to the rows in the batch as it reaches each module (for Surrogate)
    # the forward stops after the deepest layer; in a plain nn.Sequential, rows also leave at their own
    wanted = list(dict.fromkeys(layers))
    chain = chain_of(model, wanted) if len(wanted) > 1 else None
    batches = []
    alive = [] if alive is None else alive
    alive[:] = range(len(layers))

    def hook(module, inputs, output):
        if any(module is done for done, _, _ in batches):
            return None
        if not isinstance(output, torch.Tensor):
            raise UsageError(f"a chosen layer returns a {type(output).__name__}, not a tensor; "
                             "choose another (see --list_layers)")
        here = [index for index, row in enumerate(alive) if layers[row] is module]
        staying = [index for index, row in enumerate(alive) if layers[row] is not module]
        last = len(batches) + 1 == len(wanted)
        # where the whole batch runs on, a copy: an in-place ReLU could change this output
        source = output if chain is not None or last else output.clone()
        if len(here) < len(source):  # all rows: no slice, which costs a full-size copy in the backward pass
            together = here == list(range(here[0], here[-1] + 1))
            source = source[here[0]:here[-1] + 1] if together else source[here]
        batches.append((module, [alive[index] for index in here], source))
        if last:
            raise _LayerReached
        if chain is not None:
            alive[:] = [alive[index] for index in staying]
            return output[staying]
        return None

    with forward_hooks({layer: hook for layer in wanted}):
        try:
            model(images.clone())  # a copy: a network may change its input in place (a first in-place ReLU)
        except _LayerReached:
            pass
    if len(batches) < len(wanted):
        raise UsageError("a chosen layer is not used in the model's forward pass")
    return batches


def chain_of(model: nn.Module, layers: list) -> Optional[nn.Sequential]:
    """The plain nn.Sequential (no forward of its own) whose direct children all of `layers` are."""
    for module in model.modules():
        if type(module).forward is nn.Sequential.forward and isinstance(module, nn.Sequential):
            children = [id(child) for child in module.children()]
            if all(id(layer) in children for layer in layers):
                return module
    return None


def checked_forward(model: nn.Module, layers: list, images: torch.Tensor, precision: str) -> list:
    """layer_batches without gradients, in `precision`; UsageError if the model cannot take this size."""
    try:
        with torch.no_grad(), autocast(precision, images.device):
            return layer_batches(model, layers, images)
    except FORWARD_ERRORS as error:  # e.g. a kernel larger than what is left of a small input
        shape = "x".join(map(str, images.shape[1:]))
        raise UsageError(f"the model cannot compute this layer for a {shape} input: change --input_size "
                         f"({one_line(error)})") from None


def not_finite(what: str, precision: str) -> str:
    """The message for activations that are not finite before any optimisation."""
    return (f"the layer's activations for {what} are not finite (NaN or inf) in {precision}: the weights "
            "are unsound or the precision overflows; --lr is not the cause")


def check_model(model: nn.Module, layers: list, size: int, device: torch.device, precision: str) -> dict:
    """Each layer's output for a blank image; UsageError before the work if it cannot run or is not finite."""
    blank = torch.zeros(len(layers), 3, size, size, device=device)
    batches = checked_forward(model, layers, blank, precision)
    if not all(torch.isfinite(output).all() for _, _, output in batches):
        raise UsageError(not_finite("a blank image", precision))
    return {layer: output[:1] for layer, _, output in batches}


def layer_shapes(model: nn.Module, size: int, device: torch.device) -> list:
    """(seed-form name, dotted name, module type, output shape) of every submodule at this input size."""
    named = [(name, module) for name, module in model.named_modules() if name]
    shapes = {}

    def record(module, inputs, output):  # returns None, so the output passes on unchanged
        shapes.setdefault(module, "x".join(map(str, output.shape[1:])) if isinstance(output, torch.Tensor)
                          else type(output).__name__)

    unused = "not run in eval mode"
    try:
        with forward_hooks({module: record for _, module in named}), torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=device))
    except FORWARD_ERRORS:  # the layers before the failure still have their shapes
        unused = f"not reached: the model fails at --input_size {size}"
    return [(seed_form(name), name, type(module).__name__, shapes.get(module, unused))
            for name, module in named]


# ---------------------------------------------------------------- surrogate gradients


class SurrogateBackward(torch.autograd.Function):
    """A ReLU's or max-pool's own output, with a leaky ReLU's or average pool's gradient where `mask` is 1."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, output: torch.Tensor, mask, relu: bool, extra):
        # mask: Nx1... or True (every row); extra: a ReLU6's upper bound (a ReLU's None), or a max-pool's
        # kernel, stride, padding and ceil_mode (an adaptive one's None)
        ctx.save_for_backward(output if relu else inputs, *([mask] if isinstance(mask, torch.Tensor) else []))
        ctx.relu, ctx.extra = relu, extra
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved, *mask = ctx.saved_tensors
        if ctx.relu and ctx.extra is None and not mask:  # one fused pass instead of three
            leaky = torch.ops.aten.leaky_relu_backward(grad, saved, SURROGATE_LEAK, True)
            return leaky, None, None, None, None
        if ctx.relu:  # ReLU6 passes the gradient only below 6
            passing = saved > 0 if ctx.extra is None else (saved > 0) & (saved < ctx.extra)
            slope = SURROGATE_LEAK * (mask[0].to(grad.dtype) if mask else 1.0)
            return torch.where(passing, grad, grad * slope), None, None, None, None
        smooth = grad * mask[0].to(grad.dtype) if mask else grad
        if ctx.extra is None:  # adaptive
            averaged = torch.ops.aten._adaptive_avg_pool2d_backward(smooth, saved)
        else:  # max-pool padding is never the maximum, so the average leaves it out too
            averaged = torch.ops.aten.avg_pool2d_backward(smooth, saved, *ctx.extra, False, None)
        return averaged, grad - smooth if mask else None, None, None, None


def as_pair(value) -> tuple:
    """A pooling argument as an (height, width) pair."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class Surrogate:
    """For the rows that ask, leaky-ReLU and average-pool gradients below their layer; forward values kept."""
    # ReLUs run out of place meanwhile, since the leak needs their inputs; F.relu in a forward is not a module

    def __init__(self, model: nn.Module, own: bool = False):
        self.own = own  # the layer's own ReLU too: a unit to maximise must not start dead
        self.relus = [module for module in model.modules() if isinstance(module, (nn.ReLU, nn.ReLU6))]
        self.pools = [module for module in model.modules() if isinstance(module, nn.AdaptiveMaxPool2d)
                      or isinstance(module, nn.MaxPool2d) and as_pair(module.dilation) == (1, 1)]
        self.inplace = [module.inplace for module in self.relus]
        self.alive = []  # the positions of the rows in the batch as it reaches each module (layer_batches')
        self.layers, self.asking, self.key, self.masks = [], [], None, {}

    def __enter__(self) -> "Surrogate":
        self.hooks = forward_hooks({module: self.hook for module in self.relus + self.pools})
        self.hooks.__enter__()
        return self

    def __exit__(self, *exception) -> None:
        self.hooks.__exit__(*exception)
        for module, inplace in zip(self.relus, self.inplace):
            module.inplace = inplace

    def use(self, layers: list, asking: list) -> None:
        """From now on, the rows of the forward pass have these layers, and these ask for the surrogate."""
        key = (*map(id, layers), *asking)  # few over a call: rows only ever stop, and stages only end
        if key != self.key:
            self.layers, self.asking, self.key = layers, asking, key
            for module, inplace in zip(self.relus, self.inplace):
                module.inplace = inplace and not any(asking)

    def mask(self, module: nn.Module, device: torch.device, dimensions: int):
        """Which rows at `module` take the surrogate: an Nx1... 0/1 tensor, True for all or None; cached."""
        key = (module, dimensions, tuple(self.alive), self.key)
        if key not in self.masks:
            taking = [self.asking[row] and (self.own or self.layers[row] is not module) for row in self.alive]
            self.masks[key] = None if not any(taking) else True if all(taking) else \
                torch.tensor(taking, device=device).view(-1, *[1] * (dimensions - 1))
        return self.masks[key]

    def hook(self, module: nn.Module, inputs: tuple, output):
        if isinstance(output, tuple) or not (torch.is_grad_enabled() and True in self.asking):
            return None  # a tuple: return_indices, left as it is
        mask = self.mask(module, output.device, output.dim())
        if mask is None:
            return None
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            return SurrogateBackward.apply(inputs[0], output, mask, True,
                                           6.0 if isinstance(module, nn.ReLU6) else None)
        pool = None if isinstance(module, nn.AdaptiveMaxPool2d) else (
            as_pair(module.kernel_size), as_pair(module.stride or module.kernel_size),
            as_pair(module.padding), module.ceil_mode)
        return SurrogateBackward.apply(inputs[0], output, mask, False, pool)


# ---------------------------------------------------------------- losses


def per_row(values: torch.Tensor) -> torch.Tensor:
    """Each row's sum in one op, added in float64 so that a batch's summing order does not show in fp32."""
    wide = torch.float32 if values.device.type == "mps" else torch.float64  # MPS has no float64
    return values.flatten(1).sum(1, dtype=wide).float()


def alpha_prior(image: torch.Tensor, alpha: float) -> torch.Tensor:
    """The seed's alpha-norm prior sum(|x|^alpha), taken over every value of each row."""
    return per_row(image.abs().pow(alpha))


def pixel_norm_prior(image: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's alpha-norm prior sum_ij ||x_ij||^alpha, over each pixel's RGB norm, per row."""
    return per_row(image.square().sum(dim=1).clamp_min(1e-12).pow(alpha / 2))


def tv_prior(image: torch.Tensor, beta: float) -> torch.Tensor:
    """Total variation sum((dx^2 + dy^2)^(beta/2)) per row, differences taken horizontally and vertically."""
    dx = image[..., :, 1:] - image[..., :, :-1]
    dy = image[..., 1:, :] - image[..., :-1, :]
    if beta == 2:  # the common case, in a third of the time
        return per_row(dx.square()) + per_row(dy.square())
    squares = nn.functional.pad(dx.square(), (1, 0, 0, 0)) + nn.functional.pad(dy.square(), (0, 0, 1, 0))
    # the clamp keeps the gradient finite where both differences are 0 and beta < 2
    return per_row(squares.clamp_min(1e-12).pow(beta / 2))


class PaperPriors(torch.autograd.Function):
    """The paper's weighted alpha-norm and TV (beta 2, as <x, Lx>) per row, gradient written out."""

    @staticmethod
    def forward(ctx, pixels: torch.Tensor, alpha: float, alpha_weight: float = 1.0, tv_weight: float = 1.0):
        squares = pixels.square().sum(dim=1, keepdim=True).clamp_min(1e-12)
        powered = squares.pow(alpha / 2 - 1)
        # the Laplacian ignores a constant, and without each channel's mean <x, Lx> cancels far less
        centred = pixels - pixels.mean(dim=(-2, -1), keepdim=True)
        edged = nn.functional.pad(centred, (1, 1, 1, 1), mode="replicate")  # a border adds no difference
        # 4x less its four neighbours: by slices, since a CPU's 3x3 convolution of one channel is slower
        laplacian = 4 * centred - (edged[..., :-2, 1:-1] + edged[..., 2:, 1:-1] + edged[..., 1:-1, :-2]
                                   + edged[..., 1:-1, 2:])
        ctx.save_for_backward(pixels, powered, laplacian)
        ctx.scales = alpha * alpha_weight, 2 * tv_weight
        return per_row(powered * squares) * alpha_weight, per_row(centred * laplacian) * tv_weight

    @staticmethod
    def backward(ctx, alpha_grad: torch.Tensor, tv_grad: torch.Tensor):
        pixels, powered, laplacian = ctx.saved_tensors
        # d/dx ||x||^alpha = alpha ||x||^(alpha - 2) x, and d/dx <x, Lx> = 2 Lx
        alpha_scale, tv_scale = ctx.scales
        return torch.addcmul(laplacian * (tv_scale * tv_grad).view(-1, 1, 1, 1), pixels * powered,
                             (alpha_scale * alpha_grad).view(-1, 1, 1, 1)), None, None, None


@functools.lru_cache(maxsize=None)
def paper_scale(device: torch.device) -> torch.Tensor:
    """255 * std per channel, as a 1x3x1x1 tensor on `device`: made once, not every iteration."""
    return (255 * torch.tensor(IMAGENET_STD, device=device)).view(1, 3, 1, 1)


def to_paper_units(image: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised pixels -> the paper's mean-subtracted 0-255 pixels: x * 255 * std."""
    return image * paper_scale(image.device)


def data_term(features, targets, weights, mask=None, project: bool = False) -> torch.Tensor:
    """Each row's weighted ||features - target||^2 or, projecting, -<features, target>, over `mask`."""
    features = features if mask is None else features * mask
    if project:  # caricature and maximize: the target is a direction
        return -per_row(features * targets) * weights
    squares = nn.functional.mse_loss(features, targets, reduction="none")  # one kernel, both ways
    return per_row(squares) * weights


def prior_terms(settings: Settings, images, pixels=None) -> dict:
    """Each row's weighted alpha_loss and tv_loss: the seed's, or the paper's over `pixels` if given."""
    if settings.objective == "seed":
        return {"alpha_loss": settings.lambda_alpha * alpha_prior(images, settings.alpha),
                "tv_loss": settings.lambda_tv * tv_prior(images, settings.beta)}
    pixels = to_paper_units(images) if pixels is None else pixels
    area = images.shape[-2] * images.shape[-1]
    weights = settings.lambda_alpha / (area * PAPER_B ** settings.alpha), \
        settings.lambda_tv / (area * PAPER_V ** settings.beta)
    if settings.beta == 2:  # the weights' products inside: two ops fewer each way
        alpha_loss, tv_loss = PaperPriors.apply(pixels, settings.alpha, *weights)
    else:
        alpha_loss = pixel_norm_prior(pixels, settings.alpha) * weights[0]
        tv_loss = tv_prior(pixels, settings.beta) * weights[1]
    return {"alpha_loss": alpha_loss, "tv_loss": tv_loss}


def box_factor(pixels: torch.Tensor) -> torch.Tensor:
    """Per pixel of images in the paper's 0-255 units, the factor that shrinks an RGB norm above 2B to 2B."""
    # not linalg.vector_norm: over the channels of an NCHW tensor, a CPU takes 200 times longer
    return torch.rsqrt((pixels.square().sum(dim=1, keepdim=True) / (2 * PAPER_B) ** 2).clamp_min(1.0))


# ---------------------------------------------------------------- image parameterisations


def initial_noise(objective: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """The starting noise: the seed's 1e-3 * N(0, 1), or the paper's uniform noise of norm about B."""
    if objective == "seed":
        return 1e-3 * torch.randn(shape, generator=generator)
    noise = 2 * torch.rand(shape, generator=generator) - 1
    # the authors' code scales so that the 95th percentile becomes B / sqrt(3)
    noise *= PAPER_B / math.sqrt(3) / noise.flatten().quantile(0.95)
    return noise / to_paper_units(torch.ones(1, 3, 1, 1))


def fft_size(length: int) -> int:
    """The smallest length >= `length` with no prime factor above 7, for which FFTs are fast."""
    size = length
    while True:
        rest = size
        for prime in (2, 3, 5, 7):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return size
        size += 1


class PixelImage:
    """Images as they are: each pixel a free variable, projected into the box after each step."""

    def __init__(self, size: tuple, device: torch.device, objective: str):
        self.size, self.device, self.objective, self.boxed = size, device, objective, objective == "paper"

    def initial(self, generator: torch.Generator, start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A new 1x3xHxW variable: the objective's starting noise, or the normalised image `start`."""
        if start is not None:  # and the seed's faint noise, so that samples differ
            return (start.detach() + initial_noise("seed", start.shape, generator).to(start)).requires_grad_()
        return initial_noise(self.objective, (1, 3, *self.size), generator).to(self.device).requires_grad_()

    def render(self, variables: torch.Tensor) -> tuple:
        """The normalised images of a batch of variables, and None for their paper-unit pixels."""
        return variables, None

    @torch.no_grad()
    def after_step(self, variable: torch.Tensor) -> None:
        """Project the pixels back into the paper's box."""
        if self.boxed:
            variable.mul_(box_factor(to_paper_units(variable)))


class FourierImage:
    """lucent's decorrelated-colour spectrum scaled by 1/frequency, on a canvas of FFT-fast sides."""
    # sides with no prime factor above 7 (227 becomes 240), the image its top-left corner

    def __init__(self, size: tuple, device: torch.device, objective: str):
        self.size, self.device, self.boxed = size, device, objective == "paper"
        self.canvas = tuple(fft_size(length) for length in size)
        frequency_y = torch.fft.fftfreq(self.canvas[0], device=device)[:, None]
        frequency_x = torch.fft.rfftfreq(self.canvas[1], device=device)[None, :]
        frequency = (frequency_y.square() + frequency_x.square()).sqrt()
        self.scale = 1 / frequency.clamp_min(1 / max(self.canvas))
        colour = torch.tensor(COLOUR_CORRELATION_SQRT, device=device)
        self.paper_colour = (255 * colour / colour.norm(dim=0).max())[:, :, None, None]  # to 0-255 units

    def initial(self, generator: torch.Generator, start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A faint random spectrum, plus the one that renders `start`; real, imaginary last."""
        faint = 0.01 * torch.randn(1, 3, *self.scale.shape, 2, generator=generator).to(self.device)
        if start is None:
            return faint.requires_grad_()
        colour = self.paper_colour[:, :, 0, 0]  # render's steps undone: colour, crop, spectrum and scale
        decorrelated = torch.linalg.solve(colour, to_paper_units(start.float()).flatten(2))
        (height, width), (canvas_height, canvas_width) = self.size, self.canvas
        canvas = nn.functional.pad(decorrelated.unflatten(2, self.size), (0, canvas_width - width, 0,
                                                                          canvas_height - height))
        spectrum = torch.fft.rfftn(canvas, dim=(-2, -1), norm="ortho") / self.scale
        return (torch.view_as_real(spectrum) + faint / 10).requires_grad_()  # a tenth: about 2 % of a photo

    def render(self, variables: torch.Tensor) -> tuple:
        """The normalised images of a batch of variables, and their pixels in the paper's units."""
        spectrum = torch.view_as_complex(variables) * self.scale
        canvas = torch.fft.irfftn(spectrum, s=self.canvas, dim=(-2, -1), norm="ortho")
        decorrelated = canvas if self.canvas == self.size else canvas[..., :self.size[0], :self.size[1]]
        # colour, in the paper's units: a broadcast product and a sum (a 1x1 convolution is one op, but
        # ten times slower each way on a CPU; an einsum dispatches about eight)
        pixels = (self.paper_colour * decorrelated[:, None]).sum(2)
        if self.boxed:  # the box as part of the image's definition: cheaper than a projection, two FFTs
            pixels = pixels * box_factor(pixels)
        return pixels / paper_scale(pixels.device), pixels

    def after_step(self, variable: torch.Tensor) -> None:
        """Nothing: the box is part of rendering."""


PARAMETERISATIONS = {"pixel": PixelImage, "fft": FourierImage}


# ---------------------------------------------------------------- inversion


class Inversion(NamedTuple):
    """What invert() returns: images, and per row its losses, iterations, why it stopped, its settings."""

    images: torch.Tensor
    losses: list  # per row: rec_loss, alpha_loss, tv_loss and feature_error of the returned image
    iterations: list  # per row; for a row that diverged, the iteration whose loss was not finite
    stopped: list  # per row: "epochs" (all ran), "plateau", "interrupted" (Ctrl-C) or "diverged"
    settings: Settings
    layer_settings: list  # per row: the jitter, C, plateau, surrogate, decays and rate its layer decided


class Descent:
    """SGD with momentum, or Adam (beta1 --momentum), with a rate per row: torch's take only one."""

    def __init__(self, settings: Settings, variable: torch.Tensor):
        self.adam, self.momentum = settings.optimizer == "adam", settings.momentum
        self.variable, self.steps = variable, 0
        self.average, self.squares = torch.zeros_like(variable), torch.zeros_like(variable)
        self.rates, self.key = None, None  # each row's rate, a number or a tensor, made from the list `key`
        self.largest = torch.finfo(variable.dtype).max  # a rate beyond it makes the step diverge, not raise

    def set_rates(self, rates: list) -> None:
        """Each row's rate from now on: a number while all are the same, else a tensor, made on change."""
        if rates != self.key:
            self.key, shape = rates, (-1, *[1] * (self.variable.dim() - 1))
            self.rates = float(rates[0]) if len(set(rates)) == 1 else \
                torch.tensor(rates, device=self.variable.device).view(shape)

    @torch.no_grad()
    def step(self, rows: Optional[torch.Tensor] = None) -> None:
        """One update of each row in use (`rows`, or all) by its gradient; the others keep their state."""
        self.steps, rates, denominator = self.steps + 1, self.rates, None
        state = [self.variable, self.variable.grad, self.average, self.squares]
        variable, gradient, average, squares = state if rows is None else [part[rows] for part in state]
        if self.adam:  # torch's Adam, its two bias corrections folded into the rate and epsilon
            average.lerp_(gradient, 1 - self.momentum)
            squares.mul_(ADAM_BETA2).addcmul_(gradient, gradient, value=1 - ADAM_BETA2)
            corrected = math.sqrt(1 - ADAM_BETA2 ** self.steps)
            rates = rates * corrected / (1 - self.momentum ** self.steps)
            denominator = squares.sqrt().add_(ADAM_EPSILON * corrected)
        else:
            average.mul_(self.momentum).add_(gradient)
        if not isinstance(rates, float):
            variable.sub_(rates * average if denominator is None else rates * average / denominator)
        elif denominator is None:  # one rate for all: one op
            variable.add_(average, alpha=-min(rates, self.largest))
        else:
            variable.addcdiv_(average, denominator, value=-min(rates, self.largest))
        if rows is not None:
            self.variable[rows], self.average[rows], self.squares[rows] = variable, average, squares


def autocast(precision: str, device: torch.device):
    """A context that runs the forward pass in `precision` (fp32, bf16 or fp16)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def reference_features(model: nn.Module, layers: list, references: torch.Tensor, precision: str,
                       activations: Optional[torch.Tensor] = None) -> list:
    """Per layer, (the layer, its rows, their fp32 activations or `activations`); RowError where unsound."""
    targets = [(layer, rows, batch.float())
               for layer, rows, batch in checked_forward(model, layers, references, precision)]
    if activations is not None:  # activations from elsewhere, in place of the references'
        targets = [(layer, rows, fitted(activations, target)[rows].to(target))
                   for layer, rows, target in targets]
    return refuse_unsound(targets, precision)


def fitted(activations: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Saved activations batched as the layer's `output`; UsageError naming both shapes where they misfit."""
    batched = activations[None] if activations.dim() == output.dim() - 1 else activations
    if batched.dim() != output.dim() or batched.shape[1:] != output.shape[1:]:
        saved = activations.shape[1:] if activations.dim() == output.dim() else activations.shape
        shapes = ["x".join(map(str, shape)) or "one number" for shape in (saved, output.shape[1:])]
        raise UsageError(f"the saved activations are {shapes[0]}, but the layer gives {shapes[1]} at this "
                         "input size")
    return batched


def refuse_unsound(targets: list, precision: str) -> list:
    """`targets` (layer, rows, activations) as they are; RowError for rows not finite or all zero."""
    reasons = {}
    for _, rows, target in targets:
        finite, nonzero = torch.isfinite(target).flatten(1).all(1).tolist(), target.flatten(1).any(1).tolist()
        reasons.update({row: not_finite("this photo", precision) for row, ok in zip(rows, finite) if not ok})
        reasons.update({row: "the layer's activations for this photo are all zero: there is nothing to invert"
                        for row, ok, any_ in zip(rows, finite, nonzero) if ok and not any_})
    if reasons:
        raise RowError(reasons)
    return targets


def layer_stride(input_shape: Sequence[int], output: torch.Tensor) -> int:
    """How many input pixels one step of the layer's grid spans: the input's side over the grid's, a
    map's (N, C, H, W, or channels last as Swin's) or a token sequence's (a ViT's (N, tokens, width),
    less a class token where the rest make a square); the whole input for a layer without a grid,
    and 1 for a layer larger than its input."""
    side = output.shape[-2] if output.dim() == 4 else grid_side(output.shape[1]) if output.dim() == 3 else 1
    return max(1, input_shape[-2] // side)  # the maps are square: the second-last side is theirs either way


def grid_side(tokens: int) -> int:
    """The side of a token sequence's grid: less a class token where the rest make a square."""
    return math.isqrt(tokens - 1 if tokens > 1 and math.isqrt(tokens - 1) ** 2 == tokens - 1 else tokens)


def as_grid(tensor: torch.Tensor) -> torch.Tensor:
    """A layer's output as N x C x H x W, a view: maps (channels last too, as Swin's), tokens (N, T, D) on
    their grid (less a class token), and a vector as a 1x1 grid."""
    if tensor.dim() == 3:
        side = grid_side(tensor.shape[1])
        return tensor[:, tensor.shape[1] - side * side:].unflatten(1, (side, side)).permute(0, 3, 1, 2)
    if tensor.dim() == 4 and tensor.shape[1] == tensor.shape[2] != tensor.shape[3]:  # square maps, C last
        return tensor.permute(0, 3, 1, 2)
    return tensor if tensor.dim() == 4 else tensor.flatten(1)[:, :, None, None]


def part_mask(output: torch.Tensor, window: int, channels: str) -> Optional[torch.Tensor]:
    """1 where the layer's output counts in the data term (--window, --channels), 0 elsewhere; None: all."""
    if not window and channels == "all":
        return None
    mask, grid = torch.zeros_like(output[:1]), as_grid(output[:1])
    count, (height, width) = grid.shape[1], grid.shape[-2:]
    low, high = (0, count) if channels == "all" else map(int, channels.split(":"))
    if high > count:
        raise UsageError(f"--channels {channels}: the layer has {count} channels")
    if window > min(height, width):
        raise UsageError(f"--window {window}: the layer's grid is {height}x{width}")
    top, left = (height - window) // 2, (width - window) // 2
    inside = (slice(top, top + window), slice(left, left + window)) if window else (slice(None), slice(None))
    as_grid(mask)[(slice(None), slice(low, high), *inside)] = 1
    return mask


def unit_directions(output: torch.Tensor, units: list, scope: str) -> torch.Tensor:
    """Per row, 1 at its unit (a channel's centre neuron, or the whole channel) of the layer, 0 elsewhere."""
    directions, count = torch.zeros_like(output), as_grid(output).shape[1]
    for row, unit in enumerate(units):
        if not 0 <= unit < count:
            raise UsageError(f"--units {unit}: the layer has {count} units (channels), 0 to {count - 1}")
        grid = as_grid(directions[row:row + 1])[:, unit]
        middle = (grid.shape[-2] // 2, grid.shape[-1] // 2)
        grid[(slice(None), *middle) if scope == "neuron" else slice(None)] = 1
    return directions


def receptive_field(model: nn.Module, layer: nn.Module, size: int, settings: Settings,
                    device: torch.device) -> list:
    """[left, top, right, bottom) of the input pixels that the window's activations depend on, from their
    gradient, with leaky ReLUs and average pools so that every path that can carry one does."""
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with Surrogate(model, own=True) as surrogate, torch.enable_grad():
        images.requires_grad_()
        surrogate.use([layer] * 2, [True] * 2)
        (_, _, output), = layer_batches(model, [layer] * 2, images, surrogate.alive)
        mask = part_mask(output, settings.window, settings.channels)
        gradient, = torch.autograd.grad((output.float() * mask).sum(), images)
    reached = gradient.abs().sum((0, 1)) > 0
    if not reached.any():
        raise UsageError("the window's activations do not depend on the input: no receptive field to draw")
    rows, columns = (reached.any(dim).nonzero()[:, 0].tolist() for dim in (1, 0))
    return [columns[0], rows[0], columns[-1] + 1, rows[-1] + 1]


def layer_settings(settings: Settings, stride: int) -> dict:
    """A row's jitter, C, plateau, surrogate, decays and rate where its layer's stride decides them."""
    return {"jitter": max(1, round(stride / 4)) - 1 if settings.jitter == "auto" else settings.jitter,
            "C": settings.C if settings.C != "auto" else MAXIMIZE_C if settings.task == "maximize" else
            PAPER_C * min(1.0, FULL_C_STRIDE / stride) ** 2,
            "plateau": settings.plateau if stride <= PLATEAU_STRIDE else 0.0,
            "surrogate": settings.surrogate == "on", "decay_epochs": decay_iterations(settings),
            "lr": AUTO_LR * (0.5 if stride >= AUTO_LR_STRIDE else 1.0) if settings.lr == "auto"
            else settings.lr}


def in_order(parts: list, rows: list) -> torch.Tensor:
    """Join tensors of rows listed part by part (`rows`: each part's rows), in the rows' order."""
    joined = torch.cat(parts) if len(parts) > 1 else parts[0]
    listed = tuple(row for part in rows for row in part)
    return joined if listed == tuple(sorted(listed)) else joined[permutation(listed, joined.device)]


@functools.lru_cache(maxsize=None)
def permutation(listed: tuple, device: torch.device) -> torch.Tensor:
    """The index that sorts `listed`, on `device`: made once, since a copy to a GPU waits for it."""
    return torch.tensor(sorted(range(len(listed)), key=listed.__getitem__), device=device)


class Targets:
    """Each layer's rows, targets (or directions), weights and mask; the data terms of the rows in use."""

    def __init__(self, model: nn.Module, layers: list, references: torch.Tensor, settings: Settings,
                 units: Optional[list] = None, activations: Optional[torch.Tensor] = None):
        self.layers, self.project = layers, settings.task != "invert"
        self.by_layer, self.row_settings, self.photo = {}, [None] * len(layers), [{} for _ in layers]
        for layer, rows, target in reference_features(model, layers, references, settings.precision,
                                                      activations):
            chosen = layer_settings(settings, layer_stride(references.shape, target))
            mask = part_mask(target, settings.window, settings.channels)
            if settings.task != "maximize":
                data = target if mask is None else target * mask
                squares = per_row(data.square())
                if not squares.all():  # a window or channel group where this photo has nothing
                    raise RowError({row: "the activations in --window/--channels are all zero for this "
                                    "photo: there is nothing to invert there"
                                    for row, ok in zip(rows, squares.tolist()) if not ok})
                weights = chosen["C"] / squares  # C / ||target||^2
            else:  # the unit, weighed by the photo's typical activation
                data = unit_directions(target, [units[row] for row in rows], settings.unit_scope)
                typical = (per_row(target.square()) / target[0].numel()).sqrt()
                weights = chosen["C"] / (per_row(data) * typical)
                best = [as_grid(target)[index, units[row]].max().item() for index, row in enumerate(rows)]
                for row, value, scale, most in zip(rows, (per_row(target * data) / per_row(data)).tolist(),
                                                   typical.tolist(), best):  # the photo's, where the unit is
                    self.photo[row].update(photo_activation=value, typical=scale, photo_max=most)
            self.by_layer[layer] = (rows, data, weights, mask)
            for row in rows:
                self.row_settings[row] = chosen
        self.views = {}  # each list of rows used -> {layer: (its rows' positions, data, weights, mask)}
        self.use(range(len(layers)))

    def use(self, rows: Sequence[int]) -> None:
        """From now on, compute the feature terms of `rows` alone, in this order."""
        self.rows = list(rows)
        if tuple(self.rows) not in self.views:  # rows only ever stop: a set that holds these is done with
            self.views = {rows: view for rows, view in self.views.items() if not set(rows) > set(self.rows)}
            position, in_use = {row: index for index, row in enumerate(self.rows)}, {}
            for layer, (layer_rows, data, weights, mask) in self.by_layer.items():
                kept = [index for index, row in enumerate(layer_rows) if row in position]
                if kept:
                    in_use[layer] = ([position[layer_rows[index]] for index in kept],
                                     *((data, weights) if len(kept) == len(layer_rows) else
                                       (data[kept], weights[kept])), mask)
            self.views[tuple(self.rows)] = in_use
        self.in_use = self.views[tuple(self.rows)]

    def layers_in_use(self) -> list:
        """The layer of each row in use."""
        return [self.layers[row] for row in self.rows]

    def feature_terms(self, outputs: list) -> torch.Tensor:
        """Each row's weighted data term, from layer_batches' outputs, in the order of self.rows."""
        views = [self.in_use[layer] for layer, _, _ in outputs]
        return in_order([data_term(output.float(), data, weights, mask, self.project)
                         for (_, _, output), (_, data, weights, mask) in zip(outputs, views)],
                        [positions for positions, _, _, _ in views])

    def cosines(self, outputs: list) -> torch.Tensor:
        """Each row's cosine between its activations (in its mask) and its target, as feature_terms'."""
        views = [self.in_use[layer] for layer, _, _ in outputs]
        return in_order([nn.functional.cosine_similarity(
            (output.float() if mask is None else output.float() * mask).flatten(1), data.flatten(1))
            for (_, _, output), (_, data, _, mask) in zip(outputs, views)], [view[0] for view in views])


class Canvases:
    """Rows of one canvas size (input + jitter): one variable, its optimizer, its last finite copy."""
    # each row draws from its own generator, so that it gets what a call of its own would

    def __init__(self, settings: Settings, size: Sequence[int], jitter: int, rows: list, generators: list,
                 device: torch.device, photos: Optional[torch.Tensor] = None):
        self.size, self.jitter, self.members, self.generators = tuple(size), jitter, rows, generators
        self.image = PARAMETERISATIONS[settings.param]((size[0] + jitter, size[1] + jitter), device,
                                                       settings.objective)
        middle = jitter // 2  # a caricature starts from its photo, at the canvas's middle
        framed = photos if photos is None else nn.functional.pad(photos, (middle, jitter - middle) * 2,
                                                                 "replicate")
        starts = [self.image.initial(generators[row], framed if framed is None else framed[row:row + 1])
                  for row in rows]
        starts = [start.detach() for start in starts]
        self.variable = torch.cat(starts).requires_grad_()
        # L-BFGS over one row, max_iter=1: one evaluation per step, so the loop's loss serves as its closure
        self.optimizer = Descent(settings, self.variable) if settings.optimizer != "lbfgs" else \
            torch.optim.LBFGS([self.variable], max_iter=1, history_size=LBFGS_HISTORY)
        self.kept, self.checked = self.variable.detach().clone(), set()  # checked: rows ever found finite
        self.use(rows)

    def use(self, rows: list) -> None:
        """From now on, render and step `rows` alone (a sublist of the members)."""
        self.rows, self.index = rows, None if rows == self.members else self.positions(rows)

    def positions(self, rows: list) -> torch.Tensor:
        """Where `rows` are in the variable, as an index tensor."""
        return torch.tensor([self.members.index(row) for row in rows], device=self.variable.device)

    def render(self, jittering: list) -> tuple:
        """(The images the network sees, cut from their canvases at random offsets where `jittering`, else
        the middle; the whole canvases, normalised and in the paper's units or None) of the rows in use."""
        variable = self.variable if self.index is None else self.variable[self.index]
        whole, pixels = self.image.render(variable)
        if not self.jitter:
            return whole, (whole, pixels)
        (height, width), middle = self.size, self.jitter // 2
        offsets = [torch.randint(0, self.jitter + 1, (2,), generator=self.generators[row]).tolist()
                   if on else (middle, middle) for row, on in zip(self.rows, jittering)]
        crops = [whole[index:index + 1, :, dy:dy + height, dx:dx + width]
                 for index, (dy, dx) in enumerate(offsets)]
        return torch.cat(crops), (whole, pixels)

    def set_rates(self, rates: list) -> None:
        """Each row in use's rate from now on."""
        if isinstance(self.optimizer, Descent):
            self.optimizer.set_rates(rates)
        else:  # L-BFGS, of one row
            self.optimizer.param_groups[0]["lr"] = rates[0]

    def step(self, loss: torch.Tensor) -> None:
        """One update of the rows in use, each by its own loss's gradient (one backward for the group)."""
        self.variable.grad = None
        loss.backward()
        if isinstance(self.optimizer, Descent):
            self.optimizer.step(rows=self.index)
        else:  # L-BFGS, of one row
            self.optimizer.step(lambda: loss)
        self.image.after_step(self.variable)

    @torch.no_grad()
    def current(self) -> torch.Tensor:
        """Every member's current image, the middle of its canvas: a copy."""
        (height, width), middle = self.size, self.jitter // 2
        whole = self.image.render(self.variable)[0]
        return whole[:, :, middle:middle + height, middle:middle + width].clone()

    def check(self, losses: torch.Tensor, total: Optional[torch.Tensor] = None) -> list:
        """Keep the rows in use whose losses are finite, return the others; RowError if never finite."""
        # waits for a GPU: only when due; a finite sum, the common case, in one op
        finite = [True] * len(self.rows) if total is not None and math.isfinite(total.item()) else \
            torch.isfinite(losses).tolist()
        broken = [row for row, ok in zip(self.rows, finite) if not ok]
        if any(row not in self.checked for row in broken):
            raise RowError({row: "the loss is not finite at the start, before any step, so --lr is not the "
                            "cause: the model gives non-finite values for this photo (unsound weights?), "
                            "or a weight such as --C is too large"
                            for row in broken if row not in self.checked})
        good = [row for row, ok in zip(self.rows, finite) if ok]
        self.checked.update(good)
        self.copy(good, self.variable, self.kept)
        return broken

    @torch.no_grad()
    def copy(self, rows: list, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy `rows` from `source` to `target` (the variable and its finite copy): in one op."""
        if rows == self.members:
            target.copy_(source)
        elif rows:
            index = self.positions(rows)
            target[index] = source[index]


def learning_rate(base: float, step: int, first_stage_end: int, settings: Settings) -> float:
    """A row's rate at `step`: `base` through its first stage, then decayed every decay_iterations()."""
    decays = 0 if step <= first_stage_end else 1 + (step - first_stage_end - 1) // decay_iterations(settings)
    return base * settings.decay_factor ** decays


class Schedule:
    """Each row's first stage (jitter, surrogate) ends after first_stage_end[row]; it stops after last."""
    # with --plateau, the first stage ends once the lowest loss has not fallen by that fraction over
    # PLATEAU_WINDOW iterations, and a last stage as long, relative to it, as the paper's follows

    def __init__(self, settings: Settings, chosen: list, device: torch.device):
        self.settings, self.chosen, count = settings, chosen, len(chosen)  # chosen: each row's layer_settings
        self.first_stage_end = [decay_iterations(settings)] * count
        self.last = [settings.epochs] * count
        self.why = ["epochs"] * count  # why each row stops at its last iteration
        self.lowest = torch.full((count,), math.inf, device=device)  # Adam's loss oscillates
        self.before = [None] * count  # each row's lowest loss PLATEAU_WINDOW iterations ago
        self.reached = dict.fromkeys(range(count), 0)  # each row's last iteration run so far

    def rates(self, step: int, rows: list) -> list:
        """The rate of each of `rows` at iteration `step`."""
        return [learning_rate(self.chosen[row]["lr"], step, self.first_stage_end[row], self.settings)
                for row in rows]

    def record(self, step: int, rows: list, losses: torch.Tensor) -> None:
        """Apply the plateau rule at iteration `step`, whose `rows` had `losses` before its update."""
        watched = [index for index, row in enumerate(rows)
                   if self.chosen[row]["plateau"] and step <= self.first_stage_end[row]]
        if not watched:
            return
        positions = torch.tensor([rows[index] for index in watched], device=losses.device)
        self.lowest[positions] = torch.minimum(self.lowest[positions], losses.detach()[watched])
        if step % PLATEAU_WINDOW:
            return
        now = self.lowest.tolist()  # .tolist() waits for a GPU: once a window
        for row in (rows[index] for index in watched):
            if self.before[row] is not None and step < self.first_stage_end[row] and \
                    self.before[row] - now[row] < self.chosen[row]["plateau"] * abs(self.before[row]):
                self.first_stage_end[row] = step
                self.last[row] = min(self.last[row], step + math.ceil(step * (1 - FIRST_STAGE) / FIRST_STAGE))
                self.why[row] = "plateau" if self.last[row] < self.settings.epochs else "epochs"
            self.before[row] = now[row]

    def diverge(self, rows: list, step: int) -> None:
        """Stop `rows`, whose loss was not finite at iteration `step`."""
        for row in rows:
            self.last[row], self.why[row] = min(self.last[row], step), "diverged"

    def outcome(self, row: int) -> tuple:
        """(How many iterations `row` ran, and why it stopped)."""
        if self.why[row] != "diverged" and self.reached[row] < self.last[row]:
            return self.reached[row], "interrupted"
        return self.last[row], self.why[row]


def sample_seed(seed: int, sample: int) -> int:
    """The seed of sample `sample` of a row: --seed, then steps of 2^64 over the golden ratio."""
    return (seed + sample * 0x9E3779B97F4A7C15) % 2 ** 64


def check_references(model: nn.Module, references) -> None:
    """UsageError unless `references` is an Nx3xHxW float tensor of the model's dtype and device."""
    if not isinstance(references, torch.Tensor):
        raise UsageError(f"invert() needs the references as a tensor, got a {type(references).__name__}")
    shape = "x".join(map(str, references.shape))
    if references.dim() != 4:
        hint = "; add a batch dimension: .unsqueeze(0)" if references.dim() == 3 else ""
        raise UsageError(f"invert() needs the references as Nx3xHxW images, got a {references.dim()}-D "
                         f"tensor of shape {shape}{hint}")
    if len(references) == 0 or references.shape[1] != 3:
        raise UsageError(f"invert() needs the references as Nx3xHxW images with at least one row and 3 "
                         f"colour channels, got shape {shape}")
    weight = next(model.parameters(), references)  # a model without parameters takes any float
    kind = (references.dtype, references.device)
    if not references.is_floating_point() or kind != (weight.dtype, weight.device):
        raise UsageError(f"invert() needs references of the model's dtype and device, {weight.dtype} on "
                         f"{weight.device}, normalised as preprocess() makes them: got {references.dtype} on "
                         f"{references.device}")


def invert(model: nn.Module, layers, references: torch.Tensor, settings: Optional[Settings] = None, *,
           callback: Optional[Callable] = None, units=None, activations: Optional[torch.Tensor] = None,
           **overrides) -> Inversion:
    """Optimise one image per row of `references` (N per row with samples=N) to match it at its layer.

    `layers`: one module, or one per row; each row gives what it gives alone. `settings` or its fields as
    keywords; None takes the objective's default. `callback(step, losses, images)`: every iteration's
    terms per row (a stopped row keeps its last) and a function giving the images. Ctrl-C returns early;
    a RowError names the rows that cannot be inverted at all. task="maximize" takes `units`, a channel
    (or one per row); `activations` (N x the layer's output) replace the references' as the targets.
    """
    check_references(model, references)
    settings = resolve(dataclasses.replace(settings or Settings(), **overrides), references.device)
    count, samples = len(references), settings.samples
    repeat = lambda values: None if values is None else [value for value in values for _ in range(samples)]
    layers = [layers] * count if isinstance(layers, nn.Module) else list(layers)
    units = [units] * count if isinstance(units, int) else units
    for name, values in (("layer", layers), ("unit", units), ("activation", activations)):
        if values is not None and len(values) != count:
            raise UsageError(f"invert() needs one {name} for every row of the references (a layer or unit "
                             f"may be one for all): got {len(values)} for {count} rows")
    if (units is None) == (settings.task == "maximize"):
        raise UsageError("task='maximize' needs units (--units), and only it takes them")
    try:
        return optimise_images(model, repeat(layers), references.repeat_interleave(samples, 0), settings,
                               callback, repeat(units),
                               None if activations is None else activations.repeat_interleave(samples, 0))
    except RowError as error:  # told by row of `references`, not by sample
        raise RowError({row // settings.samples: reason for row, reason in error.reasons.items()}) from None


def optimise_images(model: nn.Module, layers: list, references: torch.Tensor, settings: Settings,
                    callback: Optional[Callable], units: Optional[list], activations) -> Inversion:
    """invert()'s loop; rows sharing a canvas size are a group (with L-BFGS, each row one)."""
    device, count = references.device, len(references)
    targets = Targets(model, layers, references, settings, units, activations)
    chosen = targets.row_settings
    # each row's own generator draws what a call of its own would
    generators = [torch.Generator().manual_seed(sample_seed(settings.seed, row % settings.samples))
                  for row in range(count)]
    groups = {}
    for row, key in enumerate(range(count) if settings.optimizer == "lbfgs" else
                              [row["jitter"] for row in chosen]):
        groups.setdefault(key, []).append(row)
    photos = references if settings.task == "caricature" else None  # a caricature starts from its photo
    canvases = [Canvases(settings, references.shape[-2:], chosen[rows[0]]["jitter"], rows, generators, device,
                         photos) for rows in groups.values()]
    members = [group.members for group in canvases]
    schedule, latest = Schedule(settings, chosen, device), {}
    with Surrogate(model, settings.task == "maximize") as surrogate, contextlib.suppress(KeyboardInterrupt):
        for step in range(1, settings.epochs + 1):
            ran = [iteration(model, settings, targets, group, schedule, surrogate, step)
                   for group in canvases]
            ran = [(rows, terms) for rows, terms in ran if rows]
            if not ran:
                break
            if callback is not None:
                rows, parts = [row for rows, _ in ran for row in rows], [terms for _, terms in ran]
                terms = parts[0] if len(parts) == 1 else {name: torch.cat([part[name] for part in parts])
                                                          for name in parts[0]}
                callback(step, record_latest(latest, terms, rows, count),
                         lambda: in_order([group.current() for group in canvases], members))
    return final_result(model, settings, targets, canvases, schedule)


def iteration(model: nn.Module, settings: Settings, targets: Targets, canvases: Canvases, schedule: Schedule,
              surrogate: Surrogate, step: int) -> tuple:
    """One group's iteration `step`; (its rows that ran, their terms), or ([], None) if none did."""
    rows = [row for row in canvases.members if step <= schedule.last[row]]
    if not rows:
        return [], None
    if rows != targets.rows or rows != canvases.rows:  # rows that have stopped cost nothing more
        canvases.use(rows)
        targets.use(rows)
    first = [step <= schedule.first_stage_end[row] for row in rows]  # jitter and surrogate gradients
    canvases.set_rates(schedule.rates(step, rows))
    surrogate.use(targets.layers_in_use(), [on and schedule.chosen[row]["surrogate"]
                                            for row, on in zip(rows, first)])
    terms = evaluate(model, settings, targets, canvases, first, surrogate.alive)[1]
    losses = terms["rec_loss"] + terms["alpha_loss"] + terms["tv_loss"]
    total = losses.sum()
    check_every = 1 if total.device.type == "cpu" else GPU_CHECK_EVERY
    due = step == 1 or step % check_every == 0 or any(step == schedule.last[row] for row in rows)
    broken = canvases.check(losses, total) if due else []
    canvases.step(total)
    schedule.reached.update(dict.fromkeys(rows, step))
    canvases.copy(broken, canvases.kept, canvases.variable)
    schedule.record(step, rows, losses)
    schedule.diverge(broken, step)  # after the plateau rule, which must not make it a plateau
    return rows, terms


def evaluate(model: nn.Module, settings: Settings, targets: Targets, canvases: Canvases, jittering: list,
             alive: Optional[list] = None) -> tuple:
    """Render, forward, weigh: (the images the network saw, each term per row, the layers' outputs)."""
    images, (whole, pixels) = canvases.render(jittering)
    with autocast(settings.precision, images.device):
        outputs = layer_batches(model, targets.layers_in_use(), images, alive)
    terms = {"rec_loss": targets.feature_terms(outputs), **prior_terms(settings, whole, pixels)}
    return images, terms, outputs


def record_latest(latest: dict, terms: dict, rows: list, count: int) -> dict:
    """Each term's latest value for every row, this iteration's for `rows`, as new tensors."""
    if rows == list(range(count)):  # every row ran, in order: this iteration's terms, new
        latest.update({name: values.detach() for name, values in terms.items()})
        return dict(latest)
    for name, values in terms.items():
        kept = latest[name].clone() if name in latest else \
            torch.full((count,), math.nan, device=values.device)
        kept[rows] = values.detach()
        latest[name] = kept
    return dict(latest)


def task_measures(task: str, rec_loss: float, C: float, photo: dict) -> dict:
    """What a row's task reports from its data term: the feature error, projection, or unit's activation."""
    if task == "invert":  # over the window and channels that count
        return {"feature_error": rec_loss / C}
    if task == "caricature":  # <phi(x), phi0> / ||phi0||^2
        return {"projection": -rec_loss / C}
    return {"unit_activation": -rec_loss * photo["typical"] / C, "layer_rms": photo["typical"],
            "photo_activation": photo["photo_activation"], "photo_max": photo["photo_max"]}


@torch.no_grad()
def final_result(model, settings: Settings, targets: Targets, canvases: list, schedule: Schedule
                 ) -> Inversion:
    """Every row's image at its canvas's middle, its losses and outcome; a last broken step undone."""
    images, terms = [], []
    for group in canvases:
        group.use(group.members)
        targets.use(group.members)
        for _ in range(2):
            seen, values, outputs = evaluate(model, settings, targets, group, [False] * len(group.members))
            broken = group.check(values["rec_loss"] + values["alpha_loss"] + values["tv_loss"])
            group.copy(broken, group.kept, group.variable)
            for row in broken:
                schedule.diverge([row], schedule.reached[row])
            if not broken:
                break
        if settings.task == "caricature":
            values["cosine"] = targets.cosines(outputs)
        images.append(seen)
        terms.append(values)
    members = [group.members for group in canvases]
    final = {name: in_order([values[name] for values in terms], members).tolist() for name in terms[0]}
    losses = [{**{name: values[row] for name, values in final.items()},
               **task_measures(settings.task, final["rec_loss"][row], targets.row_settings[row]["C"],
                               targets.photo[row])} for row in range(len(targets.row_settings))]
    outcomes = [schedule.outcome(row) for row in range(len(targets.row_settings))]
    return Inversion(in_order(images, members).detach().clone(), losses, [done for done, _ in outcomes],
                     [why for _, why in outcomes], settings, targets.row_settings)


# ---------------------------------------------------------------- planning: launchers, photos, names


def launcher_int(name: str, least: int = 0) -> Optional[int]:
    """Environment variable `name` as an integer >= `least`, None if unset."""
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"the environment variable {name}={text!r} is not an integer") from None
    if value < least:
        raise UsageError(f"the environment variable {name}={value} is below {least}")
    return value


def pick_device(spec: str) -> torch.device:
    """--device as a torch.device that exists here; under torchrun, auto is cuda:$LOCAL_RANK."""
    local = launcher_int("LOCAL_RANK")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        spec += f":{local}" if spec == "cuda" and local is not None else ""
    present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    try:
        device = torch.device(spec)
        assert device.type in present
    except (RuntimeError, AssertionError):
        raise UsageError(f"--device {spec!r} is not supported: use auto, cpu, cuda, cuda:N or mps") from None
    if not present[device.type] or device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}" + (" (from LOCAL_RANK)" if local is not None else "") +
                         f": no such device here ({torch.cuda.device_count()} CUDA device(s))")
    return device


def shard_of(given: Optional[tuple], photos: int) -> tuple:
    """(K, N): --shard, else a SLURM array task split by torchrun's RANK; one photo is not split."""
    names = [f"SLURM_ARRAY_TASK_{key}" for key in ("ID", "MIN", "MAX", "COUNT", "STEP")]
    task, low, high, count, step = (launcher_int(name, 1 if name.endswith(("COUNT", "STEP")) else 0)
                                    for name in names)
    world, rank, local = launcher_int("WORLD_SIZE", 1), launcher_int("RANK"), launcher_int("LOCAL_RANK")
    part, parts, present = 0, 1, [name for name, value in zip(names, (task, low, high, count, step))
                                if value is not None]
    if present:
        if task is None or low is None or (high is None and count is None):
            lacking = "ID" if task is None else "MIN" if low is None else "COUNT"
            raise UsageError(f"the environment variable SLURM_ARRAY_TASK_{lacking} is not set, but "
                             f"{present[0]} is: SLURM sets SLURM_ARRAY_TASK_ID, _MIN, _MAX, _COUNT and _STEP")
        step = step or 1
        parts = count if high is None else (high - low) // step + 1
        if parts < 1:
            raise UsageError(f"SLURM_ARRAY_TASK_MAX={high} is below SLURM_ARRAY_TASK_MIN={low}")
        if count not in (None, parts):
            raise UsageError(f"SLURM_ARRAY_TASK_COUNT={count}, but _MIN={low}, _MAX={high} and _STEP={step} "
                             f"make {parts} tasks: split photos with --array=0-{count - 1}, or --shard")
        part = (task - low) // step
        if (task - low) % step or not 0 <= part < parts:
            raise UsageError(f"SLURM_ARRAY_TASK_ID={task} is not one of the array's tasks ({low} to "
                             f"{low + (parts - 1) * step}, step {step})")
    if (world is None) != (rank is None) or (local is not None and world is None):
        have = "WORLD_SIZE" if world is not None else "RANK" if rank is not None else "LOCAL_RANK"
        lacking = "RANK" if have == "WORLD_SIZE" else "WORLD_SIZE"
        raise UsageError(f"the environment variable {lacking} is not set, but {have} is: torchrun sets "
                         "RANK, WORLD_SIZE and LOCAL_RANK together")
    for name, value in (("RANK", rank), ("LOCAL_RANK", local)):
        if value is not None and value >= world:
            raise UsageError(f"the environment variable {name}={value} is not below WORLD_SIZE={world}")
    if given:
        return given
    part, parts = (0, 1) if photos < 2 else (part, parts)
    return (part, parts) if world is None else (part * world + rank, parts * world)


def photo_paths(given: Sequence[str]) -> list:
    """The photos named, as absolute paths: files, and folders' files Pillow reads (not hidden or ours)."""
    Image.init()
    readable = {suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN
                and not (isinstance(Image.OPEN[kind][0], type)  # a stub opens nothing without a handler
                         and issubclass(Image.OPEN[kind][0], ImageFile.StubImageFile))}
    paths = []
    for item in given:
        if not os.path.isdir(item):
            paths.append(os.path.abspath(item))
            continue
        inside = [os.path.abspath(os.path.join(item, name)) for name in sorted(os.listdir(item))
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in readable]
        inside = [path for path in inside if os.path.isfile(path) and not ours(path)]
        if not inside:
            raise UsageError(f"--image_path {item} is a folder with no images in it (files ending in "
                             ".jpg, .png, .webp, .tif and the other formats Pillow reads)")
        paths += inside
    return list(dict.fromkeys(paths))


def photo_names(paths: Sequence[str], room: int = 255) -> dict:
    """Each photo's name in its outputs: its file stem; where stems are shared, after the fewest parent
    folders that tell them apart (cats/001.jpg, dogs/001.jpg: cats_001, dogs_001), then with the
    extension (001_jpg, 001_png), else numbered; a name over `room` bytes is cut, and a '~' and 8 hex
    digits of its hash added."""
    names, groups, taken = {}, {}, set()
    for path in paths:
        groups.setdefault(Path(path).stem, []).append(path)
    for stem, group in groups.items():
        folders = [Path(os.path.abspath(path)).parent.parts[1:] for path in group]  # less the root
        for extension, depth in itertools.product((False, True), range(max(map(len, folders)) + 1)):
            tried = ["_".join([*folder[max(0, len(folder) - depth):], stem,
                               *[Path(path).suffix[1:]] * extension]) for path, folder in zip(group, folders)]
            if len(set(tried)) == len(group):
                break
        names.update(zip(group, tried))
    for path in paths:
        name, number = names[path], 1
        while name in taken:
            number += 1
            name = f"{names[path]}_{number}"
        tail = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
        while len(os.fsencode(name)) > room and name != tail:
            name = name[:-len(tail) - 1] + tail
        if len(os.fsencode(name)) > room:
            raise UsageError("--model or --layer_name is too long for the file system's names")
        names[path] = name
        taken.add(name)
    return names


class Row(NamedTuple):
    """One (photo, layer) pair of a job: one image, whose files are its PNG's name with other endings."""

    image_path: str  # or, with --features, the saved activations' file
    layer_name: str
    png: Path
    montage: Optional[Path]  # the photo's montage of its layers, or (maximize) the layer's mosaic of units
    unit: Optional[int] = None  # maximize's

    def file(self, ending: str) -> Path:
        return Path(str(self.png)[:-len(".png")] + ending)

    def sample(self, index: int) -> Path:
        return self.png if index == 0 else self.file(f"_sample{index + 1}.png")


def existing_parent(folder: Path) -> Path:
    """`folder` if it exists, else its nearest parent that does: where a write would create it."""
    return next(parent for parent in (folder, *folder.parents) if parent.exists())


def plan(args: argparse.Namespace) -> list:
    """Every Row of the job, in every shard, photo by photo, after the checks that need no model."""
    paths = [os.path.abspath(args.features)] if args.features else photo_paths(args.image_path)
    layers = list(dict.fromkeys(seed_form(name) for name in args.layer_name))
    if args.units and "all" in args.units and len(args.units) > 1:
        raise UsageError("--units takes unit indices or all, not both")
    units = [None] if args.units is None else list(range(ALL_UNITS)) if args.units == ["all"] else \
        list(dict.fromkeys(int(unit) for unit in args.units))
    if (args.units is None) == (args.task == "maximize"):
        raise UsageError("--task maximize needs --units, and only it takes them")
    if args.features and args.task != "invert":
        raise UsageError("--features works with --task invert: a caricature starts from a photo, and a "
                         "unit's weight comes from one")
    if args.features and (len(layers) > 1 or args.image_path != [str(DEFAULT_IMAGE)]):
        raise UsageError("--features are one layer's activations, in place of a photo: give one --layer_name "
                         "and no --image_path")
    several = len(paths) * len(layers) * len(units) > 1
    if args.output and (several or Path(args.output).suffix.lower() != ".png"):
        raise UsageError("--output names one file: with several layers, images or units, use --output_dir"
                         if several
                         else f"--output {args.output} must end in .png")
    if args.output:
        return [Row(paths[0], layers[0], Path(args.output), None, units[0])]
    folder = Path(args.output_dir)
    existing = existing_parent(folder.absolute())
    try:
        longest = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such call, or a folder that does not say
        longest = 255
    # room for the photo's name beside the longest endings: a sample's, or the diverged image's
    tail = "_caricature" if args.task == "caricature" else f"_unit{max(units)}" if units != [None] else ""
    room = longest - max(len(f"_sample{args.samples}.png"), len(".diverged.png")) - len(
        os.fsencode(f"_{args.model}_{max(layers + ['montage'], key=len)}{tail}"))
    names = photo_names(paths, room)

    task = "_caricature" if args.task == "caricature" else ""  # a unit's name has its _unitN

    def row(path: str, layer: str, unit: Optional[int]) -> Row:
        stem = f"{names[path]}_{args.model}_{layer}{task}"
        mosaic = folder / (f"{stem}_units.png" if unit is not None else
                           f"{names[path]}_{args.model}{task}_montage.png")
        return Row(path, layer, folder / (stem + ("" if unit is None else f"_unit{unit}") + ".png"),
                   mosaic if len(units if unit is not None else layers) > 1 else None, unit)
    return [row(path, layer, unit) for path in paths for layer in layers for unit in units]


def in_shard(rows: list, part: int, parts: int) -> list:
    """The rows of groups part, part + parts, ...: the rows of one montage (a photo's layers, or a layer's
    units), else of one photo, stay together."""
    groups = [row.montage or row.image_path for row in rows]
    mine = set(list(dict.fromkeys(groups))[part::parts])
    return [row for row, group in zip(rows, groups) if group in mine]


def real(path) -> Path:
    """`path` with its folder's links and `..` resolved, but not its own name: where a write to it lands."""
    return Path(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


def check_outputs(args: argparse.Namespace, rows: list, previous: dict, photos: list) -> None:
    """UsageError before the work if an output is unwritable or would replace a photo or record."""
    files = {real(Path(args.output_dir) / INDEX): False} if rows and not args.output else {}
    endings = [".png", ".json", ".diverged.png", *([".gif", "_frames"] if args.save_every else []),
               *(["_field.png"] if args.window else []),
               *(["_mean.png", "_spread.png", "_sample*.png"] if args.samples > 1 else [])]
    for row in rows:  # each file the rows write (True: a folder); samples past the first as one pattern
        paths = [row.file(ending) for ending in endings] + ([row.montage] if row.montage else [])
        files.update({real(path): path.name.endswith("_frames") for path in paths})
        other = (previous[row] or {}).get("image_path")
        if isinstance(other, str) and other != row.image_path:
            raise UsageError(f"{row.file('.json')} holds the result of another photo, {other}: "
                             f"invert {row.image_path} into another --output_dir")

    def written(path: Path) -> Optional[bool]:  # None if the job does not write `path`; else if as a folder
        stem, _, number = path.name.removesuffix(".png").rpartition("_sample")
        sample = path.name.endswith(".png") and number.isdigit() and 2 <= int(number) <= args.samples
        return files.get(path.with_name(f"{stem}_sample*.png") if sample else path)

    for photo in photos:
        if any(written(path) is not None for path in (real(photo), Path(os.path.realpath(photo)))):
            raise UsageError(f"the outputs would overwrite the input photo {photo}: use another --output_dir")
    for folder in dict.fromkeys(path.parent for path in files):
        existing = existing_parent(folder)
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write in {folder}: {existing} is not a writable directory")
        for entry in os.scandir(folder) if existing == folder else ():
            kind = written(folder / entry.name)
            if kind is not None and entry.is_dir(follow_symlinks=False) != kind:
                raise UsageError(f"cannot write {folder / entry.name}: something that is not a "
                                 f"{'folder' if kind else 'file'} is already there")


# ---------------------------------------------------------------- records, resume and the index


def read_record(path: Path) -> Optional[dict]:
    """The JSON record at `path`; None if it is missing or not a JSON object, whatever its shape."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def identity(row: Row, args: argparse.Namespace, settings: Settings, sha256: Optional[str],
             weights: str) -> dict:
    """What --resume compares: photo path and content, model, weights' content, size, layer and settings."""
    return {"image_path": row.image_path, "image_sha256": sha256, "model": args.model, "weights_id": weights,
            "input_size": args.input_size, "layer_name": row.layer_name, "task": settings.task,
            "unit": row.unit, "features": bool(args.features), "settings": dataclasses.asdict(settings)}


def natural(text: str) -> list:
    """A sort key that puts features_4 before features_12."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def finished(record: Optional[dict], wanted: dict, row: Row, samples: int, gif: bool) -> bool:
    """Whether --resume may skip a row: its record is done and of the same identity, its pictures there."""
    return (record is not None and record.get("status") == "done" and wanted["image_sha256"] is not None
            and all(record.get(key) == value for key, value in wanted.items())
            and all(row.sample(index).is_file() for index in range(samples))
            and all(row.file(ending).is_file() for ending in ("_mean.png", "_spread.png") if samples > 1)
            and (row.file(".gif").is_file() or not gif)
            and (row.file("_field.png").is_file() or not wanted["settings"]["window"]))


def index_line(record: dict, name: str) -> Optional[dict]:
    """The index's line for the record in file `name`, None if not one; old records read as meant."""
    old = record.get("args") if "status" not in record and isinstance(record.get("args"), dict) else None
    if old is not None:
        settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
        record = {**record, "model": old.get("model"), "png": name.removesuffix(".json") + ".png",
                  "status": "done" if record.get("stopped") in ("epochs", "plateau") else "interrupted",
                  "precision": settings.get("precision", "")}
    line = {column: record.get(column, "") for column in INDEX_COLUMNS}
    if not all(isinstance(line[key], str) and line[key] for key in ("image_path", "layer_name", "status",
                                                                   "model")):
        return None
    return {column: "" if value is None else encodable(str(value)) for column, value in line.items()}


def encodable(text: str) -> str:
    """`text` if it can be written as UTF-8 with its undecodable bytes as they were, else escaped."""
    try:
        text.encode("utf-8", "surrogateescape")
        return text
    except UnicodeEncodeError:  # a lone surrogate that no file name gives, e.g. from a damaged record
        return text.encode("utf-8", "backslashreplace").decode()


def write_index(folder: Path, cache: dict) -> None:
    """Rebuild folder/index.csv from all its records under a lock; `cache` keeps unchanged records' lines."""
    try:
        with filelock.FileLock(str(folder / f"{INDEX}.lock")):
            for entry in os.scandir(folder):
                if entry.name.endswith(".json") and entry.is_file():
                    key = (entry.stat().st_mtime_ns, entry.stat().st_size)
                    if cache.get(entry.name, (None,))[0] != key:
                        cache[entry.name] = key, index_line(read_record(Path(entry.path)) or {}, entry.name)
            present = [line for name, (_, line) in cache.items() if line and os.path.exists(folder / name)]
            lines = sorted(present, key=lambda line: (line["image_path"], line["model"],
                                                      natural(line["layer_name"]), natural(line["unit"])))

            def write(file):
                text = io.TextIOWrapper(file, encoding="utf-8", errors="surrogateescape", newline="")
                table = csv.DictWriter(text, INDEX_COLUMNS)
                table.writeheader()
                table.writerows(lines)
                text.flush()
                text.detach()

            write_atomically(folder / INDEX, write)
    except (OSError, filelock.Timeout) as error:  # a lock the file system refuses, a folder gone
        raise UsageError(f"could not rebuild {folder / INDEX} ({one_line(error)})") from None


# ---------------------------------------------------------------- memory and batches


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes left to allocate on `device`: on a CPU the least of MemAvailable, `ulimit -v`'s, the cgroup's."""
    if device.type != "cpu":
        return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    left = []
    with contextlib.suppress(OSError, ValueError, KeyError):
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        left.append(int(fields["MemAvailable"].split()[0]) * 1024)
    with contextlib.suppress(OSError, ValueError, KeyError, AttributeError):
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        left += [limit - int(status["VmSize"].split()[0]) * 1024] if limit != resource.RLIM_INFINITY else []
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():  # v2 ("0::/path") or v1's memory
            _, kinds, group = line.split(":", 2)
            root, names = (Path("/sys/fs/cgroup"), ("memory.max", "memory.current")) if not kinds else \
                (Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes"))
            for folder in [root / group.lstrip("/"), *(root / group.lstrip("/")).parents]:  # SLURM's too
                if (not kinds or "memory" in kinds.split(",")) and folder.is_relative_to(root) and all(
                        (folder / name).is_file() for name in names):
                    limit, used = ((folder / name).read_text().strip() for name in names)
                    left += [int(limit) - int(used)] if limit.isdigit() and int(limit) < 2 ** 60 else []
    return min(left) if left else None


def check_memory(needed: float, device: torch.device, what: str, helps: str) -> None:
    """Refuse, before allocating, work whose estimated memory exceeds what this process has free."""
    free = available_memory(device)
    if free is not None and needed > free:
        raise UsageError(f"{what} needs about {needed / 2**30:.3g} GiB, more than the "
                         f"{max(free, 0) / 2**30:.1f} GiB free on {device}: {helps}")


def row_bytes(model: nn.Module, layer: nn.Module, size: int, stride: int, settings: Settings, frames: int,
              device: torch.device) -> float:
    """Estimated bytes of one row at `layer`, from a forward pass at a small size scaled by area."""
    probe, elements = min(size, 64), []
    leaves = [module for module in model.modules() if not any(module.children())]

    def count(module, inputs, output):
        elements.append(output.numel() if isinstance(output, torch.Tensor) else 0)

    try:
        with forward_hooks({leaf: count for leaf in leaves}), torch.no_grad():
            output = layer_batches(model, [layer], torch.zeros(1, 3, probe, probe, device=device))[0][2]
        activations = sum(elements) + output.numel()
    except FORWARD_ERRORS:  # a model that refuses the probe size
        activations = 0
    canvas = 3 * (size + layer_settings(settings, stride)["jitter"]) ** 2
    state = {"sgd": 1, "adam": 2, "lbfgs": 2 * LBFGS_HISTORY + 2}[settings.optimizer]
    # float32: each activation thrice (values, gradients, a copy), the reference and target, the canvas
    # about 16 times (variable, gradient, optimizer state, finite copy, render, priors), the GIF's frames
    return (12 * activations * (size / probe) ** 2 + 24 * size * size + 4 * (16 + state) * canvas
            + frames * canvas)


def plan_batches(args: argparse.Namespace, rows: list, model: nn.Module, layers: dict, strides: dict,
                 settings: Settings, device: torch.device) -> list:
    """Consecutive runs of rows within --batch_size and a share of free memory; refuses one too big alone."""
    frames = settings.epochs // args.save_every if args.save_every else 0
    costs = {name: settings.samples * row_bytes(model, layer, args.input_size, strides[layer], settings,
                                                 frames, device) for name, layer in layers.items()}
    for name, cost in costs.items():
        check_memory(cost, device, f"inverting {name} at --input_size {args.input_size}"
                     + (f" with --samples {settings.samples}" if settings.samples > 1 else ""),
                     "use a smaller --input_size or --jitter, fewer --samples, a larger --save_every or 0"
                     + (", or another --optimizer" if settings.optimizer == "lbfgs" else ""))
    free = available_memory(device)
    budget = math.inf if free is None else MEMORY_SHARE * free
    most = max(1, (BATCH_CAP[device.type == "cuda"] if args.batch_size == "auto" else args.batch_size)
               // settings.samples)
    runs, used = [[]], 0.0
    for row in rows:
        if runs[-1] and (len(runs[-1]) == most or used + costs[row.layer_name] > budget):
            runs, used = runs + [[]], 0.0
        runs[-1].append(row)
        used += costs[row.layer_name]
    return runs if runs[0] else []


# ---------------------------------------------------------------- saving


def write_atomically(path: Path, write: Callable) -> None:
    """write(file) to a new, exclusive temporary file beside `path` (never a planted link), then rename it."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".invert-", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            mask = os.umask(0o22)  # mkstemp makes it 0600: give it the mode the umask gives a new file
            os.umask(mask)
            os.fchmod(file.fileno(), 0o666 & ~mask)
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:  # a full disk, a folder that vanished: the old file, if any, stays
        raise UsageError(f"could not write {path} ({one_line(error)})") from None
    finally:
        if temporary is not None and os.path.lexists(temporary):
            os.unlink(temporary)


def save_png(path: Path, picture: Image.Image) -> None:
    """Write a PNG atomically, marked as this tool's so that folder listings leave it out."""
    marked = PngImagePlugin.PngInfo()
    marked.add_text("Software", MARK)
    write_atomically(path, lambda file: picture.save(file, format="PNG", pnginfo=marked))


def save_json(path: Path, record: dict) -> None:
    """Write a JSON record atomically (ASCII: an undecodable byte in a name is escaped)."""
    write_atomically(path, lambda file: file.write((json.dumps(record, indent=2) + "\n").encode()))


# ---------------------------------------------------------------- the job


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device's, or a CPU allocator's, out of memory."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


class Job:
    """The command line's rows, planned and checked before the work, then inverted batch by batch."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device, self.failed, self.index_cache = args, device, {}, {}  # failed: row -> why
        self.fields, self.saved = {}, {}  # each layer's receptive field of --window; --features' activations
        # the cheap checks come first, so that a typo fails before a model loads or downloads
        self.settings = settings = resolve(settings_from_args(args), device)
        job = plan(args)
        everyone = list(dict.fromkeys(row.image_path for row in job))
        self.shard = shard_of(args.shard, len(everyone))
        self.rows = rows = in_shard(job, *self.shard)
        self.by_photo, self.by_montage = {}, {}  # each photo's rows, each montage's
        for row in rows:
            self.by_photo.setdefault(row.image_path, []).append(row)
            self.by_montage.setdefault(row.montage, []).append(row)
        weights, weights_data = weights_identity(args.model, args.weights)
        self.photos = {path: read_photo(path, args.input_size, bool(args.features))
                       for path in dict.fromkeys(row.image_path for row in rows)}
        self.previous = previous = {row: read_record(row.file(".json")) for row in rows}
        check_outputs(args, rows, previous, everyone)
        self.wanted = {row: identity(row, args, settings, self.photos[row.image_path].sha256, weights)
                       for row in rows}
        self.done = {row for row in rows if args.resume and finished(previous[row], self.wanted[row], row,
                                                                     settings.samples, args.save_every)}
        self.todo = [row for row in rows if row not in self.done]
        runnable, self.runs = [row for row in self.todo if self.photos[row.image_path].error is None], []
        if runnable:
            self.model = load_model(args.model, args.weights, not args.quiet, weights_data).to(device)
            self.layers = {row.layer_name: resolve_layer(self.model, row.layer_name)[1] for row in runnable}
            outputs = check_model(self.model, list(self.layers.values()), args.input_size, device,
                                  settings.precision)
            self.check_parts(runnable, outputs)
            strides = {layer: layer_stride((args.input_size,) * 2, out) for layer, out in outputs.items()}
            self.runs = plan_batches(args, runnable, self.model, self.layers, strides, settings, device)
            self.fields = {name: receptive_field(self.model, layer, args.input_size, settings, device)
                           for name, layer in self.layers.items()} if settings.window else {}
        self.bar = tqdm(total=len(rows), initial=len(self.done), unit="image", dynamic_ncols=True,
                        disable=args.quiet)

    def record(self, row: Row, **fields) -> dict:
        """A row's record: what identifies it, where it ran, and `fields`."""
        return {**self.wanted[row], "weights": self.args.weights, "precision": self.settings.precision,
                "device": str(self.device), "png": row.png.name, **fields}

    def fail(self, row: Row, reason: str, status: str = "failed") -> None:
        """Mark `row` failed for `reason`: named on stderr in a job of several rows, and recorded, unless
        its photo could not be read and its record is of a finished run of this row (an NFS hiccup must
        not undo a week's work)."""
        self.failed[row] = reason
        if len(self.rows) > 1:
            self.bar.write(shown(f"invert.py: {row.image_path} at {row.layer_name}: {status}: {reason}"),
                           sys.stderr)
        kept = self.previous[row] or {}
        same = all(kept.get(key) == value for key, value in self.wanted[row].items() if key != "image_sha256")
        if not (self.photos[row.image_path].error and kept.get("status") == "done" and same):
            save_json(row.file(".json"), self.record(row, status=status, error=reason, png=""))

    def photo(self, path: str) -> torch.Tensor:
        """A photo preprocessed, read again unless planning kept it; its rows record what was read. Saved
        activations (--features) are kept as read at planning, and their photo is blank."""
        data = self.photos[path].data or read_bytes(path)
        for row in self.by_photo[path]:
            self.wanted[row]["image_sha256"] = hashlib.sha256(data).hexdigest()
        if self.args.features:
            return torch.zeros(1, 3, self.args.input_size, self.args.input_size)
        return load_photo(path, self.args.input_size, data)

    def check_parts(self, rows: list, outputs: dict) -> None:
        """UsageError before the work where saved activations or a unit do not fit their layer."""
        self.saved = {}  # --features: the activations, batched as the layer's output
        for row in rows:
            output = outputs[self.layers[row.layer_name]]
            part_mask(output, self.settings.window, self.settings.channels)  # refuses a misfit part now
            if self.args.features:
                features = fitted(load_features(self.photos[row.image_path].data, row.image_path), output)
                if len(features) != 1:
                    raise UsageError(f"--features {row.image_path} holds {len(features)} rows of "
                                     "activations: save one image's")
                saved = [(None, [0], features.to(output.device))]
                self.saved[row.image_path] = refuse_unsound(saved, "fp32")[0][2]
            if row.unit is not None:
                unit_directions(output, [row.unit], self.settings.unit_scope)

    def callback(self, rows: list, frames: list) -> tuple:
        """invert()'s callback for a batch, and its bar: the losses now and then, and the frames."""
        epochs, every, samples = self.settings.epochs, self.args.stdout_epochs, self.settings.samples
        labels = [shown(f"{row.png.stem}{f' sample {sample + 1}' if samples > 1 else ''}  ")
                  if len(rows) * samples > 1 else "" for row in rows for sample in range(samples)]
        bar = tqdm(total=epochs, unit="it", dynamic_ncols=True, position=1, leave=False,
                   disable=self.args.quiet)

        def report(step: int, losses: dict, images: Callable) -> None:
            bar.update()
            if not self.args.quiet and (step % every == 0 or step == epochs):  # .tolist() waits for a GPU
                values = {name: value.tolist() for name, value in losses.items()}
                for index, label in enumerate(labels):
                    text = "  ".join(f"{name} {value[index]:.4g}" for name, value in values.items())
                    bar.write(f"iteration {step:>5}/{epochs}  {label}{text}")
            if self.args.save_every and step % self.args.save_every == 0:
                for row, kept, image in zip(rows, frames, images()[::samples]):
                    kept.append(deprocess(image[None]))
                    save_png(row.file("_frames") / f"iteration_{step:05d}.png", kept[-1])

        return report, bar

    def optimise(self, rows: list) -> bool:
        """Invert a batch of rows and save what each gives; return whether Ctrl-C stopped it."""
        photos = {}
        for row in rows:
            try:
                if row.image_path not in photos:
                    photos[row.image_path] = self.photo(row.image_path)
            except UsageError as error:
                self.fail(row, str(error))
        while rows := [row for row in rows if row not in self.failed]:
            frames, count, started = [[] for _ in rows], self.settings.samples, time.perf_counter()
            report, bar = self.callback(rows, frames)
            short = None  # what ran out of memory, if it did
            references = torch.cat([photos[row.image_path] for row in rows]).to(self.device)
            try:
                result = invert(self.model, [self.layers[row.layer_name] for row in rows], references,
                                self.settings, callback=report, **self.targets(rows))
            except RowError as error:  # those rows fail; the others run again without them
                for index, reason in error.reasons.items():
                    self.fail(rows[index], reason)
                continue
            except RuntimeError as error:  # out of memory: the estimate was wrong, or others share the device
                if not out_of_memory(error):
                    raise
                short = one_line(error)  # the batch's tensors go with the error, outside this block
            finally:
                bar.close()
            if short is not None:
                return self.alone(rows, short)
            seconds = time.perf_counter() - started
            timing = dict(seconds=round(seconds / len(rows), 4), batch=len(rows) * count,  # a row's share
                          ms_per_iteration=round(1000 * seconds / max(*result.iterations, 1), 3))
            classes = self.top1(references, result.images[::count])
            for index, row in enumerate(rows):
                self.save(row, result, range(index * count, (index + 1) * count), frames[index],
                          self.record(row, **timing, **classes[index], torch_version=torch.__version__,
                                      torchvision_version=torchvision.__version__))
            return "interrupted" in result.stopped
        return False

    def targets(self, rows: list) -> dict:
        """invert()'s keywords for what the rows aim at, besides their photos: units, saved activations."""
        if self.settings.task == "maximize":
            return {"units": [row.unit for row in rows]}
        return {"activations": torch.cat([self.saved[row.image_path] for row in rows])} if self.saved else {}

    @torch.no_grad()
    def top1(self, photos: torch.Tensor, images: torch.Tensor) -> list:
        """Per row, the classifier's top-1 class of its photo and pre-image, and the photo's class's
        probability for the pre-image (a pre-image that still means the photo); nothing for other models."""
        try:
            with autocast(self.settings.precision, self.device):
                scores = [self.model(batch.to(self.device)) for batch in (photos, images)]
            scores = [score.float() for score in scores if isinstance(score, torch.Tensor)]
        except FORWARD_ERRORS as error:  # a model whose whole forward this input does not suit, or memory
            if out_of_memory(error):
                self.bar.write(f"invert.py: warning: no top-1 classes: out of memory ({one_line(error)})",
                               sys.stderr)
            return [{}] * len(images)
        if len(scores) < 2 or not all(score.dim() == 2 and score.shape[1] > 1 for score in scores):
            return [{}] * len(images)
        photo, preimage = (score.softmax(1) for score in scores)
        wanted, got = photo.argmax(1), preimage.argmax(1)
        probability = preimage.gather(1, wanted[:, None])[:, 0]
        if self.settings.task == "maximize" or self.args.features:  # no photo to agree with
            return [{"preimage_top1": label} for label in got.tolist()]
        return [{"photo_top1": photo_label, "preimage_top1": label, "top1_agree": photo_label == label,
                 "photo_probability": round(chance, 6)}
                for photo_label, label, chance in zip(wanted.tolist(), got.tolist(), probability.tolist())]

    def alone(self, rows: list, short: str) -> bool:
        """After running out of memory, each row alone (failed if one is too many); whether Ctrl-C stopped."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(rows) == 1:
            self.fail(rows[0], f"out of memory on {self.device} ({short})")
            return False
        return any(self.optimise([row]) for row in rows)  # any() stops at the first interrupted row

    def save(self, row: Row, result: Inversion, mine: range, frames: list, record: dict) -> None:
        """Save a row's pictures and then its record; or where a sample diverged, its last finite image."""
        broken, first = [at for at in mine if result.stopped[at] == "diverged"], mine.start
        if broken:
            save_png(row.file(".diverged.png"), deprocess(result.images[broken[0]][None]))
            self.fail(row, f"the loss became non-finite at iteration {result.iterations[broken[0]]}: --lr "
                      f"{result.layer_settings[broken[0]]['lr']:g} is too large for this layer; try a "
                      f"smaller --lr; the last finite image is {row.file('.diverged.png').name}", "diverged")
            return
        pictures = [deprocess(result.images[at][None]) for at in mine]
        for sample, picture in enumerate(pictures):
            save_png(row.sample(sample), picture)
        if row.layer_name in self.fields:  # the window's receptive field, drawn on a copy
            field, box = pictures[0].copy(), self.fields[row.layer_name]
            ImageDraw.Draw(field).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline="red")
            record["field_box"] = box
            save_png(row.file("_field.png"), field)
        record.update(status="interrupted" if result.stopped[first] == "interrupted" else "done",
                      layer_settings=result.layer_settings[first], **result.losses[first],
                      iterations=result.iterations[first], stopped=result.stopped[first])
        if len(mine) > 1:
            mean, spread_picture, spread = mean_and_spread(result.images[first:mine.stop])
            save_png(row.file("_mean.png"), mean)
            save_png(row.file("_spread.png"), spread_picture)
            samples = [{**result.losses[at], "iterations": result.iterations[at],
                        "stopped": result.stopped[at]} for at in mine]
            record.update(mean_png=row.file("_mean.png").name, spread_png=row.file("_spread.png").name,
                          spread=round(spread, 3), samples=samples)
        if self.args.save_every:
            movie = frames + pictures[:1]
            write_atomically(row.file(".gif"), lambda file: movie[0].save(
                file, format="GIF", save_all=True, append_images=movie[1:], duration=100, loop=0,
                comment=MARK))
        save_json(row.file(".json"), record)
        if record["status"] == "done":
            self.done.add(row)
        self.bar.update()
        if not self.args.quiet:
            measure = {"invert": "feature_error", "caricature": "projection"}.get(self.settings.task,
                                                                                  "unit_activation")
            self.bar.write(shown(f"saved {row.png} and {row.file('.json').name}: {measure} "
                                 f"{record[measure]:.4f}"
                                 + (f", spread {spread:.1f} grey levels" if len(mine) > 1 else "")))

    def montages(self, rows: list) -> None:
        """Write each montage among `rows` whose rows are all done, from their pictures: a photo's layers
        after the photo, or (maximize) a layer's mosaic of units."""
        units = self.settings.task == "maximize"
        for path in dict.fromkeys(row.montage for row in rows if row.montage):
            mine = self.by_montage[path]
            names = [f"unit {row.unit}" if units else row.layer_name for row in mine]
            shown_files = list(zip(names, [row.png for row in mine])) if self.settings.samples == 1 else [
                (f"{name} {kind}", row.file(f"_{kind}.png")) for name, row in zip(names, mine)
                for kind in ("mean", "spread")]
            with contextlib.suppress(UsageError, OSError):  # a photo or picture gone since: rows say so
                if all(row in self.done for row in mine):
                    tiles = [(label, Image.open(picture).convert("RGB")) for label, picture in shown_files]
                    photo = None if units or self.args.features else deprocess(self.photo(mine[0].image_path))
                    save_png(path, montage(photo, tiles))

    def run(self) -> int:
        """Invert and save batch by batch, the index rebuilt now and then and at the end; the exit code."""
        indexed = started = time.perf_counter()
        interrupted, folder, unindexed = False, None if self.args.output else Path(self.args.output_dir), None
        if not self.rows:
            print(f"invert.py: this process's part, {self.shard[0]} of {self.shard[1]} (from --shard or the "
                  "launcher's variables), has no photos", file=sys.stderr)
        try:
            for row in self.todo:
                if self.photos[row.image_path].error is not None:
                    self.fail(row, self.photos[row.image_path].error)
            self.montages([row for row in self.done if row.montage and not row.montage.exists()])
            for batch in self.runs:
                interrupted = self.optimise(batch)
                self.montages(batch)
                if folder and time.perf_counter() - indexed > INDEX_EVERY:
                    write_index(folder, self.index_cache)
                    indexed = time.perf_counter()
                if interrupted:
                    break
        finally:
            self.bar.close()
            try:
                if folder and folder.is_dir():
                    write_index(folder, self.index_cache)
            except UsageError as error:  # told after what stopped the run, if anything did
                unindexed = error
        if interrupted:
            print("interrupted: saved what it had; rerun with --resume to finish", file=sys.stderr)
        told = [] if unindexed is None else [str(unindexed)]
        if self.failed:
            (row, reason), count = next(iter(self.failed.items())), len(self.failed)
            told.insert(0, reason if len(self.todo) == 1 else f"{count} of {len(self.todo)} image(s) failed, "
                        f"{row.image_path} at {row.layer_name} first: {reason}"
                        + ("; see index.csv" if folder and unindexed is None else ""))
        if told:
            raise UsageError("; and ".join(told))
        before = len(self.rows) - len(self.todo)
        if not self.args.quiet and not interrupted:
            print(f"{len(self.todo)} inversion(s) in {time.perf_counter() - started:.1f} s"
                  + (f", {before} done before" if before else ""))
        return 130 if interrupted else 0


def run(args: argparse.Namespace) -> int:
    """The command line's work: list the layers, or plan and check the job, then run it; the exit code."""
    device = pick_device(args.device)
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # and every CUDA device's
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # the same PNG again
    return list_layers(args, device) if args.list_layers else Job(args, device).run()


# ---------------------------------------------------------------- command line


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one-line UsageErrors instead of usage dumps."""

    def error(self, message):
        raise UsageError(message)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show each flag's default; a setting whose default is None says how it is chosen instead."""

    def _get_help_string(self, action):
        if isinstance(action.default, list):
            return f"{action.help} (default: {' '.join(action.default)})"
        return action.help if action.default is None else super()._get_help_string(action)


def shard_spec(text: str) -> tuple:
    """--shard K/N: the K-th (0 to N-1) of N parts."""
    try:
        part, parts = (int(number) for number in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be K/N, such as 0/4, got {text}") from None
    if not 0 <= part < parts:
        raise argparse.ArgumentTypeError(f"must be K/N with K from 0 to N-1, got {text}")
    return part, parts


def list_layers(args: argparse.Namespace, device: torch.device) -> int:
    """Print every layer of the model with its output shape at --input_size."""
    model = load_model(args.model, args.weights, progress=not args.quiet).to(device)
    for row in layer_shapes(model, args.input_size, device):
        print("  ".join(f"{cell:<24}" for cell in row).rstrip())
    return 0


def unit_spec(text: str) -> str:
    """An argparse type for --units: a channel index or 'all'."""
    if text != "all" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a unit (channel) index >= 0 or all, got {text}")
    return text


def given(text: str) -> str:
    """An argparse type for names and paths: any text but the empty one ('' would mean the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line: its inputs and outputs, then one flag per field of Settings."""
    parser = _ArgumentParser(
        prog="invert.py", formatter_class=_HelpFormatter,
        description="Recover images whose activations at layers of a torchvision CNN match those "
                    "of photos (Mahendran & Vedaldi, CVPR 2015 and IJCV 2016).",
        epilog="example: python invert.py --model vgg16_bn --layer_name features_22")
    inputs = parser.add_argument_group("what to invert")
    inputs.add_argument("--image_path", nargs="+", type=given, default=[str(DEFAULT_IMAGE)],
                        help="the photos to invert (any format Pillow reads, a pipe too), and folders of "
                             "them (the images directly inside, by name, less the pictures invert.py "
                             "wrote); outputs are named by file stem, with parent folders where two photos "
                             "share one, cut with a hash where too long")
    inputs.add_argument("--model", type=given, default="alexnet",
                        help="a torchvision classification model name")
    inputs.add_argument("--weights", type=given, default="DEFAULT",
                        help="DEFAULT or another torchvision weights name (downloaded once to TORCH_HOME), "
                             "a path to a state-dict file, or 'none' for random weights")
    inputs.add_argument("--input_size", type=positive_int, default=227,
                        help="side of the square input, in pixels")
    inputs.add_argument("--layer_name", nargs="+", type=given, default=["avgpool"],
                        help="the layer(s) to invert: features_4 (the seed's form) or features.4 "
                             "(PyTorch's); each (photo, layer) pair is one image")
    inputs.add_argument("--units", nargs="+", type=unit_spec, default=None,
                        help=f"--task maximize: the units (channels) to maximise, one image each, or 'all': "
                             f"the first {ALL_UNITS}; a layer's are also one mosaic, "
                             "<stem>_<model>_<layer>_units.png")
    inputs.add_argument("--features", type=given, default=None, metavar="FILE.pt",
                        help="invert a saved activation tensor (torch.save, CxHxW or 1xCxHxW) of "
                             "--layer_name at --input_size, in place of a photo's")
    inputs.add_argument("--list_layers", action="store_true",
                        help="print every layer with its output shape, then exit")
    method = parser.add_argument_group("how to invert (the keywords of invert())")
    for field in dataclasses.fields(Settings):
        options = dict(field.metadata)
        explained = f" (default: {default_help(field.name)})" if field.default is None else ""
        method.add_argument(f"--{field.name}", default=field.default, help=options.pop("help") + explained,
                            **options)
    add_running_flags(parser.add_argument_group("running and output"))
    return parser.parse_args(argv)


def add_running_flags(running) -> None:
    """The command line's flags for the device, the outputs, the progress and the job."""
    running.add_argument("--device", default="auto",
                         help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    running.add_argument("--output", type=given, default=None,
                         help="the PNG to write, instead of <output_dir>/<stem>_<model>_<layer>.png")
    running.add_argument("--output_dir", type=given, default="outputs",
                         help="folder for outputs, created if missing; it may be a folder of the photos")
    running.add_argument("--save_every", type=non_negative_int, default=0,
                         help="also save every N-th iteration as <name>_frames/iteration_N.png, and "
                              "<name>.gif (0: off)")
    running.add_argument("--stdout_epochs", type=positive_int, default=25,
                         help="print the losses every this many iterations")
    running.add_argument("--quiet", action="store_true", help="no progress bar and no loss lines")
    running.add_argument("--batch_size", type=positive_int.or_auto(), default="auto",
                         help="images optimised together at most; auto: as many as fit in half the free "
                              f"memory by the estimate, up to {BATCH_CAP[0]} on a CPU and {BATCH_CAP[1]} "
                              "on a GPU. A row's picture does not depend on its batch")
    running.add_argument("--resume", action="store_true",
                         help="skip each image whose record says it finished from the same photo (path and "
                              "content), weights (content), model, layer, input size and settings, and "
                              "whose pictures are there")
    running.add_argument("--shard", type=shard_spec, default=None, metavar="K/N",
                         help="invert only the K-th (0 to N-1) of N parts of the photos, every N-th from "
                              "the K-th; by default from torchrun's RANK and WORLD_SIZE and a SLURM job "
                              "array's SLURM_ARRAY_TASK_ID, _MIN, _MAX, _COUNT and _STEP, else all (a job "
                              "of one photo runs whole in each array task); 0/1 runs all in every process")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The Settings the command line chose: one field per flag of the same name."""
    return Settings(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Settings)})


def _interrupt(signum, frame):
    """Turn SIGTERM into the KeyboardInterrupt that Ctrl-C raises, so that it saves the same way."""
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """The command line: parse, run, and turn expected failures into one-line messages and exit codes."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        return run(parse_args(argv))
    except UsageError as error:
        print(f"invert.py: error: {shown(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("invert.py: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
