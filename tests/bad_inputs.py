"""A corpus of awkward and hostile inputs, generated on the fly (no binary fixtures are committed).

Each case is made in a scratch folder and gives the arguments to invert.py and what must happen:
"ok" (a PNG is written) or the text the one-line error must contain (exit 2, nothing written).
`python tests/bad_inputs.py` prints every case's outcome through invert.main as a table.
"""
import io
import os
import pickle
from pathlib import Path

import torch
from PIL import Image

from conftest import FAST  # a small random network, so that each case runs in a fraction of a second

PAYLOAD_MARKER = "payload_ran"


class Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def photo(size=(48, 32)) -> Image.Image:
    """A colourful RGB test picture."""
    image = Image.new("RGB", size)
    image.putdata([(x * 5 % 256, y * 7 % 256, (x + y) * 3 % 256) for y in range(size[1]) for x in range(size[0])])
    return image


def saved(image: Image.Image, path: Path, **options) -> Path:
    """Save `image` to `path` and return the path."""
    image.save(path, **options)
    return path


def truncated(path: Path) -> Path:
    """Cut a file to half its length."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def exif_rotated(path: Path) -> Path:
    """A JPEG stored 30x10 whose EXIF orientation says to show it 10x30."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return saved(photo((30, 10)), path, exif=exif)


def palette_with_transparency(path: Path) -> Path:
    """A palette PNG whose colour 0 is transparent."""
    image = photo().convert("P")
    return saved(image, path, transparency=0)


def decompression_bomb(path: Path) -> Path:
    """A tiny PNG that declares 15000x15000 pixels, past Pillow's decompression-bomb limit."""
    return saved(Image.new("1", (15000, 15000)), path, optimize=True)


def image_cases(folder: Path) -> dict:
    """name -> (image file, expected outcome)."""
    text = folder / "notes.jpg"
    text.write_text("this is not a picture\n")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    (folder / "a_folder").mkdir()
    return {
        "empty file": (empty, "not a readable image"),
        "truncated JPEG": (truncated(saved(photo((200, 200)), folder / "cut.jpg")), "not a readable image"),
        "truncated PNG": (truncated(saved(photo((200, 200)), folder / "cut.png")), "not a readable image"),
        "text file named .jpg": (text, "not a readable image"),
        "folder with no images as --image_path": (folder / "a_folder", "is a folder with no images"),
        "missing file": (folder / "nowhere.png", "no such file"),
        "GIF (first frame)": (saved(photo(), folder / "movie.gif", save_all=True,
                                    append_images=[photo().rotate(90)]), "ok"),
        "WebP": (saved(photo(), folder / "photo.webp"), "ok"),
        "TIFF": (saved(photo(), folder / "photo.tiff"), "ok"),
        "1x1 image": (saved(photo((1, 1)), folder / "one.png"), "ok"),
        "3x3 image": (saved(photo((3, 3)), folder / "three.png"), "ok"),
        "10000x20 image": (saved(photo((10000, 20)), folder / "strip.png"), "ok"),
        "EXIF-rotated JPEG": (exif_rotated(folder / "rotated.jpg"), "ok"),
        "decompression bomb": (decompression_bomb(folder / "bomb.png"), "too large to decode safely"),
        "16-bit PNG": (saved(photo().convert("L").convert("I;16"), folder / "deep.png"), "ok"),
        "CMYK JPEG": (saved(photo().convert("CMYK"), folder / "cmyk.jpg"), "ok"),
        "LA image": (saved(photo().convert("LA"), folder / "la.png"), "ok"),
        "palette with transparency": (palette_with_transparency(folder / "palette.png"), "ok"),
    }


def weights_cases(folder: Path) -> dict:
    """name -> (weights file, expected outcome)."""
    not_torch = folder / "weights.pth"
    not_torch.write_bytes(b"GIF89a not a checkpoint at all" * 10)
    other = folder / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(1000)}, other)
    malicious = folder / "malicious.pth"
    malicious.write_bytes(pickle.dumps({"weight": Payload(str(folder / PAYLOAD_MARKER))}))
    return {
        "non-torch weights file": (not_torch, "is not a PyTorch state-dict file"),
        "state dict of another architecture": (other, "does not fit squeezenet1_1"),
        "malicious pickle": (malicious, "was refused"),
    }


def cases(folder: Path) -> dict:
    """Every case: name -> (arguments after --image_path and the fast settings, expected outcome)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = saved(photo(), folder / "good.png")
    blocker = folder / "a_file"
    blocker.write_text("a file where a folder should be\n")
    table = {name: (["--image_path", str(path)], outcome) for name, (path, outcome) in image_cases(folder).items()}
    table.update({name: (["--image_path", str(good), "--weights", str(path)], outcome)
                  for name, (path, outcome) in weights_cases(folder).items()})
    table.update({
        "--input_size 1": (["--image_path", str(good), "--input_size", "1"], "change --input_size"),
        "--input_size 10": (["--image_path", str(good), "--input_size", "10"], "ok"),
        "--input_size 100000": (["--image_path", str(good), "--input_size", "100000"], "use a smaller --input_size"),
        "layer output smaller than 1x1": (["--image_path", str(good), "--input_size", "10",
                                           "--layer_name", "features_12"], "change --input_size"),
        "output folder under a file": (["--image_path", str(good), "--output_dir", str(blocker / "out")],
                                       "not a writable directory"),
        "--output in a folder that does not exist": (
            ["--image_path", str(good), "--output", str(folder / "new" / "deeper" / "x.png")], "ok"),
    })
    return table


def command(args: list, out_dir: Path) -> list:
    """invert.py's arguments for a case: the fast settings, then the case's own (later flags win)."""
    return [*FAST, "--output_dir", str(out_dir), *args]


def main() -> None:
    """Print each case's outcome through invert.main as a Markdown table."""
    import contextlib
    import tempfile
    import invert  # conftest put the repository root on sys.path
    with tempfile.TemporaryDirectory() as scratch:
        table = cases(Path(scratch) / "inputs")
        print("| case | expected | exit code | message |\n|---|---|---|---|")
        for index, (name, (args, expected)) in enumerate(table.items()):
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                code = invert.main(command(args, Path(scratch) / f"out{index}"))
            errors = [line for line in stderr.getvalue().splitlines() if line.startswith("invert.py:")]
            outcome = errors[0].removeprefix("invert.py: error: ") if errors else "PNG written"
            print(f"| {name} | {'works' if expected == 'ok' else 'exit 2'} | {code} | {outcome} |")


if __name__ == "__main__":
    main()
