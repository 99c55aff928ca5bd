"""Simulated resting-state fMRI with a known ground truth, acquired like a scanner would.

Every run is built from the MNI152 template that ships inside nilearn (no download), on a
grid twice as fine as the one written, and is then acquired slice by slice:

* **Anatomy** (the object): grey matter, white matter and CSF probabilities with T2*-like
  EPI contrast (CSF > GM > WM), a faint scalp, a sagittal-sinus strip, tissue T1 values
  (3 T) and, optionally, a subject-specific 12-parameter placement in scanner space.
* **Neural signal**: spherical grey-matter regions at Dosenbach et al. (2010) coordinates in
  five networks; each region mixes its network's latent signal and its own, which defines
  the true correlation matrix exactly. Convolved with the SPM HRF, about 1 % signal change.
* **Physiology**: a respiratory belt and a pulse trace (rates, depth and heart-rate
  variability differ per subject). They drive RETROICOR-like cardiac and respiratory
  fluctuations, strongest at vessels and CSF (Glover et al. 2000), a global signal from
  breathing depth and heart rate (Birn et al. 2008; Chang et al. 2009), breathing-locked
  head motion and apparent motion along the phase-encode axis (Power et al. 2019;
  Fair et al. 2020).
* **Tissue noise**: spatially smooth fluctuations shared by GM, WM and CSF with different
  amplitudes (CSF > GM > WM), which WM/CSF regressors and aCompCor can estimate.
* **Head motion** (:func:`make_motion`): a slow drift, continuous small movements, breathing
  and sudden jerks at a subject-dependent rate, in continuous time.
* **Acquisition** (:func:`simulate_run`): every slice is excited and read at its own time
  (``SliceTiming``, interleaved or sequential), with the head where it is at that moment.
  The object moves; the receive-coil sensitivity stays fixed in the scanner. Tissue that
  moves through the slices is excited after an interval other than TR, and its
  longitudinal magnetisation recovers with its own T1 over the following volumes (spin
  history; Friston et al. 1996). The fine grid is block-averaged 2 x 2 x 2 to the output
  grid, so no estimator can win by matching the simulator's interpolation. Then slow
  drift and Rician thermal noise; stored as 16-bit integers, like scanner data.

The truth is expressed in the engine's reference position: the head at the acquisition of
volume ``fmri_preproc.motion.reference_index("middle", T)`` is where the labels and the
mask are. :func:`simulate_study` writes a valid BIDS raw dataset (``data/raw``) and the
truth beside it (``data/truth``); :func:`load_truth` reads the truth back. Everything is
deterministic given the seed.

References
----------
.. [1] Friston KJ, Williams S, Howard R, Frackowiak RSJ, Turner R (1996). Movement-related
   effects in fMRI time-series. Magn Reson Med 35:346-355. :doi:`10.1002/mrm.1910350312`
.. [2] Glover GH, Li TQ, Ress D (2000). Image-based method for retrospective correction of
   physiological motion effects in fMRI: RETROICOR. Magn Reson Med 44:162-167.
   :doi:`10.1002/1522-2594(200007)44:1<162::AID-MRM23>3.0.CO;2-E`
.. [3] Birn RM, Smith MA, Jones TB, Bandettini PA (2008). The respiration response
   function. NeuroImage 40:644-654. :doi:`10.1016/j.neuroimage.2007.11.059`
.. [4] Chang C, Cunningham JP, Glover GH (2009). Influence of heart rate on the BOLD
   signal: the cardiac response function. NeuroImage 44:857-869.
   :doi:`10.1016/j.neuroimage.2008.09.029`
.. [5] Power JD, Lynch CJ, Silver BM, Dubin MJ, Martin A, Jones RM (2019). Distinctions
   among real and apparent respiratory motions in human fMRI data. NeuroImage 201:116041.
   :doi:`10.1016/j.neuroimage.2019.116041`
.. [6] Fair DA, Miranda-Dominguez O, Snyder AZ, et al. (2020). Correction of respiratory
   artifacts in MRI head motion estimates. NeuroImage 208:116400.
   :doi:`10.1016/j.neuroimage.2019.116400`
.. [7] Behzadi Y, Restom K, Liau J, Liu TT (2007). A component based noise correction
   method (CompCor) for BOLD and perfusion based fMRI. NeuroImage 37:90-101.
   :doi:`10.1016/j.neuroimage.2007.04.042`
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage, signal, stats

from fmri_preproc import affine_to_params, framewise_displacement, params_to_affine
from fmri_preproc.contract import MOTION_PARAMS, TEMPLATE, Sidecar
from fmri_preproc.motion import reference_index

__all__ = [
    "NETWORKS",
    "PRESETS",
    "PUBLISHED_FD",
    "StudyConfig",
    "NoiseModel",
    "StudyDesign",
    "Physiology",
    "Motion",
    "SimulatedRun",
    "study_config",
    "make_design",
    "slice_timing",
    "make_physiology",
    "make_motion",
    "native_transform",
    "simulate_run",
    "simulate_study",
    "fd_summary",
    "load_truth",
    "run_bids_validator",
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
_SHORT_NAMES = {"default": "DMN", "fronto-parietal": "FPN", "cingulo-opercular": "CON",
                "sensorimotor": "SMN", "occipital": "VIS"}
#: Centre of the default field of view in MNI mm, and its extent (mm).
_FOV_CENTRE = np.array([0.0, -17.0, 12.0])
_FOV_EXTENT = np.array([224.0, 224.0, 128.0])
#: Relative EPI (T2*-weighted) intensity of each tissue; "blood" is the sagittal sinus.
_TISSUE_INTENSITY = {"gm": 1.0, "wm": 0.78, "csf": 1.45, "blood": 1.1, "scalp": 0.12}
#: Longitudinal relaxation times at 3 T (s): GM and WM from Wansapura et al. (1999, JMRI
#: 9:531), CSF about 4 s, venous blood about 1.6 s (Lu et al. 2004, MRM 52:679).
_T1_S = {"gm": 1.33, "wm": 0.83, "csf": 4.0, "blood": 1.6, "scalp": 1.0}
_BASELINE = 1000.0
SIMULATOR_VERSION = "2.0"
_PADDING_MM = 12.0  # object grid beyond the field of view, so tissue can move into it

#: Published framewise displacement (Power FD, mm) of healthy adults at rest, TR 2-3 s,
#: used as the target bands of the simulator. Median FD per run is about 0.1-0.2 mm
#: (Power et al. 2014; Parkes et al. 2018); Parkes et al.'s stringent criterion excludes
#: runs with mean FD > 0.25 mm or more than 20 % of volumes above 0.2 mm, and censoring at
#: 0.5 mm (Power et al. 2012) typically removes a few percent of volumes.
PUBLISHED_FD = {
    "median_mm": (0.08, 0.20),
    "fraction_above_0.2": (0.05, 0.30),
    "fraction_above_0.5": (0.005, 0.05),
    "references": [
        "Power JD et al. (2014) NeuroImage 84:320-341, doi:10.1016/j.neuroimage.2013.08.048",
        "Satterthwaite TD et al. (2013) NeuroImage 64:240-256, "
        "doi:10.1016/j.neuroimage.2012.08.052",
        "Parkes L et al. (2018) NeuroImage 171:415-436, doi:10.1016/j.neuroimage.2017.12.073",
    ],
}


# --------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class NoiseModel:
    """Amplitudes of the non-neural fluctuations, in percent of the local baseline.

    Attributes
    ----------
    thermal : float
        SD of the Gaussian noise in each of the real and imaginary channels (Rician
        magnitude), per output voxel, in % of the brain's baseline (1 %: tSNR 100 alone).
    cardiac, respiratory : float
        Amplitude (%) of the first RETROICOR harmonic where the vessel (cardiac) or CSF and
        brain-edge (respiratory) weight is 1; the second harmonic is 40 % / 30 % of it.
    global_signal : float
        SD (%) in grey matter of the global signal driven by breathing depth and heart
        rate (half in WM, 0.6 in CSF).
    tissue : tuple of 3 float
        SD (%) of spatially smooth, low-rank fluctuations in GM, WM and CSF.
    drift : float
        Peak slow scanner drift over the run (%).
    """

    thermal: float = 1.0
    cardiac: float = 1.2
    respiratory: float = 0.8
    global_signal: float = 0.5
    tissue: tuple = (0.5, 0.3, 1.2)
    drift: float = 1.0

    @classmethod
    def none(cls) -> "NoiseModel":
        """No noise of any kind (for tests and figures)."""
        return cls(thermal=0.0, cardiac=0.0, respiratory=0.0, global_signal=0.0,
                   tissue=(0.0, 0.0, 0.0), drift=0.0)


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines a simulated study (see :data:`PRESETS`).

    Attributes
    ----------
    n_subjects : int
        Subjects (``sub-01`` ...).
    shape : tuple of 3 int
        Output grid; the field of view is fixed (224 x 224 x 128 mm), so the voxel size
        is ``fov / shape``. Slices are along the third axis.
    n_volumes : int
        Volumes per run.
    tr : float
        Repetition time (s).
    slice_order : {"interleaved", "sequential"}
        See :func:`slice_timing`.
    flip_angle_deg : float
        Excitation flip angle (degrees), for the spin-history model.
    oversample : int
        Simulation grid refinement per axis (2: simulate at half the voxel size).
    native_space : bool
        Place each subject in scanner space with its own 12-parameter transform
        (:func:`native_transform`) instead of MNI space.
    noise : NoiseModel
        Non-neural fluctuation amplitudes.
    signal_change : float
        SD of the regions' BOLD signal (% of baseline).
    """

    n_subjects: int = 40
    shape: tuple = (32, 32, 20)
    n_volumes: int = 150
    tr: float = 2.0
    slice_order: str = "interleaved"
    flip_angle_deg: float = 77.0
    oversample: int = 2
    native_space: bool = False
    noise: NoiseModel = field(default_factory=NoiseModel)
    signal_change: float = 1.0


#: Named studies. ``realistic`` (default): enough subjects for QC-FC to mean something;
#: ``demo``: a light study for a first run on the cloud.
PRESETS = {
    "realistic": StudyConfig(),
    "demo": StudyConfig(n_subjects=8, n_volumes=100),
}


def study_config(preset: str = "realistic", **overrides) -> StudyConfig:
    """A preset with some fields replaced (``None`` values are ignored).

    Raises
    ------
    ValueError
        For an unknown preset or field.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = set(StudyConfig.__dataclass_fields__)
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown study settings {sorted(unknown)}; valid: {sorted(fields)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "shape" in changes:
        changes["shape"] = tuple(int(n) for n in changes["shape"])
    return replace(PRESETS[preset], **changes)


# --------------------------------------------------------------------------------------
# Containers


@dataclass
class StudyDesign:
    """What every subject of a study shares: grid, regions and the true matrix (MNI space).

    Attributes
    ----------
    affine : (4, 4) ndarray
        Voxel-to-world (MNI mm) affine of the output grid.
    shape : tuple of 3 int
        Output grid shape.
    baseline : (X, Y, Z) ndarray of float32
        Motion-free, noise-free mean image of an MNI-born subject (brain about 1000).
    brain : (X, Y, Z) ndarray of bool
        Brain mask (brain probability > 0.5 on the output grid).
    gm, wm, csf : (X, Y, Z) ndarray of float32
        Tissue probabilities on the output grid.
    labels : (X, Y, Z) ndarray of int16
        Region labels on the output grid, 0 = background, ``k`` = ``regions.iloc[k - 1]``.
    regions : pandas.DataFrame
        One row per region: ``index`` (label value), ``name``, ``network``, ``x``, ``y``,
        ``z`` (MNI mm), ``weight`` (share of the network signal), ``n_voxels``.
    true_connectivity : (R, R) ndarray
        Population correlation between the regions' neural (and BOLD) signals.
    radius : float
        Region radius (mm).
    """

    affine: np.ndarray
    shape: tuple
    baseline: np.ndarray
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    labels: np.ndarray
    regions: pd.DataFrame
    true_connectivity: np.ndarray
    radius: float

    @property
    def networks(self) -> dict:
        """Region name -> network name."""
        return dict(zip(self.regions["name"], self.regions["network"]))


@dataclass
class Physiology:
    """A subject's breathing and pulse, sampled at ``fs`` Hz from ``time[0]`` (s).

    Attributes
    ----------
    fs : float
        Sampling rate (Hz).
    time : (N,) ndarray
        Seconds from the start of the first volume (negative before it).
    respiration : (N,) ndarray
        Respiratory-belt signal (arbitrary units, unit SD).
    cardiac : (N,) ndarray
        Pulse-oximeter signal (arbitrary units).
    respiratory_phase, cardiac_phase : (N,) ndarray
        Unwrapped phases (rad); a breath or heartbeat per 2 pi.
    rvt : (N,) ndarray
        Respiration volume per time (belt amplitude x rate, a.u.), Birn et al. (2006).
    heart_rate : (N,) ndarray
        Beats per minute.
    global_signal : (N,) ndarray
        ``rvt`` convolved with the respiration response function plus ``heart_rate``
        convolved with the cardiac response function, unit SD.
    respiratory_rate_hz, heart_rate_hz : float
        Mean rates.
    """

    fs: float
    time: np.ndarray
    respiration: np.ndarray
    cardiac: np.ndarray
    respiratory_phase: np.ndarray
    cardiac_phase: np.ndarray
    rvt: np.ndarray
    heart_rate: np.ndarray
    global_signal: np.ndarray
    respiratory_rate_hz: float
    heart_rate_hz: float

    def at(self, times, name: str) -> np.ndarray:
        """Signal ``name`` (an attribute) linearly interpolated at ``times`` (s)."""
        return np.interp(np.asarray(times, dtype=float), self.time, getattr(self, name))


@dataclass
class Motion:
    """Head motion of one run, per slice acquisition and per volume.

    All parameters follow the engine's convention (:func:`fmri_preproc.params_to_affine`:
    ``[trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (rad)]``, a reference point ->
    the same tissue's position) and are relative to the reference volume.

    Attributes
    ----------
    real : (T, S, 6) ndarray
        The head's true position when slice ``s`` of volume ``t`` is acquired.
    apparent_y : (T, S) ndarray
        Apparent shift (mm) along the phase-encode axis (y) from breathing's B0 changes:
        the image moves, the head does not.
    volumes : (T, 6) ndarray
        Per volume: the slice average of ``real`` plus ``apparent_y`` on ``trans_y``,
        which is what a rigid realignment of whole volumes can recover; exactly zero at
        the reference volume.
    reference : int
        The reference volume, ``fmri_preproc.motion.reference_index("middle", T)``.
    jerks : pandas.DataFrame
        One row per sudden movement: ``time_s``, ``size_mm`` (displacement 50 mm from the
        centre), ``returns`` (True for out-and-back).
    """

    real: np.ndarray
    apparent_y: np.ndarray
    volumes: np.ndarray
    reference: int
    jerks: pd.DataFrame

    @property
    def fd(self) -> np.ndarray:
        """Framewise displacement of ``volumes`` (mm, engine definition: first NaN)."""
        return framewise_displacement(self.volumes)


@dataclass
class SimulatedRun:
    """One simulated run and its ground truth.

    Attributes
    ----------
    img : nibabel.Nifti1Image
        4D int16 BOLD run; TR (s) is the fourth zoom, units mm and seconds.
    nomotion_img : nibabel.Nifti1Image
        The motion-free noisy twin: same signals, physiology, drift and thermal noise
        samples, no motion (real or apparent), hence no spin-history effects.
    motion : (T, 6) ndarray
        True motion per volume (:attr:`Motion.volumes`); zero at ``reference``.
    slice_motion : Motion
        The full motion truth (per slice, real and apparent).
    slice_timing : (S,) ndarray
        Acquisition time of each slice within a volume (s), the BIDS ``SliceTiming``.
    labels_img, brain_mask_img : nibabel.Nifti1Image
        Region labels and brain mask in the run's reference position.
    networks : dict
        Region name -> network name.
    true_connectivity : (R, R) ndarray
        True correlation matrix between regions (rows in label order).
    regions : pandas.DataFrame
        Region table (see :class:`StudyDesign`).
    signals : (T, R) ndarray
        Noise-free, motion-free regional BOLD (% signal change), averaged over each
        volume's slice acquisition times.
    fd : (T,) ndarray
        True framewise displacement (mm, engine definition, first value NaN).
    physiology : Physiology
        The breathing and pulse recordings that drove the physiological noise.
    scanner_from_mni : (4, 4) ndarray
        ``x_scanner = A @ x_mni`` (mm): where the MNI-born head sits at the reference
        volume (identity for an MNI-born run).
    spin_history : (X, Y, Z, T) ndarray or None
        The spin-history signal factor (1 = steady state) on the output grid, when asked.
    tr : float
        Repetition time (s).
    """

    img: nib.Nifti1Image
    nomotion_img: nib.Nifti1Image
    motion: np.ndarray
    slice_motion: Motion
    slice_timing: np.ndarray
    labels_img: nib.Nifti1Image
    brain_mask_img: nib.Nifti1Image
    networks: dict
    true_connectivity: np.ndarray
    regions: pd.DataFrame
    signals: np.ndarray
    fd: np.ndarray
    physiology: Physiology
    scanner_from_mni: np.ndarray
    spin_history: np.ndarray | None
    tr: float

    @property
    def reference(self) -> int:
        """Index of the reference volume (engine rule)."""
        return self.slice_motion.reference


# --------------------------------------------------------------------------------------
# Grids


def _grid_affine(shape) -> np.ndarray:
    """RAS affine whose field of view covers ``_FOV_EXTENT`` around ``_FOV_CENTRE``."""
    shape = np.asarray(shape, dtype=float)
    zooms = _FOV_EXTENT / shape
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = _FOV_CENTRE - zooms * (shape - 1) / 2
    return affine


def _fine_affine(affine: np.ndarray, factor: int, pad=(0, 0, 0)) -> np.ndarray:
    """Affine of a grid ``factor`` times finer whose ``factor**3`` blocks average to the
    voxels of ``affine``, with ``pad`` extra fine voxels before the first one per axis."""
    offset = (1.0 / factor - 1.0) / 2.0
    fine = np.diag([1.0 / factor] * 3 + [1.0])
    fine[:3, 3] = offset - np.asarray(pad, dtype=float) / factor
    return affine @ fine


def _block_average(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each ``factor**3`` block of a 3D array (shape divisible by ``factor``)."""
    total = np.zeros(tuple(n // factor for n in volume.shape), dtype=np.float32)
    for a in range(factor):
        for b in range(factor):
            for c in range(factor):
                total += volume[a::factor, b::factor, c::factor]
    return total / factor**3


def _world(affine: np.ndarray, shape) -> np.ndarray:
    """World coordinates (mm) of every voxel of a grid, as an (X, Y, Z, 3) array."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _coil_sensitivity(xyz: np.ndarray) -> np.ndarray:
    """Receive-coil sensitivity of a 32-channel-like head array at scanner points (mm).

    Brighter near the coil elements: about 35 % brighter at the cortex than at the
    centre of the head, a little brighter at the back and the top. It is a property of
    the scanner: fixed in scanner space, whatever the head does.
    """
    centre = _FOV_CENTRE
    u = (xyz - centre) / 90.0  # 90 mm: about the head's half-width
    radius2 = (u**2).sum(-1) / 3.0
    return (0.85 + 0.9 * radius2 - 0.04 * u[..., 1] + 0.03 * u[..., 2]).astype(np.float32)


# --------------------------------------------------------------------------------------
# Anatomy


@lru_cache(maxsize=1)
def _templates() -> tuple:
    """MNI152 2 mm head, brain, GM and WM maps shipped with nilearn (float32, cached)."""
    from nilearn import datasets

    loaders = {"head": datasets.load_mni152_template, "brain": datasets.load_mni152_brain_mask,
               "gm": datasets.load_mni152_gm_template, "wm": datasets.load_mni152_wm_template}
    images = {name: load(resolution=2) for name, load in loaders.items()}
    affine = images["head"].affine
    return affine, {name: np.clip(img.get_fdata(dtype=np.float32), 0, 1)
                    for name, img in images.items()}


def _resample_templates(affine: np.ndarray, shape, scanner_from_mni: np.ndarray) -> dict:
    """The templates on a scanner grid, the head placed by ``scanner_from_mni``
    (trilinear; the mapping voxel -> template voxel is ``T^-1 N^-1 A``)."""
    template_affine, maps = _templates()
    vox = np.linalg.inv(template_affine) @ np.linalg.inv(scanner_from_mni) @ affine
    return {name: ndimage.affine_transform(data, vox[:3, :3], vox[:3, 3], output_shape=shape,
                                           order=1, mode="constant", cval=0.0,
                                           output=np.float32)
            for name, data in maps.items()}


def _tissues(maps: dict, mni_xyz: np.ndarray) -> dict:
    """Tissue fractions (GM, WM, CSF, sinus blood, scalp) from resampled templates."""
    brain = maps["brain"]
    gm, wm = maps["gm"] * brain, maps["wm"] * brain
    csf = np.clip(brain - gm - wm, 0, 1)
    # superior sagittal sinus: a midline strip just outside the brain, above the ventricles
    near = ndimage.binary_dilation(brain > 0.5, iterations=2) & (brain < 0.5)
    strip = near & (np.abs(mni_xyz[..., 0]) < 6.0) & (mni_xyz[..., 2] > 5.0)
    blood = ndimage.gaussian_filter(strip.astype(np.float32), 0.7)
    blood = np.clip(blood * 2.0, 0, 1) * (1 - brain)
    scalp = np.clip(maps["head"] * (1 - brain) - blood, 0, 1)
    return {"gm": gm, "wm": wm, "csf": csf, "blood": blood, "scalp": scalp, "brain": brain}


def _vessel_weight(tissue: dict, mni_xyz: np.ndarray) -> np.ndarray:
    """Where pulsatility is strongest (0-1): CSF spaces, the sagittal sinus, and the
    arteries at the base of the brain (circle of Willis) and in the Sylvian fissures."""
    def blob(centre, sigma):
        d2 = ((mni_xyz - np.asarray(centre)) ** 2).sum(-1)
        return np.exp(-d2 / (2 * sigma**2))

    arteries = blob((0, -10, -18), 10.0) + blob((38, -5, 0), 7.0) + blob((-38, -5, 0), 7.0)
    weight = tissue["csf"] + tissue["blood"] + 0.8 * arteries * tissue["brain"]
    return np.clip(weight, 0, 1).astype(np.float32)


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


def _region_labels(coords: np.ndarray, mni_xyz: np.ndarray, gm: np.ndarray, radius: float,
                   min_voxels: int) -> np.ndarray:
    """Label array: grey-matter voxels whose MNI position is within ``radius`` mm of each
    coordinate (at least ``min_voxels`` per region: the nearest GM voxels on coarse grids)."""
    xyz = mni_xyz.reshape(-1, 3)
    gm_flat = gm.reshape(-1)
    labels = np.zeros(len(xyz), dtype=np.int16)
    for k, centre in enumerate(coords, start=1):
        dist = np.linalg.norm(xyz - centre, axis=1)
        inside = (dist <= radius) & (gm_flat > 0.2) & (labels == 0)
        if inside.sum() < min_voxels:
            order = np.argsort(dist + 1e3 * ((gm_flat <= 0.05) | (labels != 0)))
            inside = np.zeros_like(inside)
            inside[order[:min_voxels]] = True
        labels[inside] = k
    return labels.reshape(gm.shape)


def _true_connectivity(networks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Correlation of ``sqrt(w_i) L_net(i) + sqrt(1 - w_i) e_i`` across regions."""
    index = np.array([NETWORKS.index(n) for n in networks])
    mix = np.sqrt(np.outer(weights, weights))
    matrix = mix * _NETWORK_CORRELATION[np.ix_(index, index)]
    np.fill_diagonal(matrix, 1.0)
    return matrix


def make_design(*, shape=(32, 32, 20), regions_per_network: int = 8,
                radius_mm: float | None = None, seed: int = 0) -> StudyDesign:
    """Grid, regions and true connectivity shared by every subject of a study.

    Parameters
    ----------
    shape : tuple of 3 int
        Output grid; the field of view is fixed (224 x 224 x 128 mm), so the voxel size is
        ``fov / shape`` (7 x 7 x 6.4 mm for the default 32 x 32 x 20).
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
        raise ValueError(f"shape must be three grid sizes of at least 8 voxels, got {shape}")
    affine = _grid_affine(shape)
    zooms = np.abs(np.diag(affine)[:3])
    radius = radius_mm if radius_mm is not None else max(8.0, 1.2 * zooms.max())
    table = _select_coordinates(regions_per_network, min_distance=2 * radius + 8)
    table.insert(0, "index", np.arange(1, len(table) + 1))
    nets = table["network"].tolist()
    table.insert(1, "name", [f"{_SHORT_NAMES[n]}_{nets[:k + 1].count(n):02d}"
                             for k, n in enumerate(nets)])
    table["weight"] = np.random.default_rng([seed, 4]).uniform(0.55, 0.8, len(table)).round(3)
    design = StudyDesign(affine=affine, shape=shape, baseline=None, brain=None, gm=None,
                         wm=None, csf=None, labels=None, regions=table, true_connectivity=_true_connectivity(
                             table["network"].to_numpy(), table["weight"].to_numpy()),
                         radius=float(radius))
    head = _head(design, 2, np.eye(4))
    design.baseline, design.brain, design.labels = (head.output_baseline, head.output_brain,
                                                    head.output_labels)
    design.gm, design.wm, design.csf = (head.output_tissue[t] for t in ("gm", "wm", "csf"))
    table["n_voxels"] = [int((design.labels == k).sum()) for k in table["index"]]
    return design


# --------------------------------------------------------------------------------------
# The head: the object on the fine grid


@dataclass
class _Head:
    """A subject's head on the padded fine grid (the object that moves).

    Voxel arrays hold only voxels with signal (``index``, Fortran order of the object
    grid, so sorted by slice).
    """

    affine: np.ndarray          # object grid (fine, padded), scanner mm
    shape: tuple
    pad: tuple
    index: np.ndarray           # flat (Fortran) indices of the head's voxels
    xyz: np.ndarray             # (N, 3) their scanner positions at the reference (mm)
    baseline: np.ndarray        # (N,) intensity
    r1: np.ndarray              # (N,) 1/T1 (1/s)
    region: np.ndarray          # (N,) label (0 = none)
    weights: dict               # (N,) maps: gm, wm, csf, vessel, edge, background
    output_baseline: np.ndarray  # on the output grid (reference position, coil applied)
    output_brain: np.ndarray
    output_tissue: dict
    output_labels: np.ndarray


_HEAD_CACHE: dict = {}


def _head(design: StudyDesign, oversample: int, scanner_from_mni: np.ndarray) -> _Head:
    """Build (or reuse) the object of a subject placed by ``scanner_from_mni``."""
    key = (design.shape, oversample, design.radius, len(design.regions),
           np.asarray(scanner_from_mni).round(9).tobytes())
    if key not in _HEAD_CACHE:
        if len(_HEAD_CACHE) > 2:
            _HEAD_CACHE.clear()
        _HEAD_CACHE[key] = _build_head(design, oversample, np.asarray(scanner_from_mni, float))
    return _HEAD_CACHE[key]


def _build_head(design: StudyDesign, factor: int, scanner_from_mni: np.ndarray) -> _Head:
    """The object on a grid ``factor`` times finer than the output, padded by 12 mm."""
    zooms = np.abs(np.diag(design.affine)[:3]) / factor
    pad = tuple(int(np.ceil(_PADDING_MM / z)) for z in zooms)
    shape = tuple(int(n * factor + 2 * p) for n, p in zip(design.shape, pad))
    affine = _fine_affine(design.affine, factor, pad)
    xyz = _world(affine, shape)
    mni_xyz = xyz @ np.linalg.inv(scanner_from_mni)[:3, :3].T + \
        np.linalg.inv(scanner_from_mni)[:3, 3]
    tissue = _tissues(_resample_templates(affine, shape, scanner_from_mni), mni_xyz)
    intensity = sum(_TISSUE_INTENSITY[t] * tissue[t] for t in _TISSUE_INTENSITY)
    r1 = sum(tissue[t] / _T1_S[t] for t in _T1_S) / np.maximum(
        sum(tissue[t] for t in _T1_S), 1e-6)
    radius = design.radius
    coords = design.regions[["x", "y", "z"]].to_numpy(float)
    labels = _region_labels(coords, mni_xyz, tissue["gm"], radius, min_voxels=4 * factor**3)
    vessel = _vessel_weight(tissue, mni_xyz)
    brain = tissue["brain"]
    edge = np.clip(ndimage.gaussian_filter(brain, 1.0) * (1 - ndimage.binary_erosion(
        brain > 0.5, iterations=2)), 0, 1)
    # neural background: grey matter away from the regions
    far = ~ndimage.binary_dilation(labels > 0, iterations=factor)
    background = (tissue["gm"] * far).astype(np.float32)
    inside = intensity > 0.01
    flat = np.flatnonzero(inside.reshape(-1, order="F"))
    take = lambda a: np.asarray(a, dtype=np.float32).reshape(-1, order="F")[flat]  # noqa: E731
    head = _Head(
        affine=affine, shape=shape, pad=pad, index=flat,
        xyz=np.stack([take(xyz[..., a]) for a in range(3)], axis=1),
        baseline=_BASELINE * take(intensity), r1=take(r1),
        region=labels.reshape(-1, order="F")[flat],
        weights={"gm": take(tissue["gm"]), "wm": take(tissue["wm"]), "csf": take(tissue["csf"]),
                 "vessel": take(vessel), "edge": take(np.maximum(edge, tissue["csf"])),
                 "background": take(background)},
        output_baseline=None, output_brain=None, output_tissue=None, output_labels=None)
    crop = tuple(slice(p, p + n * factor) for p, n in zip(pad, design.shape))
    coil = _coil_sensitivity(xyz[crop])
    head.output_baseline = _block_average(_BASELINE * intensity[crop] * coil, factor)
    head.output_brain = _block_average(brain[crop], factor) > 0.5
    head.output_tissue = {t: _block_average(tissue[t][crop], factor) for t in ("gm", "wm", "csf")}
    head.output_labels = _majority_labels(labels[crop], factor, len(coords))
    return head


def _majority_labels(fine: np.ndarray, factor: int, n_regions: int) -> np.ndarray:
    """Output-grid labels: each block takes the region covering most of it (at least 3/8
    of a 2x2x2 block); every region keeps at least its best-covered block."""
    counts = np.stack([_block_average((fine == k).astype(np.float32), factor)
                       for k in range(1, n_regions + 1)])
    best = counts.argmax(0)
    labels = np.where(counts.max(0) >= 3 / 8, best + 1, 0).astype(np.int16)
    for k in range(n_regions):
        if not (labels == k + 1).any() and counts[k].max() > 0:
            labels[np.unravel_index(np.argmax(counts[k]), labels.shape)] = k + 1
    return labels


def native_transform(seed) -> np.ndarray:
    """A random 12-parameter placement of the MNI-born head in scanner space.

    Scales 0.85-1.15 per axis, rotations up to 15 degrees about each axis and shifts up to
    20 mm, about the field-of-view centre: ``x_scanner = A @ x_mni`` (homogeneous mm).

    Parameters
    ----------
    seed : int, sequence or numpy.random.Generator

    Returns
    -------
    (4, 4) ndarray
    """
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.85, 1.15, 3)
    angles = np.deg2rad(rng.uniform(-15, 15, 3))
    shift = rng.uniform(-20, 20, 3)
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    linear = rx @ ry @ rz @ np.diag(scale)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = _FOV_CENTRE + shift - linear @ _FOV_CENTRE
    return matrix


# --------------------------------------------------------------------------------------
# Time


def slice_timing(n_slices: int, tr: float, order: str = "interleaved") -> np.ndarray:
    """Acquisition time of each slice within a volume (s): the BIDS ``SliceTiming``.

    Parameters
    ----------
    n_slices : int
        Slices along the third array axis (BIDS ``SliceEncodingDirection`` ``k``).
    tr : float
        Repetition time (s); slices are spread evenly over it.
    order : {"interleaved", "sequential"}
        ``"interleaved"``: slices 0, 2, 4, ... then 1, 3, 5, ... (ascending);
        ``"sequential"``: 0, 1, 2, ... (ascending).

    Returns
    -------
    (n_slices,) ndarray
        ``SliceTiming[s]`` in seconds, multiples of ``tr / n_slices``.
    """
    if order == "interleaved":
        sequence = [*range(0, n_slices, 2), *range(1, n_slices, 2)]
    elif order == "sequential":
        sequence = list(range(n_slices))
    else:
        raise ValueError(f"slice order must be 'interleaved' or 'sequential', not {order!r}")
    times = np.empty(n_slices)
    times[sequence] = np.arange(n_slices) * tr / n_slices
    return times


def _slow_noise(rng, n: int, fs: float, cutoff_hz: float) -> np.ndarray:
    """Gaussian noise low-passed below ``cutoff_hz`` (Gaussian transfer function
    ``exp(-f^2 / 2 cutoff^2)``, applied in the Fourier domain), unit SD."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum *= np.exp(-0.5 * (np.fft.rfftfreq(n, 1 / fs) / cutoff_hz) ** 2)
    x = np.fft.irfft(spectrum, n)
    return x / x.std()


def _respiration_response(t: np.ndarray) -> np.ndarray:
    """Respiration response function of Birn et al. (2008), t in s."""
    return 0.6 * t**2.1 * np.exp(-t / 1.6) - 0.0023 * t**3.54 * np.exp(-t / 4.25)


def _cardiac_response(t: np.ndarray) -> np.ndarray:
    """Cardiac response function of Chang et al. (2009), t in s."""
    return 0.6 * t**2.7 * np.exp(-t / 1.6) - 16 / np.sqrt(2 * np.pi * 9) * np.exp(
        -0.5 * (t - 12) ** 2 / 9)


def make_physiology(duration_s: float, *, seed=0, respiratory_rate_hz: float | None = None,
                    heart_rate_hz: float | None = None, variability: float = 1.0,
                    fs: float = 50.0, burn_in_s: float = 40.0) -> Physiology:
    """Breathing and pulse of one subject, with their global BOLD effect.

    Breathing: 0.2-0.35 Hz (12-21 breaths/min) unless given, with slowly varying rate
    (about 8 %) and depth (about 25 %), and an occasional deep breath. Pulse: 0.9-1.3 Hz
    unless given, with slow heart-rate variability (5 %) and respiratory sinus arrhythmia.

    Parameters
    ----------
    duration_s : float
        Length of the run (s); the traces start ``burn_in_s`` before it.
    seed : int, sequence or numpy.random.Generator
    respiratory_rate_hz, heart_rate_hz : float, optional
        Mean rates (Hz).
    variability : float
        Scales every variation of rate and depth (0: perfectly regular, for tests).
    fs : float
        Sampling rate of the traces (Hz).
    burn_in_s : float
        Seconds simulated before the run (the response functions need a past).

    Returns
    -------
    Physiology
    """
    rng = np.random.default_rng(seed)
    resp_rate = respiratory_rate_hz or rng.uniform(0.2, 0.35)
    heart_rate = heart_rate_hz or rng.uniform(0.9, 1.3)
    n = int(round((duration_s + burn_in_s) * fs))
    time = np.arange(n) / fs - burn_in_s
    v = float(variability)
    f_resp = resp_rate * np.exp(0.08 * v * _slow_noise(rng, n, fs, 0.02))
    depth = np.exp(0.25 * v * _slow_noise(rng, n, fs, 0.03))
    phase_r = 2 * np.pi * np.cumsum(f_resp) / fs
    # deep breaths: about one every 2-3 minutes, twice as deep for one breath
    n_deep = rng.poisson(v * (duration_s + burn_in_s) / 150.0)
    for centre in rng.uniform(time[0], time[-1], n_deep):
        depth *= 1 + 1.2 * np.exp(-0.5 * ((time - centre) / (0.7 / resp_rate)) ** 2)
    belt = depth * (np.cos(phase_r) + 0.15 * np.cos(2 * phase_r + 0.5))
    rsa = 0.03 * v * np.cos(phase_r)
    f_card = heart_rate * (1 + 0.05 * v * _slow_noise(rng, n, fs, 0.05) + rsa)
    phase_c = 2 * np.pi * np.cumsum(f_card) / fs
    wrapped = np.mod(phase_c, 2 * np.pi)
    pulse = np.exp(-0.5 * ((wrapped - 1.2) / 0.35) ** 2) + 0.35 * np.exp(
        -0.5 * ((wrapped - 2.6) / 0.45) ** 2)
    rvt = depth * f_resp
    bpm = 60 * f_card
    kernel_t = np.arange(0, 40, 1 / fs)
    drive = sum(signal.fftconvolve(x - x.mean(), response(kernel_t))[:n] / max(x.std(), 1e-9)
                for x, response in ((rvt, _respiration_response), (bpm, _cardiac_response)))
    drive = drive - drive[time >= 0].mean()
    scale = drive[time >= 0].std()
    global_signal = drive / scale if scale > 0 else drive
    return Physiology(fs=fs, time=time, respiration=belt / belt.std(), cardiac=pulse,
                      respiratory_phase=phase_r, cardiac_phase=phase_c, rvt=rvt,
                      heart_rate=bpm, global_signal=global_signal,
                      respiratory_rate_hz=float(f_resp.mean()),
                      heart_rate_hz=float(f_card.mean()))


@lru_cache(maxsize=8)
def _hrf(dt: float) -> np.ndarray:
    """SPM canonical haemodynamic response sampled every ``dt`` seconds."""
    from nilearn.glm.first_level import spm_hrf

    return spm_hrf(dt, oversampling=1)


def _bold(neural: np.ndarray, dt: float, n_keep: int) -> np.ndarray:
    """Convolve (N, K) neural signals with the HRF, keep the last ``n_keep`` samples,
    z-score each column."""
    bold = signal.fftconvolve(neural, _hrf(dt)[:, None], axes=0)[: len(neural)][-n_keep:]
    return (bold - bold.mean(0)) / bold.std(0)


# --------------------------------------------------------------------------------------
# Motion


def _motion_weights() -> np.ndarray:
    """Relative size of each parameter (mm, or mm at 50 mm for rotations): heads move most
    in pitch (rot_x) and along z and y."""
    return np.array([0.6, 1.0, 1.2, 1.3, 0.6, 0.6])


def _to_params(mm_equivalent: np.ndarray) -> np.ndarray:
    """Columns in mm (translations) and mm at 50 mm (rotations) -> engine units."""
    out = np.array(mm_equivalent, dtype=float)
    out[..., 3:] /= 50.0
    return out


def _ornstein_uhlenbeck(rng, n: int, dt: float, tau: float, sd: float) -> np.ndarray:
    """Mean-reverting random motion with stationary SD ``sd`` and time constant ``tau``."""
    a = np.exp(-dt / tau)
    shocks = rng.standard_normal(n) * sd * np.sqrt(1 - a**2)
    return signal.lfilter([1.0], [1.0, -a], shocks) + rng.standard_normal() * sd * a


def _jerks(rng, times: np.ndarray, level: float, duration_s: float) -> tuple:
    """Sudden movements: a Poisson number (rate rises with ``level``), each a smooth
    0.3-1 s movement of lognormal size that either stays or returns after 1-6 s."""
    rate_per_min = 0.4 * level**1.5
    count = rng.poisson(rate_per_min * duration_s / 60.0)
    trace = np.zeros((len(times), 6))
    rows = []
    for _ in range(count):
        start = rng.uniform(0.05, 0.95) * duration_s
        size = rng.lognormal(np.log(0.45 * np.sqrt(level)), 0.6)
        direction = rng.standard_normal(6) * _motion_weights()
        direction *= size / np.abs(direction).sum()
        rise = rng.uniform(0.3, 1.0)
        returns = bool(rng.random() < 0.6)
        step = _smooth_step(times, start, rise)
        if returns:
            step = step - _smooth_step(times, start + rise + rng.uniform(1.0, 6.0), rise)
        trace += step[:, None] * direction
        rows.append({"time_s": round(start, 3), "size_mm": round(float(size), 3),
                     "returns": returns})
    return _to_params(trace), pd.DataFrame(rows, columns=["time_s", "size_mm", "returns"])


def _smooth_step(times: np.ndarray, start: float, rise: float) -> np.ndarray:
    """0 before ``start``, 1 after ``start + rise``, a raised cosine in between."""
    u = np.clip((times - start) / rise, 0, 1)
    return 0.5 - 0.5 * np.cos(np.pi * u)


def make_motion(n_volumes: int, tr: float, slice_times, *, level: float = 1.0, seed=0,
                physiology: Physiology | None = None) -> Motion:
    """Head motion in continuous time, sampled at every slice's acquisition.

    Components (all scaled by the subject's ``level``, 1 = a typical adult):

    * slow drift (SD about 0.15 mm over the run);
    * continuous small movements (mean-reverting, 1.5 s time constant), which make FD a
      continuous distribution;
    * breathing: real motion along z and in pitch, and apparent motion along the
      phase-encode axis y from B0 changes (Power et al. 2019; Fair et al. 2020), locked
      to the respiratory belt of ``physiology``; their sizes vary between subjects;
    * sudden jerks at a rate of about ``0.4 * level**1.5`` per minute, 0.45 mm typical
      size (50 mm from the centre), 60 % of them returning after 1-6 s.

    Parameters
    ----------
    n_volumes : int
        Volumes.
    tr : float
        Repetition time (s).
    slice_times : (S,) array
        ``SliceTiming`` (s), see :func:`slice_timing`.
    level : float
        Subject's motion level (0 = perfectly still; breathing's apparent motion stays).
    seed : int, sequence or numpy.random.Generator
    physiology : Physiology, optional
        Breathing that drives the respiratory motion (default: drawn from the seed).

    Returns
    -------
    Motion
        Relative to the reference volume (``reference_index("middle", T)``).
    """
    if n_volumes < 2:
        raise ValueError("n_volumes must be at least 2")
    if level < 0:
        raise ValueError("level must be >= 0")
    rng = np.random.default_rng(seed)
    slice_times = np.asarray(slice_times, dtype=float)
    times = np.arange(n_volumes)[:, None] * tr + slice_times[None, :]  # (T, S)
    flat = times.reshape(-1)
    duration = n_volumes * tr
    if physiology is None:
        physiology = make_physiology(duration, seed=rng)
    dt = tr / len(slice_times)
    grid = np.arange(0, duration + dt, dt)
    weights = _motion_weights()
    drift = np.stack([_slow_noise(rng, len(grid), 1 / dt, 0.005) for _ in range(6)], 1)
    drift *= 0.15 * level * weights / weights.max()
    jitter = np.stack([_ornstein_uhlenbeck(rng, len(grid), dt, 1.5, 0.012) for _ in range(6)],
                      1) * level * weights
    real = _to_params(drift + jitter)
    jerks, jerk_table = _jerks(rng, grid, level, duration)
    real = np.stack([np.interp(flat, grid, c) for c in (real + jerks).T], 1)
    belt = physiology.at(flat, "respiration")
    breathing_z, breathing_pitch = rng.lognormal(np.log([0.015, 0.015]), 0.5)
    real[:, 2] += breathing_z * belt
    real[:, 3] += breathing_pitch / 50.0 * belt
    apparent = rng.lognormal(np.log(0.06), 0.5) * physiology.at(
        flat + 0.3, "respiration")  # B0 follows the chest with a small lag
    real = real.reshape(n_volumes, len(slice_times), 6)
    apparent = apparent.reshape(n_volumes, len(slice_times))
    return _referenced(real, apparent, jerk_table)


def _referenced(real: np.ndarray, apparent: np.ndarray, jerks: pd.DataFrame) -> Motion:
    """Make the reference volume's slice-average position the origin of a generated
    trajectory (a constant parameter offset: the trajectory is random anyway, and the
    truth stays the slice average of the parameters actually applied)."""
    n_volumes = apparent.shape[0]
    ref = reference_index("middle", n_volumes)
    real = real - real[ref].mean(axis=0)
    apparent = apparent - apparent[ref].mean()
    volumes = real.mean(axis=1)
    volumes[:, 1] += apparent.mean(axis=1)
    volumes[ref] = 0.0  # zero up to rounding; make the reference row exact
    return Motion(real=real, apparent_y=apparent, volumes=volumes, reference=ref, jerks=jerks)


def _motion_from_volumes(volumes: np.ndarray, n_volumes: int, n_slices: int, affine,
                         shape) -> Motion:
    """Motion given per volume (every slice of a volume in the same position), re-expressed
    relative to the reference volume exactly: ``M_t M_ref^-1`` (never negated params)."""
    volumes = np.asarray(volumes, dtype=float)
    if volumes.shape != (n_volumes, 6):
        raise ValueError(f"motion must have shape (n_volumes, 6) = ({n_volumes}, 6), got "
                         f"{volumes.shape}")
    ref = reference_index("middle", len(volumes))
    inv_ref = np.linalg.inv(params_to_affine(volumes[ref], affine, shape))
    relative = np.array([affine_to_params(params_to_affine(p, affine, shape) @ inv_ref,
                                          affine, shape) for p in volumes])
    relative[ref] = 0.0
    real = np.repeat(relative[:, None, :], n_slices, axis=1)
    empty = pd.DataFrame(columns=["time_s", "size_mm", "returns"])
    return Motion(real=real, apparent_y=np.zeros(real.shape[:2]), volumes=relative,
                  reference=ref, jerks=empty)


def _scale_peaks(motion: Motion, max_translation_mm, max_rotation_deg) -> Motion:
    """Rescale real motion so the per-volume peaks equal the given values (stress tests)."""
    real = motion.real.copy()
    for cols, peak in ((slice(0, 3), max_translation_mm),
                       (slice(3, 6), None if max_rotation_deg is None
                        else np.deg2rad(max_rotation_deg))):
        if peak is None:
            continue
        current = np.abs(motion.volumes[:, cols]).max()
        real[..., cols] *= peak / current if current > 0 else 0.0
    return _referenced(real, motion.apparent_y, motion.jerks)


def fd_summary(fd) -> dict:
    """Median, mean, maximum (mm) and fractions of volumes above 0.2 and 0.5 mm of FD
    values (NaNs, such as the engine's first value, are ignored)."""
    fd = np.asarray(fd, dtype=float)
    fd = fd[np.isfinite(fd)]
    return {"median_fd": float(np.median(fd)), "mean_fd": float(fd.mean()),
            "max_fd": float(fd.max()), "fraction_above_0.2": float((fd > 0.2).mean()),
            "fraction_above_0.5": float((fd > 0.5).mean())}


# --------------------------------------------------------------------------------------
# Signals and noise on the head's voxels


def _smooth_fields(rng, shape, n: int, sigma_vox, index: np.ndarray) -> np.ndarray:
    """``n`` smooth Gaussian random fields, (N, n) at the head voxels, unit RMS there."""
    out = np.empty((len(index), n), dtype=np.float32)
    for k in range(n):
        field_ = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                         sigma_vox)
        values = field_.reshape(-1, order="F")[index]
        out[:, k] = values / np.sqrt(np.mean(values**2))
    return out


def _slice_grid_times(n_volumes: int, tr: float, n_slices: int) -> np.ndarray:
    """Times of the slice grid ``j * tr / n_slices`` (s), ``n_volumes * n_slices`` of them."""
    return np.arange(n_volumes * n_slices) * tr / n_slices


def _components(head: _Head, rng, physiology: Physiology, n_volumes: int, tr: float,
                n_slices: int, noise: NoiseModel, background_change: float) -> tuple:
    """Spatial maps (N, K) and time courses (K, J) of every non-regional fluctuation, as
    fractions of the baseline; J samples on the slice grid."""
    times = _slice_grid_times(n_volumes, tr, n_slices)
    dt = tr / n_slices
    zooms = np.abs(np.diag(head.affine)[:3])
    w = head.weights
    maps, courses = [], []
    # neural background: low-rank smooth BOLD in grey matter away from the regions
    n_bg = 12
    burn = int(np.ceil(40.0 / dt))
    maps.append(_smooth_fields(rng, head.shape, n_bg, 6.0 / zooms, head.index)
                * (w["background"][:, None] * background_change / 100 / np.sqrt(n_bg)))
    courses.append(_bold(rng.standard_normal((len(times) + burn, n_bg)), dt, len(times)).T)
    # RETROICOR-like cardiac and respiratory terms: a(x) cos(m phi - m theta(x))
    for name, amplitude, weight, harmonics in (
            ("cardiac_phase", noise.cardiac, 0.15 + 0.85 * w["vessel"], (1.0, 0.4)),
            ("respiratory_phase", noise.respiratory, 0.25 + 0.75 * w["edge"], (1.0, 0.3))):
        theta = 2 * np.pi * _smooth_fields(rng, head.shape, 1, 15.0 / zooms, head.index)[:, 0]
        phase = physiology.at(times, name)
        for m, relative in enumerate(harmonics, start=1):
            a = amplitude / 100 * relative * weight
            maps += [(a * np.cos(m * theta))[:, None], (a * np.sin(m * theta))[:, None]]
            courses += [np.cos(m * phase)[None], np.sin(m * phase)[None]]
    # global signal from breathing depth and heart rate: mostly grey matter
    tissue_mix = w["gm"] + 0.5 * w["wm"] + 0.6 * w["csf"]
    maps.append((noise.global_signal / 100 * tissue_mix)[:, None])
    courses.append(physiology.at(times, "global_signal")[None])
    # smooth tissue noise, shared by GM, WM and CSF with different amplitudes
    n_tissue = 16
    gm_sd, wm_sd, csf_sd = noise.tissue
    amplitude = (gm_sd * w["gm"] + wm_sd * w["wm"] + csf_sd * w["csf"]) / 100
    maps.append(_smooth_fields(rng, head.shape, n_tissue, 10.0 / zooms, head.index)
                * (amplitude[:, None] / np.sqrt(n_tissue)))
    smoothness = rng.uniform(0.5, 4.0, n_tissue) / dt
    white = rng.standard_normal((n_tissue, len(times)))
    tissue_courses = np.stack([ndimage.gaussian_filter1d(x, s) for x, s in zip(white, smoothness)])
    courses.append((tissue_courses.T / tissue_courses.std(1)).T)
    return (np.concatenate(maps, axis=1).astype(np.float32),
            np.concatenate(courses, axis=0).astype(np.float32))


def _region_signals(regions: pd.DataFrame, rng, n_samples: int, dt: float) -> np.ndarray:
    """BOLD signals (J, R), z-scored, whose population correlation is the true matrix."""
    burn = int(np.ceil(40.0 / dt))
    n = n_samples + burn
    net_index = [NETWORKS.index(n_) for n_ in regions["network"]]
    latent = rng.standard_normal((n, len(NETWORKS))) @ np.linalg.cholesky(
        _NETWORK_CORRELATION).T
    own = rng.standard_normal((n, len(regions)))
    w = regions["weight"].to_numpy()
    neural = np.sqrt(w) * latent[:, net_index] + np.sqrt(1 - w) * own
    return _bold(neural, dt, n_samples)


# --------------------------------------------------------------------------------------
# Acquisition


@dataclass
class _Scan:
    """What one acquisition needs besides the head."""

    affine: np.ndarray        # output grid
    shape: tuple
    tr: float
    slice_times: np.ndarray
    flip_angle: float         # rad
    factor: int


def _slab_coefficients(scan: _Scan, matrices: np.ndarray) -> np.ndarray:
    """Row giving the output-grid slice coordinate of a scanner point, per (S) matrix."""
    inv = np.linalg.inv(scan.affine)
    return np.einsum("j,sjk->sk", inv[2], matrices)


def _acquire(head: _Head, scan: _Scan, motion: Motion, maps: np.ndarray,
             courses: np.ndarray, region_courses: np.ndarray, rng, noise: NoiseModel,
             record_spin_history: bool) -> tuple:
    """Acquire a run and its motion-free twin slice by slice (see the module docstring).

    ``courses`` (K, T, S) and ``region_courses`` (R, T, S) hold each fluctuation at every
    slice's acquisition time, as fractions of the baseline.
    """
    n_volumes, n_slices = motion.apparent_y.shape
    f = scan.factor
    out_shape = scan.shape
    fine = _FineGrid(head, scan)
    # Tissue is continuous: each voxel's excitation is decided at a random point of its
    # thickness, so the share of tissue that crosses a slice boundary grows smoothly with
    # through-plane motion instead of jumping when voxel centres cross.
    thickness = abs(head.affine[2, 2])
    depth = rng.uniform(-0.5, 0.5, len(head.xyz)) * thickness
    xyz1 = np.concatenate([head.xyz, np.ones((len(head.xyz), 1), np.float32)], 1)
    xyz1[:, 2] += depth
    rest = xyz1 @ _slab_coefficients(scan, np.eye(4)[None])[0]
    home = np.clip(np.rint(rest), 0, n_slices - 1).astype(np.intp)
    blocks = np.searchsorted(home, np.arange(n_slices + 1))
    cos_a = np.cos(scan.flip_angle)
    e1 = np.exp(-scan.tr * head.r1)
    steady = (1 - e1) / (1 - cos_a * e1)  # Mz before each pulse at steady state
    mz_after = steady * cos_a
    last_time = None
    has_region = np.flatnonzero(head.region > 0)
    region_of = head.region[has_region].astype(np.intp) - 1
    run = np.empty((*out_shape, n_volumes), dtype=np.float32)
    twin = np.empty_like(run)
    history = np.empty_like(run) if record_spin_history else None
    drift = _drift(rng, n_volumes, noise.drift)
    sigma = noise.thermal / 100 * _BASELINE
    for t in range(n_volumes):
        matrices = np.array([params_to_affine(p, scan.affine, scan.shape)
                             for p in motion.real[t]])
        # which slice excites each tissue voxel now (refined once with that slice's position)
        coef = _slab_coefficients(scan, matrices)
        slab = np.clip(np.rint(np.einsum("nk,nk->n", xyz1, coef[home])), 0, n_slices - 1)
        slab = np.clip(np.rint(np.einsum("nk,nk->n", xyz1, coef[slab.astype(np.intp)])),
                       0, n_slices - 1).astype(np.intp)
        # spin history: Mz recovers with T1 since the last excitation, then the pulse
        now = t * scan.tr + scan.slice_times[slab]
        if t == 0:  # steady state wherever the head starts
            last_time = now - scan.tr
        mz_before = 1 - (1 - mz_after) * np.exp(-(now - last_time) * head.r1)
        factor = mz_before / steady
        mz_after, last_time = mz_before * cos_a, now
        change, change_still = _fluctuations(maps, courses[:, t], blocks, home, slab)
        change[has_region] += region_courses[region_of, t, slab[has_region]]
        change_still[has_region] += region_courses[region_of, t, home[has_region]]
        moving = head.baseline * factor * (1 + change)
        still = head.baseline * (1 + change_still)
        coords, coil = fine.sampling(matrices, motion.apparent_y[t])
        run[..., t] = fine.image(ndimage.map_coordinates(
            _scatter(head, moving), coords, order=1, mode="constant", cval=0.0,
            output=np.float32, prefilter=False) * coil)
        twin[..., t] = _block_average(_scatter(head, still)[fine.crop] * fine.coil, f)
        if record_spin_history:
            history[..., t] = fine.image(ndimage.map_coordinates(
                _scatter(head, factor, fill=1.0), coords, order=1, mode="nearest",
                output=np.float32, prefilter=False), fill=1.0)
        # same drift and the same thermal noise samples in the run and its twin
        real_noise, imag_noise = sigma * rng.standard_normal((2, *out_shape), dtype=np.float32)
        for data in (run, twin):
            data[..., t] *= drift[t]
            data[..., t] = np.sqrt((data[..., t] + real_noise) ** 2 + imag_noise**2)
    return run, twin, history


class _FineGrid:
    """The scanner's fine grid: which of its voxels can see the head, where they sample
    the object, and the (scanner-fixed) coil sensitivity there."""

    def __init__(self, head: _Head, scan: _Scan):
        f = scan.factor
        self.factor = f
        self.shape = tuple(n * f for n in scan.shape)
        self.affine = _fine_affine(scan.affine, f)
        self.crop = tuple(slice(p, p + n) for p, n in zip(head.pad, self.shape))
        self.coil = _coil_sensitivity(_world(self.affine, self.shape))
        # voxels within the padding of the head can see tissue; Fortran order: by slice
        occupied = _scatter(head, np.ones(len(head.index), np.float32)) > 0
        reach = ndimage.binary_dilation(occupied, iterations=max(head.pad))[self.crop]
        self.index = np.flatnonzero(reach.reshape(-1, order="F"))
        ijk = np.array(np.unravel_index(self.index, self.shape, order="F"), dtype=np.float64)
        self.ijk1 = np.vstack([ijk, np.ones(ijk.shape[1])])
        self.xyz = (self.affine @ self.ijk1)[:3].T
        self.slab = (ijk[2] // f).astype(np.intp)
        self.blocks = np.searchsorted(self.slab, np.arange(scan.shape[2] + 1))
        self.inv_object = np.linalg.inv(head.affine)
        # the coil and its slope along y at the visible voxels (for phase-encode shifts)
        step = np.array([0.0, 0.05, 0.0])
        self.coil_visible = _coil_sensitivity(self.xyz)
        self.coil_slope = (_coil_sensitivity(self.xyz + step) - _coil_sensitivity(
            self.xyz - step)) / (2 * step[1])

    def sampling(self, matrices: np.ndarray, shifts: np.ndarray) -> tuple:
        """Object-grid coordinates (3, M) seen by the visible voxels, and the coil there.

        Slice ``s`` shows the object at ``M_s^-1 (x - d_s y)`` (``d_s`` the apparent
        phase-encode shift), weighted by the coil at ``x - d_s y``: the image moves. The
        coil is taken to first order in ``d_s`` (breathing's sub-mm shifts: error < 1e-4)."""
        coords = np.empty((3, len(self.index)), dtype=np.float64)
        for s in range(len(matrices)):
            lo, hi = self.blocks[s], self.blocks[s + 1]
            shift = np.eye(4)
            shift[1, 3] = -shifts[s]
            pull = self.inv_object @ np.linalg.inv(matrices[s]) @ shift @ self.affine
            coords[:, lo:hi] = pull[:3] @ self.ijk1[:, lo:hi]
        return coords, self.coil_visible - shifts[self.slab] * self.coil_slope

    def image(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Visible voxel values -> the output grid (block average of the fine grid)."""
        volume = np.full(int(np.prod(self.shape)), fill, dtype=np.float32)
        volume[self.index] = values
        return _block_average(volume.reshape(self.shape, order="F"), self.factor)


def _fluctuations(maps, courses_t, blocks, home, slab) -> tuple:
    """Sum of map x time course for each voxel at the time of the slice that reads it,
    and at the time of its home slice (motion-free twin). Voxels are grouped by home
    slice; each group needs only the few slice times it can have moved to."""
    n_slices = courses_t.shape[1]
    reach = int(np.abs(slab - home).max())
    change = np.empty(len(home), dtype=np.float32)
    still = np.empty(len(home), dtype=np.float32)
    for z in range(n_slices):
        lo, hi = blocks[z], blocks[z + 1]
        if hi == lo:
            continue
        cols = np.clip(np.arange(z - reach, z + reach + 1), 0, n_slices - 1)
        values = maps[lo:hi] @ courses_t[:, cols]
        change[lo:hi] = values[np.arange(hi - lo), slab[lo:hi] - z + reach]
        still[lo:hi] = values[:, reach]
    return change, still


def _scatter(head: _Head, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Head voxel values -> the object grid (3D, Fortran-ordered like ``head.index``)."""
    volume = np.full(int(np.prod(head.shape)), fill, dtype=np.float32)
    volume[head.index] = values
    return volume.reshape(head.shape, order="F")


def _drift(rng, n_volumes: int, peak_pct: float) -> np.ndarray:
    """Slow multiplicative scanner drift (linear plus quadratic), ``peak_pct`` at most."""
    t = np.linspace(0, 1, n_volumes)
    shape = rng.uniform(-1, 1) * t + rng.uniform(-0.7, 0.7) * (t**2 - t)
    peak = np.abs(shape).max()
    return (1 + peak_pct / 100 * shape / (peak if peak > 0 else 1)).astype(np.float32)


# --------------------------------------------------------------------------------------
# Runs


def _nifti(data: np.ndarray, affine: np.ndarray, tr: float | None = None) -> nib.Nifti1Image:
    """A NIfTI image with qform = sform = affine, units mm (and s), TR as 4th zoom.
    4D data become int16, as scanners store them."""
    if tr is not None:
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    if tr is not None:
        img.header.set_zooms((*np.abs(np.diag(affine)[:3]), float(tr)))
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_slope_inter(1.0, 0.0)
    else:
        img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img


def _simulate(design: StudyDesign, config: StudyConfig, *, seed, level: float,
              scanner_from_mni: np.ndarray, motion: Motion | np.ndarray | None = None,
              physiology: Physiology | None = None, peaks=(None, None),
              record_spin_history: bool = False) -> SimulatedRun:
    """Simulate one run of a design (see :func:`simulate_run`)."""
    n_volumes, tr, shape = config.n_volumes, config.tr, design.shape
    n_slices = shape[2]
    times = slice_timing(n_slices, tr, config.slice_order)
    rng = np.random.default_rng(seed)
    physio_rng, motion_rng, signal_rng, noise_rng = rng.spawn(4)
    physiology = physiology or make_physiology(n_volumes * tr, seed=physio_rng)
    if motion is None:
        motion = make_motion(n_volumes, tr, times, level=level, seed=motion_rng,
                             physiology=physiology)
    elif not isinstance(motion, Motion):
        motion = _motion_from_volumes(motion, n_volumes, n_slices, design.affine, shape)
    if motion.apparent_y.shape != (n_volumes, n_slices):
        raise ValueError(f"motion covers {motion.apparent_y.shape} volumes x slices; the run "
                         f"has {n_volumes} x {n_slices}")
    if any(p is not None for p in peaks):
        motion = _scale_peaks(motion, *peaks)
    head = _head(design, config.oversample, scanner_from_mni)
    dt = tr / n_slices
    n_samples = n_volumes * n_slices
    maps, courses = _components(head, signal_rng, physiology, n_volumes, tr, n_slices,
                                config.noise, background_change=0.5 * config.signal_change)
    regions = _region_signals(design.regions, signal_rng, n_samples, dt)
    amplitude = signal_rng.uniform(0.8, 1.2, regions.shape[1]) * config.signal_change / 100
    ranks = np.rint(times / dt).astype(np.intp)
    index = np.arange(n_volumes)[:, None] * n_slices + ranks[None, :]  # (T, S) grid samples
    scan = _Scan(affine=design.affine, shape=shape, tr=tr, slice_times=times,
                 flip_angle=np.deg2rad(config.flip_angle_deg), factor=config.oversample)
    run, twin, history = _acquire(
        head, scan, motion, maps, courses[:, index],
        (regions * amplitude).T[:, index].astype(np.float32), noise_rng, config.noise,
        record_spin_history)
    signals = (regions * amplitude * 100)[index].mean(axis=1)  # (T, R): slice-averaged
    labels = head.output_labels
    return SimulatedRun(
        img=_nifti(run, design.affine, tr), nomotion_img=_nifti(twin, design.affine, tr),
        motion=motion.volumes, slice_motion=motion, slice_timing=times,
        labels_img=_nifti(labels.astype(np.int16), design.affine),
        brain_mask_img=_nifti(head.output_brain.astype(np.uint8), design.affine),
        networks=design.networks, true_connectivity=design.true_connectivity,
        regions=design.regions.assign(n_voxels=[int((labels == k).sum())
                                                for k in design.regions["index"]]),
        signals=signals, fd=motion.fd, physiology=physiology,
        scanner_from_mni=np.asarray(scanner_from_mni, float), spin_history=history,
        tr=float(tr))


def simulate_run(*, shape=(32, 32, 20), n_volumes: int = 150, tr: float = 2.0, seed: int = 0,
                 slice_order: str = "interleaved", motion_level: float = 1.0,
                 motion: Motion | np.ndarray | None = None,
                 physiology: Physiology | None = None, noise: NoiseModel | None = None,
                 signal_change: float = 1.0, native_space: bool = False,
                 max_translation_mm: float | None = None, max_rotation_deg: float | None = None,
                 oversample: int = 2, record_spin_history: bool = False) -> SimulatedRun:
    """Simulate one resting-state run with known motion, networks and connectivity.

    Parameters
    ----------
    shape : tuple of 3 int
        Output grid (the field of view is fixed at 224 x 224 x 128 mm).
    n_volumes : int
        Number of volumes (at least 10).
    tr : float
        Repetition time (s).
    seed : int
        Seed: the same seed gives the same run, bit for bit.
    slice_order : {"interleaved", "sequential"}
        See :func:`slice_timing`.
    motion_level : float
        Subject's motion level for :func:`make_motion` (1 = a typical adult, 0 = still
        apart from breathing's apparent motion).
    motion : Motion or (T, 6) array, optional
        Use this motion instead (a (T, 6) array moves every slice of a volume alike; it is
        re-expressed relative to the reference volume).
    physiology : Physiology, optional
        Use these breathing and pulse traces (default: drawn from the seed).
    noise : NoiseModel, optional
        Fluctuation amplitudes (default :class:`NoiseModel`; ``NoiseModel.none()``).
    signal_change : float
        SD of the regions' BOLD signal (% of baseline); 0 turns neural signals off.
    native_space : bool
        Place the head with :func:`native_transform` (seeded) instead of in MNI space.
    max_translation_mm, max_rotation_deg : float, optional
        Rescale the real motion so its per-volume peaks equal these (stress tests).
    oversample : int
        Simulation grid refinement per axis.
    record_spin_history : bool
        Also return the spin-history signal factor on the output grid.

    Returns
    -------
    SimulatedRun
    """
    if n_volumes < 10:
        raise ValueError(f"n_volumes must be at least 10, got {n_volumes}")
    if tr <= 0:
        raise ValueError(f"tr must be positive (seconds), got {tr}")
    config = StudyConfig(n_subjects=1, shape=tuple(shape), n_volumes=n_volumes, tr=tr,
                         slice_order=slice_order, oversample=oversample,
                         native_space=native_space, noise=noise or NoiseModel(),
                         signal_change=signal_change)
    design = make_design(shape=shape, seed=seed)
    placement = native_transform([seed, 5]) if native_space else np.eye(4)
    return _simulate(design, config, seed=[seed, 2], level=motion_level,
                     scanner_from_mni=placement, motion=motion, physiology=physiology,
                     peaks=(max_translation_mm, max_rotation_deg),
                     record_spin_history=record_spin_history)


# --------------------------------------------------------------------------------------
# Studies on disk: a BIDS raw dataset and the truth beside it

TASK = "rest"
_PHYSIO_FS = 50.0


def _motion_levels(n_subjects: int, rng) -> np.ndarray:
    """Motion levels of a study: quantiles of a lognormal (median 1, sigma 0.6), so that
    every study spans still to restless subjects; shuffled."""
    quantiles = (np.arange(n_subjects) + 0.5) / n_subjects
    return rng.permutation(np.exp(0.6 * stats.norm.ppf(quantiles)))


def _bold_sidecar(config: StudyConfig, times: np.ndarray) -> dict:
    """The BIDS sidecar of a run (REQUIRED RepetitionTime and TaskName, SliceTiming)."""
    return {
        "TaskName": TASK,
        "TaskDescription": "Simulated resting state (eyes open, no task).",
        Sidecar.REPETITION_TIME: config.tr,
        Sidecar.SLICE_TIMING: [round(float(t), 6) for t in times],
        "SliceEncodingDirection": "k",
        "PhaseEncodingDirection": "j",
        "MRAcquisitionType": "2D",
        "PulseSequenceType": "Gradient Echo EPI",
        "EchoTime": 0.03,
        "FlipAngle": config.flip_angle_deg,
        "MagneticFieldStrength": 3,
        "Manufacturer": "fmri-cloud-workbook simulator",
        "ManufacturersModelName": f"helpers.analysis.simulate {SIMULATOR_VERSION}",
        "SoftwareVersions": SIMULATOR_VERSION,
        "InstitutionName": "none (simulated data)",
    }


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _dataset_files(raw: Path, config: StudyConfig, subjects: list[str]) -> None:
    """dataset_description.json, README, participants.tsv/.json of the raw dataset."""
    _write_json(raw / "dataset_description.json", {
        "Name": "Simulated resting-state fMRI with a known ground truth (fmri-cloud-workbook)",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["fmri-cloud-workbook simulator"],
        "GeneratedBy": [{"Name": "helpers.analysis.simulate", "Version": SIMULATOR_VERSION,
                         "Description": "MNI152 anatomy, network BOLD, physiology, head "
                                        "motion and slice-by-slice acquisition"}],
        "SourceDatasets": [{"URL": "https://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/",
                            "Version": "ICBM 2009a nonlinear symmetric (via nilearn)"}],
    })
    (raw / "README").write_text(
        "Simulated resting-state fMRI written by the fmri-cloud-workbook simulator\n"
        "(helpers/analysis/simulate.py). Every run has a known ground truth (networks,\n"
        "connectivity, head motion, physiology), kept outside this dataset in ../truth/.\n"
        f"{len(subjects)} subjects, one run each, {config.n_volumes} volumes, TR "
        f"{config.tr} s, {config.shape[2]} {config.slice_order} axial slices.\n"
        "Physiological recordings (_physio.tsv.gz) hold the respiratory belt and pulse\n"
        "traces that drove the simulated physiological noise.\n")
    pd.DataFrame({"participant_id": subjects}).to_csv(raw / "participants.tsv", sep="\t",
                                                      index=False)
    _write_json(raw / "participants.json", {
        "participant_id": {"Description": "Simulated subject (no demographics are simulated)"}})


def _write_physio(func: Path, stem: str, physiology: Physiology, duration: float) -> None:
    """BIDS physiological recording: respiratory belt and pulse, from the first volume."""
    keep = (physiology.time >= 0) & (physiology.time < duration)
    step = int(round(physiology.fs / _PHYSIO_FS))
    table = np.stack([physiology.cardiac[keep][::step], physiology.respiration[keep][::step]], 1)
    text = pd.DataFrame(table).to_csv(sep="\t", header=False, index=False, float_format="%.4f")
    # no file name and mtime 0 in the gzip header (BIDS asks for no name; same bytes each time)
    with open(func / f"{stem}_physio.tsv.gz", "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(text.encode())
    _write_json(func / f"{stem}_physio.json", {
        "SamplingFrequency": _PHYSIO_FS, "StartTime": 0.0, "Columns": ["cardiac", "respiratory"],
        "cardiac": {"Description": "simulated pulse oximetry", "Units": "a.u."},
        "respiratory": {"Description": "simulated respiratory belt", "Units": "a.u."}})


def _subject_job(args) -> dict:
    """Simulate one subject and write its raw files and truth (in a worker process)."""
    design, config, subject, level, sub_seed, raw_dir, truth_dir = args
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        placement = native_transform([*sub_seed, 5]) if config.native_space else np.eye(4)
        run = _simulate(design, config, seed=[*sub_seed, 2], level=level,
                        scanner_from_mni=placement)
        _write_subject(run, config, subject, Path(raw_dir), Path(truth_dir))
    fd = fd_summary(run.fd)
    motion = run.motion
    return {"subject": subject, "motion_level": round(float(level), 3),
            "n_jerks": len(run.slice_motion.jerks),
            "respiratory_rate_hz": round(run.physiology.respiratory_rate_hz, 3),
            "heart_rate_hz": round(run.physiology.heart_rate_hz, 3),
            **{k: round(v, 4) for k, v in fd.items()},
            "max_translation_mm": round(float(np.abs(motion[:, :3]).max()), 3),
            "max_rotation_deg": round(float(np.rad2deg(np.abs(motion[:, 3:]).max())), 3),
            "regions_in_fov": int((run.regions["n_voxels"] > 0).sum())}


def _write_subject(run: SimulatedRun, config: StudyConfig, subject: str, raw: Path,
                   truth: Path) -> None:
    """A subject's BIDS files (bold, sidecar, physio) and its truth files."""
    stem = f"{subject}_task-{TASK}"
    func = raw / subject / "func"
    func.mkdir(parents=True, exist_ok=True)
    nib.save(run.img, func / f"{stem}_bold.nii.gz")
    _write_json(func / f"{stem}_bold.json", _bold_sidecar(config, run.slice_timing))
    _write_physio(func, stem, run.physiology, config.n_volumes * config.tr)
    nib.save(run.nomotion_img, truth / f"{stem}_desc-nomotion_bold.nii.gz")
    pd.DataFrame(run.motion, columns=list(MOTION_PARAMS)).to_csv(
        truth / f"{stem}_motion.tsv", sep="\t", index=False, float_format="%.6f")
    pd.DataFrame(run.signals, columns=run.regions["name"]).to_csv(
        truth / f"{stem}_signals.tsv", sep="\t", index=False, float_format="%.5f")
    if config.native_space:
        np.savetxt(truth / f"{subject}_from-{TEMPLATE}_to-scanner_xfm.txt",
                   run.scanner_from_mni, fmt="%.9f",
                   header="x_scanner = A @ x_mni (homogeneous RAS mm, reference volume)")
        nib.save(run.labels_img, truth / f"{subject}_labels.nii.gz")
        nib.save(run.brain_mask_img, truth / f"{subject}_brain_mask.nii.gz")


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace a folder that holds something other than a simulated study."""
    if not folder.exists() or not any(folder.iterdir()):
        return
    description = folder / "dataset_description.json"
    marker = folder / "simulation.json"
    ours = marker.exists() or (description.exists() and "helpers.analysis.simulate" in
                               description.read_text())
    # the first simulator wrote flat runs: sub-XX_task-rest_bold.nii.gz and nothing else
    ours = ours or all(p.is_file() and p.name.startswith("sub-") and
                       p.name.endswith(f"_task-{TASK}_bold.nii.gz") for p in folder.iterdir())
    if not ours:
        raise FileExistsError(
            f"{folder} holds files the simulator did not write, so it will not replace "
            "them. Move them elsewhere, or pass another out_dir to simulate_study.")


def simulate_study(out_dir, config: StudyConfig | str = "realistic", *, seed: int = 0,
                   n_jobs: int | None = None) -> pd.DataFrame:
    """Simulate a study: a BIDS raw dataset in ``out_dir/raw``, the truth in ``out_dir/truth``.

    Subjects share the regions and true connectivity; each has its own physiology, noise,
    signals and motion level (lognormal spread, so every study spans still to restless
    subjects). Both folders are written in temporary folders first and swapped in at the
    end: a half-written study is never visible. A previous study is replaced (a folder with
    files the simulator did not write is refused).

    Parameters
    ----------
    out_dir : str or Path
        Data folder (the workbook's ``data/``).
    config : StudyConfig or str
        The study, or the name of a preset (:data:`PRESETS`, :func:`study_config`).
    seed : int
        Study seed; the same seed writes the same files.
    n_jobs : int, optional
        Worker processes (default: one per CPU, at most one per subject).

    Returns
    -------
    pandas.DataFrame
        One row per subject (also ``truth/participants.tsv``): ``subject``,
        ``motion_level``, ``n_jerks``, ``respiratory_rate_hz``, ``heart_rate_hz``,
        ``median_fd``, ``mean_fd``, ``max_fd`` (mm), ``fraction_above_0.2``,
        ``fraction_above_0.5``, ``max_translation_mm``, ``max_rotation_deg``,
        ``regions_in_fov``, and ``bold`` (path of the run).

    Notes
    -----
    Files (see ``data/README.md``)::

        raw/dataset_description.json, README, participants.tsv, participants.json
        raw/sub-XX/func/sub-XX_task-rest_bold.nii.gz   4D int16 BOLD
        raw/sub-XX/func/sub-XX_task-rest_bold.json     RepetitionTime, TaskName, SliceTiming
        raw/sub-XX/func/sub-XX_task-rest_physio.tsv.gz pulse and belt, 50 Hz (+ .json)
        truth/sub-XX_task-rest_motion.tsv     true motion per volume, engine convention,
                                              relative to the reference volume (T // 2)
        truth/sub-XX_task-rest_signals.tsv    noise-free, motion-free regional BOLD (%)
        truth/sub-XX_task-rest_desc-nomotion_bold.nii.gz  motion-free noisy twin
        truth/sub-XX_from-MNI152NLin2009aSym_to-scanner_xfm.txt  (native space only)
        truth/sub-XX_labels.nii.gz, sub-XX_brain_mask.nii.gz     (native space only)
        truth/labels.nii.gz, brain_mask.nii.gz   MNI-space labels and mask
        truth/regions.tsv, true_connectivity.tsv, participants.tsv, simulation.json
    """
    config = study_config(config) if isinstance(config, str) else config
    if config.n_subjects < 1:
        raise ValueError("n_subjects must be at least 1")
    out_dir = Path(out_dir)
    final = {"raw": out_dir / "raw", "truth": out_dir / "truth"}
    for folder in final.values():
        _check_replaceable(folder)
    token = uuid.uuid4().hex[:8]
    staging = {k: out_dir / f".{k}.partial-{token}" for k in final}
    for folder in staging.values():
        folder.mkdir(parents=True)
    try:
        table = _simulate_into(staging["raw"], staging["truth"], config, seed, n_jobs)
        for key in final:
            if final[key].exists():
                shutil.rmtree(final[key])
            staging[key].rename(final[key])
    finally:
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)
    table["bold"] = [final["raw"] / s / "func" / f"{s}_task-{TASK}_bold.nii.gz"
                     for s in table["subject"]]
    return table


def _simulate_into(raw: Path, truth: Path, config: StudyConfig, seed: int,
                   n_jobs: int | None) -> pd.DataFrame:
    """Simulate every subject into the given folders; write the study-level files."""
    design = make_design(shape=config.shape, seed=seed)
    subjects = [f"sub-{i + 1:02d}" for i in range(config.n_subjects)]
    levels = _motion_levels(config.n_subjects, np.random.default_rng([seed, 3]))
    jobs = [(design, config, s, levels[i], [seed, 100 + i], str(raw), str(truth))
            for i, s in enumerate(subjects)]
    n_jobs = n_jobs or min(config.n_subjects, os.cpu_count() or 1)
    if n_jobs > 1:
        with ProcessPoolExecutor(n_jobs) as pool:
            rows = list(pool.map(_subject_job, jobs))
    else:
        rows = [_subject_job(job) for job in jobs]
    table = pd.DataFrame(rows)
    _dataset_files(raw, config, subjects)
    _write_design(design, truth)
    table.to_csv(truth / "participants.tsv", sep="\t", index=False)
    params = {"config": asdict(config), "seed": seed, "simulator_version": SIMULATOR_VERSION,
              "reference_volume": reference_index("middle", config.n_volumes),
              "slice_timing_s": slice_timing(config.shape[2], config.tr,
                                             config.slice_order).round(6).tolist(),
              "motion_convention": "fmri_preproc.params_to_affine: [trans_x, trans_y, "
                                   "trans_z (mm), rot_x, rot_y, rot_z (rad)], reference "
                                   "point -> moving; relative to the reference volume"}
    _write_json(truth / "simulation.json", params)
    return table


def _write_design(design: StudyDesign, truth_dir: Path) -> None:
    """Write the MNI-space labels, mask, region table and true matrix of a design."""
    nib.save(_nifti(design.labels.astype(np.int16), design.affine), truth_dir / "labels.nii.gz")
    nib.save(_nifti(design.brain.astype(np.uint8), design.affine),
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
        ``labels_img`` (path, MNI space), ``regions`` (DataFrame), ``true_connectivity``
        (DataFrame), ``participants`` (DataFrame), ``motion`` (subject -> (T, 6) ndarray),
        ``signals`` (subject -> DataFrame), ``nomotion`` (subject -> path of the twin),
        ``scanner_from_mni`` (subject -> (4, 4) ndarray, native-space studies only) and
        ``simulation`` (the parameters). Empty when there is no ground truth (a
        researcher's own data).
    """
    truth = Path(data_dir) / "truth"
    if not (truth / "labels.nii.gz").exists():
        return {}

    def by_subject(pattern, read):
        return {p.name.split("_")[0]: read(p) for p in sorted(truth.glob(pattern))}

    return {
        "labels_img": truth / "labels.nii.gz",
        "regions": pd.read_csv(truth / "regions.tsv", sep="\t"),
        "true_connectivity": pd.read_csv(truth / "true_connectivity.tsv", sep="\t", index_col=0),
        "participants": pd.read_csv(truth / "participants.tsv", sep="\t"),
        "motion": by_subject("sub-*_motion.tsv",
                             lambda p: pd.read_csv(p, sep="\t")[list(MOTION_PARAMS)].to_numpy()),
        "signals": by_subject("sub-*_signals.tsv", lambda p: pd.read_csv(p, sep="\t")),
        "nomotion": by_subject("sub-*_desc-nomotion_bold.nii.gz", lambda p: p),
        "scanner_from_mni": by_subject("sub-*_xfm.txt", np.loadtxt),
        "simulation": json.loads((truth / "simulation.json").read_text()),
    }


def run_bids_validator(root) -> dict:
    """Run the official BIDS validator (``bids-validator-deno``, offline) on a dataset.

    Returns
    -------
    dict
        The validator's JSON report: ``issues`` (``issues`` list, each with
        ``severity``, ``code``, ``location``) and ``summary``.

    Raises
    ------
    FileNotFoundError
        When the validator is not installed (it comes with the ``test`` extra).
    """
    name = "bids-validator-deno"
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    executable = shutil.which(name, path=search)
    if executable is None:
        raise FileNotFoundError(f"{name} is not installed; install the workbook's test extra "
                                "(pip install -e '.[test]'), which pins it.")
    result = subprocess.run([executable, str(root), "--format", "json"], capture_output=True,
                            text=True, timeout=300)
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as err:
        raise RuntimeError(f"{name} printed no JSON report: {result.stderr[-2000:]}") from err
