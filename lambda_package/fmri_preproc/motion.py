"""Rigid-body motion correction in world (scanner mm) space (numpy only).

Each volume is registered to a reference volume (the middle one by default) by least
squares with an inverse-compositional Gauss-Newton optimiser [1]_, coarse to fine:

1. 2x2x2 block averages, trilinear interpolation;
2. full resolution, trilinear interpolation;
3. full resolution, cubic B-spline interpolation [2]_ (trilinear interpolation biases
   sub-voxel estimates by several hundredths of a mm; the spline stage removes that bias).

Both images are smoothed (4 mm FWHM) before estimation. Each volume starts from its
neighbour's estimate, walking outward from the reference; a volume whose fit fails the
plausibility test restarts from the identity, and so does the volume after it. All geometry is done in world
coordinates through the NIfTI affine, so oblique, LPS-stored and anisotropic images are
handled; the parameters follow the convention of :mod:`fmri_preproc.transforms`.

Cost: ``sum_x [I(W(x; p)) - T(x) (1 + g(x))]^2`` over reference voxels ``x`` inside the
head (:func:`head_mask`) with the largest gradients, where ``T`` is the reference, ``I``
the moving volume, ``W`` the rigid map and ``g`` a smooth intensity gain: a polynomial in
world coordinates, linear (4 terms) in the trilinear stages and of 6th order (84 terms) in
the final stage. Scanner drift and spin-history signal drops after movements change
intensities smoothly in space; left unmodelled they bias a least-squares fit by several
hundredths of a mm. Inverse-compositional: the Jacobian ``J = [grad T . dW/dp, T g_k]``
and the Gauss-Newton Hessian ``H = J^T J`` are computed once per stage on the reference;
each iteration samples the moving volume once, solves ``H dp = J^T r`` (Levenberg-Marquardt
damping if a step raises the cost) and updates ``M <- M @ D(dp)^-1`` (``D`` = the rigid
map of the 6 motion increments; the gain terms add).

Accuracy and speed on the default run (``bench/RESULTS.md``): about 0.02 mm mean RMS error
(Jenkinson 2002, 80 mm sphere) against known motion, about 3-5 s for 150 volumes of
64 x 64 x 32 on one core.

References
----------
.. [1] Baker S, Matthews I (2004). Lucas-Kanade 20 years on: a unifying framework.
   International Journal of Computer Vision 56:221-255.
   :doi:`10.1023/B:VISI.0000011205.11775.fd`
.. [2] Unser M (1999). Splines: a perfect fit for signal and image processing.
   IEEE Signal Processing Magazine 16(6):22-38. :doi:`10.1109/79.799930`
.. [3] Friston KJ, Williams S, Howard R, Frackowiak RSJ, Turner R (1996). Movement-related
   effects in fMRI time-series. Magn Reson Med 35:346-355. :doi:`10.1002/mrm.1910350312`
"""

from __future__ import annotations

import numpy as np

from .plausibility import check_reference, is_plausible
from .smoothing import fwhm_to_sigma, smooth_volume
from .transforms import fov_centre, rigid_matrix

__all__ = [
    "estimate_motion", "reslice_volume", "reference_index", "head_mask", "trilinear",
    "apply_affine",
]


def reference_index(reference, n_volumes: int) -> int:
    """Index of the reference volume: ``"middle"`` (``n // 2``), ``"first"`` or an int."""
    if isinstance(reference, str):
        if reference == "middle":
            return n_volumes // 2
        if reference == "first":
            return 0
        raise ValueError("reference must be 'middle', 'first' or a volume index")
    index = int(reference)
    if not -n_volumes <= index < n_volumes:
        raise ValueError(f"reference index {index} is outside the run's {n_volumes} volumes")
    return index % n_volumes


def trilinear(flat: np.ndarray, shape, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample a Fortran-ordered flat volume at voxel ``coords`` (3, N) by trilinear interpolation.

    Returns the values (float32) and a boolean mask of points inside the volume (within half
    a voxel of its edge voxels; those near the edge are clamped to the edge).
    """
    nx, ny, nz = shape
    x, y, z = coords
    inside = (
        (x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5) & (z > -0.5) & (z < nz - 0.5)
    )
    x = np.clip(x, 0, nx - 1)
    y = np.clip(y, 0, ny - 1)
    z = np.clip(z, 0, nz - 1)
    # lower corner, capped at n-2 so that corner+1 exists (then the weight may be 1)
    ix = np.minimum(x.astype(np.int32), nx - 2)
    iy = np.minimum(y.astype(np.int32), ny - 2)
    iz = np.minimum(z.astype(np.int32), nz - 2)
    fx = (x - ix).astype(np.float32)
    fy = (y - iy).astype(np.float32)
    fz = (z - iz).astype(np.float32)
    base = ix + nx * (iy + ny * iz)  # Fortran order: x fastest
    sx, sy, sz = 1, nx, nx * ny
    c00 = flat[base]
    c00 = c00 + fx * (flat[base + sx] - c00)
    c10 = flat[base + sy]
    c10 = c10 + fx * (flat[base + sy + sx] - c10)
    c01 = flat[base + sz]
    c01 = c01 + fx * (flat[base + sz + sx] - c01)
    c11 = flat[base + sz + sy]
    c11 = c11 + fx * (flat[base + sz + sy + sx] - c11)
    c0 = c00 + fy * (c10 - c00)
    c1 = c01 + fy * (c11 - c01)
    return c0 + fz * (c1 - c0), inside


# Cubic B-spline interpolation (Unser 1999): the image is sum_k c[k] beta3(x - k) with
# coefficients c from a recursive prefilter; it is exact at the grid points and far less
# biased than trilinear interpolation for sub-voxel motion.
_POLE = np.sqrt(3.0) - 2.0


def _spline_coefficients(volume: np.ndarray) -> np.ndarray:
    """Cubic B-spline coefficients of a 3D volume (mirror boundaries, as scipy's default)."""
    coeffs = np.array(volume, dtype=np.float64)
    for axis in range(3):
        coeffs = np.moveaxis(coeffs, axis, 0)
        _prefilter_axis0(coeffs)
        coeffs = np.moveaxis(coeffs, 0, axis)
    return np.asfortranarray(coeffs, dtype=np.float32)


def _prefilter_axis0(c: np.ndarray) -> None:
    """In-place cubic B-spline prefilter along axis 0: causal then anticausal recursion."""
    z = _POLE
    n = c.shape[0]
    c *= (1.0 - z) * (1.0 - 1.0 / z)  # overall gain 6
    # causal initial value with mirror boundaries: sum_k z^k c[k] (truncated, |z|^k < 1e-10)
    horizon = min(n, int(np.ceil(np.log(1e-10) / np.log(abs(z)))))
    powers = z ** np.arange(horizon)
    c[0] = np.tensordot(powers, c[:horizon], axes=1)
    for k in range(1, n):
        c[k] += z * c[k - 1]
    c[n - 1] = z / (z * z - 1.0) * (c[n - 1] + z * c[n - 2])
    for k in range(n - 2, -1, -1):
        c[k] = z * (c[k + 1] - c[k])


def _bspline_weights(t: np.ndarray) -> np.ndarray:
    """(N, 4) cubic B-spline weights of the samples floor(x)-1 .. floor(x)+2, t = x - floor(x)."""
    t2 = t * t
    t3 = t2 * t
    w0 = (1.0 - t) ** 3 / 6.0
    w3 = t3 / 6.0
    w1 = 0.5 * t3 - t2 + 2.0 / 3.0
    w2 = 1.0 - w0 - w1 - w3
    return np.stack([w0, w1, w2, w3], axis=1)


class _Spline:
    """A volume's cubic B-spline, padded by 2 mirrored voxels for evaluation near edges."""

    def __init__(self, volume: np.ndarray):
        self.shape = volume.shape
        padded = np.pad(_spline_coefficients(volume), 2, mode="reflect")  # scipy 'mirror'
        self.flat = padded.ravel(order="F")
        px, py, _ = padded.shape
        i, j, k = np.meshgrid(np.arange(4), np.arange(4), np.arange(4), indexing="ij")
        # offsets of the 4x4x4 neighbourhood, z outermost: shape (4, 4, 4) = (k, j, i)
        self.offsets = (i + px * j + px * py * k).transpose(2, 1, 0).ravel()
        self.strides = (1, px, px * py)

    def __call__(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values (float32) at voxel coords (3, N) and the inside-the-volume mask."""
        inside = np.ones(coords.shape[1], dtype=bool)
        base = np.zeros(coords.shape[1], dtype=np.intp)
        weights = []
        for axis in range(3):
            n = self.shape[axis]
            x = coords[axis]
            inside &= (x > -0.5) & (x < n - 0.5)
            x = np.clip(x, -0.5, n - 0.5)
            fl = np.floor(x)
            weights.append(_bspline_weights((x - fl).astype(np.float32)))
            # first neighbour floor-1, +2 for the padding
            base += (fl.astype(np.intp) + 1) * self.strides[axis]
        vals = self.flat[base[:, None] + self.offsets]  # (N, 64): (k, j, i)
        n_pts = vals.shape[0]
        # contract x, then y, then z: v = sum_k wz_k sum_j wy_j sum_i wx_i c[i, j, k]
        vals = np.matmul(vals.reshape(n_pts, 16, 4), weights[0][:, :, None])
        vals = np.matmul(vals.reshape(n_pts, 4, 4), weights[1][:, :, None])
        vals = np.matmul(vals.reshape(n_pts, 1, 4), weights[2][:, :, None])
        return vals.ravel(), inside


def _spread_selection(magnitude: np.ndarray, shape, n_points: int, *,
                      block: int = 4) -> np.ndarray:
    """The ``n_points`` voxels with the largest gradient, spread over the whole head.

    Half are taken as the strongest of each block of ``block`` voxels per axis (an equal
    quota per block), the rest as the strongest remaining anywhere. Taking only the
    strongest overall puts every point on the head's outline when its inside is smooth:
    a nearly round outline then barely constrains rotations, and noise moves the estimate
    by up to a millimetre; points inside the head pin them down.

    Returns
    -------
    (n_points,) ndarray
        Flat (Fortran-order) voxel indices, sorted (memory order: faster gathers).
    """
    nonzero = np.flatnonzero(magnitude)
    ijk = np.unravel_index(nonzero, shape, order="F")
    blocks = np.ravel_multi_index(tuple(i // block for i in ijk),
                                  tuple(-(-n // block) for n in shape))
    order = np.lexsort((-magnitude[nonzero], blocks))  # by block, strongest first
    sorted_blocks = blocks[order]
    starts = np.flatnonzero(np.r_[True, sorted_blocks[1:] != sorted_blocks[:-1]])
    rank = np.arange(order.size) - np.repeat(starts, np.diff(np.r_[starts, order.size]))
    quota = max(1, (n_points // 2) // max(1, starts.size))
    chosen = nonzero[order[rank < quota]][: n_points // 2]
    rest = magnitude.copy()
    rest[chosen] = 0
    extra = np.argpartition(rest, -(n_points - chosen.size))[-(n_points - chosen.size):]
    return np.sort(np.concatenate([chosen, extra]))


def _grid(shape) -> np.ndarray:
    """Voxel coordinates (3, N) float32 of every voxel, Fortran order."""
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    return np.stack([i.ravel(order="F"), j.ravel(order="F"), k.ravel(order="F")])


def reslice_volume(volume: np.ndarray, affine: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Resample one volume onto the reference grid: ``resliced(p) = volume(matrix @ p)``.

    Parameters
    ----------
    volume : (X, Y, Z) array
        The moving volume (each axis at least 4 voxels).
    affine : (4, 4) array
        The run's voxel-to-world affine (mm).
    matrix : (4, 4) array
        World-space map reference point -> moving point (:func:`params_to_affine`).

    Returns
    -------
    resliced : (X, Y, Z) ndarray of float32
        Cubic B-spline interpolation [2]_ (trilinear interpolation modulates the variance
        with the sub-voxel shift); points that fall outside the moving volume are 0.

    Notes
    -----
    The voxel map ``B`` (4x4) is factored into three passes that each change one voxel
    coordinate, ``B = E0 @ E1 @ E2`` (``Ek`` = the identity with row ``k`` replaced), so
    the volume is resampled by three 1D cubic B-splines, 4 samples per voxel per pass,
    instead of one 3D spline of 64 samples per voxel: the multi-pass scheme of [4]_.

    References
    ----------
    .. [4] Unser M, Thevenaz P, Yaroslavsky L (1995). Convolution-based interpolation for
       fast, high-quality rotation of images. IEEE Trans Image Process 4:1371-1381.
       :doi:`10.1109/83.465102`
    """
    volume = np.asarray(volume)
    if volume.ndim != 3 or min(volume.shape) < 4:
        raise ValueError("volume must be 3D with at least 4 voxels per axis")
    affine = np.asarray(affine, dtype=np.float64)
    # voxel (reference) -> world -> moving world -> voxel (moving)
    vox = np.linalg.inv(affine) @ np.asarray(matrix, dtype=np.float64) @ affine
    grid = _grid(volume.shape)
    out = np.asarray(volume, dtype=np.float32)
    for axis, row in enumerate(_row_passes(vox)):
        coord = (row[:3].astype(np.float32) @ grid + np.float32(row[3]))
        out = _resample_axis(out, axis, coord.reshape(volume.shape, order="F"))
    inside = np.ones(grid.shape[1], dtype=bool)
    for axis, x in enumerate(apply_affine(vox, grid)):
        inside &= (x > -0.5) & (x < volume.shape[axis] - 0.5)
    out[~inside.reshape(volume.shape, order="F")] = 0
    return out


def _row_passes(vox: np.ndarray) -> list[np.ndarray]:
    """Rows ``r0, r1, r2`` (4 entries each) with ``vox = E0 @ E1 @ E2``.

    ``Ek`` is the 4x4 identity with row ``k`` replaced by ``rk``; the first pass applied to
    the volume is ``E0`` (it samples along axis 0), then ``E1``, then ``E2``. From
    ``vox[2] = r2``, ``vox[1] = r1 @ E2`` and ``vox[0] = r0 @ E1 @ E2``.
    """
    e2 = np.eye(4)
    e2[2] = vox[2]
    r1 = vox[1] @ np.linalg.inv(e2)
    e1 = np.eye(4)
    e1[1] = r1
    r0 = vox[0] @ np.linalg.inv(e1 @ e2)
    return [r0, r1, vox[2]]


def _resample_axis(volume: np.ndarray, axis: int, coord: np.ndarray) -> np.ndarray:
    """Sample ``volume`` along ``axis`` at voxel coordinate ``coord`` (same shape), cubic."""
    c = np.moveaxis(np.array(volume, dtype=np.float64), axis, 0)
    _prefilter_axis0(c)
    c = np.pad(c.astype(np.float32), [(2, 2)] + [(0, 0)] * 2, mode="reflect")
    n = volume.shape[axis]
    x = np.clip(np.moveaxis(coord, axis, 0), -0.5, n - 0.5)
    fl = np.floor(x)
    t = x - fl
    t3 = t * t * t
    w0 = (1.0 - t) ** 3 / 6.0  # the cubic B-spline weights (see _bspline_weights)
    w3 = t3 / 6.0
    w1 = 0.5 * t3 - t * t + np.float32(2.0 / 3.0)
    index = fl.astype(np.intp) + 1  # first of the 4 neighbours, +2 for the padding
    out = w0 * np.take_along_axis(c, index, axis=0)
    out += w1 * np.take_along_axis(c, index + 1, axis=0)
    out += (1.0 - w0 - w1 - w3) * np.take_along_axis(c, index + 2, axis=0)
    out += w3 * np.take_along_axis(c, index + 3, axis=0)
    return np.moveaxis(out, 0, axis)


def apply_affine(matrix: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to (3, N) float32 coordinates."""
    mat = matrix[:3, :3].astype(np.float32)
    off = matrix[:3, 3:4].astype(np.float32)
    return mat @ coords + off


def _downsample(volume: np.ndarray) -> np.ndarray:
    """Average 2x2x2 blocks (axes shorter than 8 voxels are kept)."""
    out = volume
    for axis in range(3):
        n = out.shape[axis]
        if n < 8:
            continue
        m = n // 2 * 2
        a = np.take(out, np.arange(0, m, 2), axis=axis)
        b = np.take(out, np.arange(1, m, 2), axis=axis)
        out = 0.5 * (a + b)
    return out


def _downsample_affine(affine: np.ndarray, shape) -> np.ndarray:
    """Affine of :func:`_downsample`'s output: coarse voxel i is fine voxel 2 i + 0.5."""
    scale = np.eye(4)
    for axis, n in enumerate(shape[:3]):
        if n >= 8:
            scale[axis, axis] = 2.0
            scale[axis, 3] = 0.5
    return affine @ scale


class _Level:
    """One pyramid level: the reference's sample points, Jacobian and Hessian.

    ``cubic`` selects cubic B-spline interpolation (the reference gradient is then the
    exact gradient of its spline); otherwise trilinear with central-difference gradients.
    The ``n_points`` voxels with the largest reference gradient, at least ``margin``
    voxels (per axis) from the edges, are used: flat background carries no information
    on motion.
    """

    def __init__(self, ref, affine, centre, n_points: int, cubic: bool, margin, mask=None):
        self.shape = ref.shape
        self.affine = affine
        self.inv_affine = np.linalg.inv(affine)
        self.cubic = cubic
        if cubic:
            grads = _spline_gradient(ref)
        else:
            grads = np.gradient(ref)
        gvox = np.stack([g.ravel(order="F") for g in grads]).astype(np.float64)
        del grads
        # d/dworld = A^-T d/dvoxel  (A = 3x3 part of the affine)
        gworld = np.linalg.inv(affine[:3, :3]).T @ gvox
        magnitude = np.sqrt(np.sum(gworld**2, axis=0))
        # skip voxels near the edges of the field of view: one-sided differences there, and
        # the pre-smoothing mirrors the edge, which changes as tissue moves across it
        interior = np.zeros(ref.shape, dtype=bool)
        interior[tuple(slice(m, n - m) for m, n in zip(margin, ref.shape))] = True
        magnitude[~interior.ravel(order="F")] = 0
        if mask is not None and np.count_nonzero(magnitude * mask.ravel(order="F")) >= 6:
            magnitude[~mask.ravel(order="F")] = 0
        n_points = min(n_points, int(np.count_nonzero(magnitude)))
        if n_points < 6:
            raise ValueError("the reference volume has too little structure to register")
        select = _spread_selection(magnitude, ref.shape, n_points)
        grid = _grid(ref.shape)[:, select]
        self.points = grid  # (3, N) voxel coordinates of the level
        self.target = ref.ravel(order="F")[select].astype(np.float32)
        self.variance = float(np.var(self.target))  # the cost of explaining nothing
        world = affine[:3, :3] @ grid + affine[:3, 3:4]
        d = world - centre[:, None]
        g = gworld[:, select]
        # dW/dp at p = 0: translation -> identity; rotation about axis k -> e_k x (x - c);
        # so dT/dw_k = g . (e_k x d) = (d x g)_k
        jac = np.concatenate([g, np.cross(d.T, g.T).T]).T  # (N, 6)
        # intensity model: the moving volume is T(x) (1 + l0 + l . (x - c) / 100 mm), a
        # global and linearly varying gain (scanner drift, spin-history signal drops);
        # its Jacobian columns are T(x) times 1, dx, dy, dz
        target = self.target.astype(np.float64)
        # the final (cubic) stage fits a 6th-order polynomial gain (84 terms) when it has
        # enough points; the trilinear stages, which only bring it close, a linear one
        order = GAIN_ORDER if cubic and n_points >= 5000 else 1
        gain = target[:, None] * _gain_basis(d / 100.0, order)  # (N, n_gain)
        jac = np.concatenate([jac, gain], axis=1)
        self.gain = gain.astype(np.float32)
        self.jac = jac.astype(np.float32)
        self.hessian = jac.T @ jac

    def sampler(self, volume: np.ndarray):
        """The moving volume's interpolator at this level."""
        if self.cubic:
            return _Spline(volume)
        flat = volume.ravel(order="F")
        return lambda coords: trilinear(flat, self.shape, coords)

    def residual(self, sample, matrix: np.ndarray, gain: np.ndarray):
        """Residual I(W(x)) - T(x) (1 + gain model) at the level's points, and the inside mask."""
        vox = self.inv_affine @ matrix @ self.affine
        values, inside = sample(apply_affine(vox, self.points))
        return values - self.target - self.gain @ gain.astype(np.float32), inside


GAIN_ORDER = 6


def _gain_basis(u: np.ndarray, order: int) -> np.ndarray:
    """Polynomial basis (N, K) of normalised coordinates u (3, N): monomials up to ``order``."""
    # all monomials x^a y^b z^c with a + b + c <= order
    # ordered by degree, so a lower order's terms come first (gains carry across stages)
    powers = sorted(((a, b, c) for a in range(order + 1) for b in range(order + 1 - a)
                     for c in range(order + 1 - a - b)), key=lambda p: (sum(p), p[::-1]))
    return np.stack([u[0] ** a * u[1] ** b * u[2] ** c for a, b, c in powers], axis=1)


def _spline_gradient(volume: np.ndarray) -> list[np.ndarray]:
    """Exact gradient (per voxel axis) of a volume's cubic B-spline at its grid points.

    d/dx sum_k c_k beta3(x - k) at x = m is (c[m+1] - c[m-1]) / 2 along x, and the spline
    samples beta3(0) = 2/3, beta3(+-1) = 1/6 along the other axes.
    """
    c = np.pad(_spline_coefficients(volume), 1, mode="reflect")
    grads = []
    for axis in range(3):
        g = c
        for other in range(3):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            mid = [slice(None)] * 3
            lo[other], mid[other], hi[other] = slice(0, -2), slice(1, -1), slice(2, None)
            if other == axis:
                g = 0.5 * (g[tuple(hi)] - g[tuple(lo)])
            else:
                g = (g[tuple(lo)] + 4.0 * g[tuple(mid)] + g[tuple(hi)]) / 6.0
        grads.append(np.ascontiguousarray(g))
    return grads


def head_mask(volume: np.ndarray, *, fraction: float = 0.2, erode: int = 2) -> np.ndarray:
    """Voxels inside the head, away from its edge: the default support of the motion cost.

    Voxels brighter than ``fraction`` of the volume's 98th percentile, eroded by ``erode``
    voxels (6-connected). The edge of the head borders the background, whose magnitude
    (Rician noise, ghosts, interpolation ringing made positive) does not move with the
    head and biases a least-squares fit; the inside of the head has plenty of structure.
    """
    mask = volume > fraction * np.percentile(volume, 98)
    for _ in range(erode):
        # 6-connected erosion: a voxel stays if it and its 6 neighbours are in the mask;
        # the field-of-view border counts as inside (handled by the edge margin instead)
        padded = np.pad(mask, 1, mode="edge")
        core = padded[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            lo = [slice(1, -1)] * 3
            hi = [slice(1, -1)] * 3
            lo[axis], hi[axis] = slice(0, -2), slice(2, None)
            core &= padded[tuple(lo)] & padded[tuple(hi)]
        mask = core
    if np.count_nonzero(mask) < 100:  # tiny or flat images: use everything
        mask = np.ones(volume.shape, dtype=bool)
    return mask


def _gauss_newton(level: _Level, sample, matrix, gain, centre, max_iter: int, tol: float):
    """Inverse-compositional Gauss-Newton iterations at one level, Levenberg-Marquardt damped.

    Returns the new world matrix, intensity-gain parameters and the mean squared residual
    of the best point visited (not finite if no iteration ran). The 6 motion parameters
    compose (inverse-compositional), the gain parameters add. A step that raises the cost
    is undone and the damping ``lam`` (added to the Hessian's diagonal) raised tenfold.
    """
    n_gain = level.gain.shape[1]
    # carried across stages: keep the common low-order terms, new terms start at 0
    carried = np.asarray(gain, dtype=np.float64)[:n_gain]
    gain = np.zeros(n_gain)
    gain[: len(carried)] = carried
    lam = 0.0
    best = None
    last_size = np.inf
    for _ in range(max_iter):
        res, inside = level.residual(sample, matrix, gain)
        res[~inside] = 0
        cost = float(res @ res) / max(int(np.count_nonzero(inside)), 1)
        if best is not None and cost > best[0]:
            # the last step made things worse: back off and damp harder, or stop if that
            # step was already at the tolerance (we are at the minimum, up to noise)
            if last_size < 10 * tol:
                return best[1], best[2], best[0]
            cost, matrix, gain, res, inside = best
            lam = max(10.0 * lam, 1e-3)
            if lam > 1e3:
                break
        else:
            lam *= 0.1
            best = (cost, matrix, gain, res, inside)
        hessian = level.hessian
        if not inside.all():
            # points mapped outside the moving volume carry no information: drop them
            jout = level.jac[~inside].astype(np.float64)
            hessian = hessian - jout.T @ jout
        if lam:
            hessian = hessian + lam * np.diag(np.diag(hessian))
        grad = level.jac.T @ res
        try:
            step = np.linalg.solve(hessian, grad.astype(np.float64))
        except np.linalg.LinAlgError:
            break
        dp = step[:6]
        gain = gain + step[6:]
        # inverse composition: W(x; p) <- W(x; p) o W(x; dp)^-1
        matrix = matrix @ np.linalg.inv(rigid_matrix(dp, centre))
        # size of the update: translation (mm) + rotation (rad) x 50 mm, like FD
        last_size = np.abs(dp[:3]).sum() + 50.0 * np.abs(dp[3:]).sum()
        if last_size < tol:
            break
    return matrix, gain, best[0] if best is not None else np.inf


def estimate_motion(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    reference="middle",
    smooth_fwhm: float = 4.0,
    n_points: tuple[int, int, int] = (8000, 15000, 15000),
    tol: float = 1e-3,
    max_iter: int = 20,
    mask=None,
) -> np.ndarray:
    """Estimate rigid-body motion of every volume of a 4D run against a reference volume.

    Parameters
    ----------
    data : (X, Y, Z, T) array
        The run (float32 recommended). Not modified. Each spatial axis needs >= 4 voxels.
    affine : (4, 4) array
        NIfTI voxel-to-world affine (mm). Any orientation (oblique, LPS) works.
    reference : {"middle", "first"} or int, optional
        Reference volume: the middle one (``T // 2``, default), the first, or an index.
    smooth_fwhm : float, optional
        FWHM (mm) of the Gaussian applied to both images before estimation (4 mm).
    n_points : (int, int, int), optional
        Voxels used at each stage (coarse trilinear, full-resolution trilinear,
        full-resolution cubic B-spline): those with the largest reference gradient.
    tol : float, optional
        Stop a stage when an update moves a point 50 mm from the centre by less than
        ``tol`` mm.
    max_iter : int, optional
        Maximum Gauss-Newton iterations per stage.
    mask : (X, Y, Z) bool array, optional
        Reference voxels the cost may use; default :func:`head_mask` of the reference
        volume (brighter than 20 % of its 98th percentile, eroded by 2 voxels).

    Returns
    -------
    matrices : (T, 4, 4) ndarray
        World-space maps reference point -> moving point, one per volume
        (see :func:`fmri_preproc.params_to_affine`); the reference's is the identity.
        Use :func:`fmri_preproc.affine_to_params` for the six parameters.

    Notes
    -----
    Least squares with inverse-compositional Gauss-Newton [1]_, coarse to fine: 2x2x2
    block averages with trilinear interpolation, then full resolution with trilinear, then
    full resolution with cubic B-spline interpolation [2]_ (trilinear interpolation biases
    sub-voxel estimates by several hundredths of a mm; the spline stage removes that bias).
    Volumes are processed outward from the reference, each initialised with its
    neighbour's estimate (and scaled to the reference's mean intensity in the head). A
    volume whose fit is implausible (:mod:`fmri_preproc.plausibility`; more than half the
    reference's variance unexplained) is retried from the identity; if that fails too, or
    the volume is constant, it is left unmoved (identity) and the next volume starts from
    the identity, so one bad volume never corrupts its neighbours.

    Raises
    ------
    ValueError
        For a reference volume that is constant or holds only noise
        (:func:`fmri_preproc.plausibility.check_reference`), or has too little structure.

    References
    ----------
    .. [1] Baker S, Matthews I (2004). Lucas-Kanade 20 years on: a unifying framework.
       IJCV 56:221-255. :doi:`10.1023/B:VISI.0000011205.11775.fd`
    .. [2] Unser M (1999). Splines: a perfect fit for signal and image processing.
       IEEE Signal Processing Magazine 16(6):22-38. :doi:`10.1109/79.799930`
    """
    if data.ndim != 4:
        raise ValueError("data must be 4D (x, y, z, time)")
    if min(data.shape[:3]) < 4:
        raise ValueError("each spatial axis needs at least 4 voxels")
    if len(n_points) != 3 or min(n_points) < 6:
        raise ValueError("n_points must be 3 counts of at least 6 voxels")
    affine = np.asarray(affine, dtype=np.float64)
    n_volumes = data.shape[3]
    ref_index = reference_index(reference, n_volumes)
    shape = data.shape[:3]
    centre = fov_centre(affine, shape)
    sigma = fwhm_to_sigma(smooth_fwhm, affine)

    ref_raw = np.asarray(data[..., ref_index], dtype=np.float32)
    check_reference(ref_raw)  # constant or noise-only: nothing to register to
    if mask is None:
        mask = head_mask(ref_raw)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape:
        raise ValueError("mask must have the run's spatial shape")
    ref_fine = smooth_volume(ref_raw, sigma)
    del ref_raw
    stages = _stages(ref_fine, affine, centre, sigma, n_points, mask)

    ref_level = float(ref_fine[mask].mean())
    del ref_fine  # free memory ASAP

    matrices = np.tile(np.eye(4), (n_volumes, 1, 1))
    no_gain = np.zeros(stages[0].gain.shape[1])
    # walk outward from the reference so each volume starts from its neighbour's estimate;
    # a volume that fails restarts from the reference (identity), and so does the next one
    for volumes in (range(ref_index + 1, n_volumes), range(ref_index - 1, -1, -1)):
        start = (np.eye(4), no_gain)
        for t in volumes:
            volume = np.asarray(data[..., t], dtype=np.float32)  # one volume at a time
            fit = _register_volume(stages, volume, start, ref_level, mask, sigma, centre,
                                   max_iter, tol)
            matrices[t] = fit[0] if fit else np.eye(4)
            start = fit if fit else (np.eye(4), no_gain)
    return matrices


def _register_volume(stages, volume, start, ref_level, mask, sigma, centre, max_iter, tol):
    """Register one raw volume from ``start``, retrying from the identity if that fails.

    The volume is scaled to the reference's mean in the head first (a gain jump is then
    no harder than drift). Returns ``(matrix, gain)``, or None when neither attempt gives
    a plausible fit (a constant volume, or a diverged estimate): see :func:`_acceptable`.
    """
    if not np.ptp(volume) > 0:
        return None  # a dropped, constant volume holds no position
    level = float(volume[mask].mean())
    if level > 0:
        volume = volume * np.float32(ref_level / level)
    fine = smooth_volume(volume, sigma)
    attempts = [start] if np.array_equal(start[0], np.eye(4)) else [start, (np.eye(4),
                                                                             start[1] * 0)]
    for matrix, gain in attempts:
        matrix, gain, cost = _register(stages, fine, matrix, gain, centre, max_iter, tol)
        if _acceptable(stages[-1], matrix, cost, centre):
            return matrix, gain
    return None


#: A fit that leaves more than this fraction of the reference's variance (at the sample
#: points) unexplained has not registered the volume: a good fit leaves about the noise
#: (a few percent), a diverged or structure-free one about all of it.
MAX_UNEXPLAINED = 0.5


def _acceptable(level: _Level, matrix, cost: float, centre) -> bool:
    """Whether a fit is a plausible head position that explains the reference."""
    return (np.isfinite(cost) and cost <= MAX_UNEXPLAINED * level.variance
            and is_plausible(matrix, centre))


def _stages(ref_fine, affine, centre, sigma, n_points, mask) -> list[_Level]:
    """The three estimation stages (coarse trilinear, fine trilinear, fine cubic)."""
    shape = ref_fine.shape
    # edge margin: the reach of the pre-smoothing (2.5 sigma) plus one voxel
    margin = [1 + int(np.ceil(2.5 * s)) for s in sigma]
    margin = [min(m, (n - 2) // 2) for m, n in zip(margin, shape)]
    coarse = _downsample(ref_fine)
    coarse_margin = [max(1, min(-(-m // 2), (n - 2) // 2)) for m, n in zip(margin, coarse.shape)]
    coarse_mask = _downsample(mask.astype(np.float32)) > 0.5
    return [
        _Level(coarse, _downsample_affine(affine, shape), centre, n_points[0], False,
               coarse_margin, coarse_mask),
        _Level(ref_fine, affine, centre, n_points[1], False, margin, mask),
        _Level(ref_fine, affine, centre, n_points[2], True, margin, mask),
    ]


def _register(stages, fine, matrix, gain, centre, max_iter, tol):
    """Register one smoothed volume through all stages, from ``matrix`` and ``gain``.

    The trilinear stages only bring the estimate close (tolerances 0.05 and 0.01 mm); the
    cubic stage converges to ``tol``.
    """
    images = (_downsample(fine), fine, fine)
    tols = (max(tol, 0.05), max(tol, 0.01), tol)
    for stage, image, stage_tol in zip(stages, images, tols):
        matrix, gain, cost = _gauss_newton(stage, stage.sampler(image), matrix, gain, centre,
                                           max_iter, stage_tol)
    return matrix, gain, cost

