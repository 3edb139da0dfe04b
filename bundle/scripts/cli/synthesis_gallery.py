"""Draw a gallery of synthetic lesions implanted into real CT (``scripts.transforms.RandLesionSynthesisd``), so
that a person can judge their realism: per row one lesion kind, the axial slice through the lesion before and
after, and after with the added label contoured. Given the nodule bank of ``prepare_data``, a last row shows a
real LIDC-IDRI nodule pasted into a real lung (``scripts.transforms.RandNodulePasted``).

Run from the bundle folder (needs ``../shared/data/realct``, whose cases are never committed; the PNG is a
derived picture)::

    python -m scripts.cli.synthesis_gallery --out ../docs/images/lesion_synthesis.png \
        --nodule_bank ../output/realct_train/nodules.npz
"""

from __future__ import annotations

from pathlib import Path

import fire
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..transforms import LesionHostsd, RandLesionSynthesisd, RandNodulePasted
from .prepare_data import REALCT, _liver_mask, _resampler

PIXDIM = (1.5, 1.5, 3.0)
#: (row title, case, host, lesion diameters in mm): the kinds of lesion the transform implants.
ROWS = (
    ("liver, hypodense, 8-15 mm", "abdomen/ircadb1_17", "liver", (8.0, 15.0), {"p_hypo": 1.0}),
    ("liver, hyperdense, 15-25 mm", "abdomen/ircadb1_17", "liver", (15.0, 25.0), {"p_hypo": 0.0}),
    ("lung nodule, 6-15 mm", "chest/pyradiomics_lung2", "lung", (6.0, 15.0), {}),
    ("soft-tissue mass, 15-30 mm", "extremity/sts_003", "soft_tissue", (15.0, 30.0), {}),
)
#: (row title, case, smallest nodule in voxels) of the pasted-nodule row: one large enough to judge by eye.
PASTED = ("real LIDC nodule pasted, >= 0.7 mL", "chest/pyradiomics_lung2", 100)


def _case(realct: Path, name: str) -> dict:
    paths = {"image": str(realct / f"{name}_ct.nii.gz"), "label": str(realct / f"{name}_lesion.nii.gz")}
    organs = realct / f"{name}_organs.nii.gz"
    keys = list(paths) + (["liver"] if organs.exists() else [])
    if organs.exists():
        import nibabel as nib

        liver = _liver_mask(organs)
        tmp = Path("/tmp") / f"gf_screen_gallery_{Path(name).name}_liver.nii.gz"
        nib.save(nib.Nifti1Image(liver, nib.load(str(organs)).affine), str(tmp))
        paths["liver"] = str(tmp)
    d = _resampler(PIXDIM, keys)(paths)
    if "liver" in paths:
        Path(paths["liver"]).unlink()
    return LesionHostsd(pixdim=PIXDIM)({k: v.as_tensor() for k, v in d.items() if k in keys})


def _pasted(d: dict, bank: str, min_voxels: int, seed: int) -> tuple[dict, dict]:
    """The case with one bank nodule of at least ``min_voxels`` pasted (the first seed from ``seed`` that gives
    one), and its record with the nodule's mean HU and size."""
    paste = RandNodulePasted(bank, prob=1.0, max_nodules=1)
    for s in range(seed, seed + 200):
        after = paste.set_random_state(s)(d)
        if paste.pasted and paste.pasted[0]["voxels"] >= min_voxels:
            rec = paste.pasted[0]
            added = (after["label"][0] > 0) & (d["label"][0] == 0)
            ml = rec["voxels"] * float(np.prod(PIXDIM)) / 1000
            return after, {**rec, "text": f"{float(after['image'][0][added].mean()):.0f} HU\n{ml:.1f} mL"}
    raise ValueError(f"no nodule of >= {min_voxels} voxels fits the lung of this case in 200 tries.")


def render(
    out: str = "../docs/images/lesion_synthesis.png",
    realct: str = str(REALCT),
    seed: int = 3,
    nodule_bank: str | None = None,
) -> str:
    """Write the gallery PNG to ``out`` and return its path."""
    rows = len(ROWS) + (nodule_bank is not None)
    fig = Figure(figsize=(9, 2.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for row in range(rows):
        if row < len(ROWS):
            title, name, host, diameters, extra = ROWS[row]
            d = _case(Path(realct), name)
            synth = RandLesionSynthesisd(
                pixdim=PIXDIM, prob=1.0, max_lesions=1, host_weights={host: 1.0}, diameter_mm=diameters, **extra
            )
            synth.set_random_state(seed + row)
            after = synth(d)
            rec = synth.implanted[0]
            rec["text"] = f"{rec['hu']:.0f} HU\nhost {rec['host_hu']:.0f}\n{rec['diameter_mm']:.0f} mm"
            kind = "synthetic lesion"
        else:
            title, name, min_voxels = PASTED
            host, kind = "lung", "pasted nodule"
            d = _case(Path(realct), name)
            after, rec = _pasted(d, nodule_bank, min_voxels, seed)
        x, y, z = rec["centre"]
        half = 40
        box = (slice(max(x - half, 0), x + half), slice(max(y - half, 0), y + half), z)
        before_img, after_img = d["image"][0][box].numpy(), after["image"][0][box].numpy()
        added = (after["label"][0][box] > 0).numpy() & (d["label"][0][box] == 0).numpy()
        level, width = (-600, 1500) if host == "lung" else (40, 400)
        for col, (img, label, caption) in enumerate(
            ((before_img, None, "real CT"), (after_img, None, f"with {kind}"), (after_img, added, "label added"))
        ):
            ax = fig.add_subplot(rows, 3, 3 * row + col + 1)
            ax.imshow(img.T, cmap="gray", vmin=level - width / 2, vmax=level + width / 2, origin="lower", aspect=1.0)
            if label is not None and label.any():
                ax.contour(label.T.astype(float), levels=[0.5], colors="lime", linewidths=1.0, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(caption if col else f"{title}\n{caption}", fontsize=9)
        ax.text(1.02, 0.5, rec["text"], transform=ax.transAxes, fontsize=8, va="center")
    fig.suptitle("GF-Screen lesion synthesis on real CT (axial, 1.5 x 1.5 x 3 mm grid)", fontsize=11)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


if __name__ == "__main__":
    fire.Fire(render)
