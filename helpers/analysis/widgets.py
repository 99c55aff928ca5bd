"""Interactive views of what the engine does to one run (notebook 02), with ipywidgets.

Each view draws its figure once with matplotlib, then on every control change only updates
the image data and re-renders the figure to PNG into an :class:`ipywidgets.Image` (no new
figure, no new axes: a redraw takes tens of milliseconds at the workbook's sizes; measured
by ``bench/bench_widgets.py``). Every view is drawn when it is created, and its sliders span
the notebook's width so that one pixel of drag is at most one volume.

Public functions return a :class:`View`: display it (``display(view.widget)`` or just
``view`` as a cell's last line), move its controls, or call :meth:`View.update` directly.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Callable

import ipywidgets as w
import numpy as np
from matplotlib.figure import Figure

from fmri_preproc import params_to_affine, reslice_volume
from fmri_preproc.motion import head_mask
from fmri_preproc.smoothing import fwhm_to_sigma, gaussian_kernel, smooth_volume

__all__ = ["View", "correction_view", "smoothing_view", "rigid_view", "registration_cost"]

WIDE = w.Layout(width="95%")  # a slider the notebook's width: any volume can be picked
STYLE = {"description_width": "9em"}
FONT_PT = 9  # at 100 dpi and the figure widths below: tick labels of about 12 px displayed


@dataclass
class View:
    """A figure and the controls that redraw it.

    Attributes
    ----------
    widget : ipywidgets.VBox
        Controls above the figure (an :class:`ipywidgets.Image` holding a PNG).
    controls : dict
        Name -> slider.
    update : callable
        ``update(**values)`` redraws for these control values (all of them); returns the
        text shown under the figure.
    redraw_s : list of float
        Seconds each redraw took (data, draw, PNG), for the benchmark.
    """

    widget: w.VBox
    controls: dict
    update: Callable[..., str]
    redraw_s: list = field(default_factory=list)

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)


def _figure(n_axes: int, width_in: float = 9.0, height_in: float = 3.2) -> tuple[Figure, list]:
    fig = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    axes = [fig.add_subplot(1, n_axes, k + 1) for k in range(n_axes)]
    for ax in axes:
        ax.tick_params(labelsize=FONT_PT)
    return fig, axes


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _image_axes(ax, image: np.ndarray, title: str, **kwargs):
    ax.set_title(title, fontsize=FONT_PT + 1)
    ax.set_xticks([]), ax.set_yticks([])
    return ax.imshow(image.T, origin="lower", interpolation="nearest", **kwargs)


def _assemble(fig: Figure, controls: dict, redraw: Callable[..., str]) -> View:
    """Wire controls to ``redraw`` and draw once now (no empty view waiting for a move)."""
    image = w.Image(format="png", layout=w.Layout(width="100%", max_width=f"{fig.get_figwidth() * 100:.0f}px"))
    caption = w.HTML()
    view = View(w.VBox([*controls.values(), image, caption]), controls, lambda **v: "")

    def update(**values) -> str:
        tic = time.perf_counter()
        text = redraw(**values)
        image.value = _png(fig)
        caption.value = f"<span style='font-size:12px'>{text}</span>"
        view.redraw_s.append(time.perf_counter() - tic)
        return text

    view.update = update
    for slider in controls.values():
        slider.observe(lambda _change: update(**{k: s.value for k, s in controls.items()}),
                       names="value")
    update(**{k: s.value for k, s in controls.items()})
    return view


def _middle_slice(shape) -> int:
    return shape[2] // 2


def correction_view(raw: np.ndarray, corrected: np.ndarray, reference: int) -> View:
    """One volume before and after motion correction, each minus the reference volume.

    Parameters
    ----------
    raw, corrected : (X, Y, Z, T) arrays
        The run as acquired and after the engine's motion correction (``preproc_bold``).
    reference : int
        The reference volume's index (the engine's ``reference_volume``).

    Returns
    -------
    View
        Sliders ``volume`` (0..T-1) and ``slice`` (z); four panels: raw volume, raw minus
        reference, corrected minus reference (same colour scale), corrected volume.
    """
    n_volumes = raw.shape[3]
    ref = raw[..., reference]
    fig, axes = _figure(4, 10.0, 3.0)
    z0 = _middle_slice(raw.shape)
    top = float(np.percentile(ref, 99.5))
    diff_range = 0.25 * top
    images = [
        _image_axes(axes[0], raw[:, :, z0, 0], "raw volume", cmap="gray", vmin=0, vmax=top),
        _image_axes(axes[1], raw[:, :, z0, 0] - ref[:, :, z0], "raw − reference",
                    cmap="RdBu_r", vmin=-diff_range, vmax=diff_range),
        _image_axes(axes[2], corrected[:, :, z0, 0] - ref[:, :, z0], "corrected − reference",
                    cmap="RdBu_r", vmin=-diff_range, vmax=diff_range),
        _image_axes(axes[3], corrected[:, :, z0, 0], "corrected volume", cmap="gray", vmin=0, vmax=top)]
    bar = fig.colorbar(images[2], ax=axes[1:3], shrink=0.8, location="bottom")
    bar.set_label("difference (scanner units)", fontsize=FONT_PT)
    bar.ax.tick_params(labelsize=FONT_PT)
    mask = head_mask(ref)

    def redraw(volume: int, slice: int) -> str:
        before, after = raw[..., volume], corrected[..., volume]
        for image, data in zip(images, (before, before - ref, after - ref, after)):
            image.set_data(data[:, :, slice].T)
        rms = [float(np.sqrt(np.mean((v - ref)[mask] ** 2))) for v in (before, after)]
        return (f"volume {volume} of {n_volumes - 1}, slice {slice}: RMS difference to the "
                f"reference inside the head {rms[0]:.1f} before, {rms[1]:.1f} after correction")

    controls = {
        "volume": w.IntSlider(value=0, min=0, max=n_volumes - 1, description="volume",
                              layout=WIDE, style=STYLE, continuous_update=True),
        "slice": w.IntSlider(value=z0, min=0, max=raw.shape[2] - 1, description="slice (z)",
                             layout=WIDE, style=STYLE)}
    return _assemble(fig, controls, redraw)


def smoothing_view(volume: np.ndarray, affine: np.ndarray, fwhm_mm: float = 6.0,
                   max_fwhm_mm: float = 16.0) -> View:
    """The Gaussian kernel of an FWHM in mm, and one slice smoothed with it (the engine's own
    separable filter, :func:`fmri_preproc.smoothing.smooth_volume`).

    Parameters
    ----------
    volume : (X, Y, Z) array
        One volume (e.g. the engine's ``boldref``).
    affine : (4, 4) array
        Its voxel-to-world affine (mm): the kernel's width in voxels follows the voxel size.
    fwhm_mm, max_fwhm_mm : float
        The slider's start and end (mm).

    Returns
    -------
    View
        Slider ``fwhm_mm``; panels: the kernel along x (mm, with the FWHM marked), the
        unsmoothed slice and the smoothed slice.
    """
    voxel_mm = float(np.sqrt(np.sum(np.asarray(affine)[:3, :3] ** 2, axis=0))[0])
    z0 = _middle_slice(volume.shape)
    fig, axes = _figure(3, 10.0, 3.2)
    top = float(np.percentile(volume, 99.5))
    (curve,) = axes[0].plot([], [], "o-", color="tab:blue", ms=3)
    half = axes[0].axhline(0.5, color="0.5", lw=0.8, ls=":")
    axes[0].set_xlabel("distance along x (mm)", fontsize=FONT_PT)
    axes[0].set_ylabel("weight / peak", fontsize=FONT_PT)
    axes[0].set_xlim(-1.5 * max_fwhm_mm, 1.5 * max_fwhm_mm), axes[0].set_ylim(0, 1.05)
    axes[0].set_title("kernel (voxel centres)", fontsize=FONT_PT + 1)
    _image_axes(axes[1], volume[:, :, z0], "unsmoothed", cmap="gray", vmin=0, vmax=top)
    smoothed = _image_axes(axes[2], volume[:, :, z0], "smoothed", cmap="gray", vmin=0, vmax=top)
    half.set_visible(True)

    def redraw(fwhm_mm: float) -> str:
        sigma = fwhm_to_sigma(fwhm_mm, affine)
        taps = gaussian_kernel(float(sigma[0])) if sigma[0] > 0 else np.ones(1)
        x = (np.arange(taps.size) - taps.size // 2) * voxel_mm
        curve.set_data(x, taps / taps.max())
        out = smooth_volume(volume.astype(np.float64), sigma) if fwhm_mm > 0 else volume
        smoothed.set_data(out[:, :, z0].T)
        return (f"FWHM {fwhm_mm:.1f} mm = {fwhm_mm / voxel_mm:.2f} voxels of {voxel_mm:.1f} mm "
                f"(sigma {sigma[0]:.2f} voxels, {taps.size} taps)")

    controls = {"fwhm_mm": w.FloatSlider(value=fwhm_mm, min=0.0, max=max_fwhm_mm, step=0.5,
                                         description="FWHM (mm)", layout=WIDE, style=STYLE)}
    return _assemble(fig, controls, redraw)


def registration_cost(moved: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """The least-squares cost that rigid registration minimises, normalised.

    ``sum((moved - reference)^2) / sum((reference - mean)^2)`` over ``mask`` (the engine's
    :func:`fmri_preproc.motion.head_mask`): 0 when the images match; about 2 for unrelated
    images of the same contrast. The engine fits the same sum of squares by Gauss-Newton
    (with an intensity gain as well; see :mod:`fmri_preproc.motion`).
    """
    ref = reference[mask]
    return float(np.sum((moved[mask] - ref) ** 2) / np.sum((ref - ref.mean()) ** 2))


def rigid_view(volume: np.ndarray, affine: np.ndarray, max_mm: float = 10.0,
               max_deg: float = 10.0) -> View:
    """Move a volume by six rigid-body parameters; see the difference and the cost.

    Parameters
    ----------
    volume : (X, Y, Z) array
        The reference volume.
    affine : (4, 4) array
        Its voxel-to-world affine (mm).
    max_mm, max_deg : float
        The translation (mm) and rotation (degrees) sliders' range, each way.

    Returns
    -------
    View
        Sliders ``trans_x``, ``trans_y``, ``trans_z`` (mm) and ``rot_x``, ``rot_y``,
        ``rot_z`` (degrees; the engine's parameters are in radians,
        :func:`fmri_preproc.params_to_affine`); panels: the moved volume, moved minus
        reference, and the cost (:func:`registration_cost`) along the last parameter moved.
    """
    volume = volume.astype(np.float64)
    mask = head_mask(volume)
    z0 = _middle_slice(volume.shape)
    top = float(np.percentile(volume, 99.5))
    fig, axes = _figure(3, 10.0, 3.2)
    moved_img = _image_axes(axes[0], volume[:, :, z0], "moved volume", cmap="gray", vmin=0, vmax=top)
    diff_img = _image_axes(axes[1], 0 * volume[:, :, z0], "moved − reference", cmap="RdBu_r",
                           vmin=-0.5 * top, vmax=0.5 * top)
    bar = fig.colorbar(diff_img, ax=axes[1], shrink=0.8)
    bar.set_label("difference (scanner units)", fontsize=FONT_PT)
    bar.ax.tick_params(labelsize=FONT_PT)
    history: list[float] = []
    (trace,) = axes[2].plot([], [], "o-", color="tab:red", ms=3)
    axes[2].set_xlabel("redraw", fontsize=FONT_PT)
    axes[2].set_ylabel("cost (normalised SSD)", fontsize=FONT_PT)
    axes[2].set_title("the cost registration minimises", fontsize=FONT_PT + 1)
    names = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")

    def redraw(**values) -> str:
        params = [values[n] if n.startswith("trans") else np.deg2rad(values[n]) for n in names]
        moved = reslice_volume(volume, affine, params_to_affine(params, affine, volume.shape))
        moved_img.set_data(moved[:, :, z0].T)
        diff_img.set_data((moved - volume)[:, :, z0].T)
        history.append(registration_cost(moved, volume, mask))
        shown = history[-30:]
        trace.set_data(np.arange(len(history) - len(shown), len(history)), shown)
        axes[2].relim(), axes[2].autoscale_view()
        return f"cost {history[-1]:.4f} (0 = aligned with the reference)"

    controls = {n: w.FloatSlider(value=0.0, min=-(max_mm if n.startswith("trans") else max_deg),
                                 max=max_mm if n.startswith("trans") else max_deg, step=0.25,
                                 description=f"{n} ({'mm' if n.startswith('trans') else '°'})",
                                 layout=WIDE, style=STYLE) for n in names}
    return _assemble(fig, controls, redraw)
