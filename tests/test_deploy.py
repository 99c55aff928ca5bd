"""The deployment zip: what it holds, its size against Lambda's limits, reproducibility."""
import zipfile

import pytest

from helpers.cloud.deploy import AWS_RUNTIME, UNZIPPED_LIMIT_MB, ZIPPED_LIMIT_MB, build_lambda_zip, local_runtime


@pytest.fixture(scope="module")
def local_zip(tmp_path_factory):
    return build_lambda_zip(out_dir=tmp_path_factory.mktemp("zip"))


def test_local_zip_holds_code_and_dependencies(local_zip):
    names = zipfile.ZipFile(local_zip.path).namelist()
    assert "handler.py" in names
    assert "fmri_preproc/__init__.py" in names
    # the MNI template asset that fmri_preproc.normalize reads at run time
    assert "fmri_preproc/data/tpl-MNI152NLin2009aSym_res-2_desc-tissues_probseg.nii.gz" in names
    assert "fmri_preproc/data/tpl-MNI152NLin2009aSym_res-2_desc-tissues_probseg.json" in names
    assert any(n.startswith("numpy/") for n in names)
    assert any(n.startswith("nibabel/") for n in names)
    assert not any(n.startswith(("scipy/", "boto3/", "nilearn/")) for n in names)
    assert not any("/tests/" in n or "__pycache__" in n for n in names)
    assert local_zip.runtime == local_runtime()


def test_sizes_within_lambda_limits(local_zip):
    assert 0 < local_zip.zipped_mb < ZIPPED_LIMIT_MB
    assert local_zip.zipped_mb < local_zip.unzipped_mb < UNZIPPED_LIMIT_MB
    assert "of the direct-upload limit" in local_zip.report()


def test_same_sources_give_the_same_zip(local_zip, tmp_path):
    again = build_lambda_zip(out_dir=tmp_path)
    assert again.path.read_bytes() == local_zip.path.read_bytes()


def test_aws_zip_has_linux_wheels_for_the_runtime(tmp_path):
    package = build_lambda_zip(for_aws=True, out_dir=tmp_path)
    assert package.runtime == AWS_RUNTIME == "python3.12"
    names = zipfile.ZipFile(package.path).namelist()
    extensions = [n for n in names if n.startswith("numpy/") and n.endswith(".so")]
    assert extensions and all("cpython-312-x86_64-linux-gnu" in n for n in extensions)
    assert package.path.name == "function-python3.12-aws.zip"
