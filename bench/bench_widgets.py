"""Redraw time of notebook 02's interactive views (helpers.analysis.widgets).

One simulated run is preprocessed by the engine (as notebook 02 does), then every view's
controls are moved through their range; each redraw (new data, draw, PNG) is timed. The
target is a redraw under 0.5 s. Printed as a table; a reference (one ``np.sort`` of 2**22
floats, measured in the same run) makes the numbers comparable on a loaded machine.

Usage::

    python bench/bench_widgets.py [--shape 28 28 16] [--volumes 100]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from fmri_preproc import preprocess
from helpers.analysis import simulate, widgets

TARGET_S = 0.5


def _reference_s() -> float:
    data = np.random.default_rng(0).random(2**22)
    tic = time.perf_counter()
    np.sort(data)
    return time.perf_counter() - tic


def bench(shape, n_volumes: int) -> list[dict]:
    """Time every view's redraws on one preprocessed simulated run; one row per view."""
    run = simulate.simulate_run(shape=tuple(shape), n_volumes=n_volumes, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        bold = Path(tmp) / "sub-01_task-rest_bold.nii.gz"
        nib.save(run.img, bold)
        result = preprocess(bold, Path(tmp) / "out", fwhm=6.0)
        raw = np.asarray(nib.load(bold).dataobj, dtype=np.float32)
        corrected = np.asarray(nib.load(result.outputs["preproc_bold"]).dataobj)
        boldref = nib.load(result.outputs["boldref"])
        ref_volume, affine = np.asarray(boldref.dataobj), boldref.affine
    views = {
        "correction (volume slider)": (
            widgets.correction_view(raw, corrected, result.summary["reference_volume"]),
            "volume", range(0, n_volumes, max(1, n_volumes // 20))),
        "smoothing (FWHM slider)": (widgets.smoothing_view(ref_volume, affine), "fwhm_mm",
                                    np.arange(0, 16.5, 1.0)),
        "rigid (rot_z slider)": (widgets.rigid_view(ref_volume, affine), "rot_z",
                                 np.arange(-10, 10.5, 1.0))}
    rows = []
    for name, (view, control, values) in views.items():
        view.redraw_s.clear()
        for value in values:
            view.controls[control].value = value  # as a student's drag: through the widget
        rows.append({"view": name, "redraws": len(view.redraw_s),
                     "median_s": statistics.median(view.redraw_s), "max_s": max(view.redraw_s)})
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[28, 28, 16])
    parser.add_argument("--volumes", type=int, default=100)
    args = parser.parse_args(argv)
    reference = _reference_s()
    rows = bench(args.shape, args.volumes)
    print(f"grid {tuple(args.shape)}, {args.volumes} volumes; reference (sort 2**22) "
          f"{reference:.3f} s; target redraw < {TARGET_S} s")
    print(f"{'view':30s} {'redraws':>7s} {'median s':>9s} {'max s':>7s} {'max/ref':>8s}")
    for row in rows:
        print(f"{row['view']:30s} {row['redraws']:7d} {row['median_s']:9.3f} "
              f"{row['max_s']:7.3f} {row['max_s'] / reference:8.2f}")
    return 0 if all(row["max_s"] < TARGET_S for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
