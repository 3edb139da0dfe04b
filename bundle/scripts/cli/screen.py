"""Screen CT scans with the bundle's inference config: one file, a DICOM series folder (or one file of it), a folder
of scans and DICOM series, a datalist, or (no input) the embedded demo CT (``demo/``). In a batch, a DataLoader
worker reads the next scan while the current one is screened. Bad scans are reported and skipped. DICOM input
gets DICOM output by default: a DICOM-SEG of the lesions and a Secondary Capture of the overview, in the source
study (see docs/dicom.md).

Run from the bundle folder: ``python -m scripts.cli.screen --input CT.nii.gz --output_dir out``.
"""

from __future__ import annotations

if __name__ == "__main__":  # the command, not an import of this module: before MONAI's first import
    from . import startup

    startup.begin()

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import fire  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.data import list_data_collate  # noqa: E402
from monai.transforms import SaveImaged  # noqa: E402
from monai.utils import convert_to_numpy  # noqa: E402
from pydicom.misc import is_dicom  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ..dicom_output import (  # noqa: E402
    DicomSeries,
    ResultInfo,
    overview_picture,
    read_series,
    result_lines,
    write_secondary_capture,
    write_seg,
)
from ..handlers import _case_id  # noqa: E402
from ..prefetch import prefetched_cases, root_cause  # noqa: E402
from ..report import save_report  # noqa: E402

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
OUTPUT_FORMATS = ("nifti", "dicom", "both")
BUNDLE_ROOT = Path(__file__).resolve().parents[2]
#: The default input: a small real CT with a lesion the shipped weights find (source and licence beside it).
DEMO_INPUT = BUNDLE_ROOT / "demo" / "sts_012_ct.nii.gz"
logger = logging.getLogger(__name__)


def _entry(path: Path) -> dict:
    """The case of one path: a folder is a DICOM series, so is a DICOM file (its series); else a volume."""
    if path.is_dir():
        return {"image": str(path), "dicom_case": path.name}
    if path.is_file() and not path.name.endswith(VOLUME_SUFFIXES) and is_dicom(path):
        return {"image": str(path), "dicom_case": path.parent.name}
    return {"image": str(path)}


def _series_folders(root: Path, output_dir: Path) -> list[Path]:
    """Folders under ``root`` (itself included) that hold files but no volumes: the DICOM series of a batch.
    Hidden folders and ``output_dir`` are skipped."""
    folders = []
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        parts = folder.relative_to(root).parts
        if any(p.startswith(".") for p in parts) or folder.resolve().is_relative_to(output_dir.resolve()):
            continue
        files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        if files and not any(p.name.endswith(VOLUME_SUFFIXES) for p in files):
            folders.append(folder)
    return folders


def find_cases(source: str | None, output_dir: Path, key: str = "testing") -> list[dict]:
    """Datalist entries (``{"image": path}``) for a file, a DICOM series folder or one file of it, a folder of
    volumes and DICOM series (each folder below it that holds files but no volumes is a series), or a Decathlon
    datalist JSON (its ``key`` list); the embedded demo CT when ``source`` is None. A DICOM series entry also has
    ``dicom_case``, the name of its outputs (in a folder: its path below the folder, ``/`` written ``_``).
    Two entries that would write the same outputs are refused."""
    if source is None:
        return [{"image": str(DEMO_INPUT)}]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file() and path.suffix == ".json":
        entries = json.loads(path.read_text()).get(key)
        if not entries:
            raise ValueError(f"{path} has no '{key}' list of cases.")
        cases = [_entry(path.parent / (e["image"] if isinstance(e, dict) else e)) for e in entries]
    elif path.is_dir():
        volumes = [{"image": str(p)} for p in sorted(path.iterdir()) if p.name.endswith(VOLUME_SUFFIXES)]
        series = [
            {"image": str(f), "dicom_case": "_".join(f.relative_to(path).parts) or path.name}
            for f in _series_folders(path, output_dir)
        ]
        cases = volumes + series or [_entry(path)]  # nothing found: screening the folder says why
    else:
        cases = [_entry(path)]
    seen: dict[str, str] = {}
    for case in cases:
        name = case.get("dicom_case") or _case_id(case["image"])
        if name in seen and seen[name] != case["image"]:
            raise ValueError(f"{seen[name]} and {case['image']} would both write the outputs '{name}_*'; rename one.")
        seen[name] = case["image"]
    return cases


def output_formats(requested: str | None, series: DicomSeries | None, image: str) -> set[str]:
    """The formats to write for one case: ``requested`` (nifti, dicom or both), or by default DICOM for a DICOM
    series and NIfTI otherwise. DICOM output needs a DICOM series with UIDs to refer to."""
    if requested is None:
        formats = {"dicom"} if series is not None else {"nifti"}
    else:
        formats = {"nifti", "dicom"} if requested == "both" else {requested}
    if "dicom" in formats:
        if series is None:
            raise ValueError(f"{image}: DICOM output needs a DICOM series as input; use --output_format nifti.")
        series.require_uids()
    return formats


class CaseReader:
    """Read one case for screening, wherever the loader runs it: choose its output formats (so that a case
    that cannot get them fails before screening), check and sort a DICOM series (:func:`read_series`) and
    stage links to its files in a temporary folder only while ``preprocessing`` reads them. Returns the
    preprocessed case with ``series`` (the :class:`DicomSeries`, or None) and ``formats``."""

    def __init__(self, preprocessing: Callable[[dict], dict], output_format: str | None = None) -> None:
        self.preprocessing, self.output_format = preprocessing, output_format

    def __call__(self, case: dict) -> dict:
        series = read_series(case["image"]) if "dicom_case" in case else None
        formats = output_formats(self.output_format, series, case["image"])
        if series is None:
            item = self.preprocessing({"image": case["image"]})
        else:
            with tempfile.TemporaryDirectory(prefix="gf-screen-") as staging:
                item = self.preprocessing({"image": str(series.stage(Path(staging) / case["dicom_case"]))})
        return {**item, "series": series, "formats": formats}


def write_dicom(item: dict, rep: dict, series: DicomSeries, out: Path, info: ResultInfo) -> dict:
    """DICOM-SEG of the lesion mask (none without lesions) and Secondary Capture of the overview of one screened
    case; returns their paths for the report's ``files``."""
    case, pred = rep["case"], item["pred"]
    mask, affine = convert_to_numpy(pred[0]) > 0, convert_to_numpy(pred.affine)
    seg = write_seg(mask, affine, series, out / f"{case}_lesion_seg.dcm", info)
    picture = overview_picture(rep["files"]["overview"], result_lines(rep, info))
    sc = write_secondary_capture(picture, series, out / f"{case}_overview_sc.dcm", info)
    if seg is None:
        logger.info(f"{case}: no lesion, so no DICOM-SEG; the Secondary Capture gives the verdict")
    return {"dicom_seg": None if seg is None else str(seg), "dicom_sc": str(sc)}


def screen(
    input: str | None = None,
    output_dir: str = "output/screening",
    config_file: str = str(BUNDLE_ROOT / "configs" / "inference.json"),
    key: str = "testing",
    threshold: float | None = None,
    device: str | None = None,
    output_format: str | None = None,
    min_lesion_peak: float | None = None,
) -> None:
    """Screen every case, writing ``<case>_report.json`` and ``<case>_overview.png`` into ``output_dir``, plus the
    lesion mask as ``<case>_lesion.nii.gz`` (``output_format`` nifti or both) and, for a DICOM series, as
    ``<case>_lesion_seg.dcm`` with the overview as ``<case>_overview_sc.dcm`` (dicom or both; the default follows
    the input), and ``summary.json``; exit status 1 when any case failed. ``threshold`` (the Glance's) and
    ``min_lesion_peak`` (0.5 reports every component) override the inference config."""
    if output_format is not None and output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}.")
    out = Path(output_dir).resolve()
    cases = find_cases(input, out, key)
    parser = ConfigParser()
    parser.read_config(config_file)
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["output_dir"] = str(out)
    parser["datalist"] = []
    if threshold is not None:
        parser["glance_threshold"] = threshold
    if min_lesion_peak is not None:
        parser["min_lesion_peak"] = min_lesion_peak
    if device is not None:
        parser["device"] = f"$torch.device('{device}')"
    parser["inferer"]["progress"] = len(cases) == 1
    evaluator = parser.get_parsed_content("evaluator")
    # Ignite keeps a failed run's generator to resume it, which would silently swallow the next case.
    evaluator.interrupt_resume_enabled = False
    report_handler = next(h for h in parser.get_parsed_content("handlers") if hasattr(h, "reports"))
    preprocessing = parser.get_parsed_content("preprocessing")
    postprocessing = parser.get_parsed_content("postprocessing")  # the evaluator's: its steps are chosen per case
    with_nifti = postprocessing.transforms
    without_nifti = tuple(t for t in with_nifti if not isinstance(t, SaveImaged))
    info = ResultInfo.from_metadata(BUNDLE_ROOT / "configs" / "metadata.json")

    failures = []
    workers = 1 if len(cases) > 1 else 0  # a batch: read the next scan while this one is screened
    items = prefetched_cases(cases, CaseReader(preprocessing, output_format), workers)
    for case, item in tqdm(zip(cases, items), total=len(cases), desc="screening", unit="scan", disable=workers == 0):
        error = item.get("error")  # the reader's, when the case could not be read
        if error is None:
            screened = len(report_handler.reports)
            try:
                series, formats = item.pop("series"), item.pop("formats")
                postprocessing.transforms = with_nifti if "nifti" in formats else without_nifti
                evaluator.data_loader = [list_data_collate([item])]
                evaluator.state.epoch_length = 1
                evaluator.run()
                if series is not None:
                    out_item, rep = evaluator.state.output[0], report_handler.reports[-1]
                    series.check_grid(out_item["pred"].shape[1:], convert_to_numpy(out_item["pred"].affine))
                    if "dicom" in formats:
                        rep["files"].update(write_dicom(out_item, rep, series, out, info))
                        save_report(rep, out / f"{rep['case']}_report.json")
            except Exception as e:  # one bad scan must not stop the batch
                del report_handler.reports[screened:]
                error = root_cause(e)
        if error is not None:
            failures.append({"image": case["image"], "error": error})
            logger.error(f"skipped {case['image']}: {error}")
    summary = {"screened": len(report_handler.reports), "failed": failures, "reports": report_handler.reports}
    (out / "summary.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for rep in report_handler.reports:
        print(f"{rep['case']}: {rep['verdict']} ({len(rep['lesions'])} lesion(s), score {rep['score']:.2f})")
        print(f"  report:   {out / (rep['case'] + '_report.json')}")
        for name, path in rep["files"].items():
            if path:
                print(f"  {name + ':':<10}{path}")
    for f in failures:
        print(f"FAILED {f['image']}: {f['error']}", file=sys.stderr)
    print(f"{len(report_handler.reports)} screened, {len(failures)} failed; summary: {out / 'summary.json'}")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    startup.end()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire(screen)
