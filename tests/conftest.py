"""Shared test set-up: the bundle's `scripts` package is importable as in a model-zoo bundle."""

import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE_ROOT))
