"""What the tests share: the repository root on sys.path, fast settings, a photo, a tiny network, and
the precision that --precision auto picks.

INVERT_AUTO_PRECISION=bf16 (or fp32) runs the suite as a CPU with (or without) native bf16 would:
auto then picks that precision, whatever this machine's CPU. Tests that compare exact values pin
fp32 themselves. Subprocesses see the machine's own choice.
"""
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
INVERT = str(ROOT / "invert.py")
# A small random network keeps each command-line run to a fraction of a second.
FAST = ["--model", "squeezenet1_1", "--weights", "none", "--input_size", "64",
        "--layer_name", "features_3", "--epochs", "5", "--quiet"]


AUTO_PRECISION = os.environ.get("INVERT_AUTO_PRECISION")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real processes, signals, kill -9 and fuzzing "
                                       "(deselect with -m 'not slow')")
    if AUTO_PRECISION not in (None, "bf16", "fp32"):
        raise pytest.UsageError(f"INVERT_AUTO_PRECISION={AUTO_PRECISION!r}: use bf16 or fp32")


@pytest.fixture(autouse=True)
def auto_precision(monkeypatch):
    """What --precision auto picks in this run: INVERT_AUTO_PRECISION's, else this CPU's."""
    import invert
    if AUTO_PRECISION:
        monkeypatch.setattr(invert, "native_bf16", lambda device: AUTO_PRECISION == "bf16")


@pytest.fixture
def photo(tmp_path) -> Path:
    """A small colourful RGB photo on disk."""
    x = torch.linspace(0, 1, 48)
    pixels = torch.stack([x.expand(48, 48), x.expand(48, 48).T, (1 - x).expand(48, 48)])
    path = tmp_path / "photo.png"
    Image.fromarray((pixels.permute(1, 2, 0) * 255).byte().numpy()).save(path)
    return path


@pytest.fixture
def tiny() -> nn.Module:
    """A two-conv network with fixed random weights, frozen as invert.py freezes models."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
    return model.eval().requires_grad_(False)


@pytest.fixture
def cli(capsys):
    """Run invert.main on arguments (any objects, turned into strings); return (code, stdout, stderr)."""
    import invert

    def run(*args):
        code = invert.main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def assert_clean_failure(code: int, err: str, out_dir: Path) -> None:
    """Exit 2, one error line on stderr (beside any warning), no traceback, nothing written."""
    assert code == 2
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("invert.py: error: "), err
    assert "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.iterdir())
