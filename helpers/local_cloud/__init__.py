"""The local cloud: an emulated AWS on this machine, in which the Lambda function really runs.

- :mod:`~helpers.local_cloud.control`: start, find and stop the server (a background
  process that outlives each notebook's kernel); ``python -m helpers.local_cloud``;
- :mod:`~helpers.local_cloud.auth`: only requests signed with the workbook's own key, or
  with credentials the local cloud issued, get in;
- :mod:`~helpers.local_cloud.executor`: runs the deployed zip as the Lambda service would
  (fresh interpreter, the role's credentials, timeout, memory, logs, async retries);
- :mod:`~helpers.local_cloud.sandbox`: one run's process, fenced in (unprivileged user,
  read-only code, limits, no process left behind);
- :mod:`~helpers.local_cloud.bootstrap`: the runtime's bootstrap inside that interpreter;
- :mod:`~helpers.local_cloud.aws_behaviour`: AWS behaviour shown on request (retry delays
  and event age, eventual consistency, CPU shares, ephemeral storage);
- :mod:`~helpers.local_cloud.moto_adapter`: every moto internal the other modules need.

Notebooks only call :func:`ensure_running` (through ``helpers.cloud.session``) and
:func:`stop`; tests also :func:`set_iam_enforcement` and :func:`set_aws_behaviour`.
"""
from helpers.local_cloud.control import (  # noqa: F401
    CERT_FILE,
    STATE_DIR,
    STATE_FILE,
    ensure_running,
    find,
    own_key,
    set_aws_behaviour,
    set_iam_enforcement,
    stop,
)
