"""Confounds: FD on a known trajectory, the 24 motion regressors, DVARS, the TSV."""

import numpy as np
import pytest

from fmri_preproc import dvars, framewise_displacement, motion_expansion
from fmri_preproc.confounds import confounds_table, non_steady_state, tsnr, write_tsv


def test_fd_known_trajectory():
    params = np.zeros((4, 6))
    params[1, 0] = 1.0  # 1 mm along x
    params[2, 0] = 1.0
    params[2, 5] = 0.01  # + 0.01 rad about z -> 0.5 mm at 50 mm
    params[3, 1] = -0.5  # back in x (1 mm), -0.5 mm in y, back in rot z (0.5 mm)
    fd = framewise_displacement(params)
    assert np.isnan(fd[0])
    assert np.allclose(fd[1:], [1.0, 0.5, 1.0 + 0.5 + 0.5])
    assert np.allclose(framewise_displacement(params, radius=80)[2], 0.8)


def test_fd_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        framewise_displacement(np.zeros((5, 3)))


def test_24_parameter_names_and_values():
    params = np.arange(18, dtype=float).reshape(3, 6) ** 1.5
    cols = motion_expansion(params)
    assert len(cols) == 24
    assert list(cols)[:4] == ["trans_x", "trans_x_derivative1", "trans_x_power2",
                              "trans_x_derivative1_power2"]
    assert np.allclose(cols["rot_z"], params[:, 5])
    assert np.isnan(cols["rot_z_derivative1"][0])
    assert np.allclose(cols["rot_z_derivative1"][1:], np.diff(params[:, 5]))
    assert np.allclose(cols["trans_y_derivative1_power2"][1:], np.diff(params[:, 1]) ** 2)


def test_dvars_of_known_series():
    rng = np.random.default_rng(0)
    data = np.full((6, 6, 6, 50), 500.0, dtype=np.float32)
    data += rng.normal(scale=5.0, size=data.shape).astype(np.float32)
    data[..., 30] += 50.0  # a spike
    mask = np.ones((6, 6, 6), dtype=bool)
    raw, std = dvars(data, mask)
    assert np.isnan(raw[0]) and np.isnan(std[0])
    assert np.argmax(raw[1:]) + 1 in (30, 31)
    # white noise: DVARS ~ sqrt(2) sd, scaled to median 1000 (x2); std_dvars ~ 1
    assert np.median(raw[1:]) == pytest.approx(np.sqrt(2) * 5.0 * 2.0, rel=0.1)
    assert np.median(std[1:]) == pytest.approx(1.0, rel=0.15)
    assert tsnr(data[..., :30], mask) == pytest.approx(500 / 5.0, rel=0.1)


def test_non_steady_state_detects_leading_bright_volumes():
    rng = np.random.default_rng(1)
    signal = 1000 + rng.normal(scale=2, size=60)
    signal[:3] += [300, 150, 60]
    assert non_steady_state(signal) == 3
    assert non_steady_state(np.full(20, 5.0)) == 0


def test_table_outliers_and_tsv(tmp_path):
    params = np.zeros((5, 6))
    params[3, 0] = 2.0  # FD 2 mm at t=3 and t=4
    nan5 = np.r_[np.nan, np.ones(4)]
    cols = confounds_table(params, nan5, nan5, n_non_steady=1)
    assert [c for c in cols if "outlier" in c] == [
        "non_steady_state_outlier00", "motion_outlier00", "motion_outlier01"]
    assert np.array_equal(cols["motion_outlier00"], [0, 0, 0, 1, 0])
    path = tmp_path / "c.tsv"
    write_tsv(path, cols)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == list(cols)
    assert len(lines) == 6
    first = dict(zip(lines[0].split("\t"), lines[1].split("\t")))
    assert first["framewise_displacement"] == "n/a"
    assert first["trans_x"] == "0"
