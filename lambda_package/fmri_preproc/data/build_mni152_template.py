"""Build the engine's MNI template asset from the MNI152 files that nilearn ships.

Run from the project root (needs nilearn; the engine at run time does not):

    .venv/bin/python lambda_package/fmri_preproc/data/build_mni152_template.py

It writes, next to this script,

- ``tpl-MNI152NLin2009aSym_res-2_desc-tissues_probseg.nii.gz``: a 4D uint8 NIfTI, three
  volumes on nilearn's 2 mm MNI grid cropped to the brain plus a margin: grey matter,
  white matter (probabilities x 255) and the brain mask (0/255). These are
  ``nilearn.datasets.load_mni152_gm_template(resolution=2)``,
  ``load_mni152_wm_template(resolution=2)`` and ``load_mni152_brain_mask(resolution=2)``
  (nilearn resamples its 1 mm ICBM 2009a nonlinear *symmetric* files to 2 mm);
- a JSON sidecar with the full grid (shape, affine), the crop, the volumes' order and
  scale, and the sha256 of the nilearn source files.

The T1 template is not stored: the engine models EPI intensities from the tissue maps
(:mod:`fmri_preproc.normalize`), and nilearn's brain mask is the T1 thresholded at 0.2.
Both files are byte-for-byte reproducible (gzip without a name or time stamp);
``tests/test_engine_normalize.py`` rebuilds them and compares.

References
----------
.. [1] Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL (2009). Unbiased nonlinear
   average age-appropriate brain templates from birth to adulthood. NeuroImage 47:S102.
   :doi:`10.1016/S1053-8119(09)70884-5`
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
TEMPLATE = "MNI152NLin2009aSym"  # = fmri_preproc.contract.TEMPLATE (checked by the tests)
STEM = f"tpl-{TEMPLATE}_res-2_desc-tissues_probseg"
VOLUMES = ("gm", "wm", "brain")
MARGIN_VOXELS = 6  # around the brain mask: room for the dilated mask the cost samples


def _maps() -> tuple[dict, nib.Nifti1Image]:
    """nilearn's 2 mm tissue maps (float) and the mask image (for the grid)."""
    from nilearn import datasets

    mask_img = datasets.load_mni152_brain_mask(resolution=2)
    maps = {
        "gm": datasets.load_mni152_gm_template(resolution=2).get_fdata(dtype=np.float32),
        "wm": datasets.load_mni152_wm_template(resolution=2).get_fdata(dtype=np.float32),
        "brain": mask_img.get_fdata(dtype=np.float32),
    }
    return maps, mask_img


def _sources() -> dict:
    """sha256 of the nilearn files the maps come from."""
    import nilearn
    from nilearn.datasets import struct

    files = [struct.MNI152_FILE_PATH, struct.GM_MNI152_FILE_PATH, struct.WM_MNI152_FILE_PATH]
    return {"nilearn": nilearn.__version__,
            "files": {Path(f).name: hashlib.sha256(Path(f).read_bytes()).hexdigest()
                      for f in files}}


def build(out_dir: Path = HERE) -> tuple[Path, Path]:
    """Write the asset and its sidecar into ``out_dir``; return both paths."""
    maps, mask_img = _maps()
    full_shape = mask_img.shape
    full_affine = np.asarray(mask_img.affine, dtype=np.float64)
    inside = np.argwhere(maps["brain"] > 0.5)
    lo = np.maximum(inside.min(axis=0) - MARGIN_VOXELS, 0)
    hi = np.minimum(inside.max(axis=0) + MARGIN_VOXELS + 1, full_shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    stack = np.stack([np.clip(np.round(maps[k][crop] * 255), 0, 255).astype(np.uint8)
                      for k in VOLUMES], axis=-1)
    affine = full_affine.copy()
    affine[:3, 3] = full_affine[:3, :3] @ lo + full_affine[:3, 3]
    img = nib.Nifti1Image(stack, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=4)  # 4 = MNI152
    img.header.set_sform(affine, code=4)
    img.header["descrip"] = b"MNI152NLin2009aSym 2mm: gm, wm, brain (x255)"
    out_dir.mkdir(parents=True, exist_ok=True)
    nii = out_dir / f"{STEM}.nii.gz"
    raw = io.BytesIO()
    img.to_file_map({"image": nib.FileHolder(fileobj=raw), "header": nib.FileHolder(fileobj=raw)})
    # no file name and mtime 0 in the gzip header: the same maps give the same bytes
    nii.write_bytes(gzip.compress(raw.getvalue(), compresslevel=9, mtime=0))
    sidecar = {
        "Template": TEMPLATE,
        "Resolution_mm": 2,
        "Volumes": list(VOLUMES),
        "Scale": "uint8 / 255 (probabilities; the brain mask is 0 or 255)",
        "FullGridShape": [int(n) for n in full_shape],
        "FullGridAffine": full_affine.tolist(),
        "CropStart": [int(a) for a in lo],
        "Sources": _sources(),
        "Builder": "lambda_package/fmri_preproc/data/build_mni152_template.py",
    }
    side = out_dir / f"{STEM}.json"
    side.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return nii, side


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: here)")
    args = parser.parse_args(argv)
    for path in build(args.out):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
