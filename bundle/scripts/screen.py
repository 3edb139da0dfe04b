"""Screen CT scans with the bundle's inference config: one file, a DICOM series folder, a folder of scans, a
datalist, or (no input) the embedded demo CT (``demo/``). Bad scans are reported and skipped.

Run from the bundle folder: ``python -m scripts.screen --input CT.nii.gz --output_dir out``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import fire
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from tqdm import tqdm


VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
BUNDLE_ROOT = Path(__file__).resolve().parents[1]
#: The default input: a small real CT with a lesion the shipped weights find (source and licence beside it).
DEMO_INPUT = BUNDLE_ROOT / "demo" / "sts_012_ct.nii.gz"
logger = logging.getLogger(__name__)


def find_cases(source: str | None, output_dir: Path, key: str = "testing") -> list[dict]:
    """Datalist entries (``{"image": path}``) for a file, a DICOM series folder, a folder of volumes or a
    Decathlon datalist JSON (its ``key`` list); the embedded demo CT when ``source`` is None."""
    if source is None:
        return [{"image": str(DEMO_INPUT)}]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file() and path.suffix == ".json":
        entries = json.loads(path.read_text()).get(key)
        if not entries:
            raise ValueError(f"{path} has no '{key}' list of cases.")
        return [{"image": str(path.parent / (e["image"] if isinstance(e, dict) else e))} for e in entries]
    if path.is_dir():
        volumes = sorted(p for p in path.iterdir() if p.name.endswith(VOLUME_SUFFIXES))
        return [{"image": str(p)} for p in volumes] if volumes else [{"image": str(path)}]  # else: a DICOM series
    return [{"image": str(path)}]


def screen(
    input: str | None = None,
    output_dir: str = "output/screening",
    config_file: str = str(BUNDLE_ROOT / "configs" / "inference.json"),
    key: str = "testing",
    threshold: float | None = None,
    device: str | None = None,
    min_lesion_peak: float | None = None,
) -> None:
    """Screen every case, writing ``<case>_lesion.nii.gz``, ``<case>_report.json`` and ``<case>_overview.png``
    into ``output_dir`` plus ``summary.json``; exit status 1 when any case failed. ``threshold`` (the Glance's)
    and ``min_lesion_peak`` (0.5 reports every component) override the inference config."""
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

    failures = []
    for case in tqdm(cases, desc="screening", unit="scan", disable=len(cases) == 1):
        evaluator.data_loader = DataLoader(Dataset([case], preprocessing), batch_size=1)
        evaluator.state.epoch_length = 1
        try:
            evaluator.run()
        except Exception as e:  # one bad scan must not stop the batch
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            failures.append({"image": case["image"], "error": f"{type(cause).__name__}: {cause}"})
            logger.error(f"skipped {case['image']}: {failures[-1]['error']}")
    summary = {"screened": len(report_handler.reports), "failed": failures, "reports": report_handler.reports}
    (out / "summary.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for rep in report_handler.reports:
        print(f"{rep['case']}: {rep['verdict']} ({len(rep['lesions'])} lesion(s), score {rep['score']:.2f})")
        print(f"  mask:     {rep['files']['mask']}")
        print(f"  report:   {out / (rep['case'] + '_report.json')}")
        print(f"  overview: {rep['files']['overview']}")
    for f in failures:
        print(f"FAILED {f['image']}: {f['error']}", file=sys.stderr)
    print(f"{len(report_handler.reports)} screened, {len(failures)} failed; summary: {out / 'summary.json'}")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire(screen)
