#!/usr/bin/env python3
"""Invert a layer of a pretrained CNN: find images whose activations there match a photo's.

Mahendran & Vedaldi, "Understanding Deep Image Representations by Inverting Them" (CVPR 2015), with the
normalised objective and the other pre-images of their IJCV 2016 follow-up.

    python invert.py --image_path reference_images/astronaut.jpg --model alexnet --layer_name features_4
    python invert.py --model vgg16 --layer_name features_4 features_9 features_16 features_23

From Python, on any nn.Module:

    from invert import invert, load_image, preprocess
    photo = preprocess(load_image("reference_images/astronaut.jpg"), 227)
    result = invert(model, model.features[4], photo, objective="seed", epochs=100)

Sections, in order: settings, images, layers, surrogate gradients, losses, parameterisations, the data
term's targets and the inversion, invert(); then the job of many photos, and the command line.
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
import operator
import os
import pickle
import random
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

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
OBJECTIVES, TASKS = ("seed", "paper"), ("invert", "caricature", "maximize")
OPTIMIZERS, PARAMS, SURROGATES = ("sgd", "adam"), ("pixel", "fft"), ("on", "off")
UNIT_SCOPES = ("neuron", "channel")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The paper's pixel scales in its mean-subtracted 0-255 units (IJCV 2016): B, a typical pixel's RGB
# norm (the box constraint is 2B), and V, a typical difference between neighbouring pixels.
PAPER_B, PAPER_V = 80.0, 80.0 / 6.5
# --C auto: the paper's weight of the feature term up to this layer stride, then falling with the
# stride's square; 1 for --task maximize (both measured on the trained stand-in: tests/README.md)
PAPER_C, FULL_C_STRIDE, MAXIMIZE_C = 100.0, 4, 1.0
# The plateau rule ends runs early only at layers of this stride or less: deeper layers' losses stall
# at the first stage's rate while their pictures still gain from the last stage (tests/README.md).
PLATEAU_STRIDE = 2
# The paper's two stages: this share of the iterations, then the rest at --decay_factor times the rate.
FIRST_STAGE = Fraction(6, 7)
# What --objective decides when a flag is not given. seed: the original design's whole method.
# paper: the normalised terms, on the parameterisation and optimizer measured best for them.
OBJECTIVE_DEFAULTS = {
    "seed": {"optimizer": "sgd", "param": "pixel", "lambda_alpha": 1e-5, "lambda_tv": 1e-5, "C": 1.0,
             "decay_epochs": 200, "plateau": 0.0, "surrogate": "off"},
    "paper": {"optimizer": "adam", "param": "fft", "lambda_alpha": 1.0, "lambda_tv": 1.0, "C": "auto",
              "decay_epochs": "auto", "plateau": 0.01, "surrogate": "on"},
}
# Learning rates per (objective, optimizer, param), measured on a trained VGG16-BN (tests/README.md).
# The original design's 1e-2 leaves the image as noise; 1e2, the value its own comment gives, measured best.
DEFAULT_LRS = {
    ("seed", "sgd", "pixel"): 100.0, ("seed", "adam", "pixel"): 0.1, ("seed", "sgd", "fft"): 0.003,
    ("seed", "adam", "fft"): 0.01, ("paper", "sgd", "pixel"): 3.0, ("paper", "adam", "pixel"): 0.1,
    ("paper", "sgd", "fft"): 0.003, ("paper", "adam", "fft"): "auto",
}
# --lr auto: this rate, and half of it at layers of stride AUTO_LR_STRIDE or more (tests/README.md)
AUTO_LR, AUTO_LR_STRIDE = 0.01, 4
# lucent's square root of ImageNet's colour correlation, for --param fft
COLOUR_CORRELATION_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
# .item() makes a GPU wait, so there the loss is checked for NaN only this often; on a CPU, every step
CHECK_EVERY, GPU_CHECK_EVERY = {"cpu": 1}, 25
# the plateau rule compares each image's lowest loss with its lowest this many iterations before
PLATEAU_WINDOW = 10
# the largest weight (C, lambdas) and prior exponent (alpha, beta) whose terms stay inside float32
MAX_WEIGHT, MAX_EXPONENT = 1e30, 12.0
# --surrogate on: through each row's first stage, a ReLU's backward leaks this slope (tests/README.md)
SURROGATE_LEAK = 0.1
# Adam's beta2 and epsilon: torch's defaults
ADAM_BETA2, ADAM_EPSILON = 0.999, 1e-8
# what torchvision models raise for an input size they cannot take (ViT asserts, convs raise)
FORWARD_ERRORS = (RuntimeError, AssertionError, ValueError)
# a layer's channel axis is the one that does not grow when the input grows by this many pixels
LAYOUT_PROBE = 32
# --units all: the first this many units (channels) of the layer, or all of a layer that has fewer
ALL_UNITS = 25
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# --batch_size auto: rows per batch at most (on a CPU, a GPU), beyond which a batch no longer gains per
# image (tests/README.md), and the share of the free memory a batch may take by the estimate
BATCH_CAP, MEMORY_SHARE = (2, 32), 0.5
# --samples: the spread picture is white where the samples' standard deviation is this many grey levels
SPREAD_WHITE = 64
# every job's table of results, in --output_dir, rebuilt at most this often while a job runs, and at its end
INDEX, INDEX_EVERY = "index.csv", 60.0
# every picture this tool writes carries this PNG text (a GIF comment), so that folder listings leave it out
MARK = "invert.py"


class UsageError(Exception):
    """A problem with the user's input or settings: reported as one line, exit code 2."""


class RowError(UsageError):
    """Rows of a batch that cannot be inverted, whatever the settings: `reasons` maps each to why."""

    def __init__(self, reasons: dict):
        self.reasons = reasons
        lines = [f"row {row}: {reason}" for row, reason in reasons.items()]
        super().__init__("; ".join(lines) if len(reasons) > 1 else next(iter(reasons.values())))


def printable(text) -> str:
    """A path or message as one printable line: control characters and undecodable bytes escaped."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in str(text))


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one short line, less a terminal's colours."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------- settings


class Checked:
    """An argparse type: `kind`, finite, for which `test` holds (or 'auto'); holds() checks API values."""

    def __init__(self, kind: type, test: Callable, requirement: str, auto: bool = False):
        self.kind, self.test, self.requirement, self.auto = kind, test, requirement, auto
        self.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages

    def __call__(self, text: str):
        value = self.taken(text if self.auto and text == "auto" else self.kind(text))
        if value is None:
            raise argparse.ArgumentTypeError(f"must be {self.requirement}, got {text}")
        return value

    def taken(self, value):
        """`value` as this type holds it (a numpy or 0-d tensor number as Python's), or None if refused."""
        if isinstance(value, str):  # text as its own type writes it
            return value if self.auto and value == "auto" else self.test(value) if self.kind is str else None
        boolean = isinstance(value, bool) or "bool" in str(getattr(value, "dtype", ""))
        with contextlib.suppress(TypeError, ValueError, RuntimeError, OverflowError):  # arrays and the like
            number = operator.index(value) if self.kind is int else float(value)
            if self.kind is not str and not boolean and getattr(value, "ndim", 0) == 0 and \
                    math.isfinite(number) and self.test(number):
                return number
        return None

    def or_auto(self) -> "Checked":
        """The same type, also taking 'auto' (a value decided when the layer or the run is known)."""
        return Checked(self.kind, self.test, f"{self.requirement} or auto", auto=True)


positive_int = Checked(int, lambda value: value > 0, "a positive integer")
non_negative_int = Checked(int, lambda value: value >= 0, "an integer >= 0")
index_int = Checked(int, lambda value: 0 <= value < 2 ** 31, "an integer from 0 to 2^31 - 1")  # in names
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


def channel_group(text: str) -> Optional[str]:
    """--channels written one way: all, or A:B with A < B (00:08 as 0:8); None for anything else."""
    if text == "all":
        return text
    ends = [int(end) for end in text.split(":")] if re.fullmatch(r"0*[0-9]{1,9}:0*[0-9]{1,9}", text) else []
    return f"{ends[0]}:{ends[1]}" if ends and ends[0] < ends[1] else None


channels_type = Checked(str, channel_group, "all or A:B, A < B")


def setting(default, help: str, **argparse_options):
    """A field of Settings: its default, its help, and how argparse reads and checks it."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to invert: each field a keyword of invert() and a flag; None takes the objective's default."""

    task: str = setting("invert", "invert: match the photo's activations; caricature: start from the photo "
                        "and push its activations further along themselves, -<phi(x), phi0> / ||phi0||^2; "
                        "maximize: drive a unit of the layer (--units) as high as the priors allow, "
                        "-phi_unit(x) / rms(phi0)", choices=TASKS)
    window: int = setting(0, "invert and caricature: only the central KxK positions of the layer's grid (of "
                          "tokens, for a ViT) count in the data term; 0: all", type=index_int)
    channels: str = setting("all", "invert and caricature: only channels A to B-1 count in the data term",
                            type=channels_type)
    unit_scope: str = setting("neuron", "maximize: a unit is its channel's neuron at the centre of the grid, "
                              "or its whole channel (the mean)", choices=UNIT_SCOPES)
    objective: str = setting("paper", "seed: the original design's method (SGD on pixels, lambdas 1e-5); "
                             "paper: the IJCV 2016 normalised loss with box constraint and two stages",
                             choices=OBJECTIVES)
    optimizer: Optional[str] = setting(None, "sgd: SGD with momentum; adam: Adam with --momentum as beta1",
                                       choices=OPTIMIZERS)
    param: Optional[str] = setting(None, "pixel: optimise pixels; fft: optimise a decorrelated-colour "
                                   "spectrum, as lucent does", choices=PARAMS)
    alpha: float = setting(6.0, "exponent of the alpha-norm prior", type=exponent)
    beta: float = setting(2.0, "exponent of the total-variation prior", type=exponent)
    lambda_alpha: Optional[float] = setting(None, "weight of the alpha-norm prior", type=weight)
    lambda_tv: Optional[float] = setting(None, "weight of the total-variation prior", type=weight)
    C: Union[float, str, None] = setting(None, f"weight C of the feature term (the paper used 1 to 300); "
                                         f"'auto': {PAPER_C:g} up to a layer stride of {FULL_C_STRIDE}, "
                                         f"then {PAPER_C:g} * ({FULL_C_STRIDE} / stride)^2, so that the "
                                         f"priors weigh more where the layer keeps less ({MAXIMIZE_C:g} to "
                                         "maximize)", type=positive_weight.or_auto())
    jitter: Union[int, str] = setting(0, "random shift of the image each iteration, 0 to N pixels on each "
                                      "axis, in the first stage; 'auto' is the authors' choice, a quarter "
                                      "of the layer's stride less one", type=non_negative_int.or_auto())
    epochs: int = setting(200, "optimisation iterations: exactly this many with --plateau 0, else at most",
                          type=positive_int)
    plateau: Optional[float] = setting(None, f"end an image's first stage once its lowest loss has not "
                                       f"fallen by this fraction over {PLATEAU_WINDOW} iterations, at layers "
                                       f"of stride {PLATEAU_STRIDE} or less; a last stage at --decay_factor "
                                       f"times the rate, {(1 - FIRST_STAGE) / FIRST_STAGE} as long, follows. "
                                       "0: --epochs exactly", type=below_one)
    surrogate: Optional[str] = setting(None, "on: in each image's first stage, the backward pass goes "
                                       "through each max-pool below the layer as an average pool's would, "
                                       "and each ReLU as a leaky ReLU's (the layer's own too, to maximize); "
                                       "forward values stay the network's own. Deep layers gain most",
                                       choices=SURROGATES)
    lr: Union[float, str, None] = setting(None, f"learning rate; 'auto': {AUTO_LR:g}, and {AUTO_LR / 2:g} "
                                          f"at layers of stride {AUTO_LR_STRIDE} or more",
                                          type=positive_float.or_auto())
    momentum: float = setting(0.9, "SGD momentum, or Adam's beta1", type=below_one)
    decay_factor: float = setting(0.1, "learning-rate multiplier at each decay", type=decay)
    decay_epochs: Union[int, str, None] = setting(None, f"iterations between learning-rate decays; 'auto': "
                                                  f"the paper's first stage, {FIRST_STAGE} of --epochs",
                                                  type=positive_int.or_auto())
    precision: str = setting("auto", "the forward pass's precision; losses stay fp32 (auto: bf16 where "
                             "the hardware runs it natively, AMX or AVX512-BF16 CPUs and bf16 GPUs, "
                             "else fp32; fp16 needs CUDA)", choices=PRECISIONS)
    samples: int = setting(1, "pre-images per (photo, layer), each from its own starting noise: what they "
                           "share is what the layer keeps, where they differ what it discards",
                           type=positive_int)
    seed: int = setting(2023, "random seed for Python, torch and each image's own generator", type=seed_int)


def resolve(settings: Settings, device: torch.device, units: bool = False, features: bool = False):
    """The settings checked as the flags are, None the objective's default, the precision chosen for `device`;
    a setting, units or saved features that the task does not take are refused."""
    values = {}
    for field in dataclasses.fields(Settings):
        value, kind = getattr(settings, field.name), field.metadata.get("type")
        if value is None and field.default is None:  # the objective's default, below
            continue
        values[field.name] = value if kind is None or value is None else kind.taken(value)
        choices = field.metadata.get("choices")
        if values[field.name] is None or choices and not (isinstance(value, str) and value in choices):
            allowed = kind.requirement if kind else f"one of {', '.join(choices)}"
            raise UsageError(f"--{field.name} must be {allowed}, got {value!r}")
    if values["task"] == "maximize" and (values["window"] or values["channels"] != "all"):
        raise UsageError("--window and --channels are for --task invert and caricature, not maximize")
    if values["task"] != "maximize" and values["unit_scope"] != "neuron":
        raise UsageError(f"--unit_scope is for --task maximize, not {values['task']}")
    if units != (values["task"] == "maximize"):
        raise UsageError("--task maximize needs --units, and only it takes them")
    if features and values["task"] != "invert":
        raise UsageError("--features work with --task invert only: a caricature starts from a photo, and a "
                         "unit's weight comes from one")
    values = {**OBJECTIVE_DEFAULTS[values["objective"]], **values}
    values.setdefault("lr", DEFAULT_LRS[values["objective"], values["optimizer"], values["param"]])
    if values["precision"] == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32")
    # natively, bf16 is faster and within 0.01 SSIM of fp32 at every benchmark layer (tests/README.md)
    if values["precision"] == "auto":
        values["precision"] = "bf16" if native_bf16(device) else "fp32"
    return Settings(**values)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 in hardware: AMX or AVX512-BF16 on a CPU, compute capability 8 on a GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    # private helpers, absent from older torch: then assume no
    checks = [getattr(torch.cpu, f"_is_{name}_supported", None) for name in ("amx_tile", "avx512_bf16")]
    return device.type == "cpu" and any(check() for check in checks if check is not None)


def decay_iterations(settings: Settings) -> int:
    """The iterations between learning-rate decays: --decay_epochs, or 'auto' the paper's first stage."""
    if settings.decay_epochs == "auto":
        return max(1, round(settings.epochs * FIRST_STAGE))
    return settings.decay_epochs


def unit_index(value) -> int:
    """A unit (channel) index given as any integer: Python's, numpy's, or a 0-d integer tensor."""
    with contextlib.suppress(TypeError):  # floats and text have no integer value
        if not isinstance(value, bool) and operator.index(value) >= 0:
            return operator.index(value)
    raise UsageError(f"--units takes unit (channel) indices, integers >= 0: got {value!r}")


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
    except Image.UnidentifiedImageError:
        raise UsageError(f"--image_path {path} is not a readable image (no format Pillow knows)") from None
    except MemoryError:
        raise UsageError(f"--image_path {path} is too large to decode in the memory available") from None
    except Exception as error:  # Pillow's decoders raise many types for damaged or hostile data
        raise UsageError(f"--image_path {path} is not a readable image ({one_line(error)})") from None


def crop(image: Image.Image, size: int) -> Image.Image:
    """The photo as the network sees it, in 8 bits: its shorter side resized to `size`, its centre cut out."""
    return transforms.CenterCrop(size)(transforms.Resize(size)(image))


def normalise(picture: Image.Image) -> torch.Tensor:
    """An 8-bit picture as a 1x3xHxW tensor, normalised by ImageNet's mean and standard deviation."""
    return transforms.functional.normalize(transforms.functional.to_tensor(picture), IMAGENET_MEAN,
                                           IMAGENET_STD).unsqueeze(0)


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """Resize, centre-crop and normalise a photo into a 1x3xSxS tensor, as the original design does."""
    return normalise(crop(image, size))


def displayed(tensor: torch.Tensor) -> torch.Tensor:
    """Normalised Nx3xHxW images as they are shown: the ImageNet normalisation undone, clamped to [0, 1]."""
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))
    return (tensor.detach().float().cpu() * std + mean).clamp(0, 1)


def deprocess(tensor: torch.Tensor) -> Image.Image:
    """Undo the ImageNet normalisation of a 1x3xHxW tensor, clamp to [0, 1] and return a PIL image."""
    return transforms.functional.to_pil_image(displayed(tensor)[0])


# ---------------------------------------------------------------- layers


@contextlib.contextmanager
def forward_hooks(hooks: dict):
    """Register each module's forward hook in `hooks` (module -> hook) for the block, then remove it."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _LayerReached(Exception):
    """Raised by the layer's hook so that the forward pass stops there."""


def layer_output(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The layer's output for `images`; the forward pass stops at the layer (its first call)."""
    outputs = []

    def hook(module, inputs, output):
        outputs.append(output)
        raise _LayerReached

    with forward_hooks({layer: hook}), contextlib.suppress(_LayerReached):
        model(images.clone())  # a copy: a network may change its input in place (a first in-place ReLU)
    if not outputs:
        raise UsageError("the chosen layer is not used in the model's forward pass")
    if not isinstance(outputs[0], torch.Tensor):
        raise UsageError(f"the chosen layer returns a {type(outputs[0]).__name__}, not a tensor; choose "
                         "another (see --list_layers)")
    return outputs[0]


def autocast(precision: str, device: torch.device):
    """A context that runs the forward pass in `precision` (fp32, bf16 or fp16)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def checked_output(model: nn.Module, layer: nn.Module, images: torch.Tensor, precision: str) -> torch.Tensor:
    """The layer's fp32 output, without gradients; UsageError if the model cannot take this input size."""
    try:
        with torch.no_grad(), autocast(precision, images.device):
            return layer_output(model, layer, images).float()
    except FORWARD_ERRORS as error:  # e.g. a kernel larger than what is left of a small input
        raise UsageError(f"the model cannot compute this layer for a {'x'.join(map(str, images.shape[1:]))} "
                         f"input: change --input_size ({one_line(error)})") from None


def not_finite(what: str, precision: str) -> str:
    """The message for a layer's activations that are not finite before any optimisation."""
    return (f"the layer's activations for {what} are not finite (NaN or inf) in {precision}: the weights "
            "are unsound or the precision overflows; --lr is not the cause")


def channel_axis(model: nn.Module, layer: nn.Module, output: torch.Tensor, size: tuple, precision: str):
    """The axis of the layer's output that holds its channels: the one that does not grow with the input."""
    if output.dim() < 3:
        return 1
    with contextlib.suppress(UsageError):
        larger = torch.zeros(1, 3, size[0] + LAYOUT_PROBE, size[1] + LAYOUT_PROBE, device=output.device)
        grown = checked_output(model, layer, larger, precision).shape
        fixed = [axis for axis in range(1, output.dim()) if grown[axis] == output.shape[axis]]
        if len(grown) == output.dim() and len(fixed) == 1:
            return fixed[0]
    # a model that takes one input size (a ViT), or a grid that does not follow it (an adaptive pool): tokens
    # hold their channels last, and maps first unless only their last side differs (a Swin stage at 384 is
    # 96x96x96: only the probe tells)
    last = output.dim() == 3 or output.shape[1] == output.shape[2] != output.shape[3]
    return output.dim() - 1 if last else 1


def as_grid(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """A layer's output (channels at `axis`) as an NxCxHxW view: maps, tokens on their grid, else 1x1."""
    moved = tensor.movedim(axis, 1)
    if moved.dim() == 3:  # less a class token where the rest make a square
        tokens = moved.shape[2]
        side = math.isqrt(tokens - 1 if tokens > 1 and math.isqrt(tokens - 1) ** 2 == tokens - 1 else tokens)
        return moved[:, :, tokens - side * side:].unflatten(2, (side, side))
    return moved if moved.dim() == 4 else moved.flatten(1)[:, :, None, None]


def layer_stride(size: tuple, grid: torch.Tensor) -> int:
    """How many input pixels a step of the layer's grid spans: the whole input for a layer without one."""
    return max(1, size[0] // grid.shape[-2])  # and at least 1, for a layer larger than its input


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
    """For the rows that ask, leaky-ReLU and average-pool gradients below the layer; forward values kept."""
    # ReLUs run out of place meanwhile, since the leak needs their inputs; F.relu in a forward is not a module

    def __init__(self, model: nn.Module, layer: nn.Module, own: bool = False):
        # the layer's own ReLU too where `own`: a unit to maximise must not start dead
        modules = [module for module in model.modules() if own or module is not layer]
        self.relus = [module for module in modules if isinstance(module, (nn.ReLU, nn.ReLU6))]
        self.pools = [module for module in modules if isinstance(module, nn.AdaptiveMaxPool2d)
                      or isinstance(module, nn.MaxPool2d) and as_pair(module.dilation) == (1, 1)]
        self.inplace = [module.inplace for module in self.relus]
        self.asking, self.masks = [], {}

    def __enter__(self) -> "Surrogate":
        self.hooks = forward_hooks({module: self.hook for module in self.relus + self.pools})
        self.hooks.__enter__()
        return self

    def __exit__(self, *exception) -> None:
        self.hooks.__exit__(*exception)
        for module, inplace in zip(self.relus, self.inplace):
            module.inplace = inplace

    def use(self, asking: list) -> None:
        """From now on, which rows of the batch take the surrogate gradients: a boolean each."""
        if asking != self.asking:
            self.asking, self.masks = asking, {}  # masks: by the output's dimensions, made once
            for module, inplace in zip(self.relus, self.inplace):
                module.inplace = inplace and not any(asking)

    def hook(self, module: nn.Module, inputs: tuple, output):
        if isinstance(output, tuple) or not torch.is_grad_enabled() or not any(self.asking):
            return None  # a tuple: return_indices, left as it is
        if output.dim() not in self.masks:  # the rows that take it: True for all, or an Nx1... 0/1 tensor
            self.masks[output.dim()] = True if all(self.asking) else torch.tensor(
                self.asking, device=output.device).view(-1, *[1] * (output.dim() - 1))
        mask = self.masks[output.dim()]
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
    """The original design's alpha-norm prior sum(|x|^alpha), taken over every value of each row."""
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


def data_term(outputs, data, weights, mask=None, project: bool = False) -> torch.Tensor:
    """Each row's rec_loss: weighted ||outputs - data||^2 or, projecting, -<outputs, data>, over `mask`."""
    outputs = outputs if mask is None else outputs * mask
    if project:  # caricature and maximize: the data is a direction
        return -per_row(outputs * data) * weights
    squares = nn.functional.mse_loss(outputs, data, reduction="none")  # one kernel, both ways
    return per_row(squares) * weights


def prior_terms(settings: Settings, images, pixels=None) -> dict:
    """Each row's weighted alpha_loss and tv_loss: the original design's, or the paper's over `pixels`."""
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
    """The starting noise: the original design's 1e-3 * N(0, 1), or the paper's uniform noise of norm ~B."""
    if objective == "seed":
        return 1e-3 * torch.randn(shape, generator=generator)
    noise = 2 * torch.rand(shape, generator=generator) - 1
    # the authors' code scales so that the 95th percentile becomes B / sqrt(3)
    noise *= PAPER_B / math.sqrt(3) / noise.flatten().quantile(0.95)
    return noise / to_paper_units(torch.ones(1, 3, 1, 1))


def fft_size(length: int) -> int:
    """The smallest length >= `length` with no prime factor above 7, for which FFTs are fast."""
    def rest(size: int) -> int:  # what is left of `size` after its factors 2, 3, 5 and 7
        for prime in (2, 3, 5, 7):
            while size % prime == 0:
                size //= prime
        return size

    return next(size for size in itertools.count(length) if rest(size) == 1)


class PixelImage:
    """Images as they are: each pixel a free variable, projected into the box after each step."""

    def __init__(self, size: tuple, device: torch.device, objective: str):
        self.size, self.device, self.objective, self.boxed = size, device, objective, objective == "paper"

    def initial(self, generator: torch.Generator, start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A new 1x3xHxW variable: the objective's starting noise, or the normalised image `start`."""
        if start is not None:  # and the original design's faint noise, so that samples differ
            return start.detach() + initial_noise("seed", start.shape, generator).to(start)
        return initial_noise(self.objective, (1, 3, *self.size), generator).to(self.device)

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
            return faint
        colour = self.paper_colour[:, :, 0, 0]  # render's steps undone: colour, crop, spectrum and scale
        decorrelated = torch.linalg.solve(colour, to_paper_units(start.float()).flatten(2))
        (height, width), (canvas_height, canvas_width) = self.size, self.canvas
        canvas = nn.functional.pad(decorrelated.unflatten(2, self.size), (0, canvas_width - width, 0,
                                                                          canvas_height - height))
        spectrum = torch.fft.rfftn(canvas, dim=(-2, -1), norm="ortho") / self.scale
        return torch.view_as_real(spectrum) + faint / 10  # a tenth: about 2 % of a photo

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


# ---------------------------------------------------------------- the data term's targets


def checked_features(features, output: torch.Tensor, source: str) -> torch.Tensor:
    """Saved activations, untrusted: a dense float tensor of the layer's shape, a row per row of `output`,
    finite, whose squares stay inside float32; fp32 and detached. UsageError naming `source` otherwise."""
    if not isinstance(features, torch.Tensor):
        raise UsageError(f"{source} holds a {type(features).__name__}, not a tensor")
    if features.layout != torch.strided or not features.is_floating_point():
        raise UsageError(f"{source} holds a {features.dtype} tensor, {features.layout}: not a dense float "
                         "one")
    if features.device.type not in ("cpu", output.device.type):  # a meta tensor holds no values
        raise UsageError(f"{source} holds a tensor on {features.device}, not on the CPU nor the layer's "
                         "device")
    batched = features[None] if features.dim() == output.dim() - 1 else features
    if batched.dim() != output.dim() or batched.shape[1:] != output.shape[1:]:  # before any work on them
        saved = features.shape[1:] if features.dim() == output.dim() else features.shape
        shapes = ["x".join(map(str, shape)) or "one number" for shape in (saved, output.shape[1:])]
        raise UsageError(f"{source}: the saved activations are {shapes[0]}, but the layer gives {shapes[1]} "
                         "at this input size")
    if len(batched) != len(output):
        raise UsageError(f"{source} holds {len(batched)} rows of activations, for {len(output)} image(s)")
    values = batched.detach().double()
    if not torch.isfinite(values).all():
        raise UsageError(f"{source} holds values that are not finite (NaN or inf)")
    if values.square().flatten(1).sum(1).max().item() > torch.finfo(torch.float32).max:
        raise UsageError(f"{source} holds values up to {values.abs().max().item():.3g}: their squares "
                         "overflow")
    zero = [row for row, nonzero in enumerate(values.flatten(1).any(1).tolist()) if not nonzero]
    if zero:  # a row's own failure, as a photo's would be
        raise RowError({row: f"{source} holds activations that are all zero: there is nothing to invert"
                        for row in zero})
    return values.float().to(output.device)


def part_mask(output: torch.Tensor, window: int, channels: str, axis: int) -> Optional[torch.Tensor]:
    """1 where the layer's output counts in the data term (--window, --channels), 0 elsewhere; None: all."""
    if not window and channels == "all":
        return None
    mask = torch.zeros_like(output[:1])
    grid = as_grid(mask, axis)
    count, (height, width) = grid.shape[1], grid.shape[-2:]
    low, high = (0, count) if channels == "all" else map(int, channels.split(":"))
    if high > count:
        raise UsageError(f"--channels {channels}: the layer has {count} channels")
    if window > min(height, width):
        raise UsageError(f"--window {window}: the layer's grid is {height}x{width}")
    top, left = (height - window) // 2, (width - window) // 2
    inside = (slice(top, top + window), slice(left, left + window)) if window else (slice(None), slice(None))
    grid[(slice(None), slice(low, high), *inside)] = 1
    return mask


def check_units(units: list, count: int) -> None:
    """UsageError for a unit beyond the layer's `count` units (channels)."""
    for unit in units:
        if unit >= count:
            raise UsageError(f"--units {unit}: the layer has {count} units (channels), 0 to {count - 1}")


def layer_settings(settings: Settings, stride: int) -> dict:
    """The jitter, C, plateau, surrogate, decays and rate where the layer's stride decides them."""
    return {"jitter": max(1, round(stride / 4)) - 1 if settings.jitter == "auto" else settings.jitter,
            "C": settings.C if settings.C != "auto" else MAXIMIZE_C if settings.task == "maximize" else
            PAPER_C * min(1.0, FULL_C_STRIDE / stride) ** 2,
            "plateau": settings.plateau if stride <= PLATEAU_STRIDE else 0.0,
            "surrogate": settings.surrogate == "on", "decay_epochs": decay_iterations(settings),
            "lr": AUTO_LR * (0.5 if stride >= AUTO_LR_STRIDE else 1.0) if settings.lr == "auto"
            else settings.lr}


class Targets:
    """What the rows aim at, at their layer: each row's target (its unit's direction, to maximize), weight
    and mask, and the settings the layer's stride decides; a reference's for each of its samples."""

    def __init__(self, model: nn.Module, layer: nn.Module, references: torch.Tensor, settings: Settings,
                 units: Optional[list] = None, features: Optional[torch.Tensor] = None):
        output = checked_output(model, layer, references, settings.precision)
        axis = channel_axis(model, layer, output, references.shape[-2:], settings.precision)
        self.decided = layer_settings(settings, layer_stride(references.shape[-2:], as_grid(output, axis)))
        self.task, self.mask = settings.task, part_mask(output, settings.window, settings.channels, axis)
        if features is not None:  # saved activations in place of the references'
            output = checked_features(features, output, "features")
        finite = torch.isfinite(output).flatten(1).all(1).tolist()
        masked = output if self.mask is None else output * self.mask
        squares = per_row(masked.nan_to_num().square())
        where = " in --window/--channels" if self.mask is not None else ""
        unsound = {row: not_finite("this photo", settings.precision) if not ok else f"the layer's "
                   f"activations for this photo are all zero{where}: there is nothing to invert"
                   for row, (ok, total) in enumerate(zip(finite, squares.tolist())) if not ok or not total}
        if unsound:
            raise RowError(unsound)
        if settings.task != "maximize":
            self.data, self.weights = masked, self.decided["C"] / squares  # C / ||target||^2
        else:
            self.maximize(output, axis, squares, units, settings.unit_scope)
            self.unit_stats = [stats for stats in self.unit_stats for _ in range(settings.samples)]
        self.data, self.weights = (part.repeat_interleave(settings.samples, 0)
                                   for part in (self.data, self.weights))

    def maximize(self, output: torch.Tensor, axis: int, squares: torch.Tensor, units: list, scope: str):
        """Each row's unit's direction and weight, and the photo's own activation of it."""
        self.data, grids = torch.zeros_like(output), as_grid(output, axis)
        check_units(units, grids.shape[1])
        middle = (grids.shape[-2] // 2, grids.shape[-1] // 2) if scope == "neuron" else ()
        for row, unit in enumerate(units):  # 1 at the unit: its channel's centre neuron, or the whole channel
            as_grid(self.data, axis)[(row, unit, *middle)] = 1
        # a unit's weight: C over the photo's typical activation at the layer, so one C serves every layer
        rms = (squares / output[0].numel()).sqrt()
        self.weights = self.decided["C"] / (per_row(self.data) * rms)
        activations = (per_row(output * self.data) / per_row(self.data)).tolist()
        self.unit_stats = [{"layer_rms": scale, "photo_activation": value,
                            "photo_max": grids[row, unit].max().item()}
                           for row, (unit, value, scale) in enumerate(zip(units, activations, rms.tolist()))]

    def rec_loss(self, output: torch.Tensor) -> torch.Tensor:
        """Each row's data term for the layer's `output`."""
        return data_term(output.float(), self.data, self.weights, self.mask, self.task != "invert")

    def measures(self, rec_loss: list, output: torch.Tensor) -> list:
        """Per row, what its task reports: the feature error, the projection and cosine, or the unit's."""
        C = self.decided["C"]
        if self.task == "invert":
            return [{"feature_error": loss / C} for loss in rec_loss]
        if self.task == "caricature":  # the projection <phi(x), phi0> / ||phi0||^2
            outputs = output.float() if self.mask is None else output.float() * self.mask
            cosines = nn.functional.cosine_similarity(outputs.flatten(1), self.data.flatten(1)).tolist()
            return [{"projection": -loss / C, "cosine": cosine} for loss, cosine in zip(rec_loss, cosines)]
        return [{"unit_activation": -loss * stats["layer_rms"] / C, **stats}
                for loss, stats in zip(rec_loss, self.unit_stats)]


# ---------------------------------------------------------------- the inversion


class Inversion(NamedTuple):
    """What invert() returns: per row its image, losses and task measures, iterations and why it stopped."""

    images: torch.Tensor
    losses: list  # per row: rec_loss, alpha_loss, tv_loss and what its task measures, of the returned image
    iterations: list  # per row: the updates its image had (a row that diverged: its last finite image's)
    stopped: list  # per row: "epochs" (all ran), "plateau", "interrupted" (Ctrl-C) or "diverged"
    settings: Settings
    layer_settings: dict  # the jitter, C, plateau, surrogate, decays and rate that the layer decided


class Canvas:
    """The batch's images: one variable of their parameterisation, each row on a canvas `jitter` wider than
    its image (the image its middle), drawing from its own generator; and each row's last finite copy."""

    def __init__(self, settings: Settings, size: tuple, jitter: int, generators: list, device: torch.device,
                 photos: Optional[torch.Tensor] = None):
        self.size, self.jitter, self.generators = tuple(size), jitter, generators
        canvas, middle = (size[0] + jitter, size[1] + jitter), jitter // 2
        self.image = PARAMETERISATIONS[settings.param](canvas, device, settings.objective)
        # a caricature starts from its photo, at the canvas's middle
        framed = None if photos is None else \
            nn.functional.pad(photos, (middle, jitter - middle) * 2, "replicate")
        self.variable = torch.cat([self.image.initial(generator, None if photos is None else framed[[row]])
                                   for row, generator in enumerate(generators)]).requires_grad_()
        self.last_finite = self.variable.detach().clone()
        self.last_finite_at = [0] * len(generators)  # the updates each row's last finite copy had had

    def render(self, jittering: list) -> tuple:
        """(The images the network sees, cut from their canvases at random offsets where `jittering`, else
        the middle; the whole canvases, normalised; and in the paper's units, or None)."""
        whole, pixels = self.image.render(self.variable)
        if not self.jitter:
            return whole, whole, pixels
        (height, width), middle = self.size, self.jitter // 2
        offsets = [torch.randint(0, self.jitter + 1, (2,), generator=generator).tolist() if on else
                   (middle, middle) for generator, on in zip(self.generators, jittering)]
        crops = [whole[row:row + 1, :, top:top + height, left:left + width]
                 for row, (top, left) in enumerate(offsets)]
        return torch.cat(crops), whole, pixels

    @torch.no_grad()
    def current(self) -> torch.Tensor:
        """Every row's image now, its canvas's middle: a copy."""
        (height, width), middle = self.size, self.jitter // 2
        whole = self.image.render(self.variable)[0]
        return whole[:, :, middle:middle + height, middle:middle + width].clone()

    @torch.no_grad()
    def keep_finite(self, losses: torch.Tensor, total: torch.Tensor, step: int) -> list:
        """Copy the rows whose losses are finite as their last finite images; return the others."""
        # waits for a GPU: only when due; a finite sum, the common case, in one op
        finite = [True] * len(losses) if math.isfinite(total.item()) else torch.isfinite(losses).tolist()
        good = [row for row, ok in enumerate(finite) if ok]
        broken = [row for row, ok in enumerate(finite) if not ok]
        if broken and step == 1:
            raise RowError({row: "the loss is not finite at the start, before any step, so --lr is not the "
                            "cause: the model gives non-finite values for this image (unsound weights?), or "
                            "a weight such as --C is too large" for row in broken})
        if not broken:
            self.last_finite.copy_(self.variable)
        elif good:
            self.last_finite[good] = self.variable[good]
        self.last_finite_at = [step - 1 if ok else at for ok, at in zip(finite, self.last_finite_at)]
        return broken

    @torch.no_grad()
    def restore(self, rows: list) -> None:
        """Put `rows` back to their last finite images."""
        if rows:
            self.variable[rows] = self.last_finite[rows]


class Descent:
    """SGD with momentum, or Adam (beta1 --momentum), with a rate per row: torch's optimizers take one."""

    def __init__(self, settings: Settings, variable: torch.Tensor):
        self.adam, self.momentum = settings.optimizer == "adam", settings.momentum
        self.variable, self.steps, self.rates, self.rates_given = variable, 0, None, None
        self.average, self.squares = torch.zeros_like(variable), torch.zeros_like(variable)
        self.largest = torch.finfo(variable.dtype).max  # a rate beyond it makes the step diverge, not raise

    def set_rates(self, rates: list) -> None:
        """Each row's rate from now on (0 holds it still): a number while all agree, else a tensor."""
        if rates != self.rates_given:
            self.rates_given, shape = rates, (-1, *[1] * (self.variable.dim() - 1))
            self.rates = float(rates[0]) if len(set(rates)) == 1 else \
                torch.tensor(rates, device=self.variable.device).view(shape)

    @torch.no_grad()
    def step(self) -> None:
        """One update of every row by its gradient, at its rate; `steps` counts the updates made."""
        steps, rates, denominator = self.steps + 1, self.rates, None
        variable, gradient, average, squares = self.variable, self.variable.grad, self.average, self.squares
        if self.adam:  # torch's Adam, its two bias corrections folded into the rate and epsilon
            average.lerp_(gradient, 1 - self.momentum)
            squares.mul_(ADAM_BETA2).addcmul_(gradient, gradient, value=1 - ADAM_BETA2)
            corrected = math.sqrt(1 - ADAM_BETA2 ** steps)
            rates = rates * corrected / (1 - self.momentum ** steps)
            denominator = squares.sqrt().add_(ADAM_EPSILON * corrected)
        else:
            average.mul_(self.momentum).add_(gradient)
        if not isinstance(rates, float):
            variable.sub_(rates * average if denominator is None else rates * average / denominator)
        elif denominator is None:  # one rate for all: one op
            variable.add_(average, alpha=-min(rates, self.largest))
        else:
            variable.addcdiv_(average, denominator, value=-min(rates, self.largest))
        self.steps = steps  # once made: Ctrl-C before it leaves the count true

    @torch.no_grad()
    def forget(self, rows: list) -> None:
        """Clear the momentum of `rows`, put back after a step that was not finite: they hold still."""
        if rows:
            self.average[rows], self.squares[rows] = 0, 0


def learning_rate(base: float, step: int, first_stage_end: int, settings: Settings) -> float:
    """A row's rate at `step`: `base` through its first stage, then decayed every decay_iterations()."""
    decays = 0 if step <= first_stage_end else 1 + (step - first_stage_end - 1) // decay_iterations(settings)
    return base * settings.decay_factor ** decays


class Schedule:
    """Each row's first stage (jitter, surrogate, the full rate) ends after first_stage_end[row], or at a
    plateau, and the row stops after last[row]."""

    def __init__(self, settings: Settings, decided: dict, count: int, device: torch.device):
        self.settings, self.decided = settings, decided  # what the layer's stride decided
        self.first_stage_end, self.last = [decay_iterations(settings)] * count, [settings.epochs] * count
        self.why = ["epochs"] * count  # why each row stops at its last iteration
        self.lowest = torch.full((count,), math.inf, device=device)  # Adam's loss oscillates
        self.before = [None] * count  # each row's lowest loss PLATEAU_WINDOW iterations ago

    def first_stage(self, step: int) -> list:
        """Whether each row is in its first stage at iteration `step`."""
        return [step <= end for end in self.first_stage_end]

    def rates(self, step: int) -> list:
        """Each row's rate at iteration `step`: 0 for a row that has stopped."""
        return [learning_rate(self.decided["lr"], step, end, self.settings) if step <= last else 0.0
                for end, last in zip(self.first_stage_end, self.last)]

    def plateau(self, step: int, losses: torch.Tensor) -> None:
        """Apply the plateau rule at iteration `step`, whose rows had `losses` before its update."""
        if not self.decided["plateau"] or step > max(self.first_stage_end):
            return
        torch.minimum(self.lowest, losses.detach(), out=self.lowest)
        if step % PLATEAU_WINDOW:
            return
        for row, lowest in enumerate(self.lowest.tolist()):  # .tolist() waits for a GPU: once a window
            before, self.before[row] = self.before[row], lowest
            if before is not None and step < self.first_stage_end[row] and step <= self.last[row] and \
                    before - lowest < self.decided["plateau"] * abs(before):
                self.first_stage_end[row] = step
                self.last[row] = min(self.last[row], step + math.ceil(step * (1 - FIRST_STAGE) / FIRST_STAGE))
                self.why[row] = "plateau" if self.last[row] < self.settings.epochs else "epochs"

    def diverge(self, rows: list, iterations: list) -> None:
        """Stop `rows`, whose loss was not finite: each after the iterations of its last finite image."""
        for row in rows:
            self.last[row], self.why[row] = iterations[row], "diverged"

    def outcome(self, row: int, updates: int) -> tuple:
        """(How many iterations `row` ran, and why it stopped), the loop having made `updates`."""
        if self.why[row] != "diverged" and updates < self.last[row]:
            return updates, "interrupted"
        return self.last[row], self.why[row]


def sample_seed(seed: int, sample: int) -> int:
    """The seed of sample `sample` of a row: --seed, then steps of 2^64 over the golden ratio."""
    return (seed + sample * 0x9E3779B97F4A7C15) % 2 ** 64


def check_references(model: nn.Module, layer, references) -> None:
    """UsageError unless `layer` is a module and `references` Nx3xHxW floats of the model's dtype, device."""
    if not isinstance(layer, nn.Module):
        raise UsageError(f"invert() takes one layer, a module of the model: got a {type(layer).__name__}")
    weight = next(model.parameters(), references)  # a model without parameters takes any float
    if isinstance(references, torch.Tensor) and references.dim() == 4 and len(references) and \
            references.shape[1] == 3 and references.is_floating_point() and \
            (references.dtype, references.device) == (weight.dtype, weight.device):
        return
    got = f"a {type(references).__name__}" if not isinstance(references, torch.Tensor) else \
        f"a {references.dim()}-D tensor of shape {'x'.join(map(str, references.shape))}, " \
        f"{references.dtype} on {references.device}" + \
        ("; add a batch dimension: .unsqueeze(0)" if references.dim() == 3 else "")
    raise UsageError(f"invert() needs the references as Nx3xHxW images, at least one, of the model's dtype "
                     f"and device, {weight.dtype} on {weight.device}, normalised as preprocess() makes them: "
                     f"got {got}")


def invert(model: nn.Module, layer: nn.Module, references: torch.Tensor, settings: Optional[Settings] = None,
           *, callback: Optional[Callable] = None, units=None, features=None, **overrides) -> Inversion:
    """Optimise one image per row of `references` (`samples` per row) to match the row at `layer`.

    `settings`, or its fields as keywords, named as the flags; None takes the objective's default.
    `callback(step, losses, images)` sees every iteration: each term per row (a row that has stopped keeps
    its image), and a function that gives the images. Ctrl-C returns early. task="maximize" takes `units`,
    a channel per row or one for all; `features`, a row per reference, replace the references' activations
    at the layer. Bad input raises UsageError; rows that cannot be inverted, RowError (`.reasons`, by row).
    """
    check_references(model, layer, references)
    unknown = set(overrides) - {field.name for field in dataclasses.fields(Settings)}
    if unknown or not isinstance(Settings() if settings is None else settings, Settings):
        raise UsageError(f"invert() takes Settings and their fields as keywords: got {unknown or settings!r}")
    settings = resolve(dataclasses.replace(settings or Settings(), **overrides), references.device,
                       units is not None, features is not None)
    count, samples = len(references), settings.samples
    if units is not None:  # a list, tuple, array or 1-d tensor of them, or one for every row
        many = hasattr(units, "__iter__") and not isinstance(units, (str, bytes, dict)) and \
            getattr(units, "ndim", 1) > 0
        units = [unit_index(unit) for unit in units] if many else [unit_index(units)] * count
        if len(units) != count:
            raise UsageError(f"invert() needs a unit per row of the references, or one: got {len(units)} "
                             f"for {count}")
    targets = Targets(model, layer, references, settings, units, features)
    try:
        return optimise(model, layer, targets, references.repeat_interleave(samples, 0), settings, callback)
    except RowError as error:  # told by row of `references`, not by sample
        raise RowError({row // samples: reason for row, reason in error.reasons.items()}) from None


def optimise(model: nn.Module, layer: nn.Module, targets: Targets, references: torch.Tensor,
             settings: Settings, callback: Optional[Callable]) -> Inversion:
    """invert()'s loop: every row of the batch, iteration after iteration, until each has stopped."""
    # each row's own generator draws what a call of its own would
    generators = [torch.Generator().manual_seed(sample_seed(settings.seed, row % settings.samples))
                  for row in range(len(references))]
    canvas = Canvas(settings, references.shape[-2:], targets.decided["jitter"], generators, references.device,
                    references if settings.task == "caricature" else None)
    descent = Descent(settings, canvas.variable)
    schedule = Schedule(settings, targets.decided, len(references), references.device)
    with Surrogate(model, layer, own=settings.task == "maximize") as surrogate, \
            contextlib.suppress(KeyboardInterrupt):
        for step in range(1, settings.epochs + 1):
            if step > max(schedule.last):
                break
            terms = iteration(model, layer, settings, targets, canvas, descent, schedule, surrogate, step)
            if callback is not None:
                callback(step, terms, canvas.current)
    return final_result(model, layer, settings, targets, canvas, schedule, descent.steps)


def iteration(model: nn.Module, layer: nn.Module, settings: Settings, targets: Targets, canvas: Canvas,
              descent: Descent, schedule: Schedule, surrogate: Surrogate, step: int) -> dict:
    """Iteration `step` of every row: render, forward, loss, backward, step, record; each term per row."""
    first = schedule.first_stage(step)  # jitter and surrogate gradients
    surrogate.use([on and targets.decided["surrogate"] for on in first])
    terms, losses, _ = evaluate(model, layer, settings, targets, canvas, first)
    total = losses.sum()
    every = CHECK_EVERY.get(total.device.type, GPU_CHECK_EVERY)
    due = step == 1 or step % every == 0 or step in schedule.last
    broken = canvas.keep_finite(losses, total, step) if due else []
    canvas.variable.grad = None
    total.backward()
    descent.set_rates(schedule.rates(step))
    descent.step()
    canvas.image.after_step(canvas.variable)
    canvas.restore(broken)
    descent.forget(broken)
    schedule.plateau(step, losses)
    schedule.diverge(broken, canvas.last_finite_at)  # after the plateau rule, which must not make it one
    return terms


def evaluate(model: nn.Module, layer: nn.Module, settings: Settings, targets: Targets, canvas: Canvas,
             jittering: list) -> tuple:
    """Render, forward, weigh: (each term per row, each row's loss, the layer's output)."""
    images, whole, pixels = canvas.render(jittering)
    with autocast(settings.precision, images.device):
        output = layer_output(model, layer, images)
    terms = {"rec_loss": targets.rec_loss(output), **prior_terms(settings, whole, pixels)}
    return terms, terms["rec_loss"] + terms["alpha_loss"] + terms["tv_loss"], output


@torch.no_grad()
def final_result(model: nn.Module, layer: nn.Module, settings: Settings, targets: Targets, canvas: Canvas,
                 schedule: Schedule, updates: int) -> Inversion:
    """Every row's image at its canvas's middle, its losses and measures, and how it ended (`updates`: the
    iterations the loop made); a last step that broke a row undone."""
    count = len(schedule.last)
    for _ in range(2):  # the second time, with any row that the last update broke put back
        terms, losses, output = evaluate(model, layer, settings, targets, canvas, [False] * count)
        broken = [row for row, finite in enumerate(torch.isfinite(losses).tolist()) if not finite]
        if not broken:
            break
        canvas.restore(broken)
        schedule.diverge(broken, canvas.last_finite_at)
    values = {name: term.tolist() for name, term in terms.items()}
    losses = [{**{name: value[row] for name, value in values.items()}, **measures}
              for row, measures in enumerate(targets.measures(values["rec_loss"], output))]
    outcomes = [schedule.outcome(row, updates) for row in range(count)]
    return Inversion(canvas.current(), losses, [done for done, _ in outcomes], [why for _, why in outcomes],
                     settings, targets.decided)


# ---------------------------------------------------------------- the job: the model and its layers by name


def pretrained_weights(name: str, weights: str):
    """torchvision's weights `weights` (DEFAULT or another name) of model `name`; None: 'none' or a file."""
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose from {', '.join(names)}"
        raise UsageError(f"unknown --model {name!r}; {hint}")
    members = torchvision.models.get_model_weights(name).__members__
    if weights in members:  # a weights name wins over a file or folder of that name: ./DEFAULT is the file
        return members[weights]
    if weights.lower() == "none" or os.sep in weights or "/" in weights or Path(weights).suffix or \
            Path(weights).exists():
        return None
    raise UsageError(f"--weights {weights!r} is not a file, 'none', or one of {name}'s weights: "
                     f"{', '.join(members)}")


def weights_identity(name: str, weights: str) -> tuple:
    """(The weights' identity in records: torchvision's URL, 'none' or a file's sha256; the file's bytes)."""
    member = pretrained_weights(name, weights)
    if member is not None or weights.lower() == "none":
        return "none" if member is None else member.url, None
    data = read_bytes(weights, "--weights")
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def load_model(name: str, weights: str, progress: bool = True, data: Optional[bytes] = None) -> nn.Module:
    """Torchvision model `name`, frozen, with torchvision's weights, a state-dict file's (`data`) or none."""
    member = pretrained_weights(name, weights)
    if member is not None:
        return load_pretrained(name, member, progress).eval().requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet's and inception_v3's notice on init
        model = torchvision.models.get_model(name, weights=None)
    if weights.lower() == "none":
        print(f"warning: --weights none: {name} is randomly initialised, so the result does not show what a "
              "trained network sees", file=sys.stderr)
    else:
        load_state_dict_file(model, name, weights, data or read_bytes(weights, "--weights"))
    return model.eval().requires_grad_(False)


def load_pretrained(name: str, member, progress: bool) -> nn.Module:
    """`name` with torchvision's weights `member`, downloaded once to TORCH_HOME, where they are read with
    weights_only before torchvision reads them."""
    file = os.path.basename(urllib.parse.urlparse(member.url).path)
    checkpoint = Path(torch.hub.get_dir(), "checkpoints", file)
    damaged = f"cannot read cached weights {checkpoint} ({{}}); delete it to download again"
    try:
        if not checkpoint.exists():  # torch.hub's download, its hash checked against the name's
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            prefix = torch.hub.HASH_REGEX.search(file)
            torch.hub.download_url_to_file(member.url, str(checkpoint), prefix and prefix.group(1), progress)
    except Exception as error:  # a refused download (URLError is an OSError), a bad hash
        raise UsageError(f"could not download {name} weights {file} from {member.url} ({one_line(error)}); "
                         f"put that file in {checkpoint.parent}/ (the cache under TORCH_HOME), or pass "
                         "--weights PATH to a state-dict file, or --weights none for random weights") \
            from None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stdout if progress else io.StringIO()):
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # of a file refused anyway
            torch.load(checkpoint, map_location="cpu", weights_only=True)
            return torchvision.models.get_model(name, weights=member, progress=progress)
    except Exception as error:  # a damaged file, or one whose pickle holds more than tensors
        raise UsageError(damaged.format(one_line(error))) from None


def load_state_dict_file(model: nn.Module, name: str, path: str, data: bytes) -> None:
    """Load a state-dict file's bytes into `model`, weights_only; UsageError if they misfit."""
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


def underscored(name: str) -> str:
    """The original design's spelling of a dotted module name: features.4 -> features_4."""
    return name.replace(".", "_")


def resolve_layer(model: nn.Module, layer_name: str) -> nn.Module:
    """The module that `features_4`, `features.4`, `layer3.1.conv2` or the like names."""
    dotted = [name for name, _ in model.named_modules() if name]
    # a module's real name wins over another module's underscored spelling
    spellings = {**{underscored(name): name for name in reversed(dotted)}, **{name: name for name in dotted}}
    if layer_name not in spellings:
        valid = [underscored(name) for name in dotted]
        close = difflib.get_close_matches(layer_name, valid, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"unknown --layer_name {layer_name!r}; {hint}valid names: {', '.join(valid)}")
    return model.get_submodule(spellings[layer_name])


def probe_layer(model: nn.Module, layer: nn.Module, size: int, precision: str, device: torch.device) -> tuple:
    """(The layer's output for a blank image, its channel axis, the activations a forward pass to it makes);
    UsageError if the model cannot run at this size or is not finite."""
    blank, counted = torch.zeros(1, 3, size, size, device=device), []

    def count(module, inputs, output):
        counted.append(output.numel() if isinstance(output, torch.Tensor) else 0)

    leaves = [module for module in model.modules() if not any(module.children())]
    with forward_hooks(dict.fromkeys(leaves, count)):
        output = checked_output(model, layer, blank, precision)
    if not torch.isfinite(output).all():
        raise UsageError(not_finite("a blank image", precision))
    return output, channel_axis(model, layer, output, (size, size), precision), sum(counted) + output.numel()


def receptive_field(model: nn.Module, layer: nn.Module, size: int, settings: Settings, axis: int,
                    device: torch.device) -> list:
    """[left, top, right, bottom) of the input pixels that the window's activations depend on, from their
    gradient, with leaky ReLUs and average pools so that every path that can carry one does."""
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with Surrogate(model, layer, own=True) as surrogate, torch.enable_grad():
        images.requires_grad_()
        surrogate.use([True, True])
        output = layer_output(model, layer, images)
        mask = part_mask(output, settings.window, settings.channels, axis)
        gradient, = torch.autograd.grad((output.float() * mask).sum(), images)
    reached = gradient.abs().sum((0, 1)) > 0
    if not reached.any():
        raise UsageError("the window's activations do not depend on the input: no receptive field to draw")
    rows, columns = (reached.any(dim).nonzero()[:, 0].tolist() for dim in (1, 0))
    return [columns[0], rows[0], columns[-1] + 1, rows[-1] + 1]


# ---------------------------------------------------------------- launchers, photos and names


def launcher_int(name: str, least: int = 0) -> Optional[int]:
    """Environment variable `name` as an integer >= `least`, None if unset."""
    text = os.environ.get(name)
    if text is not None and not re.fullmatch(r"\s*[-+]?[0-9]+\s*", text):
        raise UsageError(f"the environment variable {name}={text!r} is not an integer")
    if text is not None and int(text) < least:
        raise UsageError(f"the environment variable {name}={int(text)} is below {least}")
    return None if text is None else int(text)


def pick_device(spec: str) -> torch.device:
    """--device as a torch.device that is here; under torchrun, auto is cuda:$LOCAL_RANK."""
    local = launcher_int("LOCAL_RANK")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        spec += f":{local}" if spec == "cuda" and local is not None else ""
    try:
        device = torch.device(spec)
        assert device.type in ("cpu", "cuda", "mps")
    except (RuntimeError, AssertionError):
        raise UsageError(f"--device {spec!r} is not supported: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "mps" and not torch.backends.mps.is_available() or \
            device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}" + (" (from LOCAL_RANK)" if local is not None else "") +
                         f": no such device here ({torch.cuda.device_count()} CUDA device(s))")
    if device.type == "cuda":  # under torchrun, each process its own: what allocates on "cuda" goes there
        torch.cuda.set_device(device)
    return device


def shard_of(shard: Optional[tuple], photos: int) -> tuple:
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
        raise UsageError(f"the environment variable {lacking} is not set, but {have} is: torchrun sets RANK, "
                         "WORLD_SIZE and LOCAL_RANK together")
    for name, value in (("RANK", rank), ("LOCAL_RANK", local)):
        if value is not None and value >= world:
            raise UsageError(f"the environment variable {name}={value} is not below WORLD_SIZE={world}")
    if shard:
        return shard
    part, parts = (0, 1) if photos < 2 else (part, parts)
    return (part, parts) if world is None else (part * world + rank, parts * world)


def photo_paths(named: list) -> list:
    """The photos named, as absolute paths: files, and folders' files that Pillow reads but hidden ones and
    the pictures this tool wrote."""
    Image.init()
    readable = {suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN
                and not (isinstance(Image.OPEN[kind][0], type)  # a stub opens nothing without a handler
                         and issubclass(Image.OPEN[kind][0], ImageFile.StubImageFile))}

    def written_here(path: str) -> bool:
        with contextlib.suppress(Exception), Image.open(path) as opened:
            return opened.info.get("Software") == MARK or opened.info.get("comment") == MARK.encode()
        return False

    paths = []
    for item in named:
        inside = [os.path.join(item, name) for name in sorted(os.listdir(item)) if not name.startswith(".")
                  and os.path.splitext(name)[1].lower() in readable] if os.path.isdir(item) else [item]
        inside = [os.path.abspath(path) for path in inside if not os.path.isdir(item) or
                  os.path.isfile(path) and not written_here(path)]
        if not inside:
            raise UsageError(f"--image_path {item} is a folder with no images in it (files ending in "
                             ".jpg, .png, .webp, .tif and the other formats Pillow reads)")
        paths += inside
    return list(dict.fromkeys(paths))


def photo_names(paths: list, room: int = 255) -> dict:
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


class Input(NamedTuple):
    """A photo, or saved features, as the job read it, once: its bytes' hash and its content, or why not."""

    sha256: Optional[str]
    error: Optional[str]
    image: Optional[Image.Image] = None  # a photo resized and cropped as the network sees it, 8-bit
    features: Optional[torch.Tensor] = None  # --features' tensor, as loaded: checked at the layer


def read_input(path: str, size: int, features: bool) -> Input:
    """Read a photo, or saved features, once: hash it, then decode and crop it, or load it weights_only."""
    try:
        data = read_bytes(path, "--features" if features else "--image_path")
        if not features:
            image = load_image(path, data)
            # Resize scales the shorter side to `size` before the crop: a long strip becomes very long
            check_memory(3 * size * size * max(image.size) / min(image.size), torch.device("cpu"),
                         f"resizing {path} to --input_size {size}", "use a smaller --input_size")
            return Input(hashlib.sha256(data).hexdigest(), None, image=crop(image, size))
        try:  # torch.save writes a zip archive, uncompressed: anything else may claim sizes it does not hold
            archive = zipfile.ZipFile(io.BytesIO(data))
            if any(entry.compress_type != zipfile.ZIP_STORED for entry in archive.infolist()):
                raise ValueError("it is compressed, and torch.save never compresses")
            if archive.testzip() is not None:  # torch's reader checks no CRC
                raise ValueError(f"{archive.testzip()} is damaged: its CRC does not match")
            with warnings.catch_warnings():  # e.g. about the pickle protocol of a file refused anyway
                warnings.simplefilter("ignore", UserWarning)
                loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # not a zip archive, a pickle beyond tensors, a damaged file
            raise UsageError(f"--features {path} is not a tensor that torch.save wrote ({one_line(error)})") \
                from None
        return Input(hashlib.sha256(data).hexdigest(), None, features=loaded)
    except UsageError as error:
        return Input(None, str(error))


class Row(NamedTuple):
    """One pre-image of the job: a photo (or saved features) at a layer (and a unit); its files are named as
    its PNG, with other endings."""

    image_path: str
    layer_name: str
    png: Path
    montage: Optional[Path]  # the photo's montage of its layers, or (maximize) the layer's mosaic of units
    unit: Optional[int] = None

    def file(self, ending: str) -> Path:
        return self.png.with_name(self.png.stem + ending)

    def sample(self, index: int) -> Path:
        return self.png if index == 0 else self.file(f"_sample{index + 1}.png")

    def pictures(self, samples: int, gif: bool, field: bool) -> list:
        """The pictures a finished row has: its samples, their mean and spread, its GIF and field."""
        endings = ["_mean.png", "_spread.png"] * (samples > 1) + [".gif"] * gif + ["_field.png"] * field
        return [*map(self.sample, range(samples)), *map(self.file, endings)]

    def outputs(self, samples: int, gif: bool, field: bool) -> dict:
        """Every path the row may write, True for a folder: its pictures, record, diverged image and frames
        (its samples past the first as one pattern)."""
        extra = [".json", ".diverged.png", *["_sample*.png"] * (samples > 1), *["_frames"] * gif]
        paths = [*self.pictures(min(samples, 2), gif, field), *map(self.file, extra)]
        return {path: path.name.endswith("_frames") for path in paths}


def kind_words(settings: Settings, features: bool) -> list:
    """The words that tell a row's kind of pre-image apart in its names: none for a photo's inversion."""
    channels = "channels" + settings.channels.replace(":", "-")
    return [word for word, applies in (("caricature", settings.task == "caricature"),
                                       ("channel", settings.unit_scope == "channel"),
                                       (f"window{settings.window}", settings.window),
                                       (channels, settings.channels != "all"), ("features", features))
            if applies]


def plan(args: argparse.Namespace, settings: Settings) -> list:
    """Every Row of the job, in every shard, photo by photo, after the checks that need no model."""
    layers = list(dict.fromkeys(underscored(name) for name in args.layer_name))
    units = [None] if args.units is None else list(dict.fromkeys(args.units))
    if args.features and (len(layers) > 1 or args.image_path is not None):
        raise UsageError("--features are one layer's activations, in place of a photo: give one --layer_name "
                         "and no --image_path")
    if "all" in units and len(units) > 1:
        raise UsageError("--units takes unit indices or all, not both")
    units = list(range(ALL_UNITS)) if units == ["all"] else units
    paths = [os.path.abspath(args.features)] if args.features else photo_paths(args.image_path or
                                                                                [str(DEFAULT_IMAGE)])
    several = len(paths) * len(layers) * len(units) > 1
    if args.output and (several or Path(args.output).suffix.lower() != ".png"):
        raise UsageError("--output names one file: with several layers, images or units, use --output_dir"
                         if several else f"--output {args.output} must end in .png")
    if args.output:
        return [Row(paths[0], layers[0], Path(args.output), None, units[0])]
    folder = Path(args.output_dir)
    kind = "".join(f"_{word}" for word in kind_words(settings, bool(args.features)))
    try:
        longest = os.pathconf(existing_parent(folder.absolute()), "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such call, or a folder that does not say
        longest = 255
    # room for the photo's name beside the longest endings: a sample's, or the diverged image's
    unit = f"_unit{max(units)}" if units != [None] else ""
    room = longest - max(len(f"_sample{settings.samples}.png"), len(".diverged.png")) - len(
        os.fsencode(f"_{args.model}_{max(layers + ['montage'], key=len)}{kind}{unit}"))
    names = photo_names(paths, room)

    def row(path: str, layer: str, unit: Optional[int]) -> Row:
        stem = f"{names[path]}_{args.model}_{layer}{kind}"
        mosaic = folder / (f"{stem}_units.png" if unit is not None else
                           f"{names[path]}_{args.model}{kind}_montage.png")
        return Row(path, layer, folder / (stem + ("" if unit is None else f"_unit{unit}") + ".png"),
                   mosaic if len(units if unit is not None else layers) > 1 else None, unit)
    return [row(path, layer, unit) for path in paths for layer in layers for unit in units]


def existing_parent(folder: Path) -> Path:
    """`folder` if it exists, else its nearest parent that does: where a write would create it."""
    return next(parent for parent in (folder, *folder.parents) if parent.exists())


def check_outputs(args: argparse.Namespace, settings: Settings, rows: list, previous: dict,
                  photos: list) -> None:
    """UsageError before the work if an output is unwritable or would replace a photo or another's record."""
    def landing(path) -> Path:  # its folder's links and `..` resolved, not its own name: where a write lands
        return Path(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))

    files = {landing(Path(args.output_dir) / INDEX): False} if rows and not args.output else {}
    for row in rows:
        outputs = row.outputs(settings.samples, bool(args.save_every), bool(settings.window))
        files.update({landing(path): folder for path, folder in outputs.items()})
        files.update({landing(row.montage): False} if row.montage else {})
        other = (previous[row] or {}).get("image_path")
        if isinstance(other, str) and other != row.image_path:
            raise UsageError(f"{row.file('.json')} holds the result of another photo, {other}: "
                             f"invert {row.image_path} into another --output_dir")

    def written(path: Path) -> Optional[bool]:  # None if the job does not write `path`; else if as a folder
        stem, _, number = path.name.removesuffix(".png").rpartition("_sample")
        sample = path.name.endswith(".png") and number.isdigit() and 2 <= int(number) <= settings.samples
        return files.get(path.with_name(f"{stem}_sample*.png") if sample else path)

    for photo in photos:
        if any(written(path) is not None for path in (landing(photo), Path(os.path.realpath(photo)))):
            raise UsageError(f"the outputs would overwrite the input photo {photo}: use another "
                             f"{'--output' if args.output else '--output_dir'}")
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


def finished(record: Optional[dict], wanted: dict, but: tuple = ()) -> bool:
    """Whether `record` is a finished one of the row whose identity is `wanted` (but for the keys `but`)."""
    return record is not None and record.get("status") == "done" and all(
        record.get(key) == value for key, value in wanted.items() if key not in but)


def encodable(text: str) -> str:
    """`text` as UTF-8 holds it: a file name's undecodable bytes kept, other lone surrogates escaped."""
    return "".join(ascii(char)[1:-1] if "\ud800" <= char < "\udc80" or "\udd00" <= char <= "\udfff" else char
                   for char in text)


def write_index(folder: Path, cache: dict) -> None:
    """Rebuild folder/index.csv under a lock: a line per record there, its values but tables; `cache` keeps
    the lines of records that did not change."""
    try:
        with filelock.FileLock(str(folder / f"{INDEX}.lock")):
            for entry in os.scandir(folder):
                if entry.name.endswith(".json") and entry.is_file():
                    key = (entry.stat().st_mtime_ns, entry.stat().st_size)
                    if cache.get(entry.name, (None,))[0] != key:
                        cache[entry.name] = key, {name: "" if value is None else encodable(str(value)) for
                                                  name, value in (read_record(Path(entry.path)) or {}).items()
                                                  if not isinstance(value, dict) and name != "samples"}
            lines = [line for name, (_, line) in cache.items() if os.path.exists(folder / name) and all(
                line.get(key) for key in ("image_path", "layer_name", "status", "model"))]
            keys = ("image_path", "model", "layer_name", "kind", "unit")  # features_4 before features_12
            lines.sort(key=lambda line: [[int(part) if part.isdigit() else part for part in
                                          re.split(r"(\d+)", line.get(key, ""))] for key in keys])

            def write(file):
                text = io.TextIOWrapper(file, encoding="utf-8", errors="surrogateescape", newline="")
                table = csv.DictWriter(text, list(dict.fromkeys(key for line in lines for key in line)))
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


def plan_batches(rows: list, costs: dict, most: int, budget: float) -> list:
    """Runs of one layer's rows, each of at most `most` rows and `budget` bytes (`costs`: a row's)."""
    runs = []
    for layer in dict.fromkeys(row.layer_name for row in rows):
        runs.append([])
        for row in (row for row in rows if row.layer_name == layer):
            if runs[-1] and (len(runs[-1]) == most or (len(runs[-1]) + 1) * costs[layer] > budget):
                runs.append([])
            runs[-1].append(row)
    return runs


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
    side, label_height, columns = tiles[0][1].width, 16, math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new("RGB", (columns * side, rows * (side + label_height)), "white")
    for index, (label, picture) in enumerate(tiles):
        left, top = (index % columns) * side, (index // columns) * (side + label_height)
        grid.paste(picture.resize((side, side)), (left, top))
        ImageDraw.Draw(grid).text((left + 4, top + side + 2), label, fill="black")
    return grid


def save_pictures(row: Row, result: Inversion, samples: range, frames: list, field: Optional[list]) -> dict:
    """Save a finished row's pictures (samples, their mean and spread, field, GIF); what its record adds."""
    pictures = [deprocess(result.images[at][None]) for at in samples]
    for sample, picture in enumerate(pictures):
        save_png(row.sample(sample), picture)
    added = {}
    if field is not None:  # the window's receptive field, drawn on a copy
        drawn = pictures[0].copy()
        ImageDraw.Draw(drawn).rectangle([field[0], field[1], field[2] - 1, field[3] - 1], outline="red")
        save_png(row.file("_field.png"), drawn)
        added["field_box"] = field
    if len(samples) > 1:
        mean, spread_picture, spread = mean_and_spread(result.images[samples.start:samples.stop])
        save_png(row.file("_mean.png"), mean)
        save_png(row.file("_spread.png"), spread_picture)
        added.update(mean_png=row.file("_mean.png").name, spread_png=row.file("_spread.png").name,
                     spread=round(spread, 3), samples=[{**result.losses[at], "stopped": result.stopped[at],
                                                        "iterations": result.iterations[at]}
                                                       for at in samples])
    if frames:
        movie = frames + pictures[:1]
        write_atomically(row.file(".gif"), lambda file: movie[0].save(
            file, format="GIF", save_all=True, append_images=movie[1:], duration=100, loop=0, comment=MARK))
    return added


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device's, or a CPU allocator's, out of memory."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or any(
        text in str(error) for text in ("out of memory", "can't allocate memory"))


@torch.no_grad()
def top1(model: nn.Module, photos: Optional[torch.Tensor], images: torch.Tensor, precision: str) -> list:
    """Per row, a classifier's top-1 class of its pre-image, and of its photo with that class's probability
    for the pre-image (whether it still means the photo); nothing for a model that does not classify."""
    try:
        with autocast(precision, images.device):
            scores = [model(batch) for batch in ([] if photos is None else [photos]) + [images]]
    except FORWARD_ERRORS as error:  # a model whose whole forward this input does not suit, or memory
        if out_of_memory(error):
            print(f"invert.py: warning: no top-1 classes: out of memory ({one_line(error)})", file=sys.stderr)
        return [{}] * len(images)
    if not all(isinstance(score, torch.Tensor) and score.dim() == 2 and score.shape[1] > 1
               for score in scores):
        return [{}] * len(images)
    *photo, preimage = (score.float().softmax(1) for score in scores)
    if not photo:
        return [{"preimage_top1": label} for label in preimage.argmax(1).tolist()]
    wanted, got = photo[0].argmax(1), preimage.argmax(1).tolist()
    probability = preimage.gather(1, wanted[:, None])[:, 0].tolist()
    return [{"photo_top1": photo_label, "preimage_top1": label, "top1_agree": photo_label == label,
             "photo_probability": round(chance, 6)}
            for photo_label, label, chance in zip(wanted.tolist(), got, probability)]


# ---------------------------------------------------------------- the job


def progress(rows: list, settings: Settings, args: argparse.Namespace, frames: list) -> tuple:
    """invert()'s callback for a batch, and its bar: the losses now and then, and the frames."""
    epochs, every, samples = settings.epochs, args.stdout_epochs, settings.samples
    labels = [printable(f"{row.png.stem}{f' sample {sample + 1}' if samples > 1 else ''}  ")
              if len(rows) * samples > 1 else "" for row in rows for sample in range(samples)]
    bar = tqdm(total=epochs, unit="it", dynamic_ncols=True, position=1, leave=False, disable=args.quiet)

    def report(step: int, losses: dict, images: Callable) -> None:
        bar.update()
        if not args.quiet and (step % every == 0 or step == epochs):  # .tolist() waits for a GPU
            values = {name: value.tolist() for name, value in losses.items()}
            for index, label in enumerate(labels):
                text = "  ".join(f"{name} {value[index]:.4g}" for name, value in values.items())
                bar.write(f"iteration {step:>5}/{epochs}  {label}{text}")
        if args.save_every and step % args.save_every == 0:
            for row, row_frames, image in zip(rows, frames, images()[::samples]):
                row_frames.append(deprocess(image[None]))
                save_png(row.file("_frames") / f"iteration_{step:05d}.png", row_frames[-1])

    return report, bar


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The Settings the command line chose: one field per flag of the same name."""
    return Settings(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Settings)})


class Plan:
    """The command line's job as planned and checked before any of the work: its rows in this shard, their
    photos read once, what resume keeps, the model and its layers, and the batches (of one layer each)."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        # the cheap checks come first, so that a typo fails before a model loads or downloads
        self.settings = settings = resolve(settings_from_args(args), device, args.units is not None,
                                           bool(args.features))
        planned = plan(args, settings)
        everyone = list(dict.fromkeys(row.image_path for row in planned))
        self.shard = shard_of(args.shard, len(everyone))
        groups = [row.montage or row.image_path for row in planned]  # a montage's, or a photo's, together
        in_shard = set(list(dict.fromkeys(groups))[self.shard[0]::self.shard[1]])
        self.rows = [row for row, group in zip(planned, groups) if group in in_shard]
        weights, weights_data = weights_identity(args.model, args.weights)
        paths = list(dict.fromkeys(row.image_path for row in self.rows))
        check_memory(3 * args.input_size ** 2 * len(paths), torch.device("cpu"),
                     f"holding {len(paths)} photos at --input_size {args.input_size}",
                     "use a smaller --input_size, or split the photos over shards (--shard, a SLURM array)")
        self.inputs = {path: read_input(path, args.input_size, bool(args.features)) for path in paths}
        if args.features and paths and self.inputs[paths[0]].error:  # the one input, in place of a photo
            raise UsageError(self.inputs[paths[0]].error)
        previous = {row: read_record(row.file(".json")) for row in self.rows}
        check_outputs(args, settings, self.rows, previous, everyone)
        self.wanted = {row: identity(row, args, settings, self.inputs[row.image_path].sha256, weights)
                       for row in self.rows}
        # a finished record of a row whose photo cannot be read now (an NFS hiccup) is kept
        self.finished_before = {row for row in self.rows
                                if finished(previous[row], self.wanted[row], ("image_sha256",))}
        pictures = (settings.samples, bool(args.save_every), bool(settings.window))
        self.done = {row for row in self.finished_before if args.resume
                     and finished(previous[row], self.wanted[row])
                     and all(path.is_file() for path in row.pictures(*pictures))}
        runnable = [row for row in self.rows if not (row in self.done or self.inputs[row.image_path].error)]
        self.batches = self.prepare(runnable, weights_data) if runnable else []
        self.todo = [row for row in self.rows if row not in self.done]

    def prepare(self, rows: list, weights_data: Optional[bytes]) -> list:
        """Load the model and check each layer against what its rows ask of it; the batches."""
        args, settings, size = self.args, self.settings, self.args.input_size
        self.model = load_model(args.model, args.weights, not args.quiet, weights_data).to(self.device)
        self.layers, self.fields, self.features, costs = {}, {}, {}, {}
        frames = settings.epochs // args.save_every if args.save_every else 0
        for name in dict.fromkeys(row.layer_name for row in rows):
            layer = self.layers[name] = resolve_layer(self.model, name)
            output, axis, activations = probe_layer(self.model, layer, size, settings.precision, self.device)
            grid = as_grid(output, axis)
            part_mask(output, settings.window, settings.channels, axis)  # refuses a part that does not fit
            if args.units and "all" in args.units:  # the first ALL_UNITS units, or all of a smaller layer
                self.rows = [row for row in self.rows if row.layer_name != name or row.unit < grid.shape[1]]
            check_units([row.unit for row in self.rows if row.layer_name == name and row.unit is not None],
                        grid.shape[1])
            for path in dict.fromkeys(row.image_path for row in rows) if args.features else ():
                self.features[path] = checked_features(self.inputs[path].features, output,
                                                       f"--features {path}")
            if settings.window:
                self.fields[name] = receptive_field(self.model, layer, size, settings, axis, self.device)
            # float32: each activation thrice (values, gradients, a copy), the photo and target, the canvas
            # 18 times (variable, gradient, optimizer state, finite copy, render, priors), the GIF's frames
            canvas = 3 * (size + layer_settings(settings, layer_stride((size, size), grid))["jitter"]) ** 2
            costs[name] = settings.samples * (12 * activations + 24 * size * size + (72 + frames) * canvas)
            samples = f" with --samples {settings.samples}" if settings.samples > 1 else ""
            check_memory(costs[name], self.device, f"inverting {name} at --input_size {size}{samples}",
                         "use a smaller --input_size or --jitter, fewer --samples, a larger --save_every")
        free, cap = available_memory(self.device), BATCH_CAP[self.device.type == "cuda"]
        most = max(1, (cap if args.batch_size == "auto" else args.batch_size) // settings.samples)
        return plan_batches([row for row in rows if row in set(self.rows)], costs, most,
                            math.inf if free is None else MEMORY_SHARE * free)

    def batch(self, rows: list) -> tuple:
        """A batch's references (photos; blanks for saved features) and invert()'s units or features."""
        size = self.args.input_size
        references = torch.cat([torch.zeros(1, 3, size, size) if self.args.features else
                                normalise(self.inputs[row.image_path].image) for row in rows])
        keywords = {"units": [row.unit for row in rows]} if self.settings.task == "maximize" else {}
        if self.features:
            keywords["features"] = torch.cat([self.features[row.image_path] for row in rows])
        return references, keywords

    def record(self, row: Row, **fields) -> dict:
        """A row's record: what identifies it, its kind, where it ran, and `fields`."""
        words = [self.settings.task, *kind_words(self.settings, bool(self.args.features))]
        return {**self.wanted[row], "kind": " ".join(dict.fromkeys(words)), "weights": self.args.weights,
                "precision": self.settings.precision, "device": str(self.device), "png": row.png.name,
                **fields}


class Job(Plan):
    """The work: each batch inverted and saved, the rows that fail recorded, the montages and the index."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        super().__init__(args, device)
        self.failed, self.index_cache = {}, {}  # failed: row -> why
        self.bar = tqdm(total=len(self.rows), initial=len(self.done), unit="image", disable=args.quiet)

    def fail(self, row: Row, reason: str, status: str = "failed", **fields) -> None:
        """Mark `row` failed for `reason`: named on stderr in a job of several rows, and recorded, unless
        its photo cannot be read now and a finished record of it is there."""
        self.failed[row] = reason
        if len(self.rows) > 1:
            where = row.layer_name + (f" unit {row.unit}" if row.unit is not None else "")
            self.bar.write(printable(f"invert.py: {row.image_path} at {where}: {status}: {reason}"),
                           sys.stderr)
        if not (self.inputs[row.image_path].error and row in self.finished_before):
            save_json(row.file(".json"), self.record(row, status=status, error=reason, png="", **fields))

    def run_batch(self, rows: list) -> bool:
        """Invert a batch of one layer's rows and save what each gives; whether Ctrl-C stopped it. Rows that
        cannot be inverted fail and the others run again; out of memory, each runs alone."""
        while rows := [row for row in rows if row not in self.failed]:
            frames, started = [[] for _ in rows], time.perf_counter()
            report, bar = progress(rows, self.settings, self.args, frames)
            references, keywords = self.batch(rows)
            try:
                layer, short = self.layers[rows[0].layer_name], None
                result = invert(self.model, layer, references.to(self.device), self.settings, callback=report,
                                **keywords)
            except RowError as error:
                for index, reason in error.reasons.items():
                    self.fail(rows[index], reason)
                continue
            except RuntimeError as error:  # the estimate was wrong, or others share the device
                if not out_of_memory(error):
                    raise
                short = one_line(error)  # the batch's tensors go with the error, outside this block
            finally:
                bar.close()
            if short is None:
                self.save(rows, result, references, frames, time.perf_counter() - started)
                return "interrupted" in result.stopped
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(rows) == 1:
                self.fail(rows[0], f"out of memory on {self.device} ({short})")
                return False
            return any(self.run_batch([row]) for row in rows)  # any() stops at the first interrupted row
        return False

    def save(self, rows: list, result: Inversion, references: torch.Tensor, frames: list, seconds: float):
        """Save each row of a batch, its pictures and then its record; where a sample diverged, its last
        finite image."""
        count, settings = self.settings.samples, self.settings
        timing = dict(seconds=round(seconds / len(rows), 4), batch=len(rows) * count,  # a row's share
                      ms_per_iteration=round(1000 * seconds / max(*result.iterations, 1), 3))
        photos = None if settings.task == "maximize" or self.args.features else references.to(self.device)
        classes = top1(self.model, photos, result.images[::count], settings.precision)
        for index, row in enumerate(rows):
            samples, first = range(index * count, (index + 1) * count), index * count
            broken = [at for at in samples if result.stopped[at] == "diverged"]
            if broken:
                save_png(row.file(".diverged.png"), deprocess(result.images[broken[0]][None]))
                self.fail(row, f"the loss became non-finite after iteration {result.iterations[broken[0]]}: "
                          f"--lr {result.layer_settings['lr']:g} is too large for this layer; try a smaller "
                          f"--lr; {row.file('.diverged.png').name} is the image of that iteration",
                          "diverged", iterations=result.iterations[broken[0]])
                continue
            pictures = save_pictures(row, result, samples, frames[index], self.fields.get(row.layer_name))
            row.file(".diverged.png").unlink(missing_ok=True)  # of an earlier run, now superseded
            record = self.record(row, **timing, **classes[index], torch_version=torch.__version__,
                                 torchvision_version=torchvision.__version__, **pictures)
            record.update(status="interrupted" if result.stopped[first] == "interrupted" else "done",
                          layer_settings=result.layer_settings, **result.losses[first],
                          iterations=result.iterations[first], stopped=result.stopped[first])
            save_json(row.file(".json"), record)
            self.done.update([row] if record["status"] == "done" else [])
            self.bar.update()
            measure = {"invert": "feature_error", "caricature": "projection"}.get(settings.task,
                                                                                  "unit_activation")
            spread = f", spread {record['spread']:.1f} grey levels" if count > 1 else ""
            if not self.args.quiet:
                self.bar.write(printable(f"saved {row.png} and {row.file('.json').name}: {measure} "
                                         f"{record[measure]:.4f}{spread}"))

    def montages(self, rows: list) -> None:
        """Write each montage among `rows` whose rows are all done, from their pictures: a photo's layers
        after the photo, or (maximize) a layer's mosaic of units."""
        units = self.settings.task == "maximize"
        for path in dict.fromkeys(row.montage for row in rows if row.montage):
            members = [row for row in self.rows if row.montage == path]
            names = [f"unit {row.unit}" if units else row.layer_name for row in members]
            tiles = list(zip(names, [row.png for row in members])) if self.settings.samples == 1 else [
                (f"{name} {kind}", row.file(f"_{kind}.png")) for name, row in zip(names, members)
                for kind in ("mean", "spread")]
            with contextlib.suppress(OSError):  # a picture gone since: its row says so
                if all(row in self.done for row in members):
                    photo = None if units or self.args.features else self.inputs[members[0].image_path].image
                    tiles = [(label, Image.open(file).convert("RGB")) for label, file in tiles]
                    save_png(path, montage(photo, tiles))

    def run(self) -> int:
        """Invert and save batch by batch, the index rebuilt now and then and at the end; the exit code: 0
        done, 2 if a row failed, 130 interrupted (whatever else happened)."""
        folder, interrupted, errors = None if self.args.output else Path(self.args.output_dir), False, []
        indexed = started = time.perf_counter()
        if not self.rows:
            print(f"invert.py: this process's part, {self.shard[0]} of {self.shard[1]} (from --shard or the "
                  "launcher's variables), has no photos", file=sys.stderr)
        try:
            for row in self.todo:
                if self.inputs[row.image_path].error is not None:
                    self.fail(row, self.inputs[row.image_path].error)
            self.montages([row for row in self.done if row.montage and not row.montage.exists()])
            for batch in self.batches:
                interrupted = self.run_batch(batch)
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
            except UsageError as error:  # errors after what stopped the run, if anything did
                errors.append(str(error))
        if self.failed:
            (row, reason), count = next(iter(self.failed.items())), len(self.failed)
            index = "; see index.csv" if folder and not errors else ""  # if it could be rebuilt
            summary = f"{count} of {len(self.todo)} image(s) failed, {row.image_path} at {row.layer_name} " \
                "first"
            errors.insert(0, reason if len(self.todo) == 1 else f"{summary}: {reason}{index}")
        if interrupted:
            for line in errors:
                print(f"invert.py: error: {printable(line)}", file=sys.stderr)
            print("invert.py: interrupted: saved what it had; rerun with --resume to finish", file=sys.stderr)
            return 130
        if errors:
            raise UsageError("; and ".join(errors))
        before = len(self.rows) - len(self.todo)
        if not self.args.quiet:
            print(f"{len(self.todo)} inversion(s) in {time.perf_counter() - started:.1f} s"
                  + (f", {before} done before" if before else ""))
        return 0


# ---------------------------------------------------------------- the command line


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one-line UsageErrors instead of usage dumps."""

    def error(self, message):
        raise UsageError(message)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default; a setting whose default is None says how the objective chooses it instead."""

    def _get_help_string(self, action):
        def words(value):
            return f"{value:g}" if isinstance(value, float) else str(value)

        if action.default is argparse.SUPPRESS:  # -h
            chosen = None
        elif action.dest == "lr":
            chosen = ", ".join(f"{words(rate)} for {' + '.join(key)}" for key, rate in DEFAULT_LRS.items())
        elif action.default is None and action.dest in OBJECTIVE_DEFAULTS["paper"]:
            chosen = ", ".join(f"{words(OBJECTIVE_DEFAULTS[objective][action.dest])} with --objective "
                               f"{objective}" for objective in OBJECTIVES)
        else:
            chosen = " ".join(action.default) if isinstance(action.default, list) else action.default
        return action.help if chosen is None else f"{action.help} (default: {chosen})"


def shard_spec(text: str) -> tuple:
    """--shard K/N: the K-th (0 to N-1) of N parts."""
    if not re.fullmatch(r"[0-9]+/[0-9]+", text) or not int(text.split("/")[0]) < int(text.split("/")[1]):
        raise argparse.ArgumentTypeError(f"must be K/N with K from 0 to N-1, such as 0/4, got {text}")
    return tuple(map(int, text.split("/")))


def unit_spec(text: str) -> Union[int, str]:
    """--units: a unit (channel) index, or 'all'."""
    if text != "all" and not re.fullmatch(r"0*[0-9]{1,9}", text):
        raise argparse.ArgumentTypeError(f"must be a unit (channel) index, 0 to 999999999, or all, got "
                                         f"{text}")
    return text if text == "all" else int(text)


def non_empty(text: str) -> str:
    """Names and paths: any text but the empty one ('' would mean the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line: its inputs, a flag per field of Settings, and how to run and write the job."""
    parser = _ArgumentParser(
        prog="invert.py", formatter_class=_HelpFormatter,
        description="Recover images whose activations at layers of a torchvision CNN match those of photos "
                    "(Mahendran & Vedaldi, CVPR 2015 and IJCV 2016).",
        epilog="example: python invert.py --model vgg16_bn --layer_name features_22")
    flags = parser.add_argument_group("what to invert")
    flags.add_argument("--image_path", nargs="+", type=non_empty, default=None,
                       help="photos (any format Pillow reads, a pipe too) and folders of them (the images "
                            "directly inside, less the pictures invert.py wrote), named by stem in the "
                            "outputs (default: reference_images/astronaut.jpg)")
    flags.add_argument("--model", type=non_empty, default="alexnet", help="a torchvision model's name")
    flags.add_argument("--weights", type=non_empty, default="DEFAULT",
                       help="DEFAULT or another torchvision weights name (downloaded once to TORCH_HOME), a "
                            "state-dict file (./DEFAULT for one named so), or none (random)")
    flags.add_argument("--input_size", type=positive_int, default=227, help="the square input's side")
    flags.add_argument("--layer_name", nargs="+", type=non_empty, default=["avgpool"],
                       help="the layers to invert: features_4 (the original design's form) or features.4")
    flags.add_argument("--units", nargs="+", type=unit_spec, default=None,
                       help=f"--task maximize: the units (channels), a pre-image each, or all: the first "
                            f"{ALL_UNITS} (or every one of a layer with fewer); a layer's make a mosaic")
    flags.add_argument("--features", type=non_empty, default=None, metavar="FILE.pt",
                       help="saved activations (CxHxW or 1xCxHxW) of --layer_name, in place of a photo's")
    flags.add_argument("--list_layers", action="store_true", help="print each layer and its output's shape")
    flags = parser.add_argument_group("how to invert (the keywords of invert())")
    for field in dataclasses.fields(Settings):
        flags.add_argument(f"--{field.name}", default=field.default, **field.metadata)
    flags = parser.add_argument_group("running and output")
    flags.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")
    flags.add_argument("--output", type=non_empty, default=None, help="the PNG to write, for one pre-image")
    flags.add_argument("--output_dir", type=non_empty, default="outputs", help="folder for the outputs")
    flags.add_argument("--save_every", type=non_negative_int, default=0,
                       help="also save every N-th iteration, as <name>_frames/iteration_N.png and <name>.gif")
    flags.add_argument("--stdout_epochs", type=positive_int, default=25, help="print the losses this often")
    flags.add_argument("--quiet", action="store_true", help="no progress bar and no loss lines")
    flags.add_argument("--batch_size", type=positive_int.or_auto(), default="auto",
                       help=f"images optimised together at most; auto: what fits in half the free memory, "
                            f"up to {BATCH_CAP[0]} on a CPU, {BATCH_CAP[1]} on a GPU")
    flags.add_argument("--resume", action="store_true",
                       help="skip what was done from the same photo, weights, model, layer, size, settings")
    flags.add_argument("--shard", type=shard_spec, default=None, metavar="K/N",
                       help="invert only every N-th photo from the K-th; by default from torchrun's RANK and "
                            "WORLD_SIZE and a SLURM job array's variables; 0/1 runs all in every process")
    return parser.parse_args(argv)


def list_layers(args: argparse.Namespace, device: torch.device) -> int:
    """Print every layer of the model with its output's shape at --input_size."""
    model = load_model(args.model, args.weights, progress=not args.quiet).to(device)
    named = [(name, module) for name, module in model.named_modules() if name]
    shapes, unused = {}, "not run in eval mode"

    def note_shape(module, inputs, output):  # returns None, so the output passes on unchanged
        shapes.setdefault(module, "x".join(map(str, output.shape[1:])) if isinstance(output, torch.Tensor)
                          else type(output).__name__)

    try:
        with forward_hooks({module: note_shape for _, module in named}), torch.no_grad():
            model(torch.zeros(1, 3, args.input_size, args.input_size, device=device))
    except FORWARD_ERRORS:  # the layers before the failure still have their shapes
        unused = f"not reached: the model fails at --input_size {args.input_size}"
    for name, module in named:
        cells = (underscored(name), name, type(module).__name__, shapes.get(module, unused))
        print("  ".join(f"{cell:<24}" for cell in cells).rstrip())
    return 0


def main(argv=None) -> int:
    """The command line: parse, run, and turn expected failures into one-line messages and exit codes."""
    def interrupt(signum, frame):  # SIGTERM as the KeyboardInterrupt of Ctrl-C: it saves the same way
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, interrupt) if in_main_thread else None
    try:
        args = parse_args(argv)
        device = pick_device(args.device)
        random.seed(args.seed)
        torch.manual_seed(args.seed)  # and every CUDA device's
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # the same PNG again
        return list_layers(args, device) if args.list_layers else Job(args, device).run()
    except UsageError as error:
        print(f"invert.py: error: {printable(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("invert.py: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
