"""Ignite handlers of screening: per-scan reports and overview PNGs, and dataset-level screening scores."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_numpy

from . import metrics, postprocess, report

logger = logging.getLogger(__name__)


class ScreeningReportHandler:
    """After each iteration of a :class:`scripts.evaluator.ScreeningEvaluator`, write per scan
    ``<case>_report.json`` and ``<case>_overview.png`` into ``output_dir``.

    Expects per-scan outputs (after postprocessing) with ``pred`` (lesion mask in the input's geometry),
    ``prob`` (lesion probability, same grid), ``image`` (the model input; channel 0 is the soft-tissue window) and
    ``windows`` (the glance records). Timings, wall-clock seconds: ``load`` (reading and preprocessing; measured
    where it ran when the batch carries ``load_s``, e.g. from a prefetching DataLoader worker), ``glance`` and
    ``focus`` (model time), ``postprocess`` (to the input grid, size and confidence filters) and ``save`` (writing
    the mask; split where the postprocessing's :class:`scripts.postprocess.Timestampd` named "save" ran, else all
    ``postprocess``), ``report`` (JSON + PNG) and ``total`` (from the start of reading to the report written).
    """

    def __init__(
        self,
        output_dir: str,
        threshold: float,
        hu_window: tuple[float, float] = (-160.0, 240.0),
        fp_voxel_threshold: int = 125,
        overview: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.threshold, self.hu_window = threshold, tuple(hu_window)
        self.fp_voxel_threshold, self.overview = fp_voxel_threshold, overview
        self.reports: list[dict] = []
        self._t: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        def stamp(name: str):
            return lambda _: self._t.__setitem__(name, time.perf_counter())

        engine.add_event_handler(Events.GET_BATCH_STARTED, stamp("start"))
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, stamp("loaded"))
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, stamp("inferred"))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        t = self._t
        post = time.perf_counter()
        model = engine.inferer.last_timings
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [{}] * len(engine.state.output)
        for item, batch in zip(engine.state.output, batches):
            t0 = time.perf_counter()
            case = _case_id(item["pred"].meta.get("filename_or_obj", "case"))
            load = float(batch["load_s"]) if "load_s" in batch else t["loaded"] - t["start"]
            save_start = item.get("timestamps", {}).get("save", post)
            timings = {
                "load": load,
                "glance": model["glance"],
                "focus": model["focus"],
                "postprocess": save_start - t["inferred"],
                "save": post - save_start,
            }
            rep = report.build_report(
                case,
                postprocess.as_numpy(item["pred"][0]),
                postprocess.as_numpy(item["prob"][0]),
                convert_to_numpy(item["pred"].affine),
                item["windows"],
                timings,
                self.threshold,
                self.fp_voxel_threshold,
            )
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.overview:
                self._render(item, case, rep)
            rep["timings_s"]["report"] = time.perf_counter() - t0
            rep["timings_s"]["total"] = time.perf_counter() - t["start"] + (load if "load_s" in batch else 0.0)
            rep["files"] = {"mask": _mask_path(item["pred"]), "overview": str(self.output_dir / f"{case}_overview.png")}
            report.save_report(rep, self.output_dir / f"{case}_report.json")
            self.reports.append(rep)
            logger.info(
                f"{case}: {rep['verdict']}, {len(rep['lesions'])} lesion(s), "
                f"kept {rep['windows']['kept']}/{rep['windows']['total']} windows, {rep['timings_s']['total']:.1f} s"
            )

    def _render(self, item: dict, case: str, rep: dict) -> None:
        """The overview PNG on the model grid: its CT, the glance heat map and the saved mask brought to it, so
        that the picture shows what the report lists, with the report's lesion numbers."""
        image = item["image"]
        lo, hi = self.hu_window
        hu = convert_to_numpy(image[0]) * (hi - lo) + lo
        grid = convert_to_numpy(image.affine)
        saved_affine = convert_to_numpy(item["pred"].affine)
        mask = postprocess.mask_on_grid(postprocess.as_numpy(item["pred"][0]), saved_affine, hu.shape, grid)
        kept = f"kept {rep['windows']['kept']}/{rep['windows']['total']} windows"
        title = f"{case}: {rep['verdict']} (score {rep['score']:.2f}, {kept})"
        report.render_overview(
            hu,
            mask,
            report.glance_heatmap(hu.shape, item["windows"]),
            grid,
            self.output_dir / f"{case}_overview.png",
            title,
            findings=report.findings_in_world(rep.get("lesions", ()), saved_affine),
            threshold=self.threshold,
        )


def _case_id(path: str) -> str:
    name = Path(str(path)).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def score_case(item: dict, fp_voxel_threshold: int = 125) -> dict:
    """:func:`scripts.metrics.evaluate_case` of one evaluated scan (``pred`` and ``label`` masks on one grid, the
    Glance ``windows`` if any), with its case id."""
    pred = item["pred"]
    spacing = report.voxel_spacing(convert_to_numpy(pred.affine))
    record = metrics.evaluate_case(
        convert_to_numpy(pred[0]) > 0,
        convert_to_numpy(item["label"][0]) > 0,
        spacing,
        item.get("windows", ()),
        fp_voxel_threshold,
    )
    record["case"] = _case_id(pred.meta.get("filename_or_obj", "case"))
    return record


def _mask_path(pred) -> str | None:
    saved = pred.meta.get("saved_to")
    return str(saved) if saved else None


class ScreeningMetricsHandler:
    """Score every evaluated scan with :func:`scripts.metrics.evaluate_case` (FLARE DSC/NSD, lesion detection,
    scan outcome, glance windows) and, at the end of the epoch, write ``metrics.json`` (summary + per case) to
    ``output_dir``. Under torch.distributed the per-case records of every rank are gathered on rank 0."""

    def __init__(self, output_dir: str, fp_voxel_threshold: int = 125) -> None:
        self.output_dir = Path(output_dir)
        self.fp_voxel_threshold = fp_voxel_threshold
        self.cases: list[dict] = []
        self.summary: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.cases.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def iteration_completed(self, engine: Engine) -> None:
        self.cases.extend(score_case(item, self.fp_voxel_threshold) for item in engine.state.output)

    def epoch_completed(self, engine: Engine) -> None:
        cases = self.cases
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, cases)
            cases = [c for rank_cases in gathered for c in rank_cases]
            if dist.get_rank() > 0:
                return
        self.summary = metrics.summarise_cases(cases)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        report.save_report({"summary": self.summary, "cases": cases}, self.output_dir / "metrics.json")
        scan = self.summary["scan"]
        logger.info(
            f"{len(cases)} scans: DSC {self.summary['dsc']:.3f}, NSD {self.summary['nsd']:.3f}, scan F1 {scan['f1']:.3f}, "
            f"FP rate on lesion-free scans {scan['fpr']:.3f}; metrics.json in {self.output_dir}"
        )
