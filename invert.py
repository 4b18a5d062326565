#!/usr/bin/env python3
"""Invert one layer of a pretrained CNN: find an image whose activations there match a photo's.

Mahendran & Vedaldi, "Understanding Deep Image Representations by Inverting Them" (CVPR 2015).

    python invert.py --image_path reference_images/astronaut.jpg --model alexnet --layer_name features_4
"""
import argparse
import difflib
import json
import math
import os
import pickle
import random
import sys
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torchvision
from PIL import Image, ImageOps
from torch import nn
from torchvision import transforms
from tqdm import tqdm

# ---------------------------------------------------------------- constants

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE = Path(__file__).resolve().parent / "reference_images" / "astronaut.jpg"
# The seed's default lr (1e-2) leaves the image as noise; 1e2, the value its own comment gives,
# measured best on a trained VGG16-BN (see the README).
DEFAULT_LR = 100.0
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# what torchvision models raise for an input size they cannot take (ViT asserts, convs raise)
FORWARD_ERRORS = (RuntimeError, AssertionError, ValueError)


class UsageError(Exception):
    """A problem with the user's input or settings: reported as one line, exit code 2."""


class _LayerReached(Exception):
    """Raised by the layer hook so that the forward pass stops at the hooked layer."""


class Inversion(NamedTuple):
    """The result of `invert`: the normalised image, its final losses and how the run ended."""

    image: torch.Tensor
    losses: dict
    iterations: int
    interrupted: bool


# ---------------------------------------------------------------- images


def load_image(path) -> Image.Image:
    """Open an image file as 8-bit RGB, honouring EXIF orientation; UsageError if it cannot be read."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--image_path {path} is a directory, not an image")
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)  # a loaded copy, upright
    except FileNotFoundError:
        raise UsageError(f"--image_path {path}: no such file") from None
    except PermissionError:
        raise UsageError(f"--image_path {path}: permission denied") from None
    except Image.DecompressionBombError as error:
        raise UsageError(f"--image_path {path} is too large to decode safely ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:  # what Pillow raises for bad or truncated data
        raise UsageError(f"--image_path {path} is not a readable image ({one_line(error)})") from None
    return to_rgb(image)


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


def layer_output(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run `model` on `images` up to `layer` and return its output; later layers are never computed."""
    captured = []

    def hook(module, inputs, output):
        captured.append(output)
        raise _LayerReached

    handle = layer.register_forward_hook(hook)
    try:
        model(images)
    except _LayerReached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise UsageError("the chosen layer is not used in the model's forward pass")
    if not isinstance(captured[0], torch.Tensor):
        raise UsageError(f"the chosen layer returns a {type(captured[0]).__name__}, not a tensor; "
                         "choose another (see --list_layers)")
    return captured[0]


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


def alpha_prior(image: torch.Tensor, alpha: float) -> torch.Tensor:
    """The alpha-norm prior sum(|x|^alpha)."""
    return image.abs().pow(alpha).sum()


def tv_prior(image: torch.Tensor, beta: float) -> torch.Tensor:
    """Total variation sum((dx^2 + dy^2)^(beta/2)), differences taken horizontally and vertically."""
    dx = nn.functional.pad(image[..., :, 1:] - image[..., :, :-1], (1, 0, 0, 0))
    dy = nn.functional.pad(image[..., 1:, :] - image[..., :-1, :], (0, 0, 1, 0))
    # the clamp keeps the gradient finite where both differences are 0 and beta < 2
    return (dx.square() + dy.square()).clamp_min(1e-12).pow(beta / 2).sum()


def objective_terms(features, target, target_norm, image, *, alpha, beta, lambda_alpha, lambda_tv) -> dict:
    """The three weighted terms of the seed's objective: rec_loss, alpha_loss and tv_loss."""
    return {
        "rec_loss": (features - target).square().sum() / target_norm,
        "alpha_loss": lambda_alpha * alpha_prior(image, alpha),
        "tv_loss": lambda_tv * tv_prior(image, beta),
    }


# ---------------------------------------------------------------- inversion


def diverged(lr: float, what: str) -> UsageError:
    """The error for a loss that is no longer finite, which a smaller learning rate avoids."""
    return UsageError(f"the loss {what}: --lr {lr:g} is too large for this layer; try a smaller --lr")


def invert(model: nn.Module, layer: nn.Module, reference: torch.Tensor, *,
           alpha: float = 6.0, beta: float = 2.0, lambda_alpha: float = 1e-5, lambda_tv: float = 1e-5,
           epochs: int = 200, lr: float = DEFAULT_LR, momentum: float = 0.9,
           decay_factor: float = 0.1, decay_epochs: int = 200,
           callback: Optional[Callable[[int, dict], None]] = None) -> Inversion:
    """Optimise a noise image until `layer`'s activations match those of `reference`; Ctrl-C stops early."""
    weights = dict(alpha=alpha, beta=beta, lambda_alpha=lambda_alpha, lambda_tv=lambda_tv)
    try:
        with torch.no_grad():
            target = layer_output(model, layer, reference)
    except FORWARD_ERRORS as error:  # e.g. a kernel larger than what is left of a small input
        raise UsageError(f"the model cannot compute this layer for a {'x'.join(map(str, reference.shape))} "
                         f"input: change --input_size ({one_line(error)})") from None
    target_norm = target.square().sum()
    if target_norm == 0:
        raise UsageError("the layer's activations for this image are all zero: there is nothing to invert")
    image = (1e-3 * torch.randn_like(reference)).requires_grad_()
    optimizer = torch.optim.SGD([image], lr=lr, momentum=momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=decay_epochs, gamma=decay_factor)
    iterations, interrupted = 0, False
    try:
        for step in range(1, epochs + 1):
            optimizer.zero_grad(set_to_none=True)
            terms = objective_terms(layer_output(model, layer, image), target, target_norm, image, **weights)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise diverged(lr, f"became {loss.item()} at iteration {step}")
            loss.backward()
            optimizer.step()
            scheduler.step()
            iterations = step
            if callback is not None:
                callback(step, {name: value.item() for name, value in terms.items()})
    except KeyboardInterrupt:
        interrupted = True
    image = image.detach()
    with torch.no_grad():  # the losses of the returned image, not of the one before the last step
        final = objective_terms(layer_output(model, layer, image), target, target_norm, image, **weights)
    losses = {name: value.item() for name, value in final.items()}
    if not math.isfinite(sum(losses.values())):
        raise diverged(lr, "became non-finite at the last step")
    return Inversion(image, losses, iterations, interrupted)


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


def output_paths(args: argparse.Namespace) -> tuple:
    """The PNG path (--output, or <output_dir>/<stem>_<model>_<layer>.png) and the JSON beside it."""
    if args.output:
        png = Path(args.output)
        if png.suffix.lower() != ".png":
            raise UsageError(f"--output {png} must end in .png")
    else:
        layer = seed_form(args.layer_name)  # features.4 and features_4 name the same file
        png = Path(args.output_dir) / f"{Path(args.image_path).stem}_{args.model}_{layer}.png"
    return png, png.with_suffix(".json")


def check_writable(directory: Path) -> None:
    """Fail before the run, not after it, if `directory` cannot be created or written."""
    existing = next(path for path in (directory, *directory.parents) if path.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write outputs to {directory}: {existing} is not a writable directory")


def write_atomically(path: Path, write: Callable) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one short line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def progress_reporter(epochs: int, every: int, quiet: bool):
    """A tqdm bar and a loss line every `every` iterations, as a callback for `invert` (None when quiet)."""
    if quiet:
        return None, None
    bar = tqdm(total=epochs, unit="it", dynamic_ncols=True)

    def report(step: int, losses: dict) -> None:
        bar.set_postfix({name.removesuffix("_loss"): f"{value:.3g}" for name, value in losses.items()},
                        refresh=False)
        bar.update()
        if step % every == 0 or step == epochs:
            values = "  ".join(f"{name} {value:.4g}" for name, value in losses.items())
            bar.write(f"iteration {step:>5}/{epochs}  {values}")

    return report, bar


def run(args: argparse.Namespace) -> int:
    """Run the command line's job; return the exit code."""
    device = pick_device(args.device)
    seed_everything(args.seed)
    if args.list_layers:
        model = load_model(args.model, args.weights, progress=not args.quiet).to(device)
        for row in layer_shapes(model, args.input_size, device):
            print("  ".join(f"{cell:<24}" for cell in row).rstrip())
        return 0
    # the cheap checks come first, so that a typo fails before a model loads or downloads
    reference = preprocess(load_image(args.image_path), args.input_size).to(device)
    png_path, json_path = output_paths(args)
    check_writable(png_path.parent)
    model = load_model(args.model, args.weights, progress=not args.quiet).to(device)
    _, layer = resolve_layer(model, args.layer_name)
    report, bar = progress_reporter(args.epochs, args.stdout_epochs, args.quiet)
    started = time.perf_counter()
    try:
        result = invert(model, layer, reference, alpha=args.alpha, beta=args.beta,
                        lambda_alpha=args.lambda_alpha, lambda_tv=args.lambda_tv, epochs=args.epochs,
                        lr=args.lr, momentum=args.momentum, decay_factor=args.decay_factor,
                        decay_epochs=args.decay_epochs, callback=report)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started

    record = {
        "args": vars(args),
        **result.losses,
        "feature_error": result.losses["rec_loss"],
        "iterations": result.iterations,
        "seconds": round(seconds, 4),
        "ms_per_iteration": round(1000 * seconds / max(result.iterations, 1), 3),
        "device": str(device),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "interrupted": result.interrupted,
    }
    picture = deprocess(result.image)
    write_atomically(png_path, lambda file: picture.save(file, format="PNG"))
    write_atomically(json_path, lambda file: file.write((json.dumps(record, indent=2) + "\n").encode()))
    if result.interrupted:
        print(f"interrupted after {result.iterations} iterations: saved {png_path}", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"saved {png_path} and {json_path.name}: feature_error {record['feature_error']:.4f}, "
              f"{seconds:.1f} s")
    return 0


# ---------------------------------------------------------------- command line


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one-line UsageErrors instead of usage dumps."""

    def error(self, message):
        raise UsageError(message)


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
positive_float = _checked(float, lambda value: value > 0, "> 0")
non_negative_float = _checked(float, lambda value: value >= 0, ">= 0")


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line; every flag keeps the seed's name and default (except --lr: see README)."""
    parser = _ArgumentParser(
        prog="invert.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Recover an image whose activations at one layer of a torchvision CNN "
                    "match those of a photo (Mahendran & Vedaldi, CVPR 2015).",
        epilog="example: python invert.py --model vgg16_bn --layer_name features_22")
    add = parser.add_argument
    add("--image_path", default=str(DEFAULT_IMAGE), help="the photo to invert (any format Pillow reads)")
    add("--model", default="alexnet", help="a torchvision classification model name")
    add("--weights", default="DEFAULT",
        help="DEFAULT or another torchvision weights name (downloaded once to TORCH_HOME), "
             "a path to a state-dict file, or 'none' for random weights")
    add("--input_size", type=positive_int, default=227, help="side of the square input, in pixels")
    add("--layer_name", default="avgpool",
        help="the layer to invert: features_4 (the seed's form) or features.4 (PyTorch's)")
    add("--list_layers", action="store_true", help="print every layer with its output shape, then exit")
    add("--alpha", type=positive_float, default=6.0, help="exponent of the alpha-norm prior")
    add("--beta", type=positive_float, default=2.0, help="exponent of the total-variation prior")
    add("--lambda_alpha", type=non_negative_float, default=1e-5, help="weight of the alpha-norm prior")
    add("--lambda_tv", type=non_negative_float, default=1e-5, help="weight of the total-variation prior")
    add("--epochs", type=positive_int, default=200, help="optimisation iterations")
    add("--lr", type=positive_float, default=DEFAULT_LR,
        help="SGD learning rate (the seed's 1e-2 leaves the image as noise)")
    add("--momentum", type=non_negative_float, default=0.9, help="SGD momentum")
    add("--stdout_epochs", type=positive_int, default=25, help="print the losses every this many iterations")
    add("--decay_factor", type=positive_float, default=0.1, help="learning-rate multiplier at each decay")
    add("--decay_epochs", type=positive_int, default=200, help="iterations between learning-rate decays")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    add("--seed", type=int, default=2023, help="random seed for Python and torch (CPU and CUDA)")
    add("--output", default=None, help="the PNG to write, instead of <output_dir>/<stem>_<model>_<layer>.png")
    add("--output_dir", default="outputs", help="folder for outputs, created if missing")
    add("--quiet", action="store_true", help="no progress bar and no loss lines")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """The command line: parse, run, and turn expected failures into one-line messages and exit codes."""
    try:
        return run(parse_args(argv))
    except UsageError as error:
        print(f"invert.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("invert.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
