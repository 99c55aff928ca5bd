"""fmri_preproc: the cloud workbook's fMRI preprocessing engine (numpy + nibabel only).

Rigid-body motion correction in world (scanner mm) space, Gaussian smoothing with an FWHM
in mm, and fMRIPrep-style confounds, written as BIDS-derivatives outputs. Every name shared
with the handler, the helpers and the notebooks is in :mod:`fmri_preproc.contract`.

- Motion parameter convention: :func:`params_to_affine` (module
  :mod:`fmri_preproc.transforms`): ``M(p) = R (p - c) + c + t`` with
  ``R = Rx(rot_x) Ry(rot_y) Rz(rot_z)``, ``c`` the field-of-view centre in world mm;
  ``M`` maps a reference point to the same tissue's position in the moving volume.
- Non-finite input values are set to 0 and counted in the sidecar; runs that are mostly
  non-finite are rejected (:mod:`fmri_preproc.inputs`).
- Memory is flat in the run's length: the run is read into a float32 scratch file and
  processed volume by volume; what a run needs (memory, /tmp, time) is computed from its
  header by :mod:`fmri_preproc.resources`.
- Command line: ``python -m fmri_preproc sub-01_task-rest_bold.nii.gz --out DIR [--fwhm MM]``
  writes ``DIR/sub-01/func/...`` (a BIDS derivatives layout).
"""

__version__ = "0.1.0"

from .confounds import dvars, framewise_displacement, motion_expansion  # noqa: E402
from .contract import PreprocResult, Run, run_from_key  # noqa: E402
from .inputs import (InputError, RunInfo, VolumeFile, check_input, load_run,  # noqa: E402
                     repetition_time, unpack_run)
from .motion import estimate_motion, reslice_volume  # noqa: E402
from .pipeline import preprocess  # noqa: E402
from .smoothing import smooth  # noqa: E402
from .transforms import affine_to_params, fov_centre, params_to_affine, rms_deviation  # noqa: E402

__all__ = [
    "params_to_affine",
    "affine_to_params",
    "fov_centre",
    "rms_deviation",
    "estimate_motion",
    "reslice_volume",
    "smooth",
    "framewise_displacement",
    "motion_expansion",
    "dvars",
    "preprocess",
    "PreprocResult",
    "Run",
    "run_from_key",
    "InputError",
    "RunInfo",
    "check_input",
    "load_run",
    "unpack_run",
    "VolumeFile",
    "repetition_time",
]
