"""Simulated resting-state fMRI with a known ground truth.

Every run is built from the MNI152 template that ships inside nilearn (no download) and
has a ground truth that the rest of the workbook tries to recover:

* **Anatomy**: grey matter, white matter and CSF probabilities resampled to the EPI grid
  (default 64 x 64 x 32 voxels of 3.5 x 3.5 x 4 mm), with T2*-like EPI contrast
  (CSF > GM > WM), a smooth coil-sensitivity field and faint scalp signal.
* **Networks**: spherical regions at coordinates of the Dosenbach et al. (2010) atlas,
  grouped into five networks. Each region's neural signal is a mixture of its network's
  latent signal and its own; the mixture defines the true correlation matrix exactly.
  Signals are convolved with the SPM haemodynamic response and scaled to about 1 %
  signal change.
* **Head motion**: a slow drift plus a few sudden jerks, different for every subject
  (some still, some moving). The six parameters follow the engine's convention
  (:func:`fmri_preproc.params_to_affine`) and are applied to every volume with cubic
  B-spline resampling. Motion also changes intensities (a spin-history-like signal drop
  after each movement, which decays over a few volumes), so motion creates spurious,
  distance-dependent correlations that preprocessing has to remove.
* **Scanner**: slow drift and Rician thermal noise (brain tSNR of roughly 50-100).

Everything is deterministic given the seed.

The main entry points are :func:`simulate_run` (one run in memory) and
:func:`simulate_study` (several subjects written to ``data/raw`` and ``data/truth``).
"""
from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

__all__ = [
    "NETWORKS",
    "SimulatedRun",
    "StudyDesign",
    "make_design",
    "make_motion",
    "framewise_displacement",
    "apply_motion",
    "simulate_run",
    "simulate_study",
    "load_truth",
]

#: Networks used (names from Dosenbach et al. 2010) and their latent correlations.
NETWORKS = ("default", "fronto-parietal", "cingulo-opercular", "sensorimotor", "occipital")
_NETWORK_CORRELATION = np.array(
    [
        [1.0, 0.1, -0.3, -0.1, 0.0],
        [0.1, 1.0, 0.2, 0.0, 0.1],
        [-0.3, 0.2, 1.0, 0.2, 0.1],
        [-0.1, 0.0, 0.2, 1.0, 0.2],
        [0.0, 0.1, 0.1, 0.2, 1.0],
    ]
)
#: Centre of the default field of view in MNI mm, and its extent (mm).
_FOV_CENTRE = np.array([0.0, -17.0, 12.0])
_FOV_EXTENT = np.array([224.0, 224.0, 128.0])
#: Relative EPI (T2*-weighted) intensity of each tissue.
_TISSUE_INTENSITY = {"gm": 1.0, "wm": 0.78, "csf": 1.45, "scalp": 0.12}
_BASELINE = 1000.0
_PACKAGE_VERSION = "1"


# --------------------------------------------------------------------------------------
# Containers


@dataclass
class StudyDesign:
    """What every subject of a study shares: grid, anatomy, regions and the true matrix.

    Attributes
    ----------
    affine : (4, 4) ndarray
        Voxel-to-world (MNI mm) affine of the EPI grid.
    shape : tuple of 3 int
        Grid shape.
    baseline : (X, Y, Z) ndarray of float32
        Motion-free mean EPI intensity (arbitrary units, brain about 1000).
    brain : (X, Y, Z) ndarray of bool
        Brain mask.
    gm : (X, Y, Z) ndarray of float32
        Grey-matter probability.
    labels : (X, Y, Z) ndarray of int16
        Region labels, 0 = background, ``k`` = ``regions.iloc[k - 1]``.
    regions : pandas.DataFrame
        One row per region: ``index`` (label value), ``name``, ``network``, ``x``, ``y``,
        ``z`` (MNI mm), ``weight`` (share of the network signal), ``n_voxels``.
    true_connectivity : (R, R) ndarray
        Population correlation between the regions' neural (and BOLD) signals.
    """

    affine: np.ndarray
    shape: tuple
    baseline: np.ndarray
    brain: np.ndarray
    gm: np.ndarray
    labels: np.ndarray
    regions: pd.DataFrame
    true_connectivity: np.ndarray

    @property
    def networks(self) -> dict:
        """Region name -> network name."""
        return dict(zip(self.regions["name"], self.regions["network"]))


@dataclass
class SimulatedRun:
    """One simulated run and its ground truth.

    Attributes
    ----------
    img : nibabel.Nifti1Image
        4D float32 BOLD run; TR (s) is the fourth zoom, units mm and seconds.
    motion : (T, 6) ndarray
        True motion ``[trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (rad)]`` per
        volume in the convention of :func:`fmri_preproc.params_to_affine`; the first
        volume is the reference (all zeros).
    labels_img : nibabel.Nifti1Image
        Region labels on the same grid.
    networks : dict
        Region name -> network name.
    true_connectivity : (R, R) ndarray
        True correlation matrix between regions (rows in label order).
    regions : pandas.DataFrame
        Region table (see :class:`StudyDesign`).
    signals : (T, R) ndarray
        The regions' BOLD signal (percent signal change) before motion and noise.
    fd : (T,) ndarray
        True framewise displacement (mm, Power et al. 2012, 50 mm head radius).
    brain_mask_img : nibabel.Nifti1Image
        Brain mask on the same grid.
    tr : float
        Repetition time (s).
    """

    img: nib.Nifti1Image
    motion: np.ndarray
    labels_img: nib.Nifti1Image
    networks: dict
    true_connectivity: np.ndarray
    regions: pd.DataFrame
    signals: np.ndarray
    fd: np.ndarray
    brain_mask_img: nib.Nifti1Image
    tr: float


# --------------------------------------------------------------------------------------
# Anatomy


def _grid_affine(shape) -> np.ndarray:
    """RAS affine whose field of view covers ``_FOV_EXTENT`` around ``_FOV_CENTRE``."""
    shape = np.asarray(shape, dtype=float)
    zooms = _FOV_EXTENT / shape
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = _FOV_CENTRE - zooms * (shape - 1) / 2
    return affine


@lru_cache(maxsize=4)
def _anatomy(shape: tuple) -> tuple:
    """Tissue maps of the MNI152 template resampled to the grid (cached per shape)."""
    from nilearn import datasets, image

    affine = _grid_affine(shape)

    def resample(img):
        with warnings.catch_warnings():  # binary mask resampled continuously on purpose
            warnings.simplefilter("ignore")
            out = image.resample_img(img, target_affine=affine, target_shape=shape,
                                     interpolation="continuous", force_resample=True,
                                     copy_header=True)
        return np.clip(out.get_fdata(dtype=np.float32), 0, 1)

    head = resample(datasets.load_mni152_template(resolution=2))
    brain_p = resample(datasets.load_mni152_brain_mask(resolution=2))
    gm = resample(datasets.load_mni152_gm_template(resolution=2)) * brain_p
    wm = resample(datasets.load_mni152_wm_template(resolution=2)) * brain_p
    csf = np.clip(brain_p - gm - wm, 0, 1)
    return affine, head, brain_p, gm, wm, csf


def _bias_field(shape) -> np.ndarray:
    """Smooth coil-sensitivity profile (brighter at the back and top, +-8 %)."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return (1.0 - 0.05 * y + 0.03 * z - 0.04 * (x**2 + y**2)).astype(np.float32)


def _baseline_image(shape) -> tuple:
    """Motion-free mean EPI intensity, brain mask and GM probability."""
    affine, head, brain_p, gm, wm, csf = _anatomy(tuple(shape))
    t = _TISSUE_INTENSITY
    tissue = t["gm"] * gm + t["wm"] * wm + t["csf"] * csf
    scalp = t["scalp"] * head * (1 - brain_p)
    baseline = _BASELINE * (tissue + scalp) * _bias_field(shape)
    return affine, baseline.astype(np.float32), brain_p > 0.5, gm


# --------------------------------------------------------------------------------------
# Regions and networks


def _select_coordinates(per_network: int, min_distance: float) -> pd.DataFrame:
    """Pick well-separated Dosenbach coordinates, ``per_network`` per network.

    Greedy and deterministic: networks take turns choosing, each its coordinate farthest
    from every coordinate already chosen, among those at least ``min_distance`` mm away.
    """
    from nilearn import datasets

    atlas = datasets.fetch_coords_dosenbach_2010()
    coords = atlas.rois[["x", "y", "z"]].to_numpy(float)
    networks = np.asarray(atlas.networks)
    low = _FOV_CENTRE - _FOV_EXTENT / 2 + 12
    high = _FOV_CENTRE + _FOV_EXTENT / 2 - 12
    usable = np.all((coords > low) & (coords < high), axis=1)
    chosen: list[int] = []
    for _ in range(per_network):
        for net in NETWORKS:
            candidates = np.flatnonzero(usable & (networks == net))
            candidates = [c for c in candidates if c not in chosen]
            if not chosen:
                pick = candidates[int(np.argmin(coords[candidates, 1]))]
            else:
                dist = np.linalg.norm(coords[candidates, None] - coords[chosen][None], axis=2)
                nearest = dist.min(axis=1)
                if nearest.max() < min_distance:
                    continue
                pick = candidates[int(np.argmax(nearest))]
            chosen.append(pick)
    table = pd.DataFrame(coords[chosen], columns=["x", "y", "z"])
    table.insert(0, "network", networks[chosen])
    table = table.sort_values(["network", "x", "y"], key=lambda s: s.map(
        {n: i for i, n in enumerate(NETWORKS)}) if s.name == "network" else s)
    return table.reset_index(drop=True)


def _region_labels(table: pd.DataFrame, affine, gm: np.ndarray, radius: float) -> np.ndarray:
    """Label image: grey-matter voxels within ``radius`` mm of each coordinate."""
    shape = gm.shape
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    labels = np.zeros(shape, dtype=np.int16)
    flat = labels.reshape(-1)
    gm_flat = gm.reshape(-1)
    for k, (x, y, z) in enumerate(table[["x", "y", "z"]].to_numpy(), start=1):
        dist = np.linalg.norm(xyz - (x, y, z), axis=1)
        inside = (dist <= radius) & (gm_flat > 0.2) & (flat == 0)
        if inside.sum() < 4:  # coarse grids: take the 4 nearest brain voxels
            inside = np.zeros_like(inside)
            inside[np.argsort(dist + 1e3 * (gm_flat <= 0.05))[:4]] = True
        flat[inside] = k
    return labels


def _true_connectivity(networks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Correlation of ``sqrt(w_i) L_net(i) + sqrt(1 - w_i) e_i`` across regions."""
    index = np.array([NETWORKS.index(n) for n in networks])
    mix = np.sqrt(np.outer(weights, weights))
    matrix = mix * _NETWORK_CORRELATION[np.ix_(index, index)]
    np.fill_diagonal(matrix, 1.0)
    return matrix


def make_design(*, shape=(64, 64, 32), regions_per_network: int = 8, radius_mm: float | None = None,
                seed: int = 0) -> StudyDesign:
    """Grid, anatomy, regions and true connectivity shared by every subject of a study.

    Parameters
    ----------
    shape : tuple of 3 int
        EPI grid; the field of view is fixed (224 x 224 x 128 mm), so the voxel size is
        ``fov / shape`` (3.5 x 3.5 x 4 mm by default).
    regions_per_network : int
        Regions in each of the five networks (fewer if the coordinates run out).
    radius_mm : float, optional
        Radius of each spherical region (default: the larger of 8 mm and 1.2 voxels).
    seed : int
        Seed for the regions' network weights.

    Returns
    -------
    StudyDesign
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError("shape must be three grid sizes of at least 8 voxels")
    affine, baseline, brain, gm = _baseline_image(shape)
    zooms = np.abs(np.diag(affine)[:3])
    radius = radius_mm if radius_mm is not None else max(8.0, 1.2 * zooms.max())
    table = _select_coordinates(regions_per_network, min_distance=2 * radius + 8)
    labels = _region_labels(table, affine, gm, radius)
    rng = np.random.default_rng([seed, 4])
    weights = rng.uniform(0.55, 0.8, len(table))
    table.insert(0, "index", np.arange(1, len(table) + 1))
    short = {"default": "DMN", "fronto-parietal": "FPN", "cingulo-opercular": "CON",
             "sensorimotor": "SMN", "occipital": "VIS"}
    nets = table["network"].tolist()
    table.insert(1, "name", [f"{short[n]}_{nets[:k + 1].count(n):02d}" for k, n in enumerate(nets)])
    table["weight"] = weights.round(3)
    table["n_voxels"] = [(labels == k).sum() for k in table["index"]]
    truth = _true_connectivity(table["network"].to_numpy(), table["weight"].to_numpy())
    return StudyDesign(affine=affine, shape=shape, baseline=baseline, brain=brain, gm=gm,
                       labels=labels, regions=table, true_connectivity=truth)


# --------------------------------------------------------------------------------------
# Signals


def _hrf(tr: float) -> np.ndarray:
    """SPM canonical haemodynamic response sampled every ``tr`` seconds."""
    from nilearn.glm.first_level import spm_hrf

    return spm_hrf(tr, oversampling=1)


def _bold(neural: np.ndarray, tr: float, n_volumes: int) -> np.ndarray:
    """Convolve (T + burn-in, K) neural signals with the HRF, drop the burn-in, z-score."""
    hrf = _hrf(tr)
    bold = np.apply_along_axis(lambda s: np.convolve(s, hrf)[: len(s)], 0, neural)
    bold = bold[-n_volumes:]
    return (bold - bold.mean(0)) / bold.std(0)


def _region_signals(design: StudyDesign, rng, n_volumes: int, tr: float) -> np.ndarray:
    """BOLD signals (T, R) in z units whose population correlation is the true matrix."""
    burn = int(np.ceil(40.0 / tr))
    n = n_volumes + burn
    net_index = [NETWORKS.index(n_) for n_ in design.regions["network"]]
    latent = rng.standard_normal((n, len(NETWORKS))) @ np.linalg.cholesky(_NETWORK_CORRELATION).T
    own = rng.standard_normal((n, len(design.regions)))
    w = design.regions["weight"].to_numpy()
    neural = np.sqrt(w) * latent[:, net_index] + np.sqrt(1 - w) * own
    return _bold(neural, tr, n_volumes)


def _background_fluctuations(design: StudyDesign, rng, n_volumes: int, tr: float,
                             n_components: int = 12) -> np.ndarray:
    """Low-rank, spatially smooth BOLD fluctuations in grey matter outside the regions.

    Returns a (X, Y, Z, T) float32 array in z-like units (about unit SD in grey matter).
    """
    burn = int(np.ceil(40.0 / tr))
    outside = (design.gm > 0.2) & (ndimage.binary_dilation(design.labels > 0, iterations=2) == 0)
    maps = rng.standard_normal((n_components, *design.shape)).astype(np.float32)
    maps = np.stack([ndimage.gaussian_filter(m, 1.5) for m in maps])
    maps /= maps[:, outside].std(axis=1)[:, None, None, None]
    time = _bold(rng.standard_normal((n_volumes + burn, n_components)), tr, n_volumes)
    values = np.tensordot(maps[:, outside], time.T.astype(np.float32), axes=(0, 0))
    out = np.zeros((*design.shape, n_volumes), dtype=np.float32)
    out[outside] = values / np.sqrt(n_components)
    return out


# --------------------------------------------------------------------------------------
# Motion


def _smooth_walk(rng, n: int, smooth: float) -> np.ndarray:
    """A slow random walk starting at 0 and normalised to a maximum absolute value of 1."""
    walk = np.cumsum(ndimage.gaussian_filter1d(rng.standard_normal(n), smooth))
    walk -= walk[0]
    peak = np.abs(walk).max()
    return walk / peak if peak > 0 else walk


def make_motion(n_volumes: int, *, max_translation_mm: float = 2.0, max_rotation_deg: float = 2.0,
                n_jerks: int | None = None, seed=0) -> np.ndarray:
    """Head-motion parameters: a slow drift plus a few sudden jerks.

    Parameters
    ----------
    n_volumes : int
        Number of volumes.
    max_translation_mm, max_rotation_deg : float
        Largest absolute translation (mm) and rotation (degrees) reached in the run; the
        trace is scaled so that its peak equals these values exactly (0 = no motion).
    n_jerks : int, optional
        Number of sudden movements (steps that stay, or spikes lasting 1-3 volumes).
        Default: 1 to 5, drawn from the seed.
    seed : int or numpy.random.Generator
        Random seed.

    Returns
    -------
    motion : (n_volumes, 6) ndarray
        ``[trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (rad)]`` in the engine's
        convention (:func:`fmri_preproc.params_to_affine`); the first row is all zeros
        (the first volume is the reference position).
    """
    if n_volumes < 2:
        raise ValueError("n_volumes must be at least 2")
    rng = np.random.default_rng(seed)
    drift = np.stack([_smooth_walk(rng, n_volumes, n_volumes / 15) * rng.uniform(0.3, 1)
                      for _ in range(6)], axis=1)
    jerks = np.zeros((n_volumes, 6))
    if n_jerks is None:
        n_jerks = int(rng.integers(1, 6))
    for _ in range(n_jerks):
        start = int(rng.integers(n_volumes // 10, n_volumes - 2))
        size = rng.standard_normal(6)
        size *= rng.uniform(0.5, 1.2) / np.abs(size).max()
        stop = n_volumes if rng.random() < 0.5 else min(n_volumes, start + int(rng.integers(1, 4)))
        jerks[start:stop] += size
    motion = drift + jerks
    motion -= motion[0]
    scale = np.array([max_translation_mm] * 3 + [np.deg2rad(max_rotation_deg)] * 3)
    for cols in (slice(0, 3), slice(3, 6)):
        peak = np.abs(motion[:, cols]).max()
        if peak > 0:
            motion[:, cols] /= peak
    return motion * scale


def framewise_displacement(motion: np.ndarray, radius: float = 50.0) -> np.ndarray:
    """Framewise displacement (mm) of Power et al. (2012).

    ``FD_t = sum |d trans| + radius * sum |d rot|`` with rotations in radians; ``FD_0 = 0``.

    References
    ----------
    .. [1] Power JD, Barnes KA, Snyder AZ, Schlaggar BL, Petersen SE (2012). Spurious but
       systematic correlations in functional connectivity MRI networks arise from subject
       motion. NeuroImage 59:2142-2154. :doi:`10.1016/j.neuroimage.2011.10.018`
    """
    diff = np.abs(np.diff(np.asarray(motion, dtype=float), axis=0))
    return np.concatenate([[0.0], diff[:, :3].sum(1) + radius * diff[:, 3:].sum(1)])


def apply_motion(data: np.ndarray, affine: np.ndarray, motion: np.ndarray, *,
                 order: int = 3) -> np.ndarray:
    """Move a motion-free 4D array by the given rigid-body parameters.

    Volume ``t`` at world point ``x`` shows the reference at ``M_t^-1 x`` (``M_t`` from
    :func:`fmri_preproc.params_to_affine`): the tissue at reference point ``p`` appears at
    ``M_t p``. In voxels, each output voxel ``v`` samples the input at
    ``A^-1 M_t^-1 A v`` with a B-spline of the given order.

    Parameters
    ----------
    data : (X, Y, Z, T) ndarray
        Motion-free series.
    affine : (4, 4) ndarray
        Voxel-to-world affine.
    motion : (T, 6) ndarray
        Parameters per volume (mm, radians).
    order : int
        Spline order (3 = cubic; 1 = trilinear).

    Returns
    -------
    moved : (X, Y, Z, T) ndarray of float32
    """
    from fmri_preproc import params_to_affine

    data = np.asarray(data)
    motion = np.asarray(motion, dtype=float)
    if data.ndim != 4 or motion.shape != (data.shape[3], 6):
        raise ValueError("data must be 4D and motion (n_volumes, 6)")
    shape = data.shape[:3]
    inv_affine = np.linalg.inv(affine)
    out = np.empty(data.shape, dtype=np.float32)
    for t in range(data.shape[3]):
        if not motion[t].any():
            out[..., t] = data[..., t]
            continue
        world = params_to_affine(motion[t], affine, shape)
        vox = inv_affine @ np.linalg.inv(world) @ affine
        out[..., t] = ndimage.affine_transform(data[..., t], vox[:3, :3], vox[:3, 3], order=order,
                                               mode="nearest", output=np.float32)
    return out


def _spin_history(fd: np.ndarray, tau: float = 1.5) -> np.ndarray:
    """Signal-drop time course: each movement's FD decaying over ``tau`` volumes."""
    kernel = np.exp(-np.arange(int(6 * tau) + 1) / tau)
    return np.convolve(fd, kernel)[: len(fd)]


def _artefact_map(design: StudyDesign, rng, sigma_mm: float = 12.0) -> np.ndarray:
    """Spatially smooth sensitivity to motion-related signal drops, from 0.3 to 1.2.

    Every brain voxel loses signal after a movement, but by an amount that varies smoothly
    in space (FWHM about 28 mm), so nearby regions share more of their artefact than
    distant ones: a source of the distance dependence of motion artefacts (Power et al.
    2012).
    """
    sigma = sigma_mm / np.abs(np.diag(design.affine)[:3])
    field_ = ndimage.gaussian_filter(rng.standard_normal(design.shape), sigma)
    low, high = np.percentile(field_[design.brain], [1, 99])
    field_ = np.clip((field_ - low) / (high - low + 1e-12), 0, 1)
    return (0.3 + 0.9 * field_).astype(np.float32)


# --------------------------------------------------------------------------------------
# Runs


def _simulate(design: StudyDesign, *, n_volumes: int, tr: float, motion: np.ndarray, seed,
              signal_change: float = 1.0, noise_level: float = 1 / 75,
              spin_history_pct: float = 3.0) -> SimulatedRun:
    """Simulate one run of a study design with given motion (see :func:`simulate_run`)."""
    rng = np.random.default_rng(seed)
    signals = _region_signals(design, rng, n_volumes, tr)
    amplitude = rng.uniform(0.8, 1.2, signals.shape[1]) * signal_change / 100
    # fractional signal change per voxel and volume, float32 to halve the memory
    change = 0.5 * signal_change / 100 * _background_fluctuations(design, rng, n_volumes, tr)
    for k in range(signals.shape[1]):
        change[design.labels == k + 1] = (amplitude[k] * signals[:, k]).astype(np.float32)
    data = design.baseline[..., None] * (1 + change)
    del change
    data = apply_motion(data, design.affine, motion)
    fd = framewise_displacement(motion)
    drop = spin_history_pct / 100 * _spin_history(fd)
    data *= 1 - _artefact_map(design, rng)[..., None] * (design.baseline[..., None] > 200) * drop
    t = np.linspace(0, 1, n_volumes)
    drift = 1 + rng.uniform(-0.015, 0.015) * t + rng.uniform(-0.01, 0.01) * (t**2 - t)
    data *= drift.astype(np.float32)
    sigma = noise_level * _BASELINE
    # magnitude of a complex signal with Gaussian noise in each channel: Rician noise
    real = data + sigma * rng.standard_normal(data.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(data.shape, dtype=np.float32)
    data = np.sqrt(real**2 + imag**2, dtype=np.float32)
    del real, imag
    return _package(design, data, motion, signals * amplitude * 100, fd, tr)


def _package(design, data, motion, signals, fd, tr) -> SimulatedRun:
    """Wrap arrays as NIfTI images with TR and units in the header."""
    img = nib.Nifti1Image(data.astype(np.float32, copy=False), design.affine)
    zooms = np.abs(np.diag(design.affine)[:3])
    img.header.set_zooms((*zooms, float(tr)))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(design.affine, code=1)
    img.header.set_sform(design.affine, code=1)
    labels_img = nib.Nifti1Image(design.labels.astype(np.int16), design.affine)
    labels_img.header.set_xyzt_units("mm")
    mask_img = nib.Nifti1Image(design.brain.astype(np.uint8), design.affine)
    return SimulatedRun(img=img, motion=motion, labels_img=labels_img, networks=design.networks,
                        true_connectivity=design.true_connectivity, regions=design.regions,
                        signals=signals, fd=fd, brain_mask_img=mask_img, tr=float(tr))


def simulate_run(*, shape=(64, 64, 32), n_volumes: int = 150, tr: float = 2.0,
                 max_translation_mm: float = 2.0, max_rotation_deg: float = 2.0, seed: int = 0,
                 n_jerks: int | None = None, signal_change: float = 1.0,
                 noise_level: float = 1 / 75, spin_history_pct: float = 3.0) -> SimulatedRun:
    """Simulate one resting-state run with known motion, networks and connectivity.

    Parameters
    ----------
    shape : tuple of 3 int
        Grid (the field of view is fixed at 224 x 224 x 128 mm).
    n_volumes : int
        Number of volumes.
    tr : float
        Repetition time (s).
    max_translation_mm, max_rotation_deg : float
        Peak absolute translation (mm) and rotation (degrees) of the motion trace.
    seed : int
        Seed: the same seed gives the same run, bit for bit.
    n_jerks : int, optional
        Number of sudden movements (default 1-5 from the seed).
    signal_change : float
        Standard deviation of the regions' BOLD signal, in percent of the baseline.
    noise_level : float
        Thermal noise SD relative to the brain's baseline intensity (1/75: tSNR about 70).
    spin_history_pct : float
        Signal drop (percent) per mm of framewise displacement (decays over ~2 volumes).

    Returns
    -------
    SimulatedRun
    """
    if n_volumes < 10:
        raise ValueError("n_volumes must be at least 10")
    if tr <= 0:
        raise ValueError("tr must be positive (seconds)")
    design = make_design(shape=shape, seed=seed)
    motion = make_motion(n_volumes, max_translation_mm=max_translation_mm,
                         max_rotation_deg=max_rotation_deg, n_jerks=n_jerks, seed=[seed, 1])
    return _simulate(design, n_volumes=n_volumes, tr=tr, motion=motion, seed=[seed, 2],
                     signal_change=signal_change, noise_level=noise_level,
                     spin_history_pct=spin_history_pct)


# --------------------------------------------------------------------------------------
# Studies on disk


def _motion_levels(n_subjects: int, rng) -> np.ndarray:
    """Motion severities from still (0.05) to moving (1), evenly spread, shuffled."""
    levels = np.linspace(0.05, 1.0, n_subjects) if n_subjects > 1 else np.array([1.0])
    return rng.permutation(levels)


def _subject_job(args) -> dict:
    """Simulate and write one subject (runs in a worker process)."""
    (design, subject, level, sub_seed, n_volumes, tr, max_t, max_r, raw_dir, truth_dir) = args
    motion = make_motion(n_volumes, max_translation_mm=max_t * level,
                         max_rotation_deg=max_r * level,
                         n_jerks=int(round(1 + 5 * level)), seed=[*sub_seed, 1])
    run = _simulate(design, n_volumes=n_volumes, tr=tr, motion=motion, seed=[*sub_seed, 2])
    name = f"{subject}_task-rest"
    bold = Path(raw_dir) / f"{name}_bold.nii.gz"
    nib.save(run.img, bold)
    cols = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    pd.DataFrame(run.motion, columns=cols).to_csv(
        Path(truth_dir) / f"{name}_motion.tsv", sep="\t", index=False, float_format="%.6f")
    pd.DataFrame(run.signals, columns=design.regions["name"]).to_csv(
        Path(truth_dir) / f"{name}_signals.tsv", sep="\t", index=False, float_format="%.5f")
    return {"subject": subject, "bold": str(bold), "motion_level": round(float(level), 3),
            "mean_fd": round(float(run.fd.mean()), 4), "max_fd": round(float(run.fd.max()), 4),
            "max_translation_mm": round(float(np.abs(motion[:, :3]).max()), 3),
            "max_rotation_deg": round(float(np.rad2deg(np.abs(motion[:, 3:]).max())), 3)}


def simulate_study(out_dir, *, n_subjects: int = 10, shape=(64, 64, 32), n_volumes: int = 150,
                   tr: float = 2.0, max_translation_mm: float = 2.0, max_rotation_deg: float = 2.0,
                   seed: int = 0, n_jobs: int | None = None,
                   clear_existing: bool = True) -> pd.DataFrame:
    """Simulate a study and write it to ``out_dir/raw`` and ``out_dir/truth``.

    Subjects share the anatomy, regions and true connectivity; each has its own signals,
    noise and motion, with severities spread from nearly still to the maximum.

    Parameters
    ----------
    out_dir : str or Path
        Data folder (the workbook's ``data/``).
    n_subjects : int
        Number of subjects (``sub-01`` ...).
    shape, n_volumes, tr :
        Grid, run length and repetition time (s); see :func:`simulate_run`.
    max_translation_mm, max_rotation_deg : float
        Peak motion of the most-moving subject (mm, degrees).
    seed : int
        Study seed; the same seed writes the same files.
    n_jobs : int, optional
        Worker processes (default: one per CPU, at most one per subject).
    clear_existing : bool
        First delete a previous study's files (``raw/sub-*_task-rest_bold.nii.gz`` and
        everything in ``truth/``), so that a smaller study does not leave old subjects
        behind for the upload notebook to pick up.

    Returns
    -------
    pandas.DataFrame
        One row per subject: ``subject``, ``bold`` (path), ``motion_level``, ``mean_fd``,
        ``max_fd`` (mm), ``max_translation_mm``, ``max_rotation_deg``. Also written to
        ``truth/participants.tsv``.

    Notes
    -----
    Files (see ``data/README.md``)::

        raw/sub-XX_task-rest_bold.nii.gz        4D float32 BOLD
        truth/sub-XX_task-rest_motion.tsv       true motion (engine convention)
        truth/sub-XX_task-rest_signals.tsv      true regional BOLD (% signal change)
        truth/labels.nii.gz                     region labels
        truth/brain_mask.nii.gz                 brain mask
        truth/regions.tsv                       region -> network, MNI coordinates
        truth/true_connectivity.tsv             true correlation matrix
        truth/participants.tsv                  motion summary per subject
        truth/simulation.json                   parameters
    """
    if n_subjects < 1:
        raise ValueError("n_subjects must be at least 1")
    out_dir = Path(out_dir)
    raw_dir, truth_dir = out_dir / "raw", out_dir / "truth"
    raw_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    if clear_existing:
        for old in [*raw_dir.glob("sub-*_task-rest_bold.nii.gz"), *truth_dir.iterdir()]:
            if old.is_file():
                old.unlink()
    design = make_design(shape=shape, seed=seed)
    _write_design(design, truth_dir)
    levels = _motion_levels(n_subjects, np.random.default_rng([seed, 3]))
    jobs = [(design, f"sub-{i + 1:02d}", levels[i], [seed, 100 + i], n_volumes, tr,
             max_translation_mm, max_rotation_deg, raw_dir, truth_dir) for i in range(n_subjects)]
    n_jobs = n_jobs or min(n_subjects, os.cpu_count() or 1)
    if n_jobs > 1:
        with ProcessPoolExecutor(n_jobs) as pool:
            rows = list(pool.map(_subject_job, jobs))
    else:
        rows = [_subject_job(job) for job in jobs]
    table = pd.DataFrame(rows)
    table.drop(columns="bold").to_csv(truth_dir / "participants.tsv", sep="\t", index=False)
    params = {"n_subjects": n_subjects, "shape": list(shape), "n_volumes": n_volumes, "tr": tr,
              "max_translation_mm": max_translation_mm, "max_rotation_deg": max_rotation_deg,
              "seed": seed, "simulator_version": _PACKAGE_VERSION,
              "motion_convention": "fmri_preproc.params_to_affine: [trans_x, trans_y, trans_z "
                                   "(mm), rot_x, rot_y, rot_z (rad)], reference point -> moving"}
    (truth_dir / "simulation.json").write_text(json.dumps(params, indent=2))
    table["bold"] = table["bold"].map(Path)
    return table


def _write_design(design: StudyDesign, truth_dir: Path) -> None:
    """Write the labels, mask, region table and true matrix of a design."""
    labels = nib.Nifti1Image(design.labels.astype(np.int16), design.affine)
    labels.header.set_xyzt_units("mm")
    nib.save(labels, truth_dir / "labels.nii.gz")
    nib.save(nib.Nifti1Image(design.brain.astype(np.uint8), design.affine),
             truth_dir / "brain_mask.nii.gz")
    design.regions.to_csv(truth_dir / "regions.tsv", sep="\t", index=False)
    names = design.regions["name"]
    pd.DataFrame(design.true_connectivity, index=names, columns=names).to_csv(
        truth_dir / "true_connectivity.tsv", sep="\t", float_format="%.4f")


def load_truth(data_dir) -> dict:
    """Read a study's ground truth written by :func:`simulate_study`.

    Parameters
    ----------
    data_dir : str or Path
        The data folder holding ``truth/``.

    Returns
    -------
    dict
        ``labels_img`` (path), ``regions`` (DataFrame), ``true_connectivity`` (DataFrame),
        ``participants`` (DataFrame) and ``motion`` (subject -> (T, 6) ndarray).
        Empty when there is no ground truth (a researcher's own data).
    """
    truth = Path(data_dir) / "truth"
    if not (truth / "labels.nii.gz").exists():
        return {}
    motion = {p.name.split("_")[0]: pd.read_csv(p, sep="\t").to_numpy()
              for p in sorted(truth.glob("sub-*_motion.tsv"))}
    return {
        "labels_img": truth / "labels.nii.gz",
        "regions": pd.read_csv(truth / "regions.tsv", sep="\t"),
        "true_connectivity": pd.read_csv(truth / "true_connectivity.tsv", sep="\t", index_col=0),
        "participants": pd.read_csv(truth / "participants.tsv", sep="\t"),
        "motion": motion,
    }
