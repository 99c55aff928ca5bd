"""The engine's volume-by-volume path gives what the whole run in memory gives: the scratch
file (VolumeFile), the confounds' bounded slabs (VoxelSlabs) and the streamed outputs."""
import nibabel as nib
import numpy as np
import pytest

from fmri_preproc import (affine_to_params, estimate_motion, load_run, preprocess,
                          reslice_volume)
from fmri_preproc.confounds import brain_mask, dvars, tsnr
from fmri_preproc.inputs import VolumeFile, VoxelSlabs, check_input, unpack_run
from scale_runs import write_head_run


@pytest.fixture
def run_file(tmp_path):
    path = tmp_path / "sub-01_task-rest_bold.nii.gz"
    write_head_run(path, (30, 28, 16), 14)
    return path


def test_volume_file_reads_writes_and_refuses_other_indexing(tmp_path, run_file):
    data, info, _ = load_run(run_file)
    store, n_bad = unpack_run(info, tmp_path)
    assert n_bad == 0 and store.shape == data.shape
    assert all(np.array_equal(store[..., t], data[..., t]) for t in range(data.shape[3]))
    store[..., -1] = np.ones(data.shape[:3])
    assert np.all(store[:, :, :, 13] == 1)
    for index in (np.s_[:, :, 0], np.s_[0], np.s_[..., 1:3], np.s_[..., 14]):
        with pytest.raises((TypeError, IndexError)):
            store[index]
    store.close()


@pytest.mark.parametrize("budget", [2**21, 4 * 14 * 7])  # one slab for all; 7 voxels a slice
def test_confounds_over_slabs_equal_those_in_memory(tmp_path, run_file, budget):
    data, info, _ = load_run(run_file)
    store, _ = unpack_run(info, tmp_path)
    mask = brain_mask(data[..., 7])
    slabs = VoxelSlabs(store, budget)
    assert slabs.shape[0] * 4 * 14 <= max(budget, 4 * 14)
    for got, want in zip(dvars(slabs, slabs.mask(mask)), dvars(data, mask)):
        np.testing.assert_allclose(got, want, rtol=1e-10)
    assert tsnr(slabs, slabs.mask(mask)) == pytest.approx(tsnr(data, mask), rel=1e-12)
    store.close()


def test_streamed_outputs_equal_the_run_processed_in_memory(tmp_path, run_file):
    result = preprocess(run_file, tmp_path / "out", fwhm=0, work_dir=tmp_path)
    data, info, _ = load_run(run_file)
    matrices = estimate_motion(data, info.affine, reference=7)
    expected = np.stack([reslice_volume(data[..., t], info.affine, matrices[t]) if t != 7
                         else data[..., t] for t in range(14)], axis=3)
    img = nib.load(result.outputs["preproc_bold"])
    np.testing.assert_array_equal(np.asarray(img.dataobj), expected)
    # the same header nibabel writes for the whole array
    whole = nib.Nifti1Image(expected, info.affine, img.header)
    assert whole.header.binaryblock == img.header.binaryblock
    params = np.array([affine_to_params(m, info.affine, info.shape[:3]) for m in matrices])
    confounds = np.genfromtxt(result.outputs["confounds"], delimiter="\t", names=True)
    np.testing.assert_allclose(confounds["trans_x"], params[:, 0], atol=1e-6)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".f32"] == []


def test_a_truncated_run_leaves_no_scratch_file(tmp_path, run_file):
    cut = tmp_path / "cut" / "sub-01_task-rest_bold.nii.gz"
    cut.parent.mkdir()
    cut.write_bytes(run_file.read_bytes()[: run_file.stat().st_size // 2])
    with pytest.raises(Exception, match="could not be read completely"):
        unpack_run(check_input(cut), tmp_path / "cut")
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == [cut.name]
