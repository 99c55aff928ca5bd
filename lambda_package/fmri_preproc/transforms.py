"""Rigid-body transforms in world (scanner mm) space: the engine's parameter convention.

The convention
--------------
One volume's motion is six numbers ``[trans_x, trans_y, trans_z, rot_x, rot_y, rot_z]``:
translations in millimetres along the scanner (world, RAS+) axes of the NIfTI affine,
rotations in radians about those axes. They describe a 4x4 world-space matrix

    M = T(t) @ C @ Rx(rot_x) @ Ry(rot_y) @ Rz(rot_z) @ C^-1

where ``C`` translates by the rotation centre ``c`` = the centre of the field of view in
world coordinates (the world position of voxel index ``(shape - 1) / 2``), and ``Rx``,
``Ry``, ``Rz`` are right-handed rotations about the world x, y, z axes (so, acting on a
column vector, the z rotation is applied first, then y, then x: SPM's order). In words:

    M(p) = R (p - c) + c + t

``M`` maps a point ``p`` of the reference volume to the position of the same tissue in the
moving volume; it is the map used to reslice that volume onto the reference grid
(``resliced(p) = moving(M p)``). Volume-to-volume motion therefore composes as matrices;
to undo motion invert the 4x4 matrix, never negate the parameters (they differ by about
0.05 mm at 2 mm / 2 degrees).

Because the convention lives in world space, any affine (oblique, LPS-stored, anisotropic
voxels) gives the same physical meaning to the parameters.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "params_to_affine", "affine_to_params", "fov_centre", "rms_deviation", "rigid_matrix",
    "rotation_matrix",
]


def fov_centre(affine: np.ndarray, shape) -> np.ndarray:
    """World position (mm) of the centre of the field of view.

    Parameters
    ----------
    affine : (4, 4) array
        NIfTI voxel-to-world affine.
    shape : sequence of int
        Image shape; only the first three entries are used.

    Returns
    -------
    centre : (3,) ndarray
        ``affine @ ((shape[:3] - 1) / 2, 1)``, in mm.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError("affine must be 4x4")
    if len(shape) < 3:
        raise ValueError("shape must have at least 3 entries")
    ijk = (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0
    return affine[:3, :3] @ ijk + affine[:3, 3]


def rotation_matrix(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix ``Rx(rx) @ Ry(ry) @ Rz(rz)`` (radians, right-handed; SPM's order)."""
    cx, sx = np.cos(rx), np.sin(rx)
    cy, sy = np.cos(ry), np.sin(ry)
    cz, sz = np.cos(rz), np.sin(rz)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return r_x @ r_y @ r_z


# old private name, still imported by tests/test_engine_normalize.py and
# bench/bench_normalization.py (owned elsewhere): the same function, not a copy
_rotation = rotation_matrix


def rigid_matrix(params, centre) -> np.ndarray:
    """The engine's one construction of a rigid world matrix: ``x -> R (x - c) + c + t``.

    Parameters
    ----------
    params : sequence of 6 float
        ``[trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (radians)]``.
    centre : (3,) array
        Rotation centre ``c`` in world mm (the field-of-view centre, :func:`fov_centre`).

    Returns
    -------
    matrix : (4, 4) ndarray of float64
        ``R = Rx(rot_x) @ Ry(rot_y) @ Rz(rot_z)`` (:func:`rotation_matrix`), translation
        column ``c + t - R c``.
    """
    params = np.asarray(params, dtype=np.float64)
    centre = np.asarray(centre, dtype=np.float64)
    rot = rotation_matrix(*params[3:])
    matrix = np.eye(4)
    matrix[:3, :3] = rot
    # M(p) = R (p - c) + c + t  ->  translation column = c + t - R c
    matrix[:3, 3] = centre + params[:3] - rot @ centre
    return matrix


def params_to_affine(params, affine, shape) -> np.ndarray:
    """World-space matrix of one volume's six rigid-body parameters.

    Parameters
    ----------
    params : sequence of 6 float
        ``[trans_x, trans_y, trans_z, rot_x, rot_y, rot_z]``: translations in mm along
        the world axes, rotations in radians about the world axes.
    affine : (4, 4) array
        The run's NIfTI voxel-to-world affine (defines the world and the rotation centre).
    shape : sequence of int
        The run's shape (the first three entries are used for the rotation centre).

    Returns
    -------
    matrix : (4, 4) ndarray of float64
        ``M`` with ``M(p) = R (p - c) + c + t``, ``R = Rx(rot_x) @ Ry(rot_y) @ Rz(rot_z)``
        and ``c`` the field-of-view centre in world mm (see :func:`fov_centre`). ``M`` maps
        a point of the reference volume to the position of the same tissue in the moving
        volume, i.e. the map used to reslice the moving volume onto the reference.

    Notes
    -----
    Rotation order: for a column vector the z rotation acts first, then y, then x (the
    order of SPM's ``spm_matrix``). With all parameters zero ``M`` is the identity.
    :func:`affine_to_params` is the inverse.

    References
    ----------
    .. [1] Friston KJ, Ashburner J, Frith CD, Poline J-B, Heather JD, Frackowiak RSJ
       (1995). Spatial registration and normalization of images. Human Brain Mapping
       3:165-189. :doi:`10.1002/hbm.460030303`
    """
    params = np.asarray(params, dtype=np.float64)
    if params.shape != (6,):
        raise ValueError("params must have 6 entries: 3 translations (mm), 3 rotations (rad)")
    if not np.all(np.isfinite(params)):
        raise ValueError("params must be finite")
    return rigid_matrix(params, fov_centre(affine, shape))


def affine_to_params(matrix, affine, shape) -> np.ndarray:
    """Six rigid-body parameters of a world-space matrix (inverse of :func:`params_to_affine`).

    Parameters
    ----------
    matrix : (4, 4) array
        A rigid world-space matrix, reference point -> moving point.
    affine : (4, 4) array
        The run's NIfTI affine (defines the rotation centre).
    shape : sequence of int
        The run's shape.

    Returns
    -------
    params : (6,) ndarray
        ``[trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (radians)]`` with
        ``rot_y`` in [-pi/2, pi/2].
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError("matrix must be 4x4")
    rot = matrix[:3, :3]
    if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-6):
        raise ValueError("matrix is not a rigid-body (rotation + translation) transform")
    # R = Rx Ry Rz:  R[0,2] = sin(ry), R[0,0:2] = cos(ry) (cos rz, -sin rz),
    # R[1:3,2] = cos(ry) (-sin rx, cos rx)
    ry = np.arcsin(np.clip(rot[0, 2], -1.0, 1.0))
    rz = np.arctan2(-rot[0, 1], rot[0, 0])
    rx = np.arctan2(-rot[1, 2], rot[2, 2])
    centre = fov_centre(affine, shape)
    trans = matrix[:3, 3] - centre + rot @ centre
    return np.concatenate([trans, [rx, ry, rz]])


def rms_deviation(matrix_a, matrix_b, *, radius: float = 80.0, centre=None) -> float:
    """RMS displacement (mm) between two rigid transforms over a sphere (Jenkinson 2002).

    Parameters
    ----------
    matrix_a, matrix_b : (4, 4) array
        World-space matrices (e.g. estimated and true motion of one volume).
    radius : float, optional
        Radius of the sphere in mm (80 mm, a head, by default).
    centre : (3,) array, optional
        Centre of the sphere in world mm (default: origin). Use the field-of-view centre
        from :func:`fov_centre` for the engine's parameters.

    Returns
    -------
    rms : float
        Root-mean-square distance (mm) between ``matrix_a @ x`` and ``matrix_b @ x`` for
        ``x`` uniformly distributed in the sphere.

    Notes
    -----
    Each point ``x`` of the sphere moves by ``(matrix_a - matrix_b) @ x``. With
    ``matrix_a - matrix_b = [[A, t], [0, 0]]`` and ``x = c + y``, averaging over the sphere
    gives ``rms^2 = radius^2 / 5 * trace(A^T A) + |t + A c|^2``.

    References
    ----------
    .. [1] Jenkinson M (1999). Measuring transformation error by RMS deviation.
       FMRIB Technical Report TR99MJ1.
    .. [2] Jenkinson M, Bannister P, Brady M, Smith S (2002). Improved optimization for
       the robust and accurate linear registration and motion correction of brain
       images. NeuroImage 17:825-841. :doi:`10.1006/nimg.2002.1132`
    """
    matrix_a = np.asarray(matrix_a, dtype=np.float64)
    matrix_b = np.asarray(matrix_b, dtype=np.float64)
    if matrix_a.shape != (4, 4) or matrix_b.shape != (4, 4):
        raise ValueError("matrices must be 4x4")
    if radius <= 0:
        raise ValueError("radius must be positive")
    centre = np.zeros(3) if centre is None else np.asarray(centre, dtype=np.float64)
    diff = matrix_a - matrix_b
    lin, trans = diff[:3, :3], diff[:3, 3] + diff[:3, :3] @ centre
    return float(np.sqrt(radius**2 / 5.0 * np.trace(lin.T @ lin) + trans @ trans))
