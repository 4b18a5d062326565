"""Make the README's figure and results table with invert.py itself.

Inverts layers of the trained VGG16-BN stand-in (conv blocks 1-4 trained; see DEVELOPERS.md) on the
shipped photo, every setting at its default, then lays the original and the reconstructions side
by side, each labelled, and prints the table of measured results:

    python ../shared/tools/trained_vgg16bn.py /tmp/vgg16_bn_proxy.pth
    python tests/make_readme_figure.py /tmp/vgg16_bn_proxy.pth
"""
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import invert  # noqa: E402

LAYERS = ["features_5", "features_12", "features_22", "features_32"]
SIZE = 224
FIGURE = ROOT / "outputs" / "readme" / "astronaut_vgg16_bn_layers.png"


def labelled_strip(tiles: list) -> Image.Image:
    """Lay (label, image) tiles left to right with each label written under its image."""
    font = ImageFont.load_default(size=15)
    strip = Image.new("RGB", (len(tiles) * (SIZE + 8) + 8, SIZE + 34), "white")
    draw = ImageDraw.Draw(strip)
    for index, (label, image) in enumerate(tiles):
        left = 8 + index * (SIZE + 8)
        strip.paste(image.resize((SIZE, SIZE)), (left, 8))
        draw.text((left + SIZE // 2, SIZE + 20), label, fill="black", font=font, anchor="mm")
    return strip


def main(weights: str) -> None:
    """Run invert.py at each layer, save the figure and print the results table."""
    original = invert.deprocess(invert.preprocess(invert.load_image(invert.DEFAULT_IMAGE), SIZE))
    tiles, rows = [("original", original)], []
    with tempfile.TemporaryDirectory() as scratch:
        for layer in LAYERS:
            png = Path(scratch) / f"{layer}.png"
            code = invert.main(["--model", "vgg16_bn", "--weights", weights, "--input_size", str(SIZE),
                                "--layer_name", layer, "--output", str(png), "--quiet"])
            if code != 0:
                sys.exit(code)
            record = json.loads(png.with_suffix(".json").read_text())
            tiles.append((f"{layer}: error {record['feature_error']:.3f}", Image.open(png).copy()))
            rows.append(f"| `{layer}` | {record['feature_error']:.4f} | {record['iterations']} "
                        f"| {record['seconds']:.1f} | {record['ms_per_iteration']:.0f} |")
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    labelled_strip(tiles).save(FIGURE)
    print(f"wrote {FIGURE.relative_to(ROOT)}\n")
    print("| layer | feature_error | iterations | seconds | ms per iteration |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1])
