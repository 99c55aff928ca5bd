"""The deployment zip and the function's configuration: what the zip holds, its size against
Lambda's limits, reproducibility, dependencies complete for the target runtime, and one
configuration for notebook 02, the tests and the console guide."""
import json
import re
import zipfile
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers.cloud.deploy import (AWS_RUNTIME, UNZIPPED_LIMIT_MB, WORKBOOK_LARGEST_RUN,
                                  ZIPPED_LIMIT_MB, FunctionSpec, build_lambda_zip,
                                  function_configuration, local_runtime, missing_for_target,
                                  target_environment)
from helpers.cloud.settings import Settings

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_zip():
    return build_lambda_zip()  # the folder notebook 02 and the pipeline tests use


@pytest.fixture(scope="module")
def aws_zip(tmp_path_factory):
    return build_lambda_zip(for_aws=True, out_dir=tmp_path_factory.mktemp("aws"))


def test_local_zip_holds_code_and_dependencies(local_zip):
    names = zipfile.ZipFile(local_zip.path).namelist()
    assert "handler.py" in names
    assert "fmri_preproc/__init__.py" in names and "fmri_preproc/contract.py" in names
    # the MNI template asset that fmri_preproc.normalize reads at run time
    assert "fmri_preproc/data/tpl-MNI152NLin2009aSym_res-2_desc-tissues_probseg.nii.gz" in names
    assert "fmri_preproc/data/tpl-MNI152NLin2009aSym_res-2_desc-tissues_probseg.json" in names
    assert any(n.startswith("numpy/") for n in names)
    assert any(n.startswith("nibabel/") for n in names)
    assert not any(n.startswith(("scipy/", "boto3/", "nilearn/")) for n in names)
    assert not any("/tests/" in n or "__pycache__" in n or n.endswith(".requirements")
                   for n in names)
    assert local_zip.runtime == local_runtime()


def test_sizes_within_lambda_limits(local_zip):
    assert 0 < local_zip.zipped_mb < ZIPPED_LIMIT_MB
    assert local_zip.zipped_mb < local_zip.unzipped_mb < UNZIPPED_LIMIT_MB
    assert "of the direct-upload limit" in local_zip.report()


def test_same_sources_give_the_same_zip(local_zip, tmp_path):
    again = build_lambda_zip(out_dir=tmp_path)  # a fresh install, not the cached wheels
    assert again.path.read_bytes() == local_zip.path.read_bytes()


def test_a_code_change_is_in_the_next_zip_without_reinstalling(tmp_path, monkeypatch):
    from helpers.cloud import deploy

    source = tmp_path / "lambda_package"
    (source / "fmri_preproc").mkdir(parents=True)
    (source / "requirements.txt").write_text((deploy.LAMBDA_SOURCE / "requirements.txt")
                                             .read_text())
    (source / "handler.py").write_text("VERSION = 1\n")
    (source / "fmri_preproc" / "__init__.py").write_text("")
    monkeypatch.setattr(deploy, "LAMBDA_SOURCE", source)
    first = build_lambda_zip(out_dir=tmp_path / "out")
    wheels = (tmp_path / "out" / f"package-{local_runtime()}" / "numpy").stat().st_mtime_ns
    (source / "handler.py").write_text("VERSION = 2\n")
    second = build_lambda_zip(out_dir=tmp_path / "out")
    assert zipfile.ZipFile(second.path).read("handler.py") == b"VERSION = 2\n"
    assert first.path == second.path
    assert (tmp_path / "out" / f"package-{local_runtime()}" / "numpy").stat().st_mtime_ns == \
        wheels  # the wheels were reused


def test_aws_zip_has_linux_wheels_for_the_runtime(aws_zip):
    assert aws_zip.runtime == AWS_RUNTIME == "python3.12"
    names = zipfile.ZipFile(aws_zip.path).namelist()
    extensions = [n for n in names if n.startswith("numpy/") and n.endswith(".so")]
    assert extensions and all("cpython-312-x86_64-linux-gnu" in n for n in extensions)
    assert aws_zip.path.name == "function-python3.12-aws.zip"


def test_every_dependency_the_target_runtime_needs_is_in_the_aws_zip(aws_zip, tmp_path):
    """Each distribution's Requires-Dist, with markers evaluated for python3.12 (not for the
    Python that ran pip), is satisfied by a distribution in the zip."""
    zipfile.ZipFile(aws_zip.path).extractall(tmp_path)
    dists = list(distributions(path=[str(tmp_path)]))
    have = {canonicalize_name(d.metadata["Name"]): d.version for d in dists}
    assert {"numpy", "nibabel", "packaging", "typing-extensions"} <= set(have)
    env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "extra": ""}
    for dist in dists:
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is None or requirement.marker.evaluate(env):
                name = canonicalize_name(requirement.name)
                assert name in have, f"{dist.metadata['Name']} needs {requirement}"
                assert requirement.specifier.contains(have[name], prereleases=True)


def test_markers_are_evaluated_for_the_target_not_the_host(tmp_path):
    """nibabel needs typing-extensions below Python 3.13 only (the bug of pip issue 11664)."""
    from helpers.cloud.deploy import _pip_install

    _pip_install(tmp_path, "python3.12", True, ["nibabel==5.4.2"], no_deps=True)
    assert any(m.startswith("typing-extensions") for m in missing_for_target(tmp_path,
                                                                             "python3.12"))
    assert not any(m.startswith("typing-extensions")
                   for m in missing_for_target(tmp_path, "python3.13"))
    assert target_environment("python3.13")["python_version"] == "3.13"


# ------------------------------------------------------------------------------------------
# One configuration: notebook 02, the tests and the console guide deploy the same function


def test_console_guide_states_the_deployed_configuration():
    """docs/setup_guide.md gives the values notebook 02 deploys by default: the FunctionSpec
    sized for its ``largest_run`` (the workbook's simulated runs are smaller)."""
    import papermill

    params = papermill.inspect_notebook(str(ROOT / "notebooks" /
                                            "02_package_and_deploy_lambda.ipynb"))
    assert tuple(json.loads(params["largest_run"]["default"])) == WORKBOOK_LARGEST_RUN
    *grid, n_volumes = WORKBOOK_LARGEST_RUN
    spec = FunctionSpec.sized_for(grid, n_volumes, itemsize=4)
    assert spec == FunctionSpec()  # the tests' deployments (pipeline_fixtures) are the same
    config = function_configuration(Settings(mode="aws", workbook_id="fmriwb-guide"), spec,
                                    role_arn="arn:aws:iam::123456789012:role/r",
                                    runtime=AWS_RUNTIME)
    guide = (ROOT / "docs" / "setup_guide.md").read_text()
    stated = dict(re.findall(r"^\|\s*`?([^|`]+?)`?\s*\|\s*`?([^|`]+?)`?\s*\|$", guide, re.M))
    assert stated["Memory"] == f"{config['MemorySize']} MB"
    assert stated["Timeout"] == f"{config['Timeout']} s"
    assert stated["Ephemeral storage"] == f"{config['EphemeralStorage']['Size']} MB"
    assert stated["Runtime"] == config["Runtime"] and stated["Handler"] == config["Handler"]
    assert stated["Reserved concurrency"] == str(spec.max_concurrency)
    assert stated["Retry attempts"] == str(spec.retry_attempts)
    assert stated["Maximum age of event"] == f"{spec.max_event_age_s} s"
    for name, value in config["Environment"]["Variables"].items():
        if name not in ("OUTPUT_BUCKET", "INPUT_PREFIX", "OUTPUT_PREFIX"):
            assert stated[name] == value, name


def test_notebook_02_deploys_the_spec_without_changes():
    """Its only configuration parameter is a dict of changes, empty by default."""
    import papermill

    params = papermill.inspect_notebook(str(ROOT / "notebooks" /
                                            "02_package_and_deploy_lambda.ipynb"))
    assert params["function_changes"]["default"] == "{}"
    assert not {"memory_mb", "timeout_s", "max_input_mb"} & set(params)
