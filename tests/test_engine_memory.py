"""Memory is flat in the run's length: the engine's own high-water mark (VmHWM), measured in
a fresh interpreter, for two runs of the same grid, 40 and 160 volumes long."""
import json
import subprocess
import sys

import numpy as np
import pytest

from scale_runs import write_head_run

SHAPE = (64, 64, 32)
_ENGINE = ("import json, sys, fmri_preproc; "
           "r = fmri_preproc.preprocess(sys.argv[1], sys.argv[2], work_dir=sys.argv[3]); "
           "print(json.dumps(r.summary))")


def _peak_mb(tmp_path, n_volumes: int) -> dict:
    folder = tmp_path / f"T{n_volumes}"
    (folder / "work").mkdir(parents=True)
    src = folder / "sub-01_task-rest_bold.nii.gz"
    write_head_run(src, SHAPE, n_volumes)
    done = subprocess.run([sys.executable, "-c", _ENGINE, str(src), str(folder / "out"),
                           str(folder / "work")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not list((folder / "work").iterdir())  # the scratch file is removed
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_memory_does_not_grow_with_run_length(tmp_path):
    short, long = _peak_mb(tmp_path, 40), _peak_mb(tmp_path, 160)
    assert (short["n_volumes"], long["n_volumes"]) == (40, 160)
    # Holding the run would add its float32 size: 120 volumes more = 63 MB more.
    extra_run_mb = np.prod(SHAPE) * 4 * 120 / 2**20
    growth = long["peak_memory_mb"] - short["peak_memory_mb"]
    assert growth < 0.1 * extra_run_mb, (short["peak_memory_mb"], long["peak_memory_mb"])
