"""Runs of any length written in a stream: a synthetic head with known rigid motion, int16.

For the tests and benchmarks of memory and scale (``tests/test_engine_memory.py``,
``bench/bench_scale.py``): a 100 x 100 x 72 x 600 run is 864 MB as int16, so it is made and
written one volume at a time, never held whole.

The head is analytic (defined in world mm, so every volume is sampled exactly where the
moved tissue is, with no interpolation the engine could share): an ellipsoid "brain" with
a brighter rim, a few Gaussian blobs inside, a dark background, Gaussian noise.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from fmri_preproc import params_to_affine

VOXEL_MM = 2.0
TR_S = 0.8


def grid_affine(shape, voxel_mm: float = VOXEL_MM) -> np.ndarray:
    """RAS affine of ``shape`` at ``voxel_mm`` isotropic, field of view centred on 0."""
    affine = np.diag([voxel_mm] * 3 + [1.0])
    affine[:3, 3] = -voxel_mm * (np.asarray(shape) - 1) / 2
    return affine


def head_motion(n_volumes: int, *, seed: int = 0) -> np.ndarray:
    """A random walk of rigid motion (engine convention: mm, radians), 0 at the middle volume,
    a few tenths of a mm and degree over a run."""
    rng = np.random.default_rng([seed, 7])
    steps = rng.normal(0, [0.03, 0.03, 0.03, 0.0005, 0.0005, 0.0005], size=(n_volumes, 6))
    motion = np.cumsum(steps, axis=0)
    return motion - motion[n_volumes // 2]


def head_volume(shape, affine, params, *, seed: int = 0) -> np.ndarray:
    """One volume of the head moved by ``params`` (float32, before noise)."""
    rng = np.random.default_rng([seed, 3])
    extent = VOXEL_MM * np.asarray(shape) / 2
    radii = extent * [0.8, 0.85, 0.75]
    blobs = rng.uniform(-0.5, 0.5, size=(8, 3)) * radii
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    inverse = np.linalg.inv(params_to_affine(params, affine, shape))
    w = (inverse[:3, :3] @ world + inverse[:3, 3:4]).T  # where the tissue came from
    r = np.sqrt(np.sum((w / radii) ** 2, axis=1))
    volume = 900 / (1 + np.exp((r - 1) / 0.03)) + 300 * np.exp(-((r - 0.9) / 0.05) ** 2)
    for c in blobs:
        volume += 250 * np.exp(-np.sum((w - c) ** 2, axis=1) / (2 * 6.0**2))
    return (volume + 40).reshape(shape).astype(np.float32)  # np.indices: C order


def write_head_run(path, shape=(100, 100, 72), n_volumes: int = 150, *, seed: int = 0,
                   noise: float = 8.0, tr_s: float = TR_S) -> np.ndarray:
    """Write a synthetic int16 run to ``path`` (``.nii.gz``), volume by volume.

    Returns
    -------
    motion : (n_volumes, 6) ndarray
        The true motion of each volume (engine convention), zero at ``n_volumes // 2``.
    """
    path = Path(path)
    affine = grid_affine(shape)
    motion = head_motion(n_volumes, seed=seed)
    header = nib.Nifti1Header()
    header.set_data_shape((*shape, n_volumes))
    header.set_data_dtype(np.int16)
    header.set_zooms((VOXEL_MM,) * 3 + (tr_s,))
    header.set_xyzt_units("mm", "sec")
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_slope_inter(1.0, 0.0)
    header["vox_offset"] = 352
    rng = np.random.default_rng([seed, 11])
    with gzip.open(path, "wb", compresslevel=1) as gz:
        header.write_to(gz)
        gz.write(b"\0" * (352 - gz.tell()))
        for params in motion:
            vol = head_volume(shape, affine, params, seed=seed)
            vol += rng.normal(0, noise, size=shape).astype(np.float32)
            gz.write(np.clip(np.rint(vol), 0, 32767).astype(np.int16).tobytes(order="F"))
    return motion
