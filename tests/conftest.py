"""Shared fixtures. Tests keep their build and data folders apart from a student's own run,
and only ever talk to a local cloud of their own: never to AWS."""
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

# Before any helpers import: settings read these once.
_SANDBOX = Path(tempfile.mkdtemp(prefix="workbook-tests-"))
os.environ["WORKBOOK_BUILD_DIR"] = str(_SANDBOX / "build")
os.environ["WORKBOOK_DATA_DIR"] = str(_SANDBOX / "data")
for _name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
    os.environ.pop(_name, None)

import pytest  # noqa: E402

from helpers import local_cloud  # noqa: E402
from helpers.cloud.clients import client  # noqa: E402
from helpers.cloud.iam import lambda_trust_policy  # noqa: E402


@pytest.fixture(scope="session")
def real_run() -> Path:
    """The shared real BOLD run (studyforrest); missing, the test does not pass silently:
    skipped with the reason on a developer's machine, failed under CI (``CI`` set)."""
    from helpers.cloud.settings import REAL_RUN

    if not REAL_RUN.exists():
        reason = (f"{REAL_RUN} is not here, so the real-scan test did NOT run (set "
                  "WORKBOOK_REAL_DATA_DIR to the folder of the shared real scans)")
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    return REAL_RUN


@pytest.fixture(scope="session")
def cloud():
    """A local cloud for the test session (stopped at the end)."""
    state = local_cloud.ensure_running()
    yield state
    local_cloud.stop()


@pytest.fixture(scope="session")
def role_arn(cloud):
    """An execution role any test function can run as."""
    iam = client("iam")
    return iam.create_role(RoleName="test-lambda-role",
                           AssumeRolePolicyDocument=json.dumps(lambda_trust_policy()))["Role"]["Arn"]


def make_zip(files: dict[str, str]) -> bytes:
    """A deployment zip from {file name: source}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, source in files.items():
            archive.writestr(name, source)
    return buffer.getvalue()


@pytest.fixture
def deploy(cloud, role_arn, request):
    """Create a function from sources; delete it after the test."""
    lam = client("lambda")
    made = []

    def _deploy(files, *, handler="app.lambda_handler", timeout=10, memory=128, env=None):
        name = f"t-{request.node.name[:40].replace('[', '-').replace(']', '')}-{len(made)}"
        lam.create_function(FunctionName=name, Runtime="python3.11", Role=role_arn,
                            Handler=handler, Code={"ZipFile": make_zip(files)},
                            Timeout=timeout, MemorySize=memory,
                            Environment={"Variables": env or {}})
        made.append(name)
        return name

    yield _deploy
    for name in made:
        lam.delete_function(FunctionName=name)
