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
motion matrix ``M_t`` is sampled at ``M_t N x``. The ITK file holds the same map in LPS
coordinates (ITK transforms also map fixed = template points to moving = boldref points).

The cost: EPI intensities from tissue maps
------------------------------------------
EPI (T2*-weighted) and the T1-derived template have different contrasts: CSF is bright in
EPI and dark in T1, and EPI intensity varies smoothly across the head (coil sensitivity).
Rather than a contrast-free cost (mutual information, correlation ratio), the template is
*rebuilt in the EPI's contrast*: at a template point ``x`` the model EPI intensity is

    m(x) = sum_k sum_j a_kj P_k(x) phi_j(x)

with ``P_k`` the smoothed tissue probabilities (grey matter, white matter, CSF = brain -
GM - WM, and outside-the-brain) and ``phi_j`` a polynomial in template coordinates
(1, or 1, x, y, z: each tissue's intensity may vary linearly across the head). The
coefficients ``a_kj`` are linear parameters fitted jointly with the 12 affine parameters
``p`` by least squares,

    min_{p, a} sum_x w(x) [I(N(p) x) - m(x; a)]^2,

where ``I`` is the smoothed boldref and ``w`` robust weights (below). This is SPM's
approach to affine registration with a template built from tissue classes [1]_ [2]_: the
intensity of every tissue is estimated, not assumed, so the same code works for any EPI
contrast, and the cost stays a least-squares problem that the Gauss-Newton machinery of
:mod:`fmri_preproc.motion` solves quickly (mutual information needs a joint histogram
and has no Gauss-Newton form). Points where the EPI departs from any tissue mixture
(susceptibility signal loss in orbitofrontal and inferior temporal cortex, vessels,
eyes) are down-weighted by Geman-McClure weights of their residual, scaled by its median
absolute deviation, recomputed at every iteration (iteratively reweighted least squares)
[3]_.

The optimiser
-------------
Forward-additive Gauss-Newton [4]_ on the 12 entries of ``N`` (the linear part about the
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
template towards it). A coarse search over translations along the scanner's y and z axes
(+- 24 mm) and pitch (+- 20 degrees), scoring each candidate by the linear fit of the
tissue model, then picks the start of the Gauss-Newton iterations.

References
----------
.. [1] Friston KJ, Ashburner J, Frith CD, Poline J-B, Heather JD, Frackowiak RSJ (1995).
   Spatial registration and normalization of images. Human Brain Mapping 3:165-189.
   :doi:`10.1002/hbm.460030303`
.. [2] Ashburner J, Friston KJ (1997). Multimodal image coregistration and partitioning -
   a unified framework. NeuroImage 6:209-217. :doi:`10.1006/nimg.1997.0290`
.. [3] Geman S, McClure DE (1987). Statistical methods for tomographic image
   reconstruction. Bulletin of the International Statistical Institute 52(4):5-21.
.. [4] Baker S, Matthews I (2004). Lucas-Kanade 20 years on: a unifying framework.
   IJCV 56:221-255. :doi:`10.1023/B:VISI.0000011205.11775.fd`
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

from .contract import TEMPLATE
from .inputs import InputError
from .motion import _trilinear
from .smoothing import fwhm_to_sigma, smooth_volume

__all__ = [
    "Template",
    "load_template",
    "Normalization",
    "estimate_normalization",
    "template_coverage",
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
        Gauss-Newton iterations over all levels.
    """

    matrix: np.ndarray
    coverage: float
    correlation: float
    initial_matrix: np.ndarray
    n_iterations: int


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
        values, inside = _trilinear(self.flats[0], self.shape, vox)
        if not with_gradient:
            return values, None, inside
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


def _fit_intensities(basis: np.ndarray, values: np.ndarray, weights=None) -> np.ndarray:
    """Least-squares tissue coefficients of the intensity model."""
    if weights is not None:
        sw = np.sqrt(weights)
        return np.linalg.lstsq(basis * sw[:, None], values * sw, rcond=None)[0]
    return np.linalg.lstsq(basis, values, rcond=None)[0]


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
    # dy_i/dL_ij = u_j, dy_i/dt_i = 1  ->  dI/dp = g_i u_j, g_i
    geom = np.concatenate([(g[:, None, :] * u[None, :, :]).reshape(9, -1), g]).T  # (n, 12)
    r = res[inside] / s
    dvar = (w * dv) @ geom  # half the derivative of s^2
    jac = np.concatenate([geom / s - np.outer(r / s, dvar), -level.basis[inside] / s], axis=1)
    jw = jac * w[:, None]
    return jw.T @ jac, jw.T @ r


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


def _rotation_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


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
    """The ``n_best`` best starts of a grid over isotropic scale (0.9-1.1), pitch (+-20 deg)
    and shifts along y and z (+-24 mm) about the centroid alignment, by :func:`_fit_r2`."""
    scored = []
    for scale in (0.9, 1.0, 1.1):
        for pitch in np.deg2rad([-20, -10, 0, 10, 20]):
            lin = scale * _rotation_x(pitch)
            for dy in (-24, -12, 0, 12, 24):
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
        A constant or non-3D volume, a field of view far smaller than a brain, or a fit
        that leaves less than 30 % of the template brain inside the field of view.

    Notes
    -----
    12-parameter least squares against a tissue-mixture model of the EPI's intensities
    (module docstring), robustly weighted, Gauss-Newton with Levenberg-Marquardt damping,
    coarse to fine (12, 8, 5 mm FWHM).
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
    coarse = _ImageLevel(image, affine, LEVELS[0].fwhm_mm)
    # multi-start at the coarsest level: keep the fit the tissue model explains best
    fits = []
    for start in _candidate_starts(levels[0], coarse, shift, centre, N_STARTS):
        matrix, coeffs, n_iter = _gauss_newton(levels[0], coarse, start, centre, LEVELS[0])
        fits.append((_fit_r2(levels[0], coarse, matrix), len(fits), matrix, start, n_iter))
    _, _, matrix, start, total = min(fits, key=lambda item: item[:2])
    for level, spec in zip(levels[1:], LEVELS[1:]):
        img = _ImageLevel(image, affine, spec.fwhm_mm)
        matrix, coeffs, n_iter = _gauss_newton(level, img, matrix, centre, spec)
        total += n_iter
    coverage = _check_coverage(matrix, affine, image.shape, template, "holds only")
    zooms = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    if zooms.min() < ZOOM_RANGE[0] or zooms.max() > ZOOM_RANGE[1]:
        raise InputError("normalisation gave an implausible head size (the map scales the "
                         f"MNI brain by {zooms.min():.2f}-{zooms.max():.2f}).",
                         cause="The reference volume is not a brain EPI, covers too little of "
                               "the brain, or its header's voxel sizes are wrong.",
                         action="Check the run and its voxel sizes in a viewer; normalise "
                                "whole-brain EPI runs only.")
    res, _, inside, values = _evaluate(levels[-1], img, matrix, coeffs, gradient=False)
    w = _robust_weights(res, inside)[inside]
    model = values[inside] - res[inside]
    correlation = _weighted_correlation(values[inside], model, w)
    if correlation < MIN_CORRELATION:
        raise InputError("the reference volume does not look like a brain EPI: the MNI "
                         f"template's tissues explain little of it (correlation "
                         f"{correlation:.2f}, below {MIN_CORRELATION}).",
                         cause="The volume holds noise or no head, or its header's "
                               "orientation or voxel sizes are wrong.",
                         action="Check the run in a viewer; normalise brain EPI runs only.")
    return Normalization(matrix, coverage, correlation, start, total)


def _weighted_correlation(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> float:
    """Pearson correlation of a and b with weights w."""
    w = w / w.sum()
    da, db = a - w @ a, b - w @ b
    return float((w @ (da * db)) / np.sqrt((w @ da**2) * (w @ db**2) + 1e-30))
