"""The layering that docs/architecture.md states, checked on every import in the code."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


def imported(path: Path) -> set[str]:
    """Top-level names of the modules a file imports (relative imports as '.')."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
            if node.module and node.module.startswith("helpers."):
                names.add(".".join(node.module.split(".")[:2]))
    return names


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", files("lambda_package/fmri_preproc"), ids=lambda p: p.name)
def test_engine_imports_numpy_and_nibabel_only(path):
    if path.parent.name == "templates":  # build scripts for assets, not run in the Lambda
        return
    allowed = STDLIB | {".", "numpy", "nibabel", "fmri_preproc", "__future__"}
    assert imported(path) <= allowed, imported(path) - allowed


def test_handler_imports_the_engine_and_boto3_only():
    allowed = STDLIB | {"boto3", "botocore", "fmri_preproc", "__future__"}
    found = imported(ROOT / "lambda_package" / "handler.py")
    assert found <= allowed, found - allowed


@pytest.mark.parametrize("path", files("helpers/analysis"), ids=lambda p: p.name)
def test_analysis_reaches_no_cloud_code(path):
    found = imported(path)
    assert not found & {"boto3", "botocore", "moto", "helpers.cloud", "helpers.local_cloud"}


@pytest.mark.parametrize("path", files("helpers/cloud"), ids=lambda p: p.name)
def test_cloud_api_never_imports_moto(path):
    """Notebooks' cloud calls are the same in both modes: moto stays in the local cloud."""
    assert "moto" not in imported(path)


@pytest.mark.parametrize("path", [p for p in files("helpers/local_cloud")
                                  if p.name != "moto_adapter.py"], ids=lambda p: p.name)
def test_moto_internals_only_in_the_adapter(path):
    assert "moto" not in imported(path)
