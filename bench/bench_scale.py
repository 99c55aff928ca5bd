"""Benchmark at multiband scale: memory flat in run length, time per voxel-volume, the largest
run a Lambda can take, and antspyx on a multiband-size run (issue 16).

Run from the project root:  .venv/bin/python bench/bench_scale.py [--long 600] [--short 150]
                                                                  [--ants-volumes 100]
(also the second step of ``make bench``). Writes ``bench/RESULTS_scale.md``.

1. Writes synthetic runs of 100 x 100 x 72 voxels, 2 mm, int16 (``tests/scale_runs.py``: an
   analytic head with known rigid motion and noise, written volume by volume; not the
   project's simulator, whose 2x-oversampled acquisition of a 600-volume multiband run
   would take far longer than the engine), ``--long`` and ``--short`` volumes long.
2. Runs the whole command (``python -m fmri_preproc``: read, motion, reslice, confounds,
   write, 6 mm smoothing) on one core for each, in a fresh process: wall time, the engine's
   own peak memory (VmHWM) and the process's peak RSS.
3. Derives the seconds per million voxel-volumes (on this machine's core; a Lambda vCPU is
   of the same class) and, with :mod:`fmri_preproc.resources`, the largest run that fits in
   15 minutes per memory size.
4. Runs antspyx ``motion_correction`` (Rigid, one ITK thread, as ``bench/ants_anchor.py``)
   and the engine on an ``--ants-volumes`` run of the same grid: wall, peak memory, each
   tool's error against the true motion and the two tools' agreement.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from run_bench import ensure_ants, machine, measure, motion_errors, read_confounds  # noqa: E402

import fmri_preproc as fp  # noqa: E402
from fmri_preproc import resources  # noqa: E402
from scale_runs import grid_affine, write_head_run  # noqa: E402

WORK = ROOT / "bench" / "_work" / "scale"  # ignored by git, as run_bench.py's
RESULTS = ROOT / "bench" / "RESULTS_scale.md"
SHAPE = (100, 100, 72)
MEMORY_SIZES = (128, 256, 512, 1024, 1536, 1769, 2048, 3008, 10240)
TARGET_PEAK_MB, TARGET_RATIO = 600.0, 1.1
# Lambda ephemeral storage above the free 512 MB, x86, us-east-1 (aws.amazon.com/lambda/pricing)
EPHEMERAL_GB_SECOND_USD = 0.0000000309


def run_engine(n_volumes: int, *, seed: int = 0) -> dict:
    """Write a run, process it with the command line on one core; the figures."""
    folder = WORK / f"T{n_volumes}"
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "sub-01_task-rest_bold.nii.gz"
    print(f"writing {SHAPE} x {n_volumes} ...", flush=True)
    truth = write_head_run(src, SHAPE, n_volumes, seed=seed)
    print(f"processing {src.stat().st_size / 2**20:.0f} MB ...", flush=True)
    m = measure([sys.executable, "-m", "fmri_preproc", str(src), "--out", str(folder / "out")])
    if m["code"] != 0:
        raise SystemExit(f"the engine failed on {n_volumes} volumes:\n{m['stderr'][-3000:]}")
    summary = json.loads(m["stdout"])
    mvv = np.prod(SHAPE) * n_volumes / 1e6
    out_bytes = sum(f.stat().st_size for f in (folder / "out").rglob("*") if f.is_file())
    row = {"n_volumes": n_volumes, "out_mb": out_bytes / 2**20, "wall": m["wall"], "rss": m["rss"],
           "peak": summary["peak_memory_mb"], "mvv": mvv, "s_per_mvv": m["wall"] / mvv,
           "upload_mb": src.stat().st_size / 2**20, "truth": truth,
           "confounds": summary["outputs"]["confounds"], "src": src,
           "ref": summary["reference_volume"]}
    print(f"  {m['wall']:.1f} s, engine peak {row['peak']:.0f} MB, RSS {m['rss']:.0f} MB, "
          f"{row['s_per_mvv']:.3f} s per million voxel-volumes", flush=True)
    return row


def run_ants(row: dict) -> dict | None:
    """antspyx Rigid on the run of ``row`` (one thread); its matrices and figures."""
    if not ensure_ants():
        return None
    out = WORK / f"ants_T{row['n_volumes']}.npy"
    print(f"antspyx Rigid on {row['n_volumes']} volumes (one thread) ...", flush=True)
    m = measure([sys.executable, str(ROOT / "bench" / "ants_anchor.py"), str(row["src"]),
                 str(row["ref"]), str(out), "Rigid"])
    if m["code"] != 0:
        print("antspyx failed:", m["stderr"][-2000:])
        return None
    print(f"  {m['wall']:.1f} s, RSS {m['rss']:.0f} MB", flush=True)
    return {"wall": m["wall"], "rss": m["rss"], "matrices": np.load(out)}


def agreement(row: dict, ants: dict) -> dict:
    """Each tool's RMS error against the truth, and between the two (mm, 80 mm sphere)."""
    affine = grid_affine(SHAPE)
    ours = np.array([fp.params_to_affine(p, affine, SHAPE)
                     for p in read_confounds(row["confounds"])])
    ref = row["ref"]
    centre = fp.fov_centre(affine, SHAPE)
    between = np.array([fp.rms_deviation(a, b, centre=centre)
                        for a, b in zip(ours, ants["matrices"])])
    return {"ours": motion_errors(ours, row["truth"], affine, SHAPE, ref),
            "ants": motion_errors(ants["matrices"], row["truth"], affine, SHAPE, ref),
            "between": between}


def capacity_table(s_per_mvv: float, ratio: float) -> list[str]:
    """Largest run (volumes of the 100 x 100 x 72 grid) per memory size, 15 min, 10 GB /tmp."""
    lines = ["| MemorySize (MB) | vCPU | largest run, 100x100x72 (volumes) | "
             "largest run, 64x64x32 (volumes) | limited by |", "|---|---|---|---|---|"]
    for memory in MEMORY_SIZES:
        big = resources.largest_run(SHAPE, memory, compressed_ratio=ratio,
                                    seconds_per_mvv=s_per_mvv)
        small = resources.largest_run((64, 64, 32), memory, compressed_ratio=ratio,
                                      seconds_per_mvv=s_per_mvv)
        lines.append(f"| {memory:,} | {resources.cpu_share(memory):.2f} | {big:,} | {small:,} "
                     f"| {_limit(big, memory, ratio, s_per_mvv)} |")
    return lines


def _limit(n: int, memory: int, ratio: float, s_per_mvv: float) -> str:
    """Which limit stops the run one volume longer than the largest."""
    run = resources.RunShape(SHAPE, n + 1)
    need = resources.needs(run, memory_mb=memory, input_bytes=int(run.stored_bytes * ratio),
                           seconds_per_mvv=s_per_mvv)
    if need.memory_mb > memory:
        return "memory"
    if need.tmp_mb > resources.LAMBDA_MAX_EPHEMERAL_MB:
        return "/tmp (10 GB)"
    return "time (15 min)"


def study(row: dict, compressed: float, n_runs: int = 1000, concurrency: int = 100) -> list[str]:
    """A study of ``n_runs`` runs like ``row`` on AWS: configuration, time, cost (docs/scaling.md)."""
    from helpers.cloud.costs import PRICES, TRANSFER
    from helpers.cloud.deploy import FunctionSpec

    spec = FunctionSpec.sized_for(SHAPE, row["n_volumes"], compressed_ratio=compressed,
                                  max_concurrency=concurrency)
    transfer_s = (row["upload_mb"] + row["out_mb"]) / resources.S3_MB_PER_S
    run_s = row["wall"] / resources.cpu_share(spec.memory_mb) + transfer_s
    waves = -(-n_runs // concurrency)
    gb_s = spec.memory_mb / 1024 * run_s * n_runs
    tmp_gb_s = (spec.ephemeral_mb - 512) / 1024 * run_s * n_runs
    # the three series (native, smoothed, MNI) are nearly all of the outputs' bytes
    parts = -(-int(row["out_mb"] * 2**20) // TRANSFER.multipart_chunksize) + 3
    puts = n_runs * (1 + parts + 3 * 2 + 10 + 2)  # upload; the series' parts (create and
    # complete each); 10 small outputs; marker and the dataset files
    gets = n_runs * (4 + 14)  # header, run, 2 sidecars; a HEAD before each of 14 writes
    stored_gb = n_runs * (row["upload_mb"] + row["out_mb"]) / 1024
    costs = {"Lambda compute (GB-s)": gb_s * PRICES["lambda_gb_second"].usd,
             "Lambda /tmp above 512 MB (GB-s)": tmp_gb_s * EPHEMERAL_GB_SECOND_USD,
             "Lambda requests": n_runs * PRICES["lambda_request"].usd,
             "S3 PUT requests (multipart parts)": puts * PRICES["s3_put_request"].usd,
             "S3 GET/HEAD requests": gets * PRICES["s3_get_request"].usd,
             "S3 storage, one month (inputs + outputs)": stored_gb * PRICES["s3_gb_month"].usd}
    age_s = (waves - 1) * run_s + 180 + run_s  # the last wave's wait, retries' backoff
    lines = ["## A 1,000-run study on AWS (computed from the figures above)", "",
             f"{n_runs:,} runs of {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}x{row['n_volumes']}, "
             f"each {row['upload_mb']:,.0f} MB uploaded and {row['out_mb']:,.0f} MB of "
             f"outputs. `FunctionSpec.sized_for` gives MemorySize {spec.memory_mb:,} MB, "
             f"EphemeralStorage {spec.ephemeral_mb:,} MB, Timeout {spec.timeout_s} s. One run: "
             f"{row['wall']:.0f} s of computing (measured, one core) + {transfer_s:.0f} s of S3 "
             f"transfers at {resources.S3_MB_PER_S:.0f} MB/s = **{run_s:.0f} s**.", "",
             f"Reserved concurrency {concurrency}: {waves} waves, **{waves * run_s / 60:.0f} "
             f"minutes** to finish; the last event waits about {(waves - 1) * run_s / 60:.0f} "
             f"minutes, so MaximumEventAgeInSeconds >= {age_s:.0f} s (the workbook sets "
             f"{spec.max_event_age_s} s, the maximum). Account quota: concurrent executions "
             f">= {concurrency + 100} (the concurrency plus AWS's 100 unreserved).", "",
             "| item | quantity | cost (USD, list price) |", "|---|---|---|",
             f"| Lambda compute | {gb_s:,.0f} GB-s | {costs['Lambda compute (GB-s)']:.2f} |",
             f"| Lambda /tmp above 512 MB | {tmp_gb_s:,.0f} GB-s | "
             f"{costs['Lambda /tmp above 512 MB (GB-s)']:.2f} |",
             f"| Lambda requests | {n_runs:,} | {costs['Lambda requests']:.4f} |",
             f"| S3 PUT requests | {puts:,} | {costs['S3 PUT requests (multipart parts)']:.2f} |",
             f"| S3 GET/HEAD requests | {gets:,} | {costs['S3 GET/HEAD requests']:.4f} |",
             f"| S3 storage, one month | {stored_gb:,.0f} GB | "
             f"{costs['S3 storage, one month (inputs + outputs)']:.2f} |",
             f"| **total** | | **{sum(costs.values()):.2f}** |", "",
             f"Multipart parts of {TRANSFER.multipart_chunksize / 2**20:.0f} MB. Data transfer: "
             "0 (buckets and function in one region); downloading every output to a laptop "
             f"would add {n_runs * row['out_mb'] / 1024 * PRICES['transfer_out_gb'].usd:,.0f} "
             "USD of transfer out.", ""]
    return lines


def report(long: dict, short: dict, ants: dict | None, ants_row: dict | None, args) -> str:
    ratio = long["peak"] / short["peak"]
    s_per_mvv = long["s_per_mvv"]
    compressed = long["upload_mb"] / (np.prod(SHAPE) * long["n_volumes"] * 2 / 2**20)
    at_1769 = resources.largest_run(SHAPE, 1769, compressed_ratio=compressed,
                                    seconds_per_mvv=s_per_mvv)
    at_1769_raw = resources.largest_run(SHAPE, 1769, compressed_ratio=compressed,
                                        seconds_per_mvv=s_per_mvv / resources.MARGIN,
                                        ephemeral_mb=10**9)
    at_1769_time = resources.largest_run(SHAPE, 1769, compressed_ratio=compressed,
                                         seconds_per_mvv=s_per_mvv, ephemeral_mb=10**9)
    model = resources.needs(resources.RunShape(SHAPE, long["n_volumes"]),
                            input_bytes=int(long["upload_mb"] * 2**20))
    lines = [
        "# Scale benchmark: multiband-size runs (issue 16)", "",
        f"Machine: {machine()}. One core (OMP/OpenBLAS/ITK threads = 1). Synthetic head "
        "(`tests/scale_runs.py`: analytic ellipsoid and blobs, known rigid motion, noise), "
        f"{SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} voxels of 2 mm, int16, TR 0.8 s. Whole command "
        "(`python -m fmri_preproc`, 6 mm smoothing) in a fresh process; engine peak = its "
        "VmHWM, RSS = the process's peak resident set.", "",
        "## Memory flat in run length", "",
        "| volumes | float32 size (MB) | upload (MB) | wall (s) | engine peak (MB) | "
        "process RSS (MB) | s per million voxel-volumes |", "|---|---|---|---|---|---|---|"]
    for row in (short, long):
        lines.append(f"| {row['n_volumes']} | {row['mvv'] * 4 / 1.048576:,.0f} | "
                     f"{row['upload_mb']:,.0f} | {row['wall']:.1f} | {row['peak']:.0f} | "
                     f"{row['rss']:.0f} | {row['s_per_mvv']:.3f} |")
    ok = long["peak"] <= TARGET_PEAK_MB and ratio <= TARGET_RATIO
    lines += ["", f"Peak at {long['n_volumes']} volumes: **{long['peak']:.0f} MB** (target <= "
              f"{TARGET_PEAK_MB:.0f} MB), **{ratio:.2f}x** its peak at {short['n_volumes']} "
              f"volumes (target <= {TARGET_RATIO}x): {'met' if ok else 'NOT met'}.", "",
              "## Time and the largest run per Lambda", "",
              f"Seconds per million voxel-volumes, whole command on one core: "
              f"**{s_per_mvv:.3f} s** (from the {long['n_volumes']}-volume run). "
              f"The resources model uses {resources.SECONDS_PER_MVV} s, "
              f"then a {resources.MARGIN}x margin on every estimate.", "",
              f"Model for the {long['n_volumes']}-volume run at 1,769 MB (with margin): memory "
              f"{model.memory_mb:.0f} MB (measured {long['peak']:.0f}), /tmp "
              f"{model.tmp_mb:,.0f} MB, {model.seconds:.0f} s (measured {long['wall']:.0f}).", "",
              f"Largest {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} run that fits Lambda's 15 minutes at "
              f"1,769 MB (one vCPU), uploads compressed to {compressed:.2f} of int16: "
              f"**{at_1769_time:,} volumes** by time alone with the model's margin "
              f"({at_1769_raw:,} at the measured speed with no margin); with Lambda's "
              f"10,240 MB /tmp as well: **{at_1769:,} volumes** "
              f"({at_1769 * 0.8 / 60:.0f} minutes of scanning at TR 0.8 s).", "",
              "Largest run per memory size (15 min timeout, 10,240 MB /tmp, measured speed, "
              "the model's margin):", "", *capacity_table(s_per_mvv, compressed), ""]
    lines += study(long, compressed)
    lines += ["## antspyx on a multiband-size run", ""]
    if ants is None:
        lines.append("antspyx unavailable: anchor not run.")
    else:
        agree = agreement(ants_row, ants)
        lines += [
            f"{SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}x{ants_row['n_volumes']}, same reference volume "
            "(middle), one thread each. Errors: Jenkinson RMS deviation (80 mm sphere) from "
            "the true motion; agreement: the same between the two tools' estimates.", "",
            "| tool | wall (s) | peak memory (MB) | mean error (mm) | max error (mm) |",
            "|---|---|---|---|---|",
            f"| fmri_preproc, whole command (motion, reslice, confounds, smoothing, write) | "
            f"{ants_row['wall']:.1f} | {ants_row['peak']:.0f} (RSS {ants_row['rss']:.0f}) | "
            f"{agree['ours'].mean():.4f} | {agree['ours'].max():.4f} |",
            f"| antspyx motion_correction Rigid (estimation + resampling) | {ants['wall']:.1f} "
            f"| {ants['rss']:.0f} (RSS) | {agree['ants'].mean():.4f} | "
            f"{agree['ants'].max():.4f} |", "",
            f"Agreement of the two tools: mean {agree['between'].mean():.4f} mm, max "
            f"{agree['between'].max():.4f} mm. fmri_preproc is "
            f"{ants['wall'] / ants_row['wall']:.1f}x faster and uses "
            f"{ants['rss'] / ants_row['rss']:.1f}x less memory."]
    lines += ["", f"Command: `python bench/bench_scale.py --long {args.long} --short {args.short} "
              f"--ants-volumes {args.ants_volumes}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=int, default=600, help="volumes of the long run")
    parser.add_argument("--short", type=int, default=150, help="volumes of the short run")
    parser.add_argument("--ants-volumes", type=int, default=100,
                        help="volumes of the run given to antspyx (0: skip)")
    args = parser.parse_args(argv)
    short = run_engine(args.short)
    long = run_engine(args.long)
    ants = ants_row = None
    if args.ants_volumes:
        ants_row = run_engine(args.ants_volumes, seed=1)
        ants = run_ants(ants_row)
    _save_figures(short, long, ants_row, ants)
    text = report(long, short, ants, ants_row, args)
    RESULTS.write_text(text)
    print(text)
    for row in (short, long, ants_row):  # the runs are large: keep only the results
        if row:
            for path in sorted(row["src"].parent.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
    return 0


def _save_figures(*rows) -> None:
    """The measured figures, as JSON beside the runs (for checking the report by hand)."""
    keep = [{k: v for k, v in row.items() if k in ("n_volumes", "wall", "rss", "peak", "mvv",
                                                 "s_per_mvv", "upload_mb", "out_mb")}
            for row in rows if row]
    (WORK / "figures.json").write_text(json.dumps(keep, indent=2))


if __name__ == "__main__":
    sys.exit(main())
