"""A study fanned out on the local cloud: many small runs through the deployed function.

Run from the project root:  .venv/bin/python bench/bench_fanout.py [--runs 100] [--cap 2]

Deploys the real zip as notebook 02 does (``FunctionSpec``, with ``--cap`` as its reserved
concurrency) on a local cloud of its own, uploads ``--runs`` small BOLD runs at once, waits
until every one is accounted for in the status table, and prints: the wall time and
throughput, the invocations' median duration and memory (REPORT lines), the peak
concurrency, and the local cloud server's own peak resident memory against the bytes it
stores (S3 objects must live on disk, not in the server's memory). Writes
``bench/RESULTS_fanout.md``.
"""
from __future__ import annotations

import argparse
import gzip
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work" / "fanout"
os.environ["WORKBOOK_BUILD_DIR"] = str(WORK / "build")  # a local cloud of its own
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tests' deployed pipeline, reused

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from helpers import local_cloud  # noqa: E402
from helpers.cloud.clients import client  # noqa: E402
from helpers.cloud.logs import invocations, log_events, peak_concurrency  # noqa: E402
from helpers.cloud.status import processing_status  # noqa: E402
from helpers.cloud.transfer import list_objects  # noqa: E402
from pipeline_fixtures import deploy_pipeline  # noqa: E402  (as notebooks 01 and 02 deploy)

SHAPE, N_VOLUMES = (32, 32, 16), 40


def small_run(seed: int) -> bytes:
    """A 32x32x16x40 float32 run: smooth blobs shifting by up to 1 voxel, plus noise."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.random(SHAPE) ** 4 * 3000, 1.5).astype(np.float32)
    shifts = np.cumsum(rng.normal(0, 0.05, (N_VOLUMES, 3)), axis=0)
    data = np.stack([ndimage.shift(base, s, order=1) for s in shifts], axis=3)
    data += rng.normal(0, 5, data.shape).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([3.5, 3.5, 4.0, 1.0]))
    img.header.set_zooms((3.5, 3.5, 4.0, 2.0))
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def server_memory_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of the local cloud's server process, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--cap", type=int, default=2, help="reserved concurrency")
    args = parser.parse_args(argv)
    local_cloud.stop()
    state = local_cloud.ensure_running()
    try:
        cfg = deploy_pipeline("fanout", max_concurrency=args.cap).cfg
        rss_before, _ = server_memory_mb(state["pid"])
        bodies = {f"{cfg.input_prefix}sub-{i:03d}/func/sub-{i:03d}_task-rest_bold.nii.gz":
                  small_run(i) for i in range(args.runs)}
        started = time.monotonic()
        s3 = client("s3")
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda kv: s3.put_object(Bucket=cfg.input_bucket, Key=kv[0],
                                                   Body=kv[1]), bodies.items()))
        keys = sorted(bodies)
        peak_rss = 0.0
        while True:
            table = processing_status(cfg, keys, failed_events=[])
            peak_rss = max(peak_rss, server_memory_mb(state["pid"])[1])
            if not table["status"].isin(("pending", "retrying")).any():
                break
            time.sleep(2)
        wall = time.monotonic() - started
        runs = [r for r in invocations(log_events(cfg.log_group)) if r.get("key")]
        stored = sum(o["Size"] for b in (cfg.input_bucket, cfg.output_bucket)
                     for o in list_objects(b))
        rss_after, peak_rss = server_memory_mb(state["pid"])
        counts = table["status"].value_counts().to_dict()
        durations = sorted(r["duration_ms"] / 1000 for r in runs)
        rows = {
            "runs uploaded": args.runs,
            "accounted for (status)": f"{counts}",
            "invocations (REPORT lines)": len(runs),
            "reserved concurrency / peak from the logs": f"{args.cap} / {peak_concurrency(runs)}",
            "wall time, upload to last result": f"{wall:.1f} s",
            "throughput": f"{args.runs / wall * 60:.1f} runs/min",
            "median invocation": f"{durations[len(durations) // 2]:.2f} s",
            "max memory used (REPORT)": f"{max(r['max_memory_mb'] for r in runs)} MB",
            "bytes stored in S3 (inputs + derivatives)": f"{stored / 2**20:.0f} MB",
            "server RSS before / after, peak": f"{rss_before:.0f} / {rss_after:.0f} MB, "
                                               f"peak {peak_rss:.0f} MB",
            "server RSS growth / bytes stored": f"{(rss_after - rss_before) / (stored / 2**20):.3f}",
        }
    finally:
        local_cloud.stop()
    width = max(map(len, rows))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows.items()))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table_md = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    (ROOT / "bench" / "RESULTS_fanout.md").write_text(
        f"# A study fanned out on the local cloud (`bench/bench_fanout.py`)\n\n"
        f"Date: {when}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; runs of {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}x"
        f"{N_VOLUMES}.\n\n| measure | value |\n|---|---|\n{table_md}\n")
    return 0 if counts.get("processed", 0) == args.runs else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
