"""Make the repository root importable, so the tests can `import invert`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
