"""Reconstruction quality of each objective x optimizer, and of the defaults: a script, not a test.

Inverts vgg16_bn features_5, 12, 22 and 32 of the trained stand-in (conv blocks 1-4 trained; see
tests/README.md) on every photo in reference_images/, then random-weights alexnet features_0 ... 12
(default and seed+sgd only), and prints feature error, SSIM against the preprocessed original,
seconds and iterations:

    python ../shared/tools/trained_vgg16bn.py /tmp/vgg16_bn_proxy.pth
    python tests/benchmark_quality.py /tmp/vgg16_bn_proxy.pth --grid outputs/readme/quality_grid.png

Run it alone: a second torch process on the same cores skews the seconds. Needs scikit-image.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from skimage.metrics import structural_similarity

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import invert  # noqa: E402

SIZE = 224
VGG_LAYERS = ["features_5", "features_12", "features_22", "features_32"]
ALEXNET_LAYERS = [f"features_{index}" for index in range(13)]
# the defaults (paper + adam + fft), and each objective x optimizer on pixels, as in the paper
CONFIGS = {
    "default": [],
    **{f"{objective}+{optimizer}": ["--objective", objective, "--optimizer", optimizer, "--param", "pixel"]
       for objective in invert.OBJECTIVES for optimizer in ("sgd", "adam", "lbfgs")},
}
RANDOM_CONFIGS = ["default", "seed+sgd"]


def ssim(image: torch.Tensor, original: torch.Tensor) -> float:
    """SSIM of two normalised 1x3xHxW images, compared as the 8-bit RGB pictures the tool saves."""
    def as_array(tensor):
        return np.asarray(invert.deprocess(tensor))
    return structural_similarity(as_array(image), as_array(original), channel_axis=2, data_range=255)


def measure(model, photo: Path, layer_name: str, flags: list, size: int) -> tuple:
    """Invert one layer as the command line would with `flags`; return (result, seconds, SSIM)."""
    args = invert.parse_args(["--image_path", str(photo), "--input_size", str(size),
                              "--layer_name", layer_name, *flags])
    invert.seed_everything(args.seed)
    reference = invert.preprocess(invert.load_image(photo), size)
    _, layer = invert.resolve_layer(model, layer_name)
    started = time.perf_counter()
    result = invert.invert(model, layer, reference, invert.settings_from_args(args))
    return result, time.perf_counter() - started, ssim(result.images, reference)


def grid(rows: list, columns: list, tiles: dict, originals: dict, path: Path) -> None:
    """Save a labelled grid: one row per layer, the original then one column per configuration."""
    cell, label = 160, 22
    font = ImageFont.load_default(size=13)
    picture = Image.new("RGB", (90 + (len(columns) + 1) * cell, label + len(rows) * cell), "white")
    draw = ImageDraw.Draw(picture)
    for index, name in enumerate(["original", *columns]):
        draw.text((90 + index * cell + cell // 2, label // 2), name, fill="black", font=font, anchor="mm")
    for row, layer in enumerate(rows):
        top = label + row * cell
        draw.text((45, top + cell // 2), layer, fill="black", font=font, anchor="mm")
        for index, image in enumerate([originals[layer], *[tiles[layer, name] for name in columns]]):
            picture.paste(image.resize((cell - 4, cell - 4)), (92 + index * cell, top + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    print(f"wrote {path}")


def main() -> None:
    """Parse the options, run every configuration and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", help="the trained vgg16_bn stand-in's state-dict file")
    parser.add_argument("--layers", nargs="+", default=VGG_LAYERS)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--extra", nargs=2, action="append", default=[], metavar=("NAME", "FLAGS"),
                        help="another configuration to try, e.g. --extra adam-lr0.05 '--lr 0.05'")
    parser.add_argument("--no_random", action="store_true", help="skip the random-weights alexnet rows")
    parser.add_argument("--grid", type=Path, help="also save a layers x configurations picture here")
    options = parser.parse_args()
    configs = {**{name: CONFIGS[name] for name in options.configs},
               **{name: flags.split() for name, flags in options.extra}}
    photos = sorted(path for path in (ROOT / "reference_images").iterdir() if path.is_file())
    runs = [("vgg16_bn", options.weights, options.layers, SIZE, "")]
    if not options.no_random:
        runs.append(("alexnet", "none", ALEXNET_LAYERS, 227, " (random)"))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| photo | model | layer | configuration | feature error | sqrt | SSIM | seconds | iterations |")
    print("|---|---|---|---|---|---|---|---|---|")
    tiles, originals = {}, {}
    for model_name, weights, layers, size, mark in runs:
        model = invert.load_model(model_name, weights, progress=False)
        for photo in photos:
            for layer_name in layers:
                chosen = configs if model_name == "vgg16_bn" else {
                    name: flags for name, flags in configs.items() if name in RANDOM_CONFIGS}
                for name, flags in chosen.items():
                    result, seconds, score = measure(model, photo, layer_name, ["--model", model_name, *flags],
                                                     size)
                    error = result.losses[0]["feature_error"]
                    print(f"| {photo.stem} | {model_name}{mark} | {layer_name} | {name} | {error:.4f} "
                          f"| {math.sqrt(error):.3f} | {score:.3f} | {seconds:.1f} | {result.iterations} |",
                          flush=True)
                    if model_name == "vgg16_bn" and photo == photos[0]:
                        tiles[layer_name, name] = invert.deprocess(result.images)
                        originals[layer_name] = invert.deprocess(invert.preprocess(invert.load_image(photo), size))
    if options.grid:
        grid(options.layers, list(configs), tiles, originals, options.grid)


if __name__ == "__main__":
    main()
