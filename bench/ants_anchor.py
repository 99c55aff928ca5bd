"""Anchor: antspyx rigid motion correction of one run, in a child process of the benchmark.

Usage: python bench/ants_anchor.py IN.nii.gz REFERENCE_INDEX OUT.npy [TRANSFORM]

Writes the (T, 4, 4) world matrices (RAS mm, reference point -> moving point: the
convention of ``fmri_preproc.params_to_affine``). ANTs works in LPS physical space and its
registration transforms map fixed (reference) points to moving points, so each transform
``y = A (x - c) + c + t`` is converted with ``F = diag(-1, -1, 1)``: ``M_ras = F M_lps F``.
Set ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 in the environment for one thread.
"""

import sys
import time

import numpy as np


def ants_matrix(transform) -> np.ndarray:
    """4x4 LPS matrix of an ANTs affine-family transform (parameters + centre)."""
    params = np.asarray(transform.parameters, dtype=float)
    centre = np.asarray(transform.fixed_parameters, dtype=float)[:3]
    if params.size == 12:  # AffineTransform: 3x3 row-major then translation
        lin, trans = params[:9].reshape(3, 3), params[9:]
    else:  # fall back on applying the transform to points
        origin = np.asarray(transform.apply_to_point((0.0, 0.0, 0.0)))
        lin = np.stack([np.asarray(transform.apply_to_point(tuple(e))) - origin
                        for e in np.eye(3)], axis=1)
        return np.block([[lin, origin[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]])
    matrix = np.eye(4)
    matrix[:3, :3] = lin
    matrix[:3, 3] = trans + centre - lin @ centre
    return matrix


def main():
    in_file, ref_index, out_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    kind = sys.argv[4] if len(sys.argv) > 4 else "Rigid"
    import ants

    tic = time.perf_counter()
    img = ants.image_read(in_file)
    fixed = ants.slice_image(img, axis=3, idx=ref_index)
    result = ants.motion_correction(img, fixed=fixed, type_of_transform=kind)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    matrices = []
    for files in result["motion_parameters"]:
        lps = ants_matrix(ants.read_transform(files[0]))
        matrices.append(flip @ lps @ flip)
    np.save(out_file, np.array(matrices))
    print(f"ants {kind}: {time.perf_counter() - tic:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
