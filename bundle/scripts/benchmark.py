"""Screening speed and accuracy, side by side, with the same Focus weights:

(a) MONAI sliding-window inference over every window (overlap 0.5, no glance);
(b) the authors' scheme: glance on every window at overlap 0.75, keep if p > 0.9;
(c) this bundle's default (configs/inference.json);
(d) oracle selection: only windows holding a ground-truth lesion voxel are focused (the lower bound).

Each (case, scheme) runs in a fresh process so that its peak RSS and end-to-end time are what a user sees.
End to end = read + resample + model + invert to the input grid + write the mask. Model = glance + focus +
stitching. Run from the bundle folder: ``python -m scripts.benchmark --output ../docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
from monai.transforms import LoadImage, ResampleToMatch
from torch import nn

from .inferer import GlanceFocusInferer
from .metrics import flare_dsc
from .networks import GlanceFocusNet, pool_logits
from .phantom import make_phantom

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
REALCT = BUNDLE_ROOT.parents[1] / "shared" / "data" / "realct"
SCHEMES = {
    "a": "(a) sliding window, all windows, overlap 0.5",
    "b": "(b) authors' scheme: glance all windows, overlap 0.75, p > 0.9",
    "c": "(c) GF-Screen default",
    "d": "(d) oracle selection (lower bound)",
}
REAL_CASES = ("ircadb1_1", "pyradiomics_lung1", "pyradiomics_lung2", "ibsi1_lung", "sts_001")


class OracleGlance(nn.Module):
    """Glance from the ground truth, passed as the last input channel: keep a window iff it holds a lesion voxel.
    Like GlanceNet it offers a logit map (the mask max-pooled over ``scale``-voxel cells), so selecting windows
    costs no per-window call; a window also keeps a lesion up to ``scale - 1`` voxels outside it, a slightly
    generous oracle, where windows do not start on the cell grid."""

    scale, window_pool = 4, "max"

    def logit_map(self, x: torch.Tensor) -> torch.Tensor:
        keep = F.max_pool3d(x[:, -1:].gt(0).float(), self.scale, ceil_mode=True)
        return torch.cat([1 - keep, keep], 1) * 1e4  # logits whose softmax is exactly 0 or 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_logits(self.logit_map(x), self.window_pool)


class ImageChannelsOnly(nn.Module):
    """The Focus applied to the image channels, without the oracle's mask channel."""

    def __init__(self, focus: nn.Module) -> None:
        super().__init__()
        self.focus = focus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.focus(x[:, :-1])


def _sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def run_one(image: str, label: str, scheme: str, out_json: str, config_file: str = "configs/inference.json") -> None:
    """Screen one case with one scheme in this process and write its timings, windows, RSS and DSC."""
    t0 = _sync()
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / config_file))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    out_dir = tempfile.mkdtemp(prefix="gfbench_")
    parser["output_dir"] = out_dir
    net = parser.get_parsed_content("network").eval()
    net.load_state_dict(torch.load(BUNDLE_ROOT / "models" / "model.pt", map_location=parser.get_parsed_content("device")))
    data = parser.get_parsed_content("preprocessing")({"image": image})
    x = data["image"][None].to(parser.get_parsed_content("device"))
    if scheme == "d":  # the oracle's ground truth is input, read and resampled before the model clock starts
        lbl = ResampleToMatch(mode="nearest")(LoadImage(ensure_channel_first=True)(label), img_dst=data["image"])
        x = torch.cat([x, lbl[None].to(x)], 1)
    t_load = _sync()
    roi = parser["roi_size"]
    if scheme == "a":
        seen: list[int] = []

        def focus_all(w: torch.Tensor) -> torch.Tensor:
            seen.append(len(w))
            return net(w).softmax(1)

        inferer, model = SlidingWindowInferer(roi, sw_batch_size=4, overlap=0.5, mode="gaussian"), focus_all
    elif scheme == "b":
        inferer, model = GlanceFocusInferer(roi, overlap=0.75, threshold=0.9), net
    elif scheme == "c":
        inferer, model = parser.get_parsed_content("inferer"), net
    else:
        inferer = GlanceFocusInferer(roi, overlap=parser["overlap"], threshold=0.5)
        model = GlanceFocusNet(OracleGlance(), ImageChannelsOnly(net.focus))
    with torch.no_grad():
        prob = inferer(x, model)
        t_model = _sync()
        if scheme == "a":
            focused = total = sum(seen)
            glance_s = 0.0
        else:
            windows = inferer.last_windows[0]
            focused, total = sum(w["kept"] for w in windows), len(windows)
            glance_s = inferer.last_timings["glance"]
        t_warm = _sync()
        inferer(x, model)  # the same screening again, warm: what a batch of scans or a running server pays
        warm_s = _sync() - t_warm
    data["pred"] = prob[0].cpu()
    post = parser.get_parsed_content("postprocessing")(data)
    t_end = time.perf_counter() - warm_s  # end to end is one (cold) screening
    mask = np.asarray(post["pred"][0]) > 0
    result = {
        "scheme": scheme,
        "end_to_end_s": t_end - t0,
        "load_s": t_load - t0,
        "model_s": t_model - t_load,
        "model_warm_s": warm_s,
        "glance_s": glance_s,
        "post_save_s": t_end - t_model,
        "windows_focused": focused,
        "windows_total": total,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "dsc": flare_dsc(mask, np.asarray(nib.load(label).dataobj) > 0) if label else None,
    }
    Path(out_json).write_text(json.dumps(result))


def _phantom_cases(n: int, work: Path) -> list[tuple[str, str, str]]:
    cases = []
    for seed in range(100, 100 + n):
        ph = make_phantom(seed, shape=(256, 256, 96), spacing=(1.0, 1.0, 2.5), region=("abdomen", "chest")[seed % 2])
        img, lbl = work / f"phantom_{seed}_ct.nii.gz", work / f"phantom_{seed}_lesion.nii.gz"
        nib.save(nib.Nifti1Image(ph.image, ph.affine), str(img))
        nib.save(nib.Nifti1Image(ph.label, ph.affine), str(lbl))
        cases.append((f"phantom_{seed}", str(img), str(lbl)))
    return cases


def machine_description() -> str:
    """CPU model, cores, RAM, GPU and torch version, for the record beside every measured number."""
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GB RAM, {gpu}; torch {torch.__version__}"


def benchmark(
    output: str = "../docs/benchmarks.md",
    realct: str = str(REALCT),
    cases: tuple[str, ...] = REAL_CASES,
    phantoms: int = 2,
    repeats: int = 1,
) -> None:
    """Run every scheme on the named real CT cases (those found under ``realct``) and on synthetic phantoms;
    the Markdown table (and a JSON twin) is rewritten after every run, so a cut-short benchmark keeps its rows."""
    work = Path(tempfile.mkdtemp(prefix="gfbench_cases_"))
    found = {c: next(Path(realct).glob(f"**/{c}_ct.nii.gz"), None) for c in cases} if Path(realct).is_dir() else {}
    todo = [(c, str(p), str(p).replace("_ct.nii.gz", "_lesion.nii.gz")) for c, p in found.items() if p]
    todo += _phantom_cases(phantoms, work)
    rows = []
    for case, image, label in todo:
        for scheme in SCHEMES:
            runs = []
            for _ in range(repeats):
                out = work / f"{case}_{scheme}.json"
                code = "import sys; from scripts.benchmark import run_one; run_one(*sys.argv[1:])"
                cmd = [sys.executable, "-c", code, image, label, scheme, str(out)]
                done = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{case} scheme {scheme} failed:\n{done.stderr[-3000:]}")
                runs.append(json.loads(out.read_text()))
            best = min(runs, key=lambda r: r["model_s"])
            rows.append({"case": case, **best})
            print(f"{case} {SCHEMES[scheme]}: model {best['model_s']:.2f} s, end to end {best['end_to_end_s']:.2f} s, "
                  f"{best['windows_focused']}/{best['windows_total']} windows, DSC {best['dsc']:.3f}", flush=True)
            Path(output).write_text(_markdown(rows, repeats))
            Path(output).with_suffix(".json").write_text(json.dumps({"machine": machine_description(), "rows": rows}, indent=2))


def _markdown(rows: list[dict], repeats: int) -> str:
    lines = [
        "# Screening benchmark",
        "",
        f"Machine: {machine_description()}. Weights: `bundle/models/model.pt`. Each number is one run in a fresh process "
        f"(best of {repeats} by model time). Model time = glance + focus + stitching; end to end adds reading, "
        "resampling, inverting to the input grid and writing the mask. Model s, warm: the same screening run a "
        "second time in that process (first-call costs paid; what a batch of scans or a running server sees). "
        "Peak RSS is the whole process's.",
        "",
        "| case | scheme | end to end s | model s | speed-up vs (a), model | model s, warm | speed-up, warm "
        "| glance s (% of (a) model) | windows focused | peak RSS GB | lesion DSC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["case"]: r["model_s"] for r in rows if r["scheme"] == "a"}
    warm = {r["case"]: r["model_warm_s"] for r in rows if r["scheme"] == "a"}
    for r in rows:
        lines.append(
            f"| {r['case']} | {SCHEMES[r['scheme']]} | {r['end_to_end_s']:.1f} | {r['model_s']:.2f} | "
            f"{base[r['case']] / r['model_s']:.1f}x | {r['model_warm_s']:.2f} | {warm[r['case']] / r['model_warm_s']:.1f}x | {r['glance_s']:.2f} ({100 * r['glance_s'] / base[r['case']]:.0f} %) | "
            f"{r['windows_focused']}/{r['windows_total']} | "
            f"{r['peak_rss_gb']:.2f} | {r['dsc']:.3f} |"
        )
    return "\n".join(lines + _targets(rows)) + "\n"


def _targets(rows: list[dict], case: str = "ircadb1_1") -> list[str]:
    """The project's targets for the default scheme on ``case``, each with the measured value and met / missed."""
    by = {r["scheme"]: r for r in rows if r["case"] == case}
    if not {"a", "c", "d"} <= set(by):
        return []
    a, c, d = by["a"], by["c"], by["d"]
    checks = [
        ("(c) end to end <= 60 s on this machine", f"{c['end_to_end_s']:.1f} s", c["end_to_end_s"] <= 60),
        ("(c) peak RSS <= 6 GB", f"{c['peak_rss_gb']:.2f} GB", c["peak_rss_gb"] <= 6),
        ("(c) glance <= 10 % of (a)'s model time", f"{100 * c['glance_s'] / a['model_s']:.1f} %", c["glance_s"] <= 0.1 * a["model_s"]),
        ("(d) oracle >= 5x faster than (a), model time", f"{a['model_s'] / d['model_s']:.1f}x", a["model_s"] >= 5 * d["model_s"]),
        ("(c) >= 4x faster than (a), model time", f"{a['model_s'] / c['model_s']:.1f}x", a["model_s"] >= 4 * c["model_s"]),
        ("(d) oracle >= 5x faster than (a), model time, warm", f"{a['model_warm_s'] / d['model_warm_s']:.1f}x", a["model_warm_s"] >= 5 * d["model_warm_s"]),
        ("(c) >= 4x faster than (a), model time, warm", f"{a['model_warm_s'] / c['model_warm_s']:.1f}x", a["model_warm_s"] >= 4 * c["model_warm_s"]),
        ("(c) lesion DSC within 0.02 of (a)", f"{c['dsc'] - a['dsc']:+.3f}", c["dsc"] >= a["dsc"] - 0.02),
    ]
    lines = ["", f"## Targets on {case}", "", "| target | measured | |", "|---|---|---|"]
    return lines + [f"| {name} | {value} | {'met' if ok else 'MISSED'} |" for name, value, ok in checks]


if __name__ == "__main__":
    fire.Fire(benchmark)
