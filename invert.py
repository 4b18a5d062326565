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
import dataclasses
import difflib
import functools
import json
import math
import os
import pickle
import random
import signal
import sys
import threading
import time
import urllib.parse
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torchvision
from PIL import Image, ImageDraw, ImageOps
from torch import nn
from torchvision import transforms
from tqdm import tqdm

# ---------------------------------------------------------------- constants

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE = Path(__file__).resolve().parent / "reference_images" / "astronaut.jpg"
OBJECTIVES = ("seed", "paper")
OPTIMIZERS = ("sgd", "adam", "lbfgs")
PARAMS = ("pixel", "fft")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# The paper's pixel scales in its mean-subtracted 0-255 units (Mahendran & Vedaldi, IJCV 2016):
# B, a typical pixel's RGB norm (the box constraint is 2B), and V, a typical difference between
# neighbouring pixels.
PAPER_B = 80.0
PAPER_V = PAPER_B / 6.5
# --C auto: the paper's weight of the feature term, kept up to this layer stride, then falling
# with the stride's square (measured on the trained stand-in: tests/README.md)
PAPER_C = 100.0
FULL_C_STRIDE = 4
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
             "decay_epochs": 200, "plateau": 0.0},
    "paper": {"optimizer": "adam", "param": "fft", "lambda_alpha": 1.0, "lambda_tv": 1.0, "C": "auto",
              "decay_epochs": FIRST_STAGE, "plateau": 0.01},
}
# Learning rates per (objective, optimizer, param), measured on a trained VGG16-BN (tests/README.md).
# The seed's 1e-2 leaves the image as noise; 1e2, the value its own comment gives, measured best.
DEFAULT_LRS = {
    ("seed", "sgd", "pixel"): 100.0, ("seed", "adam", "pixel"): 0.1, ("seed", "lbfgs", "pixel"): 1.0,
    ("paper", "sgd", "pixel"): 3.0, ("paper", "adam", "pixel"): 0.1, ("paper", "lbfgs", "pixel"): 1.0,
    ("seed", "sgd", "fft"): 0.003, ("seed", "adam", "fft"): 0.01, ("seed", "lbfgs", "fft"): 1.0,
    ("paper", "sgd", "fft"): 0.003, ("paper", "adam", "fft"): 0.01, ("paper", "lbfgs", "fft"): 1.0,
}
# lucent's square root of ImageNet's colour correlation, for --param fft
COLOUR_CORRELATION_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
# .item() makes a GPU wait, so there the loss is checked for NaN only this often (every step on a CPU)
GPU_CHECK_EVERY = 25
# the plateau rule compares each image's loss with its loss this many iterations before
PLATEAU_WINDOW = 10
# what torchvision models raise for an input size they cannot take (ViT asserts, convs raise)
FORWARD_ERRORS = (RuntimeError, AssertionError, ValueError)


class UsageError(Exception):
    """A problem with the user's input or settings: reported as one line, exit code 2."""


class _LayerReached(Exception):
    """Raised by the layer hook so that the forward pass stops at the hooked layer."""


# ---------------------------------------------------------------- settings


def _checked(kind: type, test: Callable, requirement: str) -> Callable:
    """An argparse type that parses `kind` and insists on a finite value for which `test` holds."""
    def parse(text: str):
        value = kind(text)
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


positive_int = _checked(int, lambda value: value > 0, "a positive integer")
non_negative_int = _checked(int, lambda value: value >= 0, "an integer >= 0")
positive_float = _checked(float, lambda value: value > 0, "> 0")
non_negative_float = _checked(float, lambda value: value >= 0, ">= 0")


def auto_or(parse: Callable) -> Callable:
    """An argparse type that takes 'auto' (a value chosen from the layer's stride) or what `parse` takes."""
    def parse_or_auto(text: str):
        return "auto" if text == "auto" else parse(text)
    parse_or_auto.__name__ = parse.__name__
    return parse_or_auto


def setting(default, help: str, **argparse_options):
    """A field of Settings: its default, its help, and how argparse reads it."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to invert. Each field is a keyword of invert() and a flag of the command line; None
    means the default that OBJECTIVE_DEFAULTS and DEFAULT_LRS give for the objective."""

    objective: str = setting("paper", "seed: the original design's method (SGD on pixels, lambdas "
                             "1e-5); paper: the IJCV 2016 normalised loss with box constraint and two "
                             "stages (see the README)", choices=OBJECTIVES)
    optimizer: Optional[str] = setting(None, "sgd: SGD with momentum; adam: Adam with --momentum as "
                                       "beta1; lbfgs: L-BFGS, one step per iteration", choices=OPTIMIZERS)
    param: Optional[str] = setting(None, "pixel: optimise pixels; fft: optimise a decorrelated-colour "
                                   "spectrum, as lucent does", choices=PARAMS)
    alpha: float = setting(6.0, "exponent of the alpha-norm prior", type=positive_float)
    beta: float = setting(2.0, "exponent of the total-variation prior", type=positive_float)
    lambda_alpha: Optional[float] = setting(None, "weight of the alpha-norm prior", type=non_negative_float)
    lambda_tv: Optional[float] = setting(None, "weight of the total-variation prior", type=non_negative_float)
    C: Union[float, str, None] = setting(None, f"weight C of the feature term (the paper used 1 to 300); "
                                         f"'auto': {PAPER_C:g} up to a layer stride of {FULL_C_STRIDE}, "
                                         f"then {PAPER_C:g} * ({FULL_C_STRIDE} / stride)^2, so that the "
                                         "priors weigh more where the layer keeps less",
                                         type=auto_or(positive_float))
    jitter: Union[int, str] = setting(0, "random shift of the image each iteration, 0 to N pixels on "
                                      "each axis, until the first learning-rate decay; 'auto' is the "
                                      "authors' choice, a quarter of the layer's stride less one",
                                      type=auto_or(non_negative_int))
    epochs: int = setting(200, "optimisation iterations: exactly this many with --plateau 0, else at most",
                          type=positive_int)
    plateau: Optional[float] = setting(None, f"end the first stage once no image's lowest loss has "
                                       f"fallen by this fraction over the last {PLATEAU_WINDOW} iterations, "
                                       f"at layers of stride {PLATEAU_STRIDE} or less; a last stage at "
                                       f"--decay_factor times the rate, {(1 - FIRST_STAGE) / FIRST_STAGE} as "
                                       "long as the first, follows, and the run stops. 0 runs exactly "
                                       "--epochs iterations", type=non_negative_float)
    lr: Optional[float] = setting(None, "learning rate", type=positive_float)
    momentum: float = setting(0.9, "SGD momentum, or Adam's beta1", type=non_negative_float)
    decay_factor: float = setting(0.1, "learning-rate multiplier at each decay", type=positive_float)
    decay_epochs: Optional[int] = setting(None, "iterations between learning-rate decays", type=positive_int)
    precision: str = setting("auto", "the forward pass's precision; losses stay fp32 (auto: bf16 where "
                             "the hardware runs it natively, AMX or AVX512-BF16 CPUs and bf16 GPUs, "
                             "else fp32; fp16 needs CUDA)", choices=PRECISIONS)
    seed: int = setting(2023, "random seed for Python, torch and each image's own generator", type=int)


def resolve(settings: Settings, device: torch.device) -> Settings:
    """The settings with each None replaced by its default and the precision chosen for `device`."""
    for field in dataclasses.fields(Settings):
        choices, value = field.metadata.get("choices"), getattr(settings, field.name)
        if choices and value is not None and value not in choices:
            raise UsageError(f"--{field.name} {value!r} is not one of {', '.join(choices)}")
    given = {name: value for name, value in dataclasses.asdict(settings).items() if value is not None}
    chosen = {**OBJECTIVE_DEFAULTS[settings.objective], **given}
    chosen.setdefault("lr", DEFAULT_LRS[chosen["objective"], chosen["optimizer"], chosen["param"]])
    if isinstance(chosen["decay_epochs"], Fraction):
        chosen["decay_epochs"] = max(1, round(chosen["epochs"] * chosen["decay_epochs"]))
    chosen["precision"] = resolve_precision(chosen["precision"], device)
    return Settings(**chosen)


def default_help(name: str) -> str:
    """How a setting whose default is None gets its value, in words for --help."""
    if name == "lr":
        return ", ".join(f"{rate:g} for {' + '.join(key)}" for key, rate in DEFAULT_LRS.items())

    def words(value):
        if isinstance(value, Fraction):
            return f"{value} of --epochs"
        return f"{value:g}" if isinstance(value, float) else str(value)
    return ", ".join(f"{words(OBJECTIVE_DEFAULTS[objective][name])} with --objective {objective}"
                     for objective in OBJECTIVES)


def resolve_precision(spec: str, device: torch.device) -> str:
    """Turn --precision into fp32, bf16 or fp16 for this device."""
    if spec == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32")
    if spec != "auto":
        return spec
    # natively, bf16 is faster and within 0.01 SSIM of fp32 at every benchmark layer (tests/README.md)
    return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    """Whether this device runs bf16 in hardware: AMX or AVX512-BF16 on a CPU, bf16 units on a GPU."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3 has no including_emulation, and counts only native bf16
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # private helpers, absent from older torch: then assume no
        checks = [getattr(torch.cpu, name, None)
                  for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        return any(check() for check in checks if check is not None)
    return False


# ---------------------------------------------------------------- images


def load_image(path) -> Image.Image:
    """Open an image file as 8-bit RGB, honouring EXIF orientation; UsageError if it cannot be read."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--image_path {path} is a directory, not an image")
    try:
        with Image.open(path) as opened:
            return to_rgb(ImageOps.exif_transpose(opened))  # a loaded copy, upright
    except FileNotFoundError:
        raise UsageError(f"--image_path {path}: no such file") from None
    except PermissionError:
        raise UsageError(f"--image_path {path}: permission denied") from None
    except Image.DecompressionBombError as error:
        raise UsageError(f"--image_path {path} is too large to decode safely ({error})") from None
    except MemoryError:
        raise UsageError(f"--image_path {path} is too large to decode in the memory available") from None
    except Exception as error:  # Pillow's decoders raise many types for damaged or hostile data
        raise UsageError(f"--image_path {path} is not a readable image ({one_line(error)})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; 16-bit grey is rescaled, transparency is laid on white."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    if image.mode in TRANSPARENT_MODES or "transparency" in image.info:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    return image.convert("RGB")


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """Resize, centre-crop and normalise a photo into a 1x3xSxS tensor, as the seed does."""
    transform = transforms.Compose([
        transforms.Resize(size),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return transform(image).unsqueeze(0)


def deprocess(tensor: torch.Tensor) -> Image.Image:
    """Undo the ImageNet normalisation of a 1x3xHxW tensor, clamp to [0, 1] and return a PIL image."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (tensor.detach().float().cpu()[0] * std + mean).clamp(0, 1)
    return transforms.functional.to_pil_image(pixels)


# ---------------------------------------------------------------- models and layers


def load_model(name: str, weights: str, progress: bool = True) -> nn.Module:
    """Build torchvision model `name`, frozen, with DEFAULT, enum-name, state-dict-file or no weights."""
    names = torchvision.models.list_models(module=torchvision.models)  # the classification models
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose from {', '.join(names)}"
        raise UsageError(f"unknown --model {name!r}; {hint}")
    if weights.lower() == "none":
        print(f"warning: --weights none: {name} is randomly initialised, so the result does not "
              "show what a trained network sees", file=sys.stderr)
        model = random_model(name)
    elif looks_like_path(weights):
        model = random_model(name)
        load_state_dict_file(model, name, Path(weights))
    else:
        model = load_pretrained(name, weights, progress)
    return model.eval().requires_grad_(False)


def random_model(name: str) -> nn.Module:
    """Build a randomly initialised model, without torchvision's notice about future init defaults."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet and inception_v3 print one
        return torchvision.models.get_model(name, weights=None)


def looks_like_path(weights: str) -> bool:
    """Whether --weights names a file rather than a torchvision weights enum member."""
    return os.sep in weights or "/" in weights or Path(weights).suffix != "" or Path(weights).exists()


def load_pretrained(name: str, weights: str, progress: bool) -> nn.Module:
    """Load torchvision's pretrained weights, downloading them once into TORCH_HOME's cache."""
    enum = torchvision.models.get_model_weights(name)
    if weights not in enum.__members__:
        raise UsageError(f"--weights {weights!r} is not a file, 'none', or one of {name}'s weights: "
                         f"{', '.join(enum.__members__)}")
    chosen = enum[weights]
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(chosen.url).path).name
    if not checkpoint.exists():
        # downloaded here rather than by torchvision, so that a failure is one line, not two
        hash_prefix = torch.hub.HASH_REGEX.search(checkpoint.name)
        try:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(chosen.url, str(checkpoint), hash_prefix and hash_prefix.group(1),
                                           progress=progress)
        except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad hash is a RuntimeError
            raise UsageError(f"could not download {name} weights {checkpoint.name} from {chosen.url} "
                             f"({one_line(error)}); put that file in {checkpoint.parent}/ (the cache "
                             "under TORCH_HOME), or pass --weights PATH to a state-dict file, or "
                             "--weights none for random weights") from None
        if progress:
            print(f"downloaded {checkpoint.name} to {checkpoint.parent}/ for later runs", file=sys.stderr)
    try:
        return torchvision.models.get_model(name, weights=chosen, progress=progress)
    except Exception as error:  # torch.load raises many types for a damaged file
        raise UsageError(f"cannot read cached weights {checkpoint} ({one_line(error)}); "
                         "delete it to download again") from None


def load_state_dict_file(model: nn.Module, name: str, path: Path) -> None:
    """Load a state-dict file into `model` with weights_only=True; UsageError if it is not one or misfits."""
    if not path.is_file():
        raise UsageError(f"--weights {path}: no such file")
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a file refused anyway
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"--weights {path} was refused: it holds Python objects beyond tensors, and "
                         "only plain state dicts are loaded (a pickle could run code)") from None
    except Exception as error:  # torch.load raises many types for files that are not checkpoints
        raise UsageError(f"--weights {path} is not a PyTorch state-dict file ({one_line(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UsageError(f"--weights {path} is not a state dict (a mapping of names to tensors)")
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [key for key in expected.keys() & state.keys() if expected[key].shape != state[key].shape]
    if missing or unexpected or mismatched:
        problems = [f"{len(keys)} {what} (e.g. {keys[0]})"
                    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                       ("shape mismatches", sorted(mismatched))) if keys]
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


def layer_batches(model: nn.Module, layers: Sequence[nn.Module], images: torch.Tensor) -> list:
    """Run `model` on `images` until each row has reached its layer in `layers`; return, per layer,
    (the rows that chose it, their outputs as one tensor), in the order the layers ran.

    The forward pass stops as soon as the deepest layer has run, so later layers are never computed.
    Where the layers are children of one plain nn.Sequential, each row also leaves the batch at its
    own layer: the rest of the chain runs only for the rows that need it.
    """
    wanted = list(dict.fromkeys(layers))
    chain = chain_of(model, wanted) if len(wanted) > 1 else None
    batches = []
    alive = list(range(len(layers)))  # the rows in the batch as it reaches each layer

    def hook(module, inputs, output):
        if any(module is done for done, _ in batches):
            return None
        if not isinstance(output, torch.Tensor):
            raise UsageError(f"a chosen layer returns a {type(output).__name__}, not a tensor; "
                             "choose another (see --list_layers)")
        here = [index for index, row in enumerate(alive) if layers[row] is module]
        staying = [index for index, row in enumerate(alive) if layers[row] is not module]
        last = len(batches) + 1 == len(wanted)
        # where the whole batch runs on, a copy: an in-place ReLU could change this output
        source = output if chain is not None or last else output.clone()
        if len(here) == len(source):  # a slice would cost a full-size copy in the backward pass
            rows_output = source
        elif here == list(range(here[0], here[-1] + 1)):
            rows_output = source[here[0]:here[-1] + 1]
        else:
            rows_output = source[here]
        batches.append((module, ([alive[index] for index in here], rows_output)))
        if last:
            raise _LayerReached
        if chain is not None:
            alive[:] = [alive[index] for index in staying]
            return output[staying]
        return None

    handles = [layer.register_forward_hook(hook) for layer in wanted]
    try:
        model(images)
    except _LayerReached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(batches) < len(wanted):
        raise UsageError("a chosen layer is not used in the model's forward pass")
    return [batch for _, batch in batches]


def layer_outputs(model: nn.Module, layers: Sequence[nn.Module], images: torch.Tensor) -> list:
    """Each row's output at its layer in `layers`, as a 1xCxHxW slice (see layer_batches)."""
    outputs = [None] * len(layers)
    for rows, batch in layer_batches(model, layers, images):
        for index, row in enumerate(rows):
            outputs[row] = batch[index:index + 1]
    return outputs


def chain_of(model: nn.Module, layers: list) -> Optional[nn.Sequential]:
    """The plain nn.Sequential (no forward of its own) whose direct children all of `layers` are."""
    for module in model.modules():
        if type(module).forward is nn.Sequential.forward and isinstance(module, nn.Sequential):
            children = [id(child) for child in module.children()]
            if all(id(layer) in children for layer in layers):
                return module
    return None


def layer_shapes(model: nn.Module, size: int, device: torch.device) -> list:
    """(seed-form name, dotted name, module type, output shape) of every submodule at this input size."""
    shapes = {}

    def recorder(name):
        def hook(module, inputs, output):  # returns None, so the output passes on unchanged
            shapes.setdefault(name, describe(output))
        return hook

    hooks = [module.register_forward_hook(recorder(name)) for name, module in model.named_modules() if name]
    unused = "not run in eval mode"
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=device))
    except FORWARD_ERRORS:  # the layers before the failure still have their shapes
        unused = f"not reached: the model fails at --input_size {size}"
    finally:
        for handle in hooks:
            handle.remove()
    return [(seed_form(name), name, type(module).__name__, shapes.get(name, unused))
            for name, module in model.named_modules() if name]


def describe(output) -> str:
    """A short description of a module's output: CxHxW for an image tensor."""
    if isinstance(output, torch.Tensor):
        return "x".join(str(dim) for dim in output.shape[1:])
    return type(output).__name__


# ---------------------------------------------------------------- losses


def per_row(values: torch.Tensor) -> torch.Tensor:
    """Sum each row (the first dimension) of `values`."""
    return values.flatten(1).sum(1)


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
    """The paper's two prior sums of each row, sum_ij ||x_ij||^alpha and total variation with beta 2,
    with the gradient written out: half the time of autograd's dozen elementwise steps."""

    @staticmethod
    def forward(ctx, pixels: torch.Tensor, alpha: float):
        squares = pixels.square().sum(dim=1, keepdim=True).clamp_min(1e-12)
        powered = squares.pow(alpha / 2 - 1)
        dx = pixels[..., :, 1:] - pixels[..., :, :-1]
        dy = pixels[..., 1:, :] - pixels[..., :-1, :]
        ctx.save_for_backward(pixels, powered, dx, dy)
        ctx.alpha = alpha
        return per_row(powered * squares), per_row(dx.square()) + per_row(dy.square())

    @staticmethod
    def backward(ctx, alpha_grad: torch.Tensor, tv_grad: torch.Tensor):
        pixels, powered, dx, dy = ctx.saved_tensors
        # d/dx ||x||^alpha = alpha ||x||^(alpha - 2) x; each difference pulls its two pixels apart
        grad = pixels * powered * (ctx.alpha * alpha_grad).view(-1, 1, 1, 1)
        tv_weight = (2 * tv_grad).view(-1, 1, 1, 1)
        dx, dy = dx * tv_weight, dy * tv_weight
        grad[..., :, 1:] += dx
        grad[..., :, :-1] -= dx
        grad[..., 1:, :] += dy
        grad[..., :-1, :] -= dy
        return grad, None


@functools.lru_cache(maxsize=None)
def paper_scale(device: torch.device) -> torch.Tensor:
    """255 * std per channel, as a 1x3x1x1 tensor on `device`: made once, not every iteration."""
    return (255 * torch.tensor(IMAGENET_STD, device=device)).view(1, 3, 1, 1)


def to_paper_units(image: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised pixels -> the paper's mean-subtracted 0-255 pixels: x * 255 * std."""
    return image * paper_scale(image.device)


def data_term(C: float, features, targets, target_norms) -> torch.Tensor:
    """Each row's weighted feature error C * ||features - target||^2 / ||target||^2."""
    squares = nn.functional.mse_loss(features, targets, reduction="none")  # one kernel, both ways
    return C * per_row(squares) / target_norms


def prior_terms(settings: Settings, images) -> dict:
    """Each row's weighted alpha_loss and tv_loss, of the seed's or the paper's objective."""
    if settings.objective == "seed":
        return {"alpha_loss": settings.lambda_alpha * alpha_prior(images, settings.alpha),
                "tv_loss": settings.lambda_tv * tv_prior(images, settings.beta)}
    pixels = to_paper_units(images)
    area = images.shape[-2] * images.shape[-1]
    if settings.beta == 2:
        alpha_sums, tv_sums = PaperPriors.apply(pixels, settings.alpha)
    else:
        alpha_sums, tv_sums = pixel_norm_prior(pixels, settings.alpha), tv_prior(pixels, settings.beta)
    return {"alpha_loss": settings.lambda_alpha * alpha_sums / (area * PAPER_B ** settings.alpha),
            "tv_loss": settings.lambda_tv * tv_sums / (area * PAPER_V ** settings.beta)}


def objective_terms(settings: Settings, features, targets, target_norms, images) -> dict:
    """The three weighted terms of each row, rec_loss, alpha_loss and tv_loss, of the seed's or the
    paper's objective, for settings whose C is a number."""
    return {"rec_loss": data_term(settings.C, features, targets, target_norms),
            **prior_terms(settings, images)}


def box_factor(pixels: torch.Tensor) -> torch.Tensor:
    """Per pixel of images in the paper's 0-255 units, the factor that shrinks an RGB norm above 2B to 2B."""
    return (2 * PAPER_B / pixels.square().sum(dim=1, keepdim=True).sqrt()).clamp(max=1.0)


def box_constraint(image: torch.Tensor) -> torch.Tensor:
    """The image with every pixel whose RGB norm in the paper's 0-255 units exceeds 2B shrunk to 2B."""
    return image * box_factor(to_paper_units(image))


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

    def __init__(self, size: tuple, generators: list, device: torch.device, objective: str):
        rows = [initial_noise(objective, (1, 3, *size), generator) for generator in generators]
        self.variable = torch.cat(rows).to(device).requires_grad_()
        self.boxed = objective == "paper"

    def render(self) -> torch.Tensor:
        """The normalised images."""
        return self.variable

    @torch.no_grad()
    def after_step(self) -> None:
        """Project the pixels back into the paper's box."""
        if self.boxed:
            self.variable.copy_(box_constraint(self.variable))


class FourierImage:
    """lucent's parameterisation: a decorrelated-colour spectrum scaled by 1/frequency, so that the
    optimiser moves low frequencies first and the images stay smooth. The spectrum covers a canvas
    whose sides have no prime factor above 7 (227 becomes 240), since an FFT of a prime length
    costs several times more; the image is its top-left corner."""

    def __init__(self, size: tuple, generators: list, device: torch.device, objective: str):
        self.size, self.boxed = size, objective == "paper"
        self.canvas = tuple(fft_size(length) for length in size)
        frequency_y = torch.fft.fftfreq(self.canvas[0], device=device)[:, None]
        frequency_x = torch.fft.rfftfreq(self.canvas[1], device=device)[None, :]
        frequency = (frequency_y.square() + frequency_x.square()).sqrt()
        self.scale = 1 / frequency.clamp_min(1 / max(self.canvas))
        colour = torch.tensor(COLOUR_CORRELATION_SQRT, device=device)
        self.paper_colour = 255 * colour / colour.norm(dim=0).max()  # to the paper's 0-255 units
        rows = [0.01 * torch.randn(1, 3, *self.scale.shape, 2, generator=generator)
                for generator in generators]
        self.variable = torch.cat(rows).to(device).requires_grad_()

    def render(self) -> torch.Tensor:
        """The normalised images."""
        spectrum = torch.view_as_complex(self.variable) * self.scale
        canvas = torch.fft.irfftn(spectrum, s=self.canvas, dim=(-2, -1), norm="ortho")
        decorrelated = canvas[..., :self.size[0], :self.size[1]]
        pixels = torch.einsum("ij,bjhw->bihw", self.paper_colour, decorrelated)  # in the paper's units
        if self.boxed:  # the box as part of the image's definition: cheaper than a projection, two FFTs
            pixels = pixels * box_factor(pixels)
        return pixels / paper_scale(pixels.device)

    def after_step(self) -> None:
        """Nothing: the box is part of rendering."""


PARAMETERISATIONS = {"pixel": PixelImage, "fft": FourierImage}


# ---------------------------------------------------------------- inversion


class Inversion(NamedTuple):
    """What `invert` returns: the normalised images, per image its final losses and the settings its
    layer decided, how many iterations ran and why they stopped, and the settings as resolved."""

    images: torch.Tensor
    losses: list
    iterations: int
    stopped: str  # why: "epochs" (all of them ran), "plateau" or "interrupted" (Ctrl-C)
    settings: Settings
    layer_settings: list  # per image, the settings its layer's stride decided: jitter, C and plateau


class Diverged(UsageError):
    """The loss stopped being finite; `images` holds the last images whose loss was finite."""

    def __init__(self, message: str, images: Optional[torch.Tensor]):
        super().__init__(message)
        self.images = images


def make_optimizer(settings: Settings, variables: list) -> torch.optim.Optimizer:
    """SGD with momentum, Adam with --momentum as beta1, or L-BFGS taking one step per iteration."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(variables, lr=settings.lr, momentum=settings.momentum, foreach=False)
    if settings.optimizer == "adam":
        betas = (settings.momentum, 0.999)
        try:  # one fused kernel per step; torch before 2.4 has it for CUDA only
            return torch.optim.Adam(variables, lr=settings.lr, betas=betas, fused=True)
        except RuntimeError:
            return torch.optim.Adam(variables, lr=settings.lr, betas=betas, foreach=False)
    return torch.optim.LBFGS(variables, lr=settings.lr, max_iter=1, history_size=10)


def autocast(precision: str, device: torch.device):
    """A context that runs the forward pass in `precision` (fp32, bf16 or fp16)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def reference_features(model: nn.Module, layers: list, references: torch.Tensor, precision: str) -> list:
    """Per layer, (its rows, their fp32 activations); UsageError where there is nothing sound to invert."""
    try:
        with torch.no_grad(), autocast(precision, references.device):
            batches = layer_batches(model, layers, references)
    except FORWARD_ERRORS as error:  # e.g. a kernel larger than what is left of a small input
        shape = "x".join(map(str, references.shape[1:]))
        raise UsageError(f"the model cannot compute this layer for a {shape} "
                         f"input: change --input_size ({one_line(error)})") from None
    targets = [(rows, batch.float()) for rows, batch in batches]
    if not all(torch.isfinite(target).all() for _, target in targets):
        raise UsageError(f"the layer's activations for this photo are not finite (NaN or inf) in "
                         f"{precision}, before any optimisation: the weights are unsound or the "
                         "precision overflows; --lr is not the cause")
    if not all(target.flatten(1).any(1).all() for _, target in targets):
        raise UsageError("the layer's activations for this image are all zero: there is nothing to invert")
    return targets


def layer_settings(settings: Settings, height: int, target: torch.Tensor) -> dict:
    """The jitter, C and plateau tolerance of a row whose layer gives `target` for an input `height`
    pixels high, from the layer's stride (the whole input for a layer without a grid) where 'auto'.
    The authors' jitter is max(1, round(stride / 4)) crop offsets per axis."""
    stride = height // target.shape[-1] if target.dim() == 4 else height
    return {"jitter": max(1, round(stride / 4)) - 1 if settings.jitter == "auto" else settings.jitter,
            "C": PAPER_C * min(1.0, FULL_C_STRIDE / stride) ** 2 if settings.C == "auto" else settings.C,
            "plateau": settings.plateau if stride <= PLATEAU_STRIDE else 0.0}


def row_order(groups: list, device: torch.device) -> Optional[torch.Tensor]:
    """The permutation that puts rows listed group by group back in row order (None: they are)."""
    order = [row for rows in groups for row in rows]
    if order == sorted(order):
        return None
    return torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=device)


def in_row_order(parts: list, permutation: Optional[torch.Tensor]) -> torch.Tensor:
    """Join tensors of rows listed group by group, in row order."""
    joined = torch.cat(parts) if len(parts) > 1 else parts[0]
    return joined if permutation is None else joined[permutation]


class FiniteGuard:
    """Takes optimizer steps, keeping the images of the latest step whose loss was finite; on a
    non-finite loss it puts them back and raises Diverged, naming the likely cause."""

    def __init__(self, canvases: list, current_images: Callable, lr: float, every: int, last: int):
        self.canvases, self.current_images, self.lr = canvases, current_images, lr
        self.every, self.last = every, last
        self.finite = None  # the variables whose loss was last checked finite

    def step(self, optimizer: torch.optim.Optimizer, closure: Callable, step: int) -> torch.Tensor:
        """optimizer.step(closure), checked at the first, every `every`-th and the last step."""
        if not (step == 1 or step % self.every == 0 or step == self.last):
            return optimizer.step(closure)
        before = [canvas.variable.detach().clone() for canvas in self.canvases]
        loss = optimizer.step(closure)  # the loss of `before`, computed before the update
        if torch.isfinite(loss):
            self.finite = before
            return loss
        if self.finite is None:
            raise Diverged("the loss is not finite at the start, before any step, so --lr is not the "
                           "cause: the model gives non-finite values for this image (unsound weights?), "
                           "or a weight such as --C is too large", None)
        for canvas, variable in zip(self.canvases, self.finite):
            canvas.variable.data.copy_(variable)
        raise Diverged(f"the loss became non-finite at iteration {step}: --lr {self.lr:g} is too large "
                       "for this layer; try a smaller --lr", self.current_images())


class Schedule:
    """When the rate decays, jitter stops and the run ends. The rate decays every decay_epochs
    iterations (the seed's StepLR). With a plateau tolerance, the first decay comes as soon as no
    image's lowest loss has fallen by that fraction over PLATEAU_WINDOW iterations, and the run
    ends after a last stage as long, relative to the first, as the paper's."""

    def __init__(self, optimizer: torch.optim.Optimizer, settings: Settings, tolerances: list):
        self.optimizer, self.settings, self.tolerances = optimizer, settings, tolerances
        self.watching = any(tolerances)  # whether a plateau can end the first stage
        self.step_lr = torch.optim.lr_scheduler.StepLR(optimizer, step_size=settings.decay_epochs,
                                                       gamma=settings.decay_factor)
        self.first_decay = settings.decay_epochs  # the last iteration of the first stage
        self.last = settings.epochs  # the last iteration
        self.lowest = None  # each image's lowest loss so far: Adam's loss oscillates
        self.before = None  # the same, PLATEAU_WINDOW iterations ago

    def jittering(self, step: int) -> bool:
        """Whether `step` is in the first stage, the one with jitter."""
        return step <= self.first_decay

    def stalled(self, lowest: list) -> bool:
        """Whether no image's lowest loss fell by its tolerance since PLATEAU_WINDOW iterations ago."""
        return all(before - now < tolerance * abs(before)
                   for before, now, tolerance in zip(self.before, lowest, self.tolerances))

    def step(self, step: int, terms: dict) -> None:
        """Account for iteration `step`, whose losses before its update were `terms`."""
        self.step_lr.step()
        if not self.watching or step > self.first_decay:
            return
        loss = sum(values.detach() for values in terms.values())
        self.lowest = loss if self.lowest is None else torch.minimum(self.lowest, loss)
        if step % PLATEAU_WINDOW or step == self.first_decay:
            return
        now = self.lowest.tolist()  # .tolist() waits for a GPU: once a window
        if self.before is not None and self.stalled(now):
            for group in self.optimizer.param_groups:
                group["lr"] *= self.settings.decay_factor
            self.first_decay = step
            self.last = min(self.last, step + math.ceil(step * (1 - FIRST_STAGE) / FIRST_STAGE))
        self.before = now


def invert(model: nn.Module, layers, references: torch.Tensor, settings: Optional[Settings] = None, *,
           callback: Optional[Callable] = None, **overrides) -> Inversion:
    """Optimise one image per row of `references` until its activations at its layer match the row's.

    `layers` is one module, or one per row: all rows are optimised together in one batch, each only
    by its own loss, and each gives what a call with that row alone gives. `settings` (or keywords
    named as its fields) choose the method; what is left None takes its objective's default.
    `callback(step, losses, images)` sees each iteration's losses, a dict of one tensor per term with
    one value per row, and a function that returns the current images. Ctrl-C stops early and
    returns the images so far.
    """
    settings = resolve(dataclasses.replace(settings or Settings(), **overrides), references.device)
    count, device = len(references), references.device
    height, width = references.shape[-2:]
    layers = [layers] * count if isinstance(layers, nn.Module) else list(layers)
    if settings.optimizer == "lbfgs" and count > 1:
        raise UsageError("--optimizer lbfgs inverts one layer of one image per call: L-BFGS would "
                         "couple the images of a batch")
    targets = reference_features(model, layers, references, settings.precision)
    target_norms = [per_row(target.square()) for _, target in targets]
    by_layer = row_order([rows for rows, _ in targets], device)
    per_layer = [layer_settings(settings, height, target) for _, target in targets]
    by_row = {row: chosen for (rows, _), chosen in zip(targets, per_layer) for row in rows}
    jitters = [by_row[row]["jitter"] for row in range(count)]

    # Each row has its own generator, seeded alike, so that it draws what a call of its own would.
    # With jitter, a row's image is a canvas `jitter` pixels larger, seen through a randomly placed
    # crop; rows of one jitter share one batched canvas.
    generators = [torch.Generator().manual_seed(settings.seed) for _ in range(count)]
    groups = [[row for row in range(count) if jitters[row] == jitter] for jitter in dict.fromkeys(jitters)]
    by_canvas = row_order(groups, device)
    canvases = [PARAMETERISATIONS[settings.param](
        (height + jitters[rows[0]], width + jitters[rows[0]]), [generators[row] for row in rows], device,
        settings.objective) for rows in groups]
    middles = [(jitter // 2, jitter // 2) for jitter in jitters]

    def crop(wholes: list, offsets: list) -> torch.Tensor:
        """The rows' images, as the network sees them, from their canvases at their offsets."""
        crops = [whole if not jitters[rows[0]] else
                 torch.cat([whole[index:index + 1, :, dy:dy + height, dx:dx + width]
                            for index, (dy, dx) in enumerate(offsets[row] for row in rows)])
                 for rows, whole in zip(groups, wholes)]
        return in_row_order(crops, by_canvas)

    def current_images() -> torch.Tensor:  # a copy: a pixel image's crop can be its variable itself
        return crop([canvas.render().detach() for canvas in canvases], middles).clone()

    def evaluate(wholes: list, offsets: list) -> dict:
        """Each row's terms: the feature error at its layer, and the priors over its canvas."""
        with autocast(settings.precision, device):
            outputs = layer_batches(model, layers, crop(wholes, offsets))
        layer_targets = zip(outputs, targets, target_norms, per_layer)
        errors = [data_term(chosen["C"], output.float(), target, norms)
                  for (_, output), (_, target), norms, chosen in layer_targets]
        priors = [prior_terms(settings, whole) for whole in wholes]
        return {"rec_loss": in_row_order(errors, by_layer),
                **{name: in_row_order([terms[name] for terms in priors], by_canvas) for name in priors[0]}}

    def closure():  # reads this iteration's `offsets`; L-BFGS may call it more than once a step
        nonlocal terms
        optimizer.zero_grad(set_to_none=True)
        terms = evaluate([canvas.render() for canvas in canvases], offsets)
        loss = sum(values.sum() for values in terms.values())
        loss.backward()
        return loss

    optimizer = make_optimizer(settings, [canvas.variable for canvas in canvases])
    schedule = Schedule(optimizer, settings, [by_row[row]["plateau"] for row in range(count)])
    guard = FiniteGuard(canvases, current_images, settings.lr, 1 if device.type == "cpu" else GPU_CHECK_EVERY,
                        settings.epochs)
    terms, iterations, stopped = {}, 0, "epochs"
    try:
        for step in range(1, settings.epochs + 1):
            if step > schedule.last:
                stopped = "plateau"
                break
            offsets = [torch.randint(0, jitter + 1, (2,), generator=generator).tolist()
                       if jitter and schedule.jittering(step) else middle
                       for jitter, generator, middle in zip(jitters, generators, middles)]
            guard.step(optimizer, closure, step)  # render, forward, loss, backward, step
            for canvas in canvases:
                canvas.after_step()
            schedule.step(step, terms)
            iterations = step
            if callback is not None:
                callback(step, {name: values.detach() for name, values in terms.items()}, current_images)
    except KeyboardInterrupt:
        stopped = "interrupted"
    with torch.no_grad():  # the losses of the returned images, not of the ones before the last step
        wholes = [canvas.render() for canvas in canvases]
        images = crop(wholes, middles).detach().clone()
        final = {name: values.tolist() for name, values in evaluate(wholes, middles).items()}
    losses = [{**{name: values[row] for name, values in final.items()},
               "feature_error": final["rec_loss"][row] / by_row[row]["C"]} for row in range(count)]
    if not all(math.isfinite(value) for row in losses for value in row.values()):
        raise Diverged(f"the loss became non-finite by iteration {iterations}: --lr {settings.lr:g} is "
                       "too large for this layer; try a smaller --lr", None)
    return Inversion(images, losses, iterations, stopped, settings, [by_row[row] for row in range(count)])


# ---------------------------------------------------------------- running and saving


def pick_device(spec: str) -> torch.device:
    """Turn --device (auto, cpu, cuda, cuda:N, mps) into a torch.device that exists here."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA GPU is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {spec}: MPS is not available here")
    elif device.type != "cpu":
        raise UsageError(f"--device {spec!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (torch.manual_seed seeds every CUDA device too)."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True  # the same seed on the same GPU gives the same PNG
    torch.backends.cudnn.benchmark = False


class Row(NamedTuple):
    """One (photo, layer) pair of a call: one optimised image, saved as one PNG and one JSON."""

    image_path: str
    layer_name: str
    png: Path

    @property
    def json(self) -> Path:
        return self.png.with_suffix(".json")

    @property
    def frames(self) -> Path:
        return self.png.with_name(f"{self.png.stem}_frames")


def montage_path(args: argparse.Namespace, image_path: str) -> Path:
    """Where a call with several rows puts a photo's montage."""
    return Path(args.output_dir) / f"{Path(image_path).stem}_{args.model}_montage.png"


def plan_rows(args: argparse.Namespace) -> list:
    """One Row per (photo, layer), photo by photo, after the checks that need no model or photo."""
    image_paths = list(dict.fromkeys(args.image_path))
    layer_names = list(dict.fromkeys(seed_form(name) for name in args.layer_name))
    stems = [Path(path).stem for path in image_paths]
    if len(set(stems)) < len(stems):
        raise UsageError("two --image_path files share a name stem, so their outputs would collide")
    several = len(image_paths) * len(layer_names) > 1
    if args.output:
        if several:
            raise UsageError("--output names one file: with several layers or images, use --output_dir")
        if Path(args.output).suffix.lower() != ".png":
            raise UsageError(f"--output {args.output} must end in .png")
    rows = [Row(path, name, Path(args.output) if args.output else
                Path(args.output_dir) / f"{Path(path).stem}_{args.model}_{name}.png")
            for path in image_paths for name in layer_names]
    files = [path for row in rows for path in (row.png, row.json, row.png.with_suffix(".diverged.png"))]
    if args.save_every:
        files += [row.png.with_suffix(".gif") for row in rows]
    if several:
        files += [montage_path(args, path) for path in image_paths]
    for path in files:
        check_writable(path)
    for row in rows if args.save_every else []:
        check_writable(row.frames, folder=True)
    return rows


def check_writable(path: Path, folder: bool = False) -> None:
    """Fail before the run, not after it, if `path` cannot be written as a file (or a folder)."""
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        raise UsageError(f"cannot write {path}: something that is not a {kind} is already there")
    existing = next(parent for parent in (path if folder else path.parent, *path.parents) if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {path}: {existing} is not a writable directory")


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes this device can still allocate (MemAvailable on Linux, free GPU memory), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def check_memory(needed: float, device: torch.device, what: str) -> None:
    """Refuse, before allocating, a job whose estimated memory exceeds what the device has free."""
    free = available_memory(device)
    if free is not None and needed > free:
        raise UsageError(f"{what} needs about {needed / 2**30:.1f} GiB, more than the "
                         f"{free / 2**30:.1f} GiB free on {device}: use a smaller --input_size")


def activation_bytes(model: nn.Module, layers: list, size: int, images: int, device: torch.device) -> float:
    """Estimate an inversion's memory from a forward pass at a small size, scaled up by area."""
    probe = min(size, 64)
    elements = []

    def count_output(module, inputs, output):
        if isinstance(output, torch.Tensor):
            elements.append(output.numel())

    leaves = [module for module in model.modules() if not any(module.children())]
    handles = [module.register_forward_hook(count_output) for module in leaves]
    try:
        with torch.no_grad():
            layer_outputs(model, layers, torch.zeros(len(layers), 3, probe, probe, device=device))
    except FORWARD_ERRORS:
        return 0.0  # the model refuses the probe size; the real size is checked when it runs
    finally:
        for handle in handles:
            handle.remove()
    # each activation is kept for the backward pass and gets a gradient: about three copies in fp32
    return 3 * 4 * sum(elements) * (size / probe) ** 2 * images


def write_atomically(path: Path, write: Callable) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path` in one step."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:  # a full disk, a folder that vanished: the old file, if any, stays
        raise UsageError(f"could not write {path} ({one_line(error)})") from None
    finally:
        temporary.unlink(missing_ok=True)


def save_png(path: Path, picture: Image.Image) -> None:
    """Write a PNG atomically."""
    write_atomically(path, lambda file: picture.save(file, format="PNG"))


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one short line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def progress_reporter(epochs: int, every: int, labels: list, quiet: bool):
    """A tqdm bar and loss lines every `every` iterations, one per image (None when quiet)."""
    if quiet:
        return None, None
    bar = tqdm(total=epochs, unit="it", dynamic_ncols=True)

    def report(step: int, losses: list, images: Callable) -> None:
        bar.update()
        if step % every == 0 or step == epochs:  # .item() waits for a GPU, so only now and then
            rows = {name: values.tolist() for name, values in losses.items()}
            for index, label in enumerate(labels):
                text = "  ".join(f"{name} {values[index]:.4g}" for name, values in rows.items())
                bar.write(f"iteration {step:>5}/{epochs}  {label}{text}")

    return report, bar


def snapshot_saver(rows: list, every: int) -> tuple:
    """A callback that writes every `every`-th iteration's images as PNG frames, and the frames kept."""
    frames = [[] for _ in rows]

    def save(step: int, losses: list, images: Callable) -> None:
        if step % every == 0:
            for row, kept, image in zip(rows, frames, images()):
                picture = deprocess(image[None])
                save_png(row.frames / f"iteration_{step:05d}.png", picture)
                kept.append(picture)

    return save, frames


def chained(*callbacks: Optional[Callable]) -> Optional[Callable]:
    """One callback that calls each of `callbacks` that is not None, in order."""
    present = [callback for callback in callbacks if callback is not None]

    def call(*state) -> None:
        for callback in present:
            callback(*state)

    return call if present else None


def montage(original: Image.Image, tiles: list) -> Image.Image:
    """A grid of labelled tiles: the original first, then each (label, picture) in order."""
    tiles = [("original", original), *tiles]
    side, label_height = original.width, 16
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new("RGB", (columns * side, rows * (side + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (label, picture) in enumerate(tiles):
        left, top = (index % columns) * side, (index // columns) * (side + label_height)
        grid.paste(picture.resize((side, side)), (left, top))
        draw.text((left + 4, top + side + 2), label, fill="black")
    return grid


def save_outputs(args: argparse.Namespace, rows: list, photos: dict, result: Inversion, seconds: float,
                 frames: Optional[list], device: torch.device) -> None:
    """Write each row's PNG and JSON record, then its GIF, then each photo's montage."""
    pictures = [deprocess(image[None]) for image in result.images]
    for row, picture, losses, chosen in zip(rows, pictures, result.losses, result.layer_settings):
        record = {
            "args": vars(args),
            "image_path": row.image_path,
            "layer_name": row.layer_name,
            "settings": dataclasses.asdict(result.settings),
            "layer_settings": chosen,
            **losses,
            "iterations": result.iterations,
            "seconds": round(seconds, 4),
            "ms_per_iteration": round(1000 * seconds / max(result.iterations, 1), 3),
            "batch": len(rows),
            "device": str(device),
            "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__,
            "stopped": result.stopped,
        }
        save_png(row.png, picture)
        write_atomically(row.json, lambda file: file.write((json.dumps(record, indent=2) + "\n").encode()))
        if not args.quiet:
            print(f"saved {row.png} and {row.json.name}: feature_error {losses['feature_error']:.4f}")
    for row, kept, picture in zip(rows, frames or [], pictures):
        movie = kept + [picture]
        write_atomically(row.png.with_suffix(".gif"), lambda file: movie[0].save(
            file, format="GIF", save_all=True, append_images=movie[1:], duration=100, loop=0))
    if len(rows) > 1:
        for path, photo in photos.items():
            tiles = [(row.layer_name, picture) for row, picture in zip(rows, pictures)
                     if row.image_path == path]
            save_png(montage_path(args, path), montage(deprocess(photo), tiles))


def list_layers(args: argparse.Namespace, device: torch.device) -> int:
    """Print every layer of the model with its output shape at --input_size."""
    model = load_model(args.model, args.weights, progress=not args.quiet).to(device)
    for row in layer_shapes(model, args.input_size, device):
        print("  ".join(f"{cell:<24}" for cell in row).rstrip())
    return 0


def run(args: argparse.Namespace) -> int:
    """Plan, optimise, save: the command line's job; return the exit code."""
    device = pick_device(args.device)
    seed_everything(args.seed)
    if args.list_layers:
        return list_layers(args, device)
    # the cheap checks come first, so that a typo fails before a model loads or downloads
    settings = resolve(settings_from_args(args), device)
    rows = plan_rows(args)
    # the images alone: a resized RGB copy, its tensor, and per row the canvas, its gradient and moments
    check_memory(args.input_size ** 2 * 3 * (1 + 4 + 4 * 8 * len(rows)), torch.device("cpu"),
                 f"--input_size {args.input_size}")
    photos = {path: preprocess(load_image(path), args.input_size) for path in dict.fromkeys(args.image_path)}
    model = load_model(args.model, args.weights, progress=not args.quiet).to(device)
    modules = {row.layer_name: resolve_layer(model, row.layer_name)[1] for row in rows}
    needed = activation_bytes(model, list(modules.values()), args.input_size, len(photos), device)
    check_memory(needed, device, f"inverting {', '.join(modules)} at --input_size {args.input_size}")

    labels = [f"{Path(row.image_path).stem} {row.layer_name}  " if len(rows) > 1 else "" for row in rows]
    report, bar = progress_reporter(settings.epochs, args.stdout_epochs, labels, args.quiet)
    save_frames, frames = snapshot_saver(rows, args.save_every) if args.save_every else (None, None)
    started = time.perf_counter()
    try:
        result = invert(model, [modules[row.layer_name] for row in rows],
                        torch.cat([photos[row.image_path] for row in rows]).to(device), settings,
                        callback=chained(report, save_frames))
    except Diverged as error:
        for row, image in zip(rows, [] if error.images is None else error.images):
            save_png(row.png.with_suffix(".diverged.png"), deprocess(image[None]))
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    save_outputs(args, rows, photos, result, seconds, frames, device)
    if result.stopped == "interrupted":
        print(f"interrupted after {result.iterations} iterations: saved what it had", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"{len(rows)} inversion(s) in {seconds:.1f} s")
    return 0


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


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line: its inputs and outputs, then one flag per field of Settings."""
    parser = _ArgumentParser(
        prog="invert.py", formatter_class=_HelpFormatter,
        description="Recover images whose activations at layers of a torchvision CNN match those "
                    "of photos (Mahendran & Vedaldi, CVPR 2015 and IJCV 2016).",
        epilog="example: python invert.py --model vgg16_bn --layer_name features_22")
    inputs = parser.add_argument_group("what to invert")
    inputs.add_argument("--image_path", nargs="+", default=[str(DEFAULT_IMAGE)],
                        help="the photo(s) to invert (any format Pillow reads); several are inverted "
                             "together")
    inputs.add_argument("--model", default="alexnet", help="a torchvision classification model name")
    inputs.add_argument("--weights", default="DEFAULT",
                        help="DEFAULT or another torchvision weights name (downloaded once to TORCH_HOME), "
                             "a path to a state-dict file, or 'none' for random weights")
    inputs.add_argument("--input_size", type=positive_int, default=227,
                        help="side of the square input, in pixels")
    inputs.add_argument("--layer_name", nargs="+", default=["avgpool"],
                        help="the layer(s) to invert: features_4 (the seed's form) or features.4 "
                             "(PyTorch's); several are inverted together, in one batch")
    inputs.add_argument("--list_layers", action="store_true",
                        help="print every layer with its output shape, then exit")
    method = parser.add_argument_group("how to invert (the keywords of invert())")
    for field in dataclasses.fields(Settings):
        options = dict(field.metadata)
        explained = f" (default: {default_help(field.name)})" if field.default is None else ""
        method.add_argument(f"--{field.name}", default=field.default, help=options.pop("help") + explained,
                            **options)
    running = parser.add_argument_group("running and output")
    running.add_argument("--device", default="auto",
                         help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    running.add_argument("--output", default=None,
                         help="the PNG to write, instead of <output_dir>/<stem>_<model>_<layer>.png")
    running.add_argument("--output_dir", default="outputs", help="folder for outputs, created if missing")
    running.add_argument("--save_every", type=non_negative_int, default=0,
                         help="also save every N-th iteration as <name>_frames/iteration_N.png, and "
                              "<name>.gif (0: off)")
    running.add_argument("--stdout_epochs", type=positive_int, default=25,
                         help="print the losses every this many iterations")
    running.add_argument("--quiet", action="store_true", help="no progress bar and no loss lines")
    return parser.parse_args(argv)


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
        print(f"invert.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("invert.py: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
