"""Affine normalisation of a BOLD run to the MNI template (numpy + nibabel only).

What it does
------------
:func:`estimate_normalization` finds the 12-parameter affine map from the template
``MNI152NLin2009aSym`` (:data:`fmri_preproc.contract.TEMPLATE`, nilearn's ICBM 2009a
nonlinear symmetric template at 2 mm) to the run's reference volume (the *boldref*, native
scanner space, any orientation or obliquity). :class:`TemplateResampler` then resamples
every volume of the run into the template's 2 mm grid in one interpolation (motion and
normalisation composed), and the mask too. :func:`write_itk_affine` /
:func:`read_itk_affine` store the map as ITK does, and :func:`normalization_figure` draws
the QC figure (a PNG written with numpy + zlib).

The convention
--------------
The normalisation matrix ``N`` (4 x 4, float64) maps a template point ``x`` (MNI mm, RAS+)
to the boldref's world point ``y = N x`` (scanner mm, RAS+, through the boldref's NIfTI
affine) where the same tissue is. It is therefore the map used to *resample* the boldref
onto the template: ``normalised(x) = boldref(N x)``, exactly like the motion matrices of
:mod:`fmri_preproc.motion` (reference point -> moving point). Volume ``t`` of a run with
motion matrix ``M_t`` is sampled at ``M_t N x``.

The ITK file (``contract.OUTPUTS["xfm_to_mni"]``, ``..._from-boldref_to-MNI152NLin2009aSym_
mode-image_xfm.txt``) holds the same map as ITK, ANTs and fMRIPrep do: a text file
``#Insight Transform File V1.0`` with one ``AffineTransform_double_3_3`` in LPS coordinates
(``N_lps = F N F``, ``F = diag(-1, -1, 1)``), ``Parameters`` = the 3 x 3 matrix row by row
then the translation, ``FixedParameters`` = the centre (0 0 0). ITK transforms map points of
the fixed image (here the template) to points of the moving image (the boldref): the map
that resamples the boldref into template space, which is what fMRIPrep's
``from-boldref_to-<template>_mode-image`` names. ``antsApplyTransforms -r template.nii.gz
-i boldref.nii.gz -t <file>`` therefore normalises the boldref.

The cost: EPI intensities from tissue maps
------------------------------------------
EPI (T2*-weighted) and the T1-derived template have different contrasts: CSF is bright in
EPI and dark in T1, and EPI intensity varies smoothly across the head (coil sensitivity).
So the template is *rebuilt in the EPI's contrast*: at a template point ``x`` the model
EPI intensity is

    m(x) = sum_k sum_j a_kj P_k(x) phi_j(x)

with ``P_k`` the smoothed tissue probabilities (grey matter, white matter, CSF = brain -
GM - WM, and outside-the-brain) and ``phi_j`` a polynomial in template coordinates (1, or
1, x, y, z: each tissue's intensity may vary linearly across the head). The coefficients
``a_kj`` are linear parameters, fitted jointly with the 12 affine parameters ``p``:

    min_{p, a}  sum_x w(x) [I(N(p) x) - m(x; a)]^2  /  sum_x w(x) [I(N(p) x) - mean I]^2

where ``I`` is the smoothed boldref and ``w`` robust weights. The numerator is SPM's
affine registration to a template built from tissue classes whose intensities are
estimated, not assumed [1]_ [2]_, so the same code works for any EPI contrast. The
denominator makes the cost ``1 - R^2`` of the tissue model: the complement of the
correlation ratio [3]_ with the template's (soft) tissue classes as the partition, a
standard cost across contrasts (FSL FLIRT's default). It matters: with the numerator
alone the fit can shrink the template into a flat part of the image, where any model
leaves small residuals (seen on a real Philips run). The cost stays a ratio of least-
squares terms, so the Gauss-Newton machinery of :mod:`fmri_preproc.motion` solves it
(mutual information needs a joint histogram and has no Gauss-Newton form). Points where
the EPI departs from any tissue mixture (susceptibility signal loss in orbitofrontal and
inferior temporal cortex, vessels, eyes) are down-weighted by Geman-McClure weights of
their residual, scaled by 3 x its robust standard deviation and recomputed after every
accepted step (iteratively reweighted least squares) [4]_.

The optimiser
-------------
Forward-additive Gauss-Newton [5]_ on the 12 entries of ``N`` (the linear part about the
template brain's centre) and the intensity coefficients, damped Levenberg-Marquardt style
(a step that raises the cost is undone and the damping raised tenfold). Coarse to fine:
both images smoothed to 12, 8 and then 5 mm FWHM, with the template sampled every 8, 6
and then 4 mm inside its brain mask dilated by 8 mm. Only template points that map inside
the boldref's field of view are used, so an EPI that misses the cerebellum or the vertex
is handled: the missing part simply does not contribute. The Jacobian uses the gradient
of the smoothed boldref at the mapped points (trilinear interpolation of its gradient
volumes).

Initialisation: the scanner's world axes are close to the head's (a subject lies supine,
head first), so the linear part starts as the identity and the translation aligns centres
of mass: the boldref's head (voxels above 20 % of its 98th percentile) with the part of the
template brain that falls inside the boldref's field of view under the current
translation, iterated to a fixed point (so a partial field of view does not pull the
template towards it). A coarse search over translations along the scanner's y (+- 12 mm)
and z (+- 24 mm) axes, pitch (+- 30 degrees: heads are often tilted 20-30 degrees from the
AC-PC plane; the real Philips run of the benchmark is) and size (x 0.9, 1, 1.1), scored by
the linear fit of the tissue model (``1 - R^2``), picks the four best starts; each is
refined at the coarsest level and the best result goes on to the finer levels.

Refusals (:class:`fmri_preproc.InputError`): a constant or non-3D volume; a field of view
under 300 ml or holding under 30 % of the template brain (before and after the fit); a
fit that scales the brain outside 0.6-1.6 or whose tissue model correlates below 0.5 with
the image (noise, or a wrong header).

References
----------
.. [1] Friston KJ, Ashburner J, Frith CD, Poline J-B, Heather JD, Frackowiak RSJ (1995).
   Spatial registration and normalization of images. Human Brain Mapping 3:165-189.
   :doi:`10.1002/hbm.460030303`
.. [2] Ashburner J, Friston KJ (1997). Multimodal image coregistration and partitioning -
   a unified framework. NeuroImage 6:209-217. :doi:`10.1006/nimg.1997.0290`
.. [3] Roche A, Malandain G, Pennec X, Ayache N (1998). The correlation ratio as a new
   similarity measure for multimodal image registration. MICCAI 1998, LNCS 1496:1115-1124.
   :doi:`10.1007/BFb0056301`
.. [4] Geman S, McClure DE (1987). Statistical methods for tomographic image
   reconstruction. Bulletin of the International Statistical Institute 52(4):5-21.
.. [5] Baker S, Matthews I (2004). Lucas-Kanade 20 years on: a unifying framework.
   IJCV 56:221-255. :doi:`10.1023/B:VISI.0000011205.11775.fd`
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

from . import png
from .contract import TEMPLATE, Sidecar
from .inputs import InputError
from .motion import apply_affine as _apply, trilinear as _trilinear
from .smoothing import fwhm_to_sigma, smooth_volume
from .transforms import rotation_matrix as _rotation

__all__ = [
    "Template",
    "load_template",
    "Normalization",
    "estimate_normalization",
    "template_coverage",
    "TemplateResampler",
    "format_itk_affine",
    "parse_itk_affine",
    "write_itk_affine",
    "read_itk_affine",
    "normalization_figure",
    "MNI_KINDS",
    "normalize_or_warn",
    "write_mni_outputs",
]

_DATA = Path(__file__).resolve().parent / "data"
TEMPLATE_STEM = f"tpl-{TEMPLATE}_res-2_desc-tissues_probseg"


# ------------------------------------------------------------------------------------------
# The template asset


@dataclass(frozen=True)
class Template:
    """The MNI template's tissue maps on its 2 mm grid, cropped to the brain plus a margin.

    Attributes
    ----------
    name : str
        ``MNI152NLin2009aSym``.
    gm, wm : (X, Y, Z) ndarray of float32
        Grey- and white-matter probabilities (0-1) on the cropped grid (read-only).
    brain : (X, Y, Z) ndarray of bool
        The brain mask (read-only).
    affine : (4, 4) ndarray
        Voxel-to-MNI-mm affine of the cropped grid.
    grid_shape : tuple of 3 int
        The full 2 mm grid (nilearn's ``load_mni152_template(resolution=2)``: 99 x 117 x 95).
    grid_affine : (4, 4) ndarray
        Its affine.
    crop_start : tuple of 3 int
        Index in the full grid of the cropped grid's first voxel.
    """

    name: str
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    grid_shape: tuple
    grid_affine: np.ndarray
    crop_start: tuple

    @property
    def crop(self) -> tuple:
        """Slices of the full grid that the cropped maps cover."""
        return tuple(slice(s, s + n) for s, n in zip(self.crop_start, self.gm.shape))


@lru_cache(maxsize=1)
def load_template() -> Template:
    """The template asset shipped in the package (built by ``data/build_mni152_template.py``).

    Returns
    -------
    Template
        Cached: every call returns the same read-only arrays.
    """
    img = nib.load(_DATA / f"{TEMPLATE_STEM}.nii.gz")
    meta = json.loads((_DATA / f"{TEMPLATE_STEM}.json").read_text(encoding="utf-8"))
    if meta["Template"] != TEMPLATE or meta["Volumes"] != ["gm", "wm", "brain"]:
        raise RuntimeError(f"the template asset in {_DATA} is not {TEMPLATE} gm/wm/brain")
    raw = np.asarray(img.dataobj, dtype=np.uint8)
    gm, wm = (np.asfortranarray(raw[..., k], dtype=np.float32) / np.float32(255)
              for k in range(2))
    brain = np.asfortranarray(raw[..., 2] > 127)
    for array in (gm, wm, brain):
        array.setflags(write=False)
    return Template(TEMPLATE, gm, wm, brain, np.asarray(img.affine, dtype=np.float64),
                    tuple(meta["FullGridShape"]), np.array(meta["FullGridAffine"]),
                    tuple(meta["CropStart"]))


# ------------------------------------------------------------------------------------------
# Estimation


@dataclass(frozen=True)
class Normalization:
    """The estimated map from the template to the boldref, and how well it fits.

    Attributes
    ----------
    matrix : (4, 4) ndarray
        Template point (MNI mm, RAS+) -> boldref world point (scanner mm, RAS+).
    coverage : float
        Fraction of the template brain that maps inside the boldref's field of view.
    correlation : float
        Correlation between the boldref and the fitted tissue model at the final sample
        points (weighted; 1 = perfect).
    initial_matrix : (4, 4) ndarray
        The initialisation the Gauss-Newton iterations started from.
    n_iterations : int
        Gauss-Newton iterations of the chosen start over all levels.
    """

    matrix: np.ndarray
    coverage: float
    correlation: float
    initial_matrix: np.ndarray
    n_iterations: int

    def to_dict(self) -> dict:
        """JSON-serialisable description for a sidecar (method, template, fit quality)."""
        return {
            "Method": "12-parameter affine; least squares of the EPI against the template's "
                      "tissue maps with per-tissue intensities fitted (cost 1 - R^2, a "
                      "correlation ratio), robust weights, Gauss-Newton / Levenberg-"
                      "Marquardt, coarse to fine (12, 8, 5 mm); numpy",
            "Template": TEMPLATE,
            "Resolution_mm": 2,
            "MatrixTemplateToBoldref": np.round(self.matrix, 8).tolist(),
            "MatrixConvention": "template point (MNI mm, RAS) -> boldref world point (mm, "
                                "RAS); the ITK file holds it in LPS",
            "Coverage": round(float(self.coverage), 4),
            "Correlation": round(float(self.correlation), 4),
            "Iterations": int(self.n_iterations),
        }


@dataclass(frozen=True)
class _LevelSpec:
    """One level of the coarse-to-fine schedule."""

    fwhm_mm: float    # smoothing of both images
    step: int         # template voxels (2 mm) between sample points
    bias_order: int   # 0: one intensity per tissue; 1: plus a linear gradient per tissue
    max_iter: int
    tol_mm: float     # stop when an update moves points 80 mm from the centre by less


LEVELS = (
    _LevelSpec(12.0, 4, 0, 40, 0.1),
    _LevelSpec(8.0, 3, 1, 30, 0.05),
    _LevelSpec(5.0, 2, 1, 30, 0.01),
)
DILATE_MM = 8.0            # sample the template this far outside its brain mask
MIN_COVERAGE = 0.3         # of the template brain inside the boldref's field of view
MIN_CORRELATION = 0.5      # of the fitted tissue model with the boldref (real EPI: 0.9+)
ZOOM_RANGE = (0.6, 1.6)    # plausible scalings of the MNI brain to a head (adults: 0.8-1.1)
MIN_FOV_ML = 300.0         # a brain is about 1,200 ml; an EPI covering less cannot be placed
_SCALE_MM = 100.0          # template coordinates are (x - centre) / 100 mm in the Jacobian
N_STARTS = 4               # coarse-level Gauss-Newton runs from the best grid points
_ROBUST_C = 3.0            # Geman-McClure scale, in robust standard deviations (1.4826 MAD)


def _dilate(mask: np.ndarray, n: int) -> np.ndarray:
    """Dilate a 3D boolean mask by ``n`` voxels (6-connected)."""
    out = mask.copy()
    for _ in range(n):
        grown = out.copy()
        for axis in range(3):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, -1), slice(1, None)
            grown[tuple(lo)] |= out[tuple(hi)]
            grown[tuple(hi)] |= out[tuple(lo)]
        out = grown
    return out


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """World coordinates (3, N) float64 of voxel indices (3, N)."""
    return affine[:3, :3] @ ijk + affine[:3, 3:4]


def _poly(u: np.ndarray, order: int) -> np.ndarray:
    """(N, 1) or (N, 4) polynomial basis of normalised coordinates u (3, N)."""
    if order == 0:
        return np.ones((u.shape[1], 1))
    return np.column_stack([np.ones(u.shape[1]), u.T])


class _TemplateLevel:
    """Template sample points of one level and the tissue model's basis at them."""

    def __init__(self, template: Template, spec: _LevelSpec, region: np.ndarray,
                 centre: np.ndarray):
        sigma = fwhm_to_sigma(spec.fwhm_mm, template.affine)
        lattice = np.zeros(region.shape, dtype=bool)
        lattice[:: spec.step, :: spec.step, :: spec.step] = True
        ijk = np.nonzero(region & lattice)
        gm = smooth_volume(template.gm, sigma)[ijk]
        wm = smooth_volume(template.wm, sigma)[ijk]
        brain = smooth_volume(template.brain.astype(np.float32), sigma)[ijk]
        csf = np.clip(brain - gm - wm, 0, None)
        tissues = np.column_stack([gm, wm, csf, np.clip(1 - brain, 0, None)]).astype(np.float64)
        self.points = _world(template.affine, np.array(ijk, dtype=np.float64))  # (3, N) mm
        self.u = (self.points - centre[:, None]) / _SCALE_MM
        poly = _poly(self.u, spec.bias_order)
        # every tissue times every polynomial term: (N, 4 * n_terms)
        self.basis = (tissues[:, :, None] * poly[:, None, :]).reshape(len(gm), -1)
        self.basis_t = np.ascontiguousarray(self.basis.T)
        self.brain = brain > 0.5


class _ImageLevel:
    """The boldref smoothed for one level, with its world-space gradient volumes."""

    def __init__(self, image: np.ndarray, affine: np.ndarray, fwhm_mm: float):
        smoothed = smooth_volume(image, fwhm_to_sigma(fwhm_mm, affine))
        grads = np.gradient(smoothed)
        # d/dworld = A^-T d/dvoxel  (A = 3x3 part of the affine)
        to_world = np.linalg.inv(affine[:3, :3]).T
        gvox = np.stack([g.ravel(order="F") for g in grads])
        self.flats = [smoothed.ravel(order="F")] + list((to_world @ gvox).astype(np.float32))
        self.shape = image.shape
        self.inv_affine = np.linalg.inv(affine)

    def sample(self, world: np.ndarray, with_gradient: bool = True):
        """Values (N,), world gradients (3, N) or None, inside mask at world points (3, N)."""
        vox = (self.inv_affine[:3, :3] @ world + self.inv_affine[:3, 3:4]).astype(np.float32)
        if not with_gradient:
            values, inside = _trilinear(self.flats[0], self.shape, vox)
            return values, None, inside
        values, inside = _trilinear(self.flats[0], self.shape, vox)
        grads = np.stack([_trilinear(f, self.shape, vox)[0] for f in self.flats[1:]])
        return values, grads, inside


def _robust_weights(res: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Geman-McClure IRLS weights ``1 / (1 + z^2)^2`` of every point, 0 outside the FOV.

    ``z = r / (3 s)`` with ``s`` the robust standard deviation (1.4826 x the median absolute
    deviation) of the residuals inside the field of view.
    """
    res_in = res[inside]
    scale = 1.4826 * float(np.median(np.abs(res_in - np.median(res_in)))) + 1e-12
    z2 = (res / (_ROBUST_C * scale)) ** 2
    return np.where(inside, 1.0 / (1.0 + z2) ** 2, 0.0)


def _normalised_cost(res: np.ndarray, values: np.ndarray, weights: np.ndarray) -> float:
    """Weighted residual variance over the weighted variance of the boldref's values.

    ``1 - R^2`` of the tissue model: the correlation ratio's complement (Roche et al.
    1998) with the template's tissue classes as the partition. Dividing by the image
    variance at the sample points stops the fit from shrinking the template into a flat
    part of the image, where any model leaves small residuals.
    """
    w = weights / weights.sum()
    v = values.astype(np.float64)
    var = float(w @ (v - w @ v) ** 2)
    return float(w @ res**2) / (var + 1e-30)


def _fit_intensities(basis: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Least-squares tissue coefficients of the intensity model (normal equations).

    A tissue absent from the points (e.g. no CSF in view) gives a zero column: a tiny
    ridge keeps the system solvable and its coefficient near 0.
    """
    gram = basis.T @ basis
    gram[np.diag_indices_from(gram)] += 1e-9 * (np.trace(gram) / len(gram) + 1e-30)
    return np.linalg.solve(gram, basis.T @ values)


def _to_params(matrix: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """12 parameters: 100 x the 3x3 linear part (row-major) and the image of the centre."""
    return np.concatenate([_SCALE_MM * matrix[:3, :3].ravel(),
                           matrix[:3, :3] @ centre + matrix[:3, 3]])


def _to_matrix(params: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_to_params`: y = L (x - c) + t_c."""
    matrix = np.eye(4)
    matrix[:3, :3] = params[:9].reshape(3, 3) / _SCALE_MM
    matrix[:3, 3] = params[9:] - matrix[:3, :3] @ centre
    return matrix


def _evaluate(level: _TemplateLevel, image: _ImageLevel, matrix, coeffs, gradient=True):
    """Residuals, gradients and the inside mask of the current map at a level's points."""
    world = matrix[:3, :3] @ level.points + matrix[:3, 3:4]
    values, grads, inside = image.sample(world, with_gradient=gradient)
    res = values.astype(np.float64) - level.basis @ coeffs
    return res, grads, inside, values


def _gauss_newton(level: _TemplateLevel, image: _ImageLevel, matrix: np.ndarray,
                  centre: np.ndarray, spec: _LevelSpec) -> tuple[np.ndarray, np.ndarray, int]:
    """Levenberg-Marquardt-damped Gauss-Newton with robust reweighting at one level.

    Minimises :func:`_normalised_cost`. Returns the matrix, the intensity coefficients and
    the number of iterations. A step that does not lower the cost (at fixed weights) is
    rejected and re-solved with ten times the damping; an accepted one lowers the damping
    tenfold, and the weights are recomputed from the new residuals.
    """
    params = _to_params(matrix, centre)
    _, _, inside, values = _evaluate(level, image, matrix, np.zeros(level.basis.shape[1]))
    coeffs = _fit_intensities(level.basis[inside], values[inside].astype(np.float64))
    state = _evaluate(level, image, matrix, coeffs)
    weights = _robust_weights(state[0], state[2])
    cost = _normalised_cost(state[0], state[3], weights)
    lam, n_iter, system = 0.0, 0, None
    for n_iter in range(1, spec.max_iter + 1):
        if system is None:
            system = _normal_equations(level, state, weights)
        hessian, gradient = system
        damped = hessian + lam * np.diag(np.diag(hessian)) if lam else hessian
        try:
            step = -np.linalg.solve(damped, gradient)
        except np.linalg.LinAlgError:
            break
        trial = params + step[:12], coeffs + step[12:]
        trial_state = _evaluate(level, image, _to_matrix(trial[0], centre), trial[1])
        trial_weights = np.where(trial_state[2], weights, 0.0)
        if not trial_weights.sum() > 0 or \
                _normalised_cost(trial_state[0], trial_state[3], trial_weights) >= cost:
            lam = max(10.0 * lam, 1e-4)
            if lam > 1e4:
                break
            continue
        params, coeffs, state = trial[0], trial[1], trial_state
        weights = _robust_weights(state[0], state[2])
        cost = _normalised_cost(state[0], state[3], weights)
        lam *= 0.1
        system = None
        moved = np.linalg.norm(step[9:12]) + 0.8 * np.linalg.norm(step[:9])
        if moved < spec.tol_mm:
            break
    return _to_matrix(params, centre), coeffs, n_iter


def _normal_equations(level: _TemplateLevel, state, weights):
    """Gauss-Newton system ``J^T W J``, ``J^T W r`` of the normalised residuals ``r / s``.

    ``s^2`` is the weighted variance of the boldref's values at the inside points; it
    depends on the geometry, so the Jacobian of ``r / s`` gains a rank-one term:
    ``d(r/s)/dp = (dr/dp) / s - r / s^3 * sum_j w_j (I_j - mean I) dI_j/dp``.
    """
    res, grads, inside, values = state
    w = weights[inside] / weights[inside].sum()
    v = values[inside].astype(np.float64)
    dv = v - w @ v
    s = np.sqrt(w @ dv**2) + 1e-30
    g = grads[:, inside].astype(np.float64)  # (3, n)
    u = level.u[:, inside]
    r = res[inside] / s
    # the Jacobian transposed, (12 + n_coeffs, n), C-contiguous so that BLAS does J^T W J:
    # dy_i/dL_ij = u_j, dy_i/dt_i = 1  ->  dI/dp = g_i u_j, g_i;  d(-m)/da = -basis
    jt = np.empty((12 + level.basis.shape[1], r.size))
    jt[:9] = (g[:, None, :] * u[None, :, :]).reshape(9, -1)
    jt[9:12] = g
    dvar = jt[:12] @ (w * dv)  # half the derivative of s^2
    jt[:12] /= s
    jt[:12] -= np.outer(dvar, r / s)
    jt[12:] = -level.basis_t[:, inside] / s
    jw = jt * w
    return jw @ jt.T, jw @ r


def _check_boldref(boldref: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Validate the boldref and return it as float32 (non-finite -> 0), scaled to ~1."""
    image = np.array(boldref, dtype=np.float32)  # a copy: the input is never modified
    if image.ndim != 3:
        raise InputError(f"the reference volume has shape {image.shape}; a 3D volume is "
                         "needed.", cause="A 4D run or a slice was passed as the boldref.",
                         action="Pass one 3D volume of the run (e.g. the motion reference).")
    image[~np.isfinite(image)] = 0
    if min(image.shape) < 4 or not np.ptp(image) > 0:
        raise InputError("the reference volume is constant or too small to normalise "
                         f"(shape {image.shape}, range {np.ptp(image):g}).",
                         cause="The run holds no image (all values equal, e.g. all zero).",
                         action="Check the run in a viewer and upload the original BOLD run.")
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    fov_ml = voxel_ml * image.size
    if fov_ml < MIN_FOV_ML:
        raise InputError(f"the reference volume's field of view is {fov_ml:.0f} ml; at least "
                         f"{MIN_FOV_ML:.0f} ml of brain is needed to place it in MNI space.",
                         cause="The run covers a small slab or region, not the brain.",
                         action="Normalise whole-brain (or near whole-brain) EPI runs only; "
                                "turn normalisation off for this run.")
    top = np.percentile(image, 98)
    if not top > 0:
        raise InputError("the reference volume is almost entirely zero or negative.",
                         cause="The run holds no magnitude image.",
                         action="Upload the original (magnitude) BOLD run.")
    return image / np.float32(top)


def template_coverage(matrix: np.ndarray, affine: np.ndarray, shape, *,
                      template: Template | None = None) -> float:
    """Fraction of the template brain that ``matrix`` maps inside a volume's field of view.

    Parameters
    ----------
    matrix : (4, 4) array
        Template mm -> world mm of the volume.
    affine : (4, 4) array
        The volume's voxel-to-world affine.
    shape : sequence of int
        The volume's shape (first three entries).
    template : Template, optional
        Default: :func:`load_template`.
    """
    template = template or load_template()
    ijk = np.array(np.nonzero(template.brain[::2, ::2, ::2]), dtype=np.float64) * 2
    world = _world(np.asarray(matrix) @ template.affine, ijk)
    vox = np.linalg.inv(affine)[:3, :3] @ world + np.linalg.inv(affine)[:3, 3:4]
    n = np.asarray(shape[:3], dtype=np.float64)[:, None]
    return float(np.mean(np.all((vox > -0.5) & (vox < n - 0.5), axis=0)))


def _translation(shift) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = shift
    return matrix


def _check_coverage(matrix, affine, shape, template, verb: str) -> float:
    """:func:`template_coverage`, or an InputError below :data:`MIN_COVERAGE`."""
    coverage = template_coverage(matrix, affine, shape, template=template)
    if coverage < MIN_COVERAGE:
        raise InputError(f"the reference volume's field of view {verb} {coverage:.0%} of the "
                         f"MNI brain (at least {MIN_COVERAGE:.0%} is needed).",
                         cause="The run covers a small part of the brain (a thin slab?), or "
                               "it is not a brain EPI, or its header's orientation is wrong.",
                         action="Normalise whole-brain EPI runs only, or check the header's "
                                "orientation in a viewer.")
    return coverage


def _initial_translation(image, affine, template) -> np.ndarray:
    """Translation aligning the boldref's head centroid with the covered template brain's."""
    head = image > 0.2  # the image is scaled so that its 98th percentile is 1
    c_epi = _world(affine, np.array(np.nonzero(head), dtype=np.float64)).mean(axis=1)
    pts = _world(template.affine,
                 np.array(np.nonzero(template.brain[::2, ::2, ::2]), dtype=np.float64) * 2)
    inv = np.linalg.inv(affine)
    n = np.asarray(image.shape, dtype=np.float64)[:, None]
    shift = c_epi - pts.mean(axis=1)
    for _ in range(10):  # fixed point: centroid of the part of the brain inside the FOV
        vox = inv[:3, :3] @ (pts + shift[:, None]) + inv[:3, 3:4]
        inside = np.all((vox > -0.5) & (vox < n - 0.5), axis=0)
        if inside.mean() < 0.05:
            break
        new = c_epi - pts[:, inside].mean(axis=1)
        if np.linalg.norm(new - shift) < 0.1:
            shift = new
            break
        shift = new
    return shift


def _fit_r2(level: _TemplateLevel, image: _ImageLevel, matrix: np.ndarray) -> float:
    """Variance of the boldref left unexplained by the tissue model's linear fit under ``matrix``
    (1 - R^2 at the level's points inside the field of view; 1 if fewer than half are)."""
    world = matrix[:3, :3] @ level.points + matrix[:3, 3:4]
    values, _, inside = image.sample(world, with_gradient=False)
    if inside.mean() < 0.5:
        return 1.0
    basis = level.basis[inside]
    v = values[inside].astype(np.float64)
    res = v - basis @ _fit_intensities(basis, v)
    return float(np.mean(res**2) / (np.var(v) + 1e-30))


def _candidate_starts(level, image, shift, centre, n_best: int) -> list[np.ndarray]:
    """The ``n_best`` best starts of a grid over isotropic scale (0.9-1.1), pitch (+-30 deg)
    and shifts along y (+-12 mm) and z (+-24 mm) about the centroid alignment, by
    :func:`_fit_r2`."""
    scored = []
    for scale in (0.9, 1.0, 1.1):
        for pitch in np.deg2rad([-30, -20, -10, 0, 10, 20, 30]):
            lin = scale * _rotation(pitch, 0.0, 0.0)
            for dy in (-12, 0, 12):
                for dz in (-24, -12, 0, 12, 24):
                    matrix = np.eye(4)
                    matrix[:3, :3] = lin
                    # about the template brain's centre, then shifted
                    matrix[:3, 3] = centre + shift + [0, dy, dz] - lin @ centre
                    scored.append((_fit_r2(level, image, matrix), len(scored), matrix))
    scored.sort(key=lambda item: item[:2])
    return [matrix for _, _, matrix in scored[:n_best]]


def estimate_normalization(boldref: np.ndarray, affine: np.ndarray, *,
                           template: Template | None = None) -> Normalization:
    """Estimate the affine map from the MNI template to a run's reference volume.

    Parameters
    ----------
    boldref : (X, Y, Z) array
        One EPI volume in native space (e.g. the motion reference volume). Not modified.
    affine : (4, 4) array
        Its NIfTI voxel-to-world affine (mm); any orientation, obliquity or origin.
    template : Template, optional
        Default: :func:`load_template` (MNI152NLin2009aSym, 2 mm).

    Returns
    -------
    Normalization
        ``matrix`` maps template points (MNI mm) to boldref world points (mm); also the
        coverage of the template brain by the boldref's field of view and the fit's
        correlation.

    Raises
    ------
    InputError
        A constant or non-3D volume; a field of view far smaller than a brain or holding
        under 30 % of the template brain; an implausible fit (module docstring, "Refusals").

    Notes
    -----
    12 parameters; the cost is ``1 - R^2`` of a tissue-mixture model of the EPI's
    intensities (a correlation ratio with soft tissue classes), robustly weighted;
    Gauss-Newton with Levenberg-Marquardt damping, coarse to fine (12, 8, 5 mm FWHM).
    About 1 s (CPU) for a 64 x 64 x 32 boldref on one core, 0.16x the time of
    :func:`fmri_preproc.estimate_motion` on a 150-volume run; 0.31 mm mean, 0.43 mm worst
    error on 10 simulated heads; Dice 0.94 on a real run (``bench/RESULTS_normalization.md``).

    References
    ----------
    .. [1] Friston KJ et al. (1995). Spatial registration and normalization of images.
       Hum Brain Mapp 3:165-189. :doi:`10.1002/hbm.460030303`
    .. [2] Roche A et al. (1998). The correlation ratio as a new similarity measure for
       multimodal image registration. MICCAI, LNCS 1496:1115-1124.
       :doi:`10.1007/BFb0056301`
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or \
            abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError("the reference volume's affine is not a usable 4x4 matrix.",
                         cause="The header's qform/sform is missing or corrupt.",
                         action="Fix the header's orientation (e.g. re-convert with dcm2niix).")
    image = _check_boldref(boldref, affine)
    template = template or load_template()
    region = _dilate(template.brain, int(round(DILATE_MM / 2.0)))
    centre = _world(template.affine, np.argwhere(template.brain).mean(axis=0)[:, None])[:, 0]
    shift = _initial_translation(image, affine, template)
    _check_coverage(_translation(shift), affine, image.shape, template, "can hold only")
    levels = [_TemplateLevel(template, spec, region, centre) for spec in LEVELS]
    images = [_ImageLevel(image, affine, spec.fwhm_mm) for spec in LEVELS]
    matrix, coeffs, start, n_iter = _coarse_to_fine(levels, images, shift, centre)
    coverage = _check_coverage(matrix, affine, image.shape, template, "holds only")
    correlation = _check_fit(matrix, coeffs, levels[-1], images[-1])
    return Normalization(matrix, coverage, correlation, start, n_iter)


def _coarse_to_fine(levels, images, shift, centre):
    """Multi-start at the coarsest level; the best fit goes on through the finer levels.

    Returns the matrix, the final intensity coefficients, the start and the iterations.
    """
    fits = []
    for start in _candidate_starts(levels[0], images[0], shift, centre, N_STARTS):
        matrix, coeffs, n_iter = _gauss_newton(levels[0], images[0], start, centre, LEVELS[0])
        fits.append((_fit_r2(levels[0], images[0], matrix), len(fits), matrix, start, n_iter))
    _, _, matrix, start, total = min(fits, key=lambda item: item[:2])
    for level, image, spec in zip(levels[1:], images[1:], LEVELS[1:]):
        matrix, coeffs, n_iter = _gauss_newton(level, image, matrix, centre, spec)
        total += n_iter
    return matrix, coeffs, start, total


def _check_fit(matrix, coeffs, level, image) -> float:
    """The fit's weighted correlation with the boldref, or an InputError if implausible."""
    zooms = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    if zooms.min() < ZOOM_RANGE[0] or zooms.max() > ZOOM_RANGE[1]:
        raise InputError("normalisation gave an implausible head size (the map scales the "
                         f"MNI brain by {zooms.min():.2f}-{zooms.max():.2f}).",
                         cause="The reference volume is not a brain EPI, covers too little of "
                               "the brain, or its header's voxel sizes are wrong.",
                         action="Check the run and its voxel sizes in a viewer; normalise "
                                "whole-brain EPI runs only.")
    res, _, inside, values = _evaluate(level, image, matrix, coeffs, gradient=False)
    weights = _robust_weights(res, inside)[inside]
    model = values[inside] - res[inside]
    correlation = _weighted_correlation(values[inside], model, weights)
    if correlation < MIN_CORRELATION:
        raise InputError("the reference volume does not look like a brain EPI: the MNI "
                         f"template's tissues explain little of it (correlation "
                         f"{correlation:.2f}, below {MIN_CORRELATION}).",
                         cause="The volume holds noise or no head, or its header's "
                               "orientation or voxel sizes are wrong.",
                         action="Check the run in a viewer; normalise brain EPI runs only.")
    return correlation


def _weighted_correlation(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> float:
    """Pearson correlation of a and b with weights w."""
    w = w / w.sum()
    da, db = a - w @ a, b - w @ b
    return float((w @ (da * db)) / np.sqrt((w @ da**2) * (w @ db**2) + 1e-30))


# ------------------------------------------------------------------------------------------
# Resampling into the template grid


def _full_grid(template: Template, cropped: np.ndarray) -> np.ndarray:
    """A cropped-grid array placed into the full 2 mm grid (zeros elsewhere)."""
    full = np.zeros(template.grid_shape, dtype=cropped.dtype, order="F")
    full[template.crop] = cropped
    return full


class TemplateResampler:
    """Resample a run's native-space volumes into the template's 2 mm grid.

    Only voxels of the template brain mask dilated by ``dilate_mm`` are computed (the rest
    of the grid is 0), which keeps a 150-volume run to a few seconds.

    Parameters
    ----------
    affine : (4, 4) array
        The run's voxel-to-world affine (mm).
    matrix : (4, 4) array
        Normalisation: template mm -> boldref world mm (:attr:`Normalization.matrix`).
    template : Template, optional
        Default: :func:`load_template`.
    dilate_mm : float, optional
        Margin around the template brain mask that is resampled (8 mm).

    Attributes
    ----------
    shape : tuple of 3 int
        The output grid, nilearn's 2 mm MNI grid (99 x 117 x 95).
    affine : (4, 4) ndarray
        Its voxel-to-MNI-mm affine.

    Notes
    -----
    Cost (``bench/RESULTS_normalization.md``): about 5-6 s of CPU for 150 volumes (311,000
    voxels each, about the time of motion estimation), one output volume (4.4 MB) at a time.
    Volume ``t`` with motion matrix ``M_t`` (reference point -> moving point, as from
    :func:`fmri_preproc.estimate_motion`) is sampled at ``A^-1 M_t N x`` for template
    point ``x``: motion and normalisation are composed, so each volume is interpolated
    once (trilinear, like :func:`fmri_preproc.reslice_volume`); points outside the run's
    field of view are 0.
    """

    def __init__(self, affine: np.ndarray, matrix: np.ndarray, *,
                 template: Template | None = None, dilate_mm: float = DILATE_MM):
        template = template or load_template()
        self.shape = tuple(template.grid_shape)
        self.affine = np.array(template.grid_affine, dtype=np.float64)
        self._run_affine = np.asarray(affine, dtype=np.float64)
        self._matrix = np.asarray(matrix, dtype=np.float64)
        if self._run_affine.shape != (4, 4) or self._matrix.shape != (4, 4):
            raise ValueError("affine and matrix must be 4x4")
        region = _full_grid(template, _dilate(template.brain, int(round(dilate_mm / 2.0))))
        self._index = np.flatnonzero(region.ravel(order="F"))  # Fortran-order voxel index
        self._voxels = np.array(np.unravel_index(self._index, self.shape, order="F"),
                                dtype=np.float32)
        self.brain = _full_grid(template, template.brain)
        self.wm = _full_grid(template, template.wm)

    def _coords(self, motion) -> np.ndarray:
        """Voxel coordinates in the run of the template voxels, for one motion matrix."""
        motion = np.eye(4) if motion is None else np.asarray(motion, dtype=np.float64)
        vox = np.linalg.inv(self._run_affine) @ motion @ self._matrix @ self.affine
        return _apply(vox, self._voxels)

    def _place(self, values: np.ndarray, dtype) -> np.ndarray:
        out = np.zeros(self.shape, dtype=dtype, order="F")
        out.reshape(-1, order="F")[self._index] = values  # a view: F-ordered
        return out

    def volume(self, volume: np.ndarray, motion: np.ndarray | None = None) -> np.ndarray:
        """One native volume in the template grid.

        Parameters
        ----------
        volume : (X, Y, Z) array
            A volume of the run (raw, not motion-corrected).
        motion : (4, 4) array, optional
            Its motion matrix (reference -> this volume); identity for the boldref.

        Returns
        -------
        (99, 117, 95) ndarray of float32
            Trilinear; 0 outside the dilated brain mask and outside the field of view.
        """
        volume = np.asarray(volume)
        if volume.ndim != 3 or min(volume.shape) < 2:
            raise ValueError("volume must be 3D with at least 2 voxels per axis")
        flat = np.asarray(volume, dtype=np.float32).ravel(order="F")
        values, inside = _trilinear(flat, volume.shape, self._coords(motion))
        values[~inside] = 0
        return self._place(values, np.float32)

    def series(self, data: np.ndarray, motion: np.ndarray):
        """Each volume of a 4D run in the template grid, one at a time (a generator).

        Parameters
        ----------
        data : (X, Y, Z, T) array
            The run as read (not motion-corrected).
        motion : (T, 4, 4) array
            Motion matrices from :func:`fmri_preproc.estimate_motion`.

        Yields
        ------
        (99, 117, 95) ndarray of float32
            Volume ``t`` (memory: one output volume at a time, 4.4 MB).
        """
        if data.ndim != 4 or len(motion) != data.shape[3]:
            raise ValueError("data must be 4D with one motion matrix per volume")
        for t in range(data.shape[3]):
            yield self.volume(data[..., t], motion[t])

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A native-space mask of the boldref in the template grid.

        Trilinear interpolation of the 0/1 mask, thresholded at 0.5 (the smooth version of
        nearest-neighbour: the edge follows the interpolated boundary).

        Returns
        -------
        (99, 117, 95) ndarray of uint8
            1 inside, 0 outside (and outside the dilated template brain mask).
        """
        mask = np.asarray(mask)
        if mask.ndim != 3:
            raise ValueError("mask must be 3D")
        flat = (mask > 0).astype(np.float32).ravel(order="F")
        values, inside = _trilinear(flat, mask.shape, self._coords(None))
        return self._place(((values >= 0.5) & inside).astype(np.uint8), np.uint8)


# ------------------------------------------------------------------------------------------
# ITK transform files

_ITK_HEADER = "#Insight Transform File V1.0"
_ITK_TYPES = ("AffineTransform_double_3_3", "AffineTransform_float_3_3",
              "MatrixOffsetTransformBase_double_3_3", "MatrixOffsetTransformBase_float_3_3")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def format_itk_affine(matrix: np.ndarray) -> str:
    """The text of an ITK transform file holding the normalisation ``matrix``.

    Parameters
    ----------
    matrix : (4, 4) array
        Template point (MNI mm, RAS+) -> boldref world point (mm, RAS+).

    Returns
    -------
    text : str
        ``#Insight Transform File V1.0`` with one ``AffineTransform_double_3_3``: in LPS
        coordinates (ITK's, DICOM's), ``y = A x + T``, ``Parameters`` = ``A`` row by row then
        ``T``, ``FixedParameters`` = the centre, here 0 0 0. Like every ITK transform (and
        ANTs' and fMRIPrep's ``_xfm`` files) it maps points of the fixed image (template)
        to points of the moving image (boldref): the map used to resample the boldref into
        template space. Numbers have 17 significant digits (exact float64 round trip).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) or \
            not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise ValueError("matrix must be a finite 4x4 affine with last row 0 0 0 1")
    lps = _RAS_TO_LPS @ matrix @ _RAS_TO_LPS  # the flip is its own inverse
    numbers = [*lps[:3, :3].ravel(), *lps[:3, 3]]
    return "\n".join([
        _ITK_HEADER,
        "#Transform 0",
        "Transform: AffineTransform_double_3_3",
        "Parameters: " + " ".join(f"{v:.17g}" for v in numbers),
        "FixedParameters: 0 0 0",
        "",
    ])


def parse_itk_affine(text: str) -> np.ndarray:
    """The RAS+ matrix of an ITK text transform file (inverse of :func:`format_itk_affine`).

    Accepts one ``AffineTransform`` or ``MatrixOffsetTransformBase`` (double or float, 3-D)
    with any centre: ``y = A (x - c) + c + T`` in LPS.

    Returns
    -------
    matrix : (4, 4) ndarray
        Fixed (template) point -> moving (boldref) point, RAS+ mm.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != _ITK_HEADER:
        raise ValueError(f"not an ITK text transform file (first line is not {_ITK_HEADER!r})")
    fields = {}
    for line in lines[1:]:
        if line.startswith("#"):
            continue
        key, _, value = line.partition(":")
        if key in fields:
            raise ValueError("the file holds more than one transform; one affine is expected")
        fields[key] = value.strip()
    kind = fields.get("Transform")
    if kind not in _ITK_TYPES:
        raise ValueError(f"transform type {kind!r} is not a 3-D affine ({', '.join(_ITK_TYPES)})")
    params = np.array(fields.get("Parameters", "").split(), dtype=np.float64)
    centre = np.array(fields.get("FixedParameters", "0 0 0").split(), dtype=np.float64)
    if params.shape != (12,) or centre.shape != (3,):
        raise ValueError("an affine needs 12 Parameters and 3 FixedParameters")
    lin, trans = params[:9].reshape(3, 3), params[9:]
    lps = np.eye(4)
    lps[:3, :3] = lin
    lps[:3, 3] = trans + centre - lin @ centre
    return _RAS_TO_LPS @ lps @ _RAS_TO_LPS


def write_itk_affine(path, matrix: np.ndarray) -> Path:
    """Write :func:`format_itk_affine` of ``matrix`` to ``path`` (plain write: the pipeline
    writes outputs under a temporary name and renames them when all are complete)."""
    path = Path(path)
    path.write_text(format_itk_affine(matrix), encoding="ascii")
    return path


def read_itk_affine(path) -> np.ndarray:
    """:func:`parse_itk_affine` of a file."""
    return parse_itk_affine(Path(path).read_text(encoding="ascii"))


# ------------------------------------------------------------------------------------------
# The QC figure

_BRAIN_EDGE = (255, 70, 50)   # red: the template's brain outline
_WM_EDGE = (60, 170, 255)     # blue: its white-matter boundary (probability 0.5)


def _upsample(image: np.ndarray, zoom: int) -> np.ndarray:
    """Bilinear upsampling of a 2D array by an integer factor (pixel centres aligned)."""
    out = np.asarray(image, dtype=np.float32)
    for axis in range(2):
        n = out.shape[axis]
        x = np.clip((np.arange(n * zoom) + 0.5) / zoom - 0.5, 0, n - 1)
        lo = np.minimum(x.astype(np.intp), max(n - 2, 0))
        frac = (x - lo).astype(np.float32)
        hi = np.minimum(lo + 1, n - 1)
        a, b = np.take(out, lo, axis=axis), np.take(out, hi, axis=axis)
        shape = [1, 1]
        shape[axis] = -1
        out = a + frac.reshape(shape) * (b - a)
    return out


def _edges(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask with a 4-neighbour outside it: a one-pixel outline."""
    padded = np.pad(mask, 1, mode="edge")
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def _panel(image2d, brain2d, wm2d, window, zoom: int) -> np.ndarray:
    """One slice as RGB, superior / anterior up, with the template's edges drawn on it."""
    # array axes (a, b) -> picture: b runs upwards (rows reversed), a to the right
    low, high = window
    grey = _upsample(image2d.T[::-1], zoom)
    grey = np.clip((grey - low) / (high - low + 1e-12) * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[_edges(_upsample(wm2d.T[::-1], zoom) >= 0.5)] = _WM_EDGE
    rgb[_edges(_upsample(brain2d.T[::-1], zoom) >= 0.5)] = _BRAIN_EDGE
    return rgb


def normalization_figure(image: np.ndarray, *, template: Template | None = None,
                         n_slices: int = 5, zoom: int = 3) -> np.ndarray:
    """Template edges over a normalised image in three orthogonal views (RGB picture).

    Parameters
    ----------
    image : (99, 117, 95) array
        An image in the template grid, e.g. the normalised mean EPI
        (:meth:`TemplateResampler.volume`).
    template : Template, optional
        Default: :func:`load_template`.
    n_slices : int, optional
        Slices per view, evenly spread over the brain (5).
    zoom : int, optional
        Upsampling of the 2 mm voxels (3: one voxel = 3 x 3 pixels).

    Returns
    -------
    picture : (H, W, 3) ndarray of uint8
        Rows of sagittal, coronal and axial slices (superior or anterior up; the
        subject's right on the right, as nilearn and fMRIPrep show them), the template's
        brain outline in red and white-matter boundary in blue, as in fMRIPrep's
        normalisation report. Write it with :func:`fmri_preproc.png.write_png`.
    """
    template = template or load_template()
    image = np.asarray(image, dtype=np.float32)
    if image.shape != tuple(template.grid_shape):
        raise ValueError(f"image must be in the template grid {template.grid_shape}")
    if n_slices < 1 or zoom < 1:
        raise ValueError("n_slices and zoom must be at least 1")
    crop = image[template.crop]
    brain = template.brain.astype(np.float32)
    inside = crop[template.brain]
    window = tuple(np.percentile(inside, [1, 99.5])) if inside.size else (0.0, 1.0)
    extent = np.argwhere(template.brain)
    lo, hi = extent.min(axis=0), extent.max(axis=0)
    gap = 2 * zoom
    rows = []
    for axis in range(3):
        panels = []
        for f in np.linspace(0.15, 0.85, n_slices):
            index = int(round(lo[axis] + f * (hi[axis] - lo[axis])))
            take = [slice(None)] * 3
            take[axis] = index
            take = tuple(take)
            panels.append(_panel(crop[take], brain[take], template.wm[take], window, zoom))
        height = panels[0].shape[0]
        spacer = np.zeros((height, gap, 3), dtype=np.uint8)
        rows.append(np.concatenate([p for panel in panels for p in (panel, spacer)][:-1],
                                   axis=1))
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, gap), (0, width - row.shape[1]), (0, 0))) for row in rows]
    return np.concatenate(rows, axis=0)[:-gap]


# ------------------------------------------------------------------------------------------
# The pipeline's MNI outputs

#: Output kinds (keys of ``contract.OUTPUTS``) written when normalisation succeeds, in the
#: order they are made visible (the series' sidecar last).
MNI_KINDS = ("mni_preproc_bold", "mni_brain_mask", "mni_brain_mask_json", "xfm_to_mni",
             "normalization_figure", "mni_preproc_json")
#: What the template grid's res-2 means (BIDS asks every res- image's sidecar for it).
RESOLUTION = "2 mm isotropic, nilearn's MNI152 grid (99 x 117 x 95)"
PARTIAL_COVERAGE = 0.9  # below this, the MNI outputs are written with a warning
_NIFTI_MNI_CODE = 4     # NIfTI xform code "MNI_152"


class _FixedTrilinear:
    """Trilinear sampling of many volumes at the same points: indices and weights once.

    After motion correction every volume of a run shares the boldref's grid, so the
    template-to-run map is the same for all of them; computing it once makes each volume
    eight gathers and seven interpolations.
    """

    def __init__(self, shape, coords: np.ndarray):
        nx, ny, nz = shape
        x, y, z = coords
        self.inside = ((x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5)
                       & (z > -0.5) & (z < nz - 0.5))
        x, y, z = (np.clip(c[self.inside], 0, n - 1) for c, n in zip(coords, shape))
        lo = [np.minimum(c.astype(np.int32), n - 2) for c, n in zip((x, y, z), shape)]
        self.frac = [(c - i).astype(np.float32) for c, i in zip((x, y, z), lo)]
        self.base = lo[0] + nx * (lo[1] + ny * lo[2])
        self.steps = (1, nx, nx * ny)

    def __call__(self, flat: np.ndarray) -> np.ndarray:
        fx, fy, fz = self.frac
        sx, sy, sz = self.steps
        corner = [flat[self.base + dy + dz] for dz in (0, sz) for dy in (0, sy)]
        edge = [c + fx * (flat[self.base + off + sx] - c)
                for c, off in zip(corner, (0, sy, sz, sz + sy))]
        face = [edge[0] + fy * (edge[1] - edge[0]), edge[2] + fy * (edge[3] - edge[2])]
        return face[0] + fz * (face[1] - face[0])


#: A field of view smaller than this (ml) cannot hold a brain (an adult's is about 1,200 ml;
#: a slab of a third of it is still normalised): such runs (test phantoms, a single slice
#: stack of a phantom) are not normalised, which is noted, not warned about.
MIN_BRAIN_FOV_ML = 400.0


def normalize_or_warn(boldref: np.ndarray, affine: np.ndarray,
                      summary: dict) -> Normalization | None:
    """:func:`estimate_normalization`, a refusal turned into a warning of the run.

    Parameters
    ----------
    boldref : (X, Y, Z) array
        The run's reference volume.
    affine : (4, 4) array
        Its voxel-to-world affine (mm).
    summary : dict
        The run's summary: a warning string is appended to ``summary["warnings"]`` (created
        if missing) when normalisation fails or the field of view covers under
        :data:`PARTIAL_COVERAGE` of the template brain.

    Returns
    -------
    Normalization or None
        None when normalisation failed, or was not attempted because the field of view is
        under :data:`MIN_BRAIN_FOV_ML` (``summary["normalization"]`` says so, no warning):
        the run is still processed, native outputs only.
    """
    warnings = summary.setdefault("warnings", [])
    fov_ml = abs(np.linalg.det(np.asarray(affine)[:3, :3])) * np.prod(boldref.shape) / 1000
    if fov_ml < MIN_BRAIN_FOV_ML:
        summary["normalization"] = (f"not attempted: the field of view ({fov_ml:.0f} ml) "
                                    f"is under {MIN_BRAIN_FOV_ML:.0f} ml, too small for a "
                                    "brain")
        return None
    try:
        fit = estimate_normalization(boldref, affine)
    except InputError as exc:
        warnings.append(f"Normalisation to {TEMPLATE} failed, so only native-space outputs "
                        f"were written: {exc}")
        return None
    if fit.coverage < PARTIAL_COVERAGE:
        warnings.append(f"The field of view holds {100 * fit.coverage:.0f} % of the "
                        f"{TEMPLATE} brain: the MNI outputs are 0 outside it (regions "
                        "there have no signal).")
    return fit


def _mni_header(resampler: TemplateResampler, dtype, n_volumes: int | None, tr_s: float):
    """A NIfTI-1 header on the template's 2 mm grid (sform/qform code MNI_152)."""
    shape = resampler.shape if n_volumes is None else (*resampler.shape, n_volumes)
    img = nib.Nifti1Image(np.broadcast_to(np.zeros((), dtype), shape), resampler.affine)
    header = img.header
    header.set_data_dtype(dtype)
    header.set_qform(resampler.affine, code=_NIFTI_MNI_CODE)
    header.set_sform(resampler.affine, code=_NIFTI_MNI_CODE)
    header.set_xyzt_units("mm", "sec")
    if n_volumes is not None:
        header.set_zooms((*header.get_zooms()[:3], float(tr_s)))
    header.set_slope_inter(1.0, 0.0)
    header["descrip"] = f"fmri_preproc: {TEMPLATE} 2 mm"[:79].encode()
    return header


def write_mni_outputs(paths: dict, fit: Normalization, volumes, mask: np.ndarray,
                      affine: np.ndarray, *, tr: tuple, sources: list, mask_sources: list,
                      write_nifti) -> None:
    """Write the run in template space: series, mask, transform, QC figure, sidecar.

    Parameters
    ----------
    paths : dict
        Output kind -> path for every kind of :data:`MNI_KINDS` (the pipeline's hidden
        temporary names: it makes them visible with the other outputs).
    fit : Normalization
        From :func:`normalize_or_warn`.
    volumes : (X, Y, Z, T) array-like
        The motion-corrected run on the boldref's grid (the pipeline's scratch file), read
        one volume at a time.
    mask : (X, Y, Z) array
        The native brain mask.
    affine : (4, 4) array
        The boldref's voxel-to-world affine (mm).
    tr : (float, dict)
        Repetition time in seconds and its provenance.
    sources, mask_sources : list of str
        File names the series and the mask derive from (their sidecars' ``Sources``).
    write_nifti : callable
        ``write_nifti(path, header, volumes, strategy)``: the pipeline's streaming gzip
        writer; called with ``zlib.Z_RLE`` (three quarters of the grid is 0).

    Notes
    -----
    Each volume is resampled from the motion-corrected series, i.e. a second trilinear
    interpolation after reslicing. That costs a little smoothing (below the usual 6 mm
    kernel's) but makes the map the same for every volume, so indices and weights are
    computed once (:class:`_FixedTrilinear`). Memory: one 99 x 117 x 95 volume (4.4 MB)
    and the sampling weights (about 5 MB), whatever the run's length.
    """
    resampler = TemplateResampler(affine, fit.matrix)
    native_shape = tuple(volumes.shape[:3])
    sampler = _FixedTrilinear(native_shape, resampler._coords(None))
    index = resampler._index[sampler.inside]
    n_volumes = volumes.shape[3]
    mean = np.zeros(resampler.shape, dtype=np.float64, order="F")

    def stream():
        for t in range(n_volumes):
            out = np.zeros(resampler.shape, dtype=np.float32, order="F")
            out.reshape(-1, order="F")[index] = sampler(
                np.asarray(volumes[..., t], dtype=np.float32).ravel(order="F"))
            np.add(mean, out, out=mean)  # for the QC figure: the mean EPI
            yield out

    write_nifti(paths["mni_preproc_bold"],
                _mni_header(resampler, np.float32, n_volumes, tr[0]), stream(), zlib.Z_RLE)
    write_nifti(paths["mni_brain_mask"], _mni_header(resampler, np.uint8, None, tr[0]),
                [resampler.mask(mask)], zlib.Z_RLE)
    write_itk_affine(paths["xfm_to_mni"], fit.matrix)
    png.write_png(paths["normalization_figure"], normalization_figure(mean / max(n_volumes, 1)))
    sidecar = {
        Sidecar.REPETITION_TIME: tr[0],
        Sidecar.REPETITION_TIME_SOURCE: tr[1],
        Sidecar.SKULL_STRIPPED: False,
        Sidecar.SOURCES: list(sources),
        "SpatialReference": TEMPLATE,
        "Resolution": RESOLUTION,
        "Normalization": fit.to_dict(),
        "Resampling": "trilinear from the motion-corrected series; 0 outside the field of "
                      "view and beyond 8 mm of the template brain",
    }
    Path(paths["mni_preproc_json"]).write_text(json.dumps(sidecar, indent=2) + "\n",
                                               encoding="utf-8")
    mask_sidecar = {"Type": "Brain", "SpatialReference": TEMPLATE, "Resolution": RESOLUTION,
                    Sidecar.SOURCES: list(mask_sources)}
    Path(paths["mni_brain_mask_json"]).write_text(json.dumps(mask_sidecar, indent=2) + "\n",
                                                  encoding="utf-8")
