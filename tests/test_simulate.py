"""The simulator: realistic motion, physiology and acquisition, a fair truth, BIDS output."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fmri_preproc import framewise_displacement, params_to_affine
from fmri_preproc.motion import reference_index
from helpers.analysis import simulate

SMALL = dict(shape=(20, 20, 12), n_volumes=24, tr=2.0)
STILL = np.zeros((SMALL["n_volumes"], 6))
QUIET = simulate.NoiseModel.none()


def _data(img) -> np.ndarray:
    return np.asarray(img.dataobj, dtype=np.float64)


@pytest.fixture(scope="module")
def design():
    return simulate.make_design(shape=SMALL["shape"], seed=3)


@pytest.fixture(scope="module")
def run():
    return simulate.simulate_run(**SMALL, seed=3, motion_level=1.5)


# ---------------------------------------------------------------------------------------
# Motion


def _study_motion(n_subjects=24, n_volumes=150, tr=2.0, n_slices=20):
    levels = simulate._motion_levels(n_subjects, np.random.default_rng(0))
    times = simulate.slice_timing(n_slices, tr)
    return [simulate.make_motion(n_volumes, tr, times, level=lv, seed=[7, i])
            for i, lv in enumerate(levels)]


def test_fd_distribution_matches_published_resting_state_values():
    motions = _study_motion()
    fd = np.concatenate([m.fd for m in motions])
    summary = simulate.fd_summary(fd)
    bands = simulate.PUBLISHED_FD
    assert bands["median_mm"][0] <= summary["median_fd"] <= bands["median_mm"][1]
    for key in ("fraction_above_0.2", "fraction_above_0.5"):
        assert bands[key][0] <= summary[key] <= bands[key][1], (key, summary[key])
    # continuous, not two-valued: plenty of volumes between the small and the large ones
    finite = fd[np.isfinite(fd)]
    assert 0.2 < np.mean((finite > 0.06) & (finite < 0.3)) < 0.95
    # subjects differ: the most restless has several times the median FD of the stillest
    medians = [np.nanmedian(m.fd) for m in motions]
    assert max(medians) > 2.5 * min(medians)


def test_fd_is_the_engines_definition():
    motion = _study_motion(n_subjects=1)[0]
    np.testing.assert_array_equal(motion.fd, framewise_displacement(motion.volumes))
    assert np.isnan(motion.fd[0])


def test_breathing_shows_as_an_aliased_peak_along_phase_encode():
    tr, n_volumes, rate = 2.0, 300, 0.3
    physio = simulate.make_physiology(n_volumes * tr, seed=1, respiratory_rate_hz=rate,
                                      variability=0.0)
    motion = simulate.make_motion(n_volumes, tr, simulate.slice_timing(20, tr), level=0.0,
                                  seed=1, physiology=physio)
    freqs = np.fft.rfftfreq(n_volumes, tr)
    y = motion.volumes[:, 1] - motion.volumes[:, 1].mean()
    power = np.abs(np.fft.rfft(y)) ** 2
    aliased = abs(rate - round(rate * tr) / tr)  # 0.3 Hz sampled every 2 s -> 0.2 Hz
    peak = freqs[np.argmax(power * (freqs > 0.05))]
    assert abs(peak - aliased) < 2 / (n_volumes * tr)
    # apparent motion moves the image along y (phase encode), not the head
    assert np.abs(motion.apparent_y).max() > 5 * np.abs(motion.real[..., 0]).max()


def test_jerk_rate_depends_on_the_subject():
    times = simulate.slice_timing(20, 2.0)
    counts = {lv: sum(len(simulate.make_motion(150, 2.0, times, level=lv, seed=[3, i]).jerks)
                      for i in range(12)) for lv in (0.5, 2.0)}
    assert counts[2.0] > 2 * counts[0.5]


def test_truth_is_relative_to_the_engines_reference_volume():
    times = simulate.slice_timing(12, 2.0)
    for n_volumes in (24, 25):
        motion = simulate.make_motion(n_volumes, 2.0, times, level=2.0, seed=4)
        ref = reference_index("middle", n_volumes)
        assert motion.reference == ref
        np.testing.assert_array_equal(motion.volumes[ref], 0.0)
        assert np.abs(motion.volumes).max() > 0.05
    # a motion array given by volume is re-expressed exactly: M_t M_ref^-1, not p_t - p_ref
    design = simulate.make_design(shape=SMALL["shape"], seed=0)
    given = np.zeros((24, 6))
    given[:12, 5] = np.deg2rad(3.0)  # turned before the reference, shifted from it on
    given[12:, 0] = 4.0
    run = simulate.simulate_run(**SMALL, seed=0, motion=given, noise=QUIET)
    m_ref = params_to_affine(given[12], design.affine, design.shape)
    m_0 = params_to_affine(run.motion[0], design.affine, design.shape)
    np.testing.assert_allclose(m_0 @ m_ref, params_to_affine(given[0], design.affine,
                                                             design.shape), atol=1e-9)
    assert not np.allclose(run.motion[0], given[0] - given[12], atol=1e-3)


def test_labels_and_mask_sit_where_the_reference_volume_is():
    """A step before the reference: the truth labels/mask fit the reference volume, not
    volume 0 (which is where the old simulator put them)."""
    given = np.zeros((24, 6))
    given[:6, 1] = -7.0  # the first six volumes are one voxel behind
    run = simulate.simulate_run(**SMALL, seed=1, motion=given, noise=QUIET, signal_change=0)
    data = _data(run.img)
    mask = np.asarray(run.brain_mask_img.dataobj) > 0
    inside = lambda vol: vol[mask].mean() / vol[~mask].mean()  # noqa: E731
    assert inside(data[..., run.reference]) > 1.05 * inside(data[..., 0])
    np.testing.assert_allclose(run.motion[0, 1], -7.0, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Physiology and noise


def _tissue_voxels(design, tissue, threshold):
    return getattr(design, tissue) > threshold


def _percent_sd(img):
    data = _data(img)
    return 100 * data.std(-1) / np.maximum(data.mean(-1), 1e-6)


def test_cardiac_and_respiratory_noise_is_strongest_in_csf(design):
    for part in ("cardiac", "respiratory"):
        noise = simulate.NoiseModel(**{**QUIET.__dict__, part: 1.0})
        run = simulate.simulate_run(**SMALL, seed=2, motion=STILL, noise=noise, signal_change=0)
        sd = _percent_sd(run.img)
        csf = sd[_tissue_voxels(design, "csf", 0.5)].mean()
        wm = sd[_tissue_voxels(design, "wm", 0.8)].mean()
        assert csf > 2 * wm > 0, part


def test_global_signal_follows_physiology_and_is_grey_matter_weighted(design):
    noise = simulate.NoiseModel(**{**QUIET.__dict__, "global_signal": 1.0})
    run = simulate.simulate_run(**SMALL, seed=2, motion=STILL, noise=noise, signal_change=0)
    data = _data(run.img)
    gm, wm = _tissue_voxels(design, "gm", 0.6), _tissue_voxels(design, "wm", 0.8)
    mean_gm = data[gm].mean(0)
    times = np.arange(SMALL["n_volumes"]) * SMALL["tr"] + run.slice_timing.mean()
    truth = run.physiology.at(times, "global_signal")
    assert np.corrcoef(mean_gm, truth)[0, 1] > 0.95
    sd = _percent_sd(run.img)
    assert sd[gm].mean() > 1.5 * sd[wm].mean()


def test_tissue_noise_is_shared_so_acompcor_can_find_it(design):
    noise = simulate.NoiseModel(**{**QUIET.__dict__, "tissue": (0.5, 0.3, 1.2)})
    run = simulate.simulate_run(**SMALL, seed=2, motion=STILL, noise=noise, signal_change=0)
    data = _data(run.img)
    sd = _percent_sd(run.img)
    csf, gm, wm = (_tissue_voxels(design, t, th) for t, th in
                   (("csf", 0.6), ("gm", 0.6), ("wm", 0.8)))
    assert sd[csf].mean() > sd[gm].mean() > sd[wm].mean() > 0
    # aCompCor: principal components of WM + CSF explain most of the GM fluctuations
    noise_roi = data[csf | wm]
    noise_roi = (noise_roi - noise_roi.mean(1, keepdims=True)).T
    components = np.linalg.svd(noise_roi, full_matrices=False)[0][:, :8]
    grey = data[gm].T - data[gm].T.mean(0)
    fitted = components @ np.linalg.lstsq(components, grey, rcond=None)[0]
    assert 1 - ((grey - fitted) ** 2).sum() / (grey**2).sum() > 0.6


def test_still_run_has_a_realistic_tsnr():
    run = simulate.simulate_run(shape=(24, 24, 14), n_volumes=60, seed=0, motion_level=0.0)
    data = _data(run.img)[np.asarray(run.brain_mask_img.dataobj) > 0]
    tsnr = np.median(data.mean(1) / data.std(1))
    assert 40 <= tsnr <= 100


# ---------------------------------------------------------------------------------------
# Acquisition


def test_each_slice_is_sampled_at_its_slice_time():
    """Each slice's global fluctuation fits the physiological global signal at
    t * TR + SliceTiming[s] better than at any other slice time."""
    tr, n_volumes, n_slices = 2.0, 60, SMALL["shape"][2]
    noise = simulate.NoiseModel(**{**QUIET.__dict__, "global_signal": 2.0})
    run = simulate.simulate_run(shape=SMALL["shape"], n_volumes=n_volumes, tr=tr, seed=0,
                                motion=np.zeros((n_volumes, 6)), noise=noise, signal_change=0)
    data = _data(run.img)
    mask = np.asarray(run.brain_mask_img.dataobj) > 0
    dt = tr / n_slices
    for s in range(2, n_slices - 2):
        y = data[..., s, :][mask[..., s]].mean(0)
        fits = []
        for lag in np.arange(n_slices) * dt:
            g = run.physiology.at(np.arange(n_volumes) * tr + lag, "global_signal")
            design = np.column_stack([np.ones(n_volumes), g])
            residual = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
            fits.append(residual.var() / y.var())
        assert np.argmin(fits) * dt == pytest.approx(run.slice_timing[s]), s
        assert min(fits) < 1e-3


def test_slice_timing_orders():
    np.testing.assert_allclose(simulate.slice_timing(6, 1.2, "sequential"),
                               [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(simulate.slice_timing(5, 2.0), [0, 1.2, 0.4, 1.6, 0.8])
    with pytest.raises(ValueError, match="slice order"):
        simulate.slice_timing(5, 2.0, "random")


def test_still_run_equals_its_twin_and_moving_run_does_not(run):
    still = simulate.simulate_run(**SMALL, seed=3, motion=STILL)
    np.testing.assert_array_equal(_data(still.img), _data(still.nomotion_img))
    assert np.abs(_data(run.img) - _data(run.nomotion_img)).max() > 50
    # the twin shares the noise: its difference from the moving run is motion only
    diff = _data(run.img) - _data(run.nomotion_img)
    mask = np.asarray(run.brain_mask_img.dataobj) > 0
    ref = run.reference
    assert np.abs(diff[mask][:, ref]).mean() < 0.3 * np.abs(diff[mask]).mean()


def test_coil_sensitivity_stays_fixed_in_the_scanner(design):
    """Move a static head one voxel along x: if the coil moved with the head the image
    would just shift; with a fixed coil the shifted image is reweighted by the coil."""
    voxel = design.affine[0, 0]
    given = np.zeros((24, 6))
    given[12:, 0] = voxel  # the reference (12) is moved; volume 0 is one voxel back
    run = simulate.simulate_run(**SMALL, seed=1, motion=given, noise=QUIET, signal_change=0)
    data = _data(run.img)
    back, moved = data[..., 0], data[..., 12]
    mask = (np.asarray(run.brain_mask_img.dataobj) > 0)[1:-1]
    ratio = moved[1:-1][mask] / back[:-2][mask]  # same tissue, one voxel apart in the scanner
    coil = simulate._coil_sensitivity(simulate._world(design.affine, design.shape))
    coil_ratio = (coil[1:-1] / coil[:-2])[mask]
    assert np.abs(ratio - 1).max() > 0.005          # not simply shifted with the head
    assert np.corrcoef(ratio, coil_ratio)[0, 1] > 0.9
    assert np.median(np.abs(ratio - coil_ratio)) < 0.003


def _step_run(axis, size, order="interleaved", n_volumes=20):
    given = np.zeros((n_volumes, 6))
    given[8:, axis] = size  # relative to the reference (10): volumes 0-7 at -size
    return simulate.simulate_run(shape=SMALL["shape"], n_volumes=n_volumes, seed=1,
                                 slice_order=order, motion=given, noise=QUIET,
                                 signal_change=0, record_spin_history=True)


def test_spin_history_follows_through_plane_motion_slice_by_slice():
    half_slice = simulate._grid_affine(SMALL["shape"])[2, 2] / 2
    run = _step_run(2, half_slice)
    factor = run.spin_history - 1
    mask = np.asarray(run.brain_mask_img.dataobj) > 0
    assert np.abs(factor[..., :8]).max() < 1e-6            # steady state before the step
    per_slice = np.array([factor[..., s, 8][mask[..., s]].mean()
                          for s in range(2, SMALL["shape"][2] - 2)])
    # interleaved (even slices first): tissue entering an even slice was excited late in
    # the last volume (short interval, darker); entering an odd slice, early (brighter)
    parity = np.arange(2, SMALL["shape"][2] - 2) % 2
    assert np.all(per_slice[parity == 0] < 0) and np.all(per_slice[parity == 1] > 0)
    # T1 recovery: the effect lasts beyond the step volume and fades
    size = [np.abs(factor[..., t][mask]).mean() for t in (8, 9, 11)]
    assert size[0] > size[1] > size[2] and size[1] > 1e-4
    # sequential acquisition: neighbours are excited TR / S apart, a far smaller effect
    sequential = _step_run(2, half_slice, order="sequential").spin_history - 1
    assert np.abs(sequential[..., 8][mask]).mean() < 0.3 * size[0]


def test_in_plane_motion_has_no_spin_history():
    run = _step_run(0, 5.0)
    assert np.abs(run.spin_history - 1).max() < 1e-6


def test_fine_grid_is_block_averaged_to_the_output():
    """A shift of one fine voxel (half an output voxel) equals the block average of the
    fine image shifted by one fine voxel: the simulator samples the fine grid."""
    design = simulate.make_design(shape=SMALL["shape"], seed=0)
    head = simulate._head(design, 2, np.eye(4))
    fine = simulate._scatter(head, head.baseline)
    crop = tuple(slice(p, p + 2 * n) for p, n in zip(head.pad, design.shape))
    coil = simulate._coil_sensitivity(simulate._world(simulate._fine_affine(design.affine, 2),
                                                      [2 * n for n in design.shape]))
    shifted = np.roll(fine, 1, axis=0)[crop]
    expected = simulate._block_average(shifted * coil, 2)
    given = np.zeros((24, 6))
    given[:12, 0] = design.affine[0, 0] / 2  # volumes before the reference: half a voxel on
    run = simulate.simulate_run(**SMALL, seed=0, motion=given, noise=QUIET, signal_change=0)
    got = _data(run.img)[..., 0]
    np.testing.assert_allclose(got, np.rint(expected), atol=1.01)
    # ... which no interpolation of the unshifted output reproduces
    still = _data(run.img)[..., 12]
    linear = 0.5 * (still + np.roll(still, 1, axis=0))
    brain = np.asarray(run.brain_mask_img.dataobj) > 0
    assert np.abs(linear - got)[brain].mean() > 5 * np.abs(np.rint(expected) - got)[brain].mean()


# ---------------------------------------------------------------------------------------
# Truth


def test_true_matrix_has_network_structure(design):
    truth = design.true_connectivity
    nets = design.regions["network"].to_numpy()
    assert np.allclose(truth, truth.T) and np.allclose(np.diag(truth), 1)
    assert np.linalg.eigvalsh(truth).min() > 0
    same = nets[:, None] == nets[None]
    off = ~np.eye(len(nets), dtype=bool)
    assert truth[same & off].min() > np.abs(truth[~same]).max()
    assert set(nets) == set(simulate.NETWORKS)
    assert sorted(np.unique(design.labels))[1:] == list(design.regions["index"])


def test_region_signals_follow_the_true_matrix(design):
    signals = simulate._region_signals(design.regions, np.random.default_rng(0), 40000, 0.2)
    empirical = np.corrcoef(signals[::10].T)
    assert np.abs(empirical - design.true_connectivity).max() < 0.12


def test_run_header_and_truth(run):
    img = run.img
    assert img.shape == (*SMALL["shape"], SMALL["n_volumes"])
    assert img.get_data_dtype() == np.int16
    assert img.header.get_zooms()[3] == pytest.approx(2.0)
    assert img.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(run.labels_img.affine, img.affine)
    assert run.motion.shape == (SMALL["n_volumes"], 6)
    assert run.slice_motion.real.shape == (SMALL["n_volumes"], SMALL["shape"][2], 6)
    assert len(run.networks) == run.true_connectivity.shape[0] == run.signals.shape[1]
    data = _data(img)
    brain = np.asarray(run.brain_mask_img.dataobj) > 0
    assert data[brain].mean() > 5 * data[~brain].mean() > 0


def test_same_seed_same_run_other_seed_other_run(run):
    again = simulate.simulate_run(**SMALL, seed=3, motion_level=1.5)
    other = simulate.simulate_run(**SMALL, seed=4, motion_level=1.5)
    np.testing.assert_array_equal(_data(again.img), _data(run.img))
    np.testing.assert_array_equal(_data(again.nomotion_img), _data(run.nomotion_img))
    np.testing.assert_array_equal(again.motion, run.motion)
    assert not np.array_equal(other.motion, run.motion)
    assert not np.array_equal(_data(other.img), _data(run.img))


def test_native_transform_is_within_the_stated_ranges():
    for seed in range(20):
        matrix = simulate.native_transform(seed)
        singular = np.linalg.svd(matrix[:3, :3], compute_uv=False)
        assert 0.85 - 1e-9 <= singular.min() and singular.max() <= 1.15 + 1e-9
    assert not np.allclose(simulate.native_transform(0), simulate.native_transform(1))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        simulate.study_config("huge")
    with pytest.raises(ValueError, match="unknown study settings"):
        simulate.study_config("realistic", n_subject=3)
    with pytest.raises(ValueError, match="n_volumes"):
        simulate.simulate_run(n_volumes=3)
    with pytest.raises(ValueError, match="motion must have shape"):
        simulate.simulate_run(**SMALL, motion=np.zeros((5, 6)))


# ---------------------------------------------------------------------------------------
# Studies on disk


STUDY = dict(n_subjects=3, shape=(20, 20, 12), n_volumes=20)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    config = simulate.study_config("realistic", **STUDY)
    table = simulate.simulate_study(root, config, seed=1, n_jobs=1)
    return root, table, config


@pytest.mark.slow
def test_study_writes_a_bids_layout_and_the_truth(study):
    root, table, config = study
    raw, truth = root / "raw", root / "truth"
    assert list(table["subject"]) == ["sub-01", "sub-02", "sub-03"]
    for subject, bold in zip(table["subject"], table["bold"]):
        assert bold == raw / subject / "func" / f"{subject}_task-rest_bold.nii.gz"
        sidecar = json.loads(bold.with_name(f"{subject}_task-rest_bold.json").read_text())
        assert sidecar["RepetitionTime"] == config.tr and sidecar["TaskName"] == "rest"
        np.testing.assert_allclose(sidecar["SliceTiming"],
                                   simulate.slice_timing(12, config.tr), atol=1e-6)
        assert nib.load(bold).shape == nib.load(
            truth / f"{subject}_task-rest_desc-nomotion_bold.nii.gz").shape
    assert (raw / "participants.tsv").read_text().split() == ["participant_id", *table["subject"]]
    loaded = simulate.load_truth(root)
    ref = reference_index("middle", config.n_volumes)
    for subject in table["subject"]:
        np.testing.assert_array_equal(loaded["motion"][subject][ref], 0.0)
        assert list(loaded["signals"][subject].columns) == list(loaded["regions"]["name"])
    assert list(loaded["true_connectivity"].index) == list(loaded["regions"]["name"])
    assert loaded["simulation"]["reference_volume"] == ref
    assert not list(root.glob(".*partial*"))


@pytest.mark.slow
def test_a_new_study_replaces_the_old_one(tmp_path):
    config = simulate.study_config("realistic", **{**STUDY, "n_subjects": 2})
    simulate.simulate_study(tmp_path, config, seed=1, n_jobs=1)
    simulate.simulate_study(tmp_path, replace_subjects(config, 1), seed=1, n_jobs=1)
    assert sorted(p.name for p in (tmp_path / "raw").glob("sub-*")) == ["sub-01"]
    assert len(simulate.load_truth(tmp_path)["motion"]) == 1


def replace_subjects(config, n):
    from dataclasses import replace
    return replace(config, n_subjects=n)


@pytest.mark.slow
def test_same_seed_writes_the_same_files(tmp_path):
    config = simulate.study_config("realistic", n_subjects=1, shape=(20, 20, 12), n_volumes=12)
    for name in ("a", "b"):
        simulate.simulate_study(tmp_path / name, config, seed=4, n_jobs=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                   if p.is_file())
    assert len(files) > 15
    for path in files:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path


def test_a_folder_of_someone_elses_files_is_not_replaced(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "my_scan.nii.gz").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="did not write"):
        simulate.simulate_study(tmp_path, simulate.study_config(**STUDY), n_jobs=1)
    assert (tmp_path / "raw" / "my_scan.nii.gz").read_bytes() == b"precious"


@pytest.mark.slow
def test_the_official_validator_finds_no_errors(study):
    root, _, _ = study
    report = simulate.run_bids_validator(root / "raw")
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert errors == []
    assert sorted(report["summary"]["subjects"]) == ["01", "02", "03"]
    assert report["summary"]["tasks"] == ["rest"]


@pytest.mark.slow
def test_pybids_indexes_every_run_with_its_tr(study):
    from bids import BIDSLayout

    root, table, config = study
    layout = BIDSLayout(root / "raw")
    runs = layout.get(suffix="bold", extension=".nii.gz")
    assert sorted(r.entities["subject"] for r in runs) == ["01", "02", "03"]
    for r in runs:
        metadata = r.get_metadata()
        assert metadata["RepetitionTime"] == config.tr
        assert len(metadata["SliceTiming"]) == config.shape[2]
    physio = layout.get(suffix="physio", extension=".tsv.gz")
    assert len(physio) == 3 and physio[0].get_metadata()["SamplingFrequency"] == 50.0


@pytest.mark.slow
def test_native_space_transform_is_recovered_from_the_truth_files(tmp_path):
    config = simulate.study_config("realistic", n_subjects=2, shape=(24, 24, 14), n_volumes=12,
                                   native_space=True)
    simulate.simulate_study(tmp_path, config, seed=2, n_jobs=1)
    truth = simulate.load_truth(tmp_path)
    mni_mask = nib.load(tmp_path / "truth" / "brain_mask.nii.gz")
    for subject, matrix in truth["scanner_from_mni"].items():
        bold = nib.load(tmp_path / "raw" / subject / "func" / f"{subject}_task-rest_bold.nii.gz")
        ref = _data(bold)[..., config.n_volumes // 2]
        brain = ref > 0.5 * np.percentile(ref, 98)

        def dice(m):
            vox = np.linalg.inv(mni_mask.affine) @ np.linalg.inv(m) @ bold.affine
            from scipy import ndimage
            mapped = ndimage.affine_transform(np.asarray(mni_mask.dataobj, float), vox[:3, :3],
                                              vox[:3, 3], output_shape=brain.shape, order=1) > 0.5
            return 2 * (mapped & brain).sum() / (mapped.sum() + brain.sum())

        assert dice(matrix) > 0.8
        assert dice(matrix) > dice(np.linalg.inv(matrix)) + 0.1
        assert dice(matrix) > dice(np.eye(4)) + 0.05


@pytest.mark.slow
def test_engine_recovers_the_truth_in_its_reference_position():
    import fmri_preproc as fp

    run = simulate.simulate_run(shape=(32, 32, 20), n_volumes=40, seed=5, motion_level=2.0)
    data = _data(run.img).astype(np.float32)
    matrices = fp.estimate_motion(data, run.img.affine)
    shape = data.shape[:3]
    errors = [fp.rms_deviation(m, fp.params_to_affine(p, run.img.affine, shape))
              for m, p in zip(matrices, run.motion)]
    # a truth left at volume 0 (the old convention) would not match the engine's estimates
    first = np.linalg.inv(fp.params_to_affine(run.motion[0], run.img.affine, shape))
    wrong = [fp.rms_deviation(m, fp.params_to_affine(p, run.img.affine, shape) @ first)
             for m, p in zip(matrices, run.motion)]
    assert run.reference == 20
    assert np.median(errors) < 0.15
    assert np.median(wrong) > 2 * np.median(errors)
