"""Pack the bundle as a model-zoo style archive: ``<name>/{configs,docs,models,scripts,LICENSE}`` in one zip.

Unzipped anywhere, it runs with ``python -m monai.bundle run --config_file configs/inference.json`` from its
folder (``scripts.*`` resolves against the bundle root, as in model-zoo bundles). Run from the bundle folder:
``python -m scripts.cli.pack --output ../dist``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import fire

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
CONTENT = ("configs", "docs", "models", "scripts", "LICENSE")
SKIP_SUFFIXES = (".pyc", ".ts")


def pack(output: str = "../dist", name: str = "gf_screen") -> str:
    """Write ``<output>/<name>_v<version>.zip`` and return its path. Only ``models/model.pt`` of the models
    folder goes in (not training checkpoints)."""
    version = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())["version"]
    if not (BUNDLE_ROOT / "models" / "model.pt").is_file():
        raise FileNotFoundError(f"no weights at {BUNDLE_ROOT / 'models' / 'model.pt'}: train or fetch them first.")
    out = Path(output).resolve() / f"{name}_v{version}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for item in CONTENT:
            path = BUNDLE_ROOT / item
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            for f in files:
                rel = f.relative_to(BUNDLE_ROOT)
                if "__pycache__" in rel.parts or f.suffix in SKIP_SUFFIXES:
                    continue
                if rel.parts[0] == "models" and rel.name != "model.pt":
                    continue
                zf.write(f, Path(name) / rel)
    return str(out)


if __name__ == "__main__":
    fire.Fire(pack)
