"""Build the training/validation datalist of the shipped weights from ``shared/data/realct`` plus phantoms.

The CTs are resampled once to the bundle's grid (RAS, ``pixdim``) and cropped to the body, so the training
folder is small enough to copy to a GPU machine; nothing here is ever committed (the licences forbid it).
Run from the bundle folder: ``python -m scripts.cli.prepare_data --out_dir ../output/realct_train``.

Split (fixed, documented in docs/README.md): validation = ircadb1_1 (abdomen, 7 liver tumours),
pyradiomics_lung1 (chest, 1.4 mL nodule), sts_012 (extremity sarcoma) and held-out phantoms, the cases 0.4.0 was
validated on, so the two weights compare on the same scans; everything else with a lesion mask trains, the liver
cases ircadb1_17 and crlm_1100 included. totalseg_example (not proven healthy) and crlm_1004 (no mask) are left
out. Where the datalist gives an organ map with a "liver" label, the liver mask is written beside the case
(``liver`` key): training implants synthetic liver lesions inside it (``scripts.transforms.RandLesionSynthesisd``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from monai.transforms import Compose, CropForegroundd, LoadImaged, Orientationd, Spacingd
from tqdm import tqdm

from ..phantom import write_phantom_dataset

REALCT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "realct"
VALIDATION = ("ircadb1_1", "pyradiomics_lung1", "sts_012")
EXCLUDED = ("totalseg_example", "crlm_1004")


def _resampler(pixdim: tuple[float, float, float], keys: list[str]) -> Compose:
    """Load the image and its masks, reorient to RAS, resample to ``pixdim`` and crop to the body."""
    return Compose(
        [
            LoadImaged(keys, ensure_channel_first=True),
            Orientationd(keys, axcodes="RAS"),
            Spacingd(keys, pixdim=pixdim, mode=["bilinear"] + ["nearest"] * (len(keys) - 1)),
            CropForegroundd(keys, source_key="image", select_fn=lambda x: x > -500, margin=8, allow_smaller=True),
        ]
    )


def _liver_mask(organs: Path) -> np.ndarray | None:
    """The liver of an organ label map (its ``<name>_labels.json`` maps label values to names), or None."""
    names = json.loads(organs.with_name(organs.name.replace(".nii.gz", "_labels.json")).read_text())
    values = [int(v) for v, name in names.items() if name.lower() == "liver"]
    if not values:
        return None
    return np.isin(np.asarray(nib.load(str(organs)).dataobj), values).astype(np.uint8)


def write_nodule_bank(crops: list[Path], pixdim: tuple[float, float, float], path: Path, margin: int = 2) -> int:
    """Resample LIDC-IDRI nodule crops (``image/`` and ``nodule_mask/`` files of one name) to the training grid and
    save each, trimmed to its nodule plus ``margin`` voxels, as ``hu_<i>`` / ``mask_<i>`` in ``path`` (the bank
    of ``scripts.transforms.RandNodulePasted``); returns how many were kept (a nodule can vanish below one voxel)."""
    resample = Compose(
        [
            LoadImaged(["image", "label"], ensure_channel_first=True),
            Orientationd(["image", "label"], axcodes="RAS"),
            Spacingd(["image", "label"], pixdim=pixdim, mode=["bilinear", "nearest"]),
        ]
    )
    arrays: dict[str, np.ndarray] = {}
    for image in tqdm(crops, desc="nodule bank", unit="nodule"):
        d = resample({"image": str(image), "label": str(image.parent.parent / "nodule_mask" / image.name)})
        mask = d["label"][0].numpy() > 0
        if not mask.any():
            continue
        box = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in np.nonzero(mask))
        i = len(arrays) // 2
        arrays[f"hu_{i}"] = np.round(d["image"][0].numpy()[box]).astype(np.int16)
        arrays[f"mask_{i}"] = mask[box].astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return len(arrays) // 2


def _save(array: np.ndarray, affine: np.ndarray, path: Path, dtype: type) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.round(array).astype(dtype), affine), str(path))
    return str(path)


def prepare(
    out_dir: str = "../output/realct_train",
    realct: str = str(REALCT),
    pixdim: tuple[float, float, float] = (1.5, 1.5, 3.0),
    lidc_crops: int = 0,
    phantoms: int = 24,
    nodule_bank: bool = True,
    seed: int = 0,
) -> str:
    """Write resampled cases and ``dataset.json`` (relative paths) into ``out_dir``; returns its path.

    ``lidc_crops`` LIDC-IDRI nodule crops join the training split (default none: they are ~25 x 30 x 9 voxels on
    the training grid, so their windows are mostly air padding, and a Glance trained on 60 of them learnt that
    tissue beside air means lesion; see the model card). With ``nodule_bank`` the nodule of every LIDC-IDRI crop
    is written to ``nodules.npz``, the bank that training can paste into real lungs (``nodule_bank`` setting of
    train.json, ``scripts.transforms.RandNodulePasted``; no LIDC patient is in the validation split)."""
    src, out = Path(realct), Path(out_dir).resolve()
    cases = json.loads((src / "datalist.json").read_text())["cases"]
    items = [
        (c["case"], src / c["image"], src / c["label"], src / c["organs"] if c.get("organs") else None)
        for c in cases
        if c.get("label") and c["case"] not in EXCLUDED
    ]
    crops = sorted((src / "lidc_nodule_crops" / "image").glob("*.nii.gz"))
    rng = np.random.default_rng(seed)
    for img in rng.choice(crops, size=min(lidc_crops, len(crops)), replace=False) if crops else []:
        items.append((img.name[: -len(".nii.gz")], img, img.parent.parent / "nodule_mask" / img.name, None))
    if nodule_bank and crops:
        write_nodule_bank(crops, pixdim, out / "nodules.npz")
    split: dict[str, list] = {"training": [], "validation": []}
    for case, image, label, organs in tqdm(items, desc="resampling real CT", unit="case"):
        validation = case in VALIDATION
        liver = None if validation or organs is None else _liver_mask(organs)
        paths = {"image": str(image), "label": str(label)}
        if liver is not None:
            paths["liver"] = _save(liver, nib.load(str(organs)).affine, out / "tmp" / f"{case}_liver.nii.gz", np.uint8)
        d = _resampler(pixdim, list(paths))(paths)
        affine = np.asarray(d["image"].affine)
        entry = {}
        for key, dtype in (("image", np.int16), ("label", np.uint8), ("liver", np.uint8)):
            if key in d:
                name = {"image": "ct", "label": "lesion"}.get(key, key)
                path = _save(d[key][0].numpy(), affine, out / "real" / f"{case}_{name}.nii.gz", dtype)
                entry[key] = Path(path).relative_to(out).as_posix()
        split["validation" if validation else "training"].append(entry)
    shutil.rmtree(out / "tmp", ignore_errors=True)
    ph = json.loads(
        write_phantom_dataset(out / "phantoms", num_cases=phantoms, val_fraction=0.25, seed=seed).read_text()
    )
    for key in split:
        split[key] += [{k: f"phantoms/{v}" for k, v in e.items()} for e in ph[key]]
    datalist = out / "dataset.json"
    datalist.write_text(json.dumps({"description": "GF-Screen shipped-weights split", **split}, indent=2))
    return str(datalist)


if __name__ == "__main__":
    fire.Fire(prepare)
