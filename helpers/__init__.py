"""What the notebooks import, grouped by who uses it.

- :mod:`helpers.cloud`: the cloud API notebooks call (settings, clients, IAM, deploy,
  transfer, status, logs, costs, cleanup), the same code for the local cloud and AWS;
- :mod:`helpers.local_cloud`: the emulated cloud on this machine and its Lambda executor;
- :mod:`helpers.analysis`: simulation, connectivity and figures (no cloud code).
"""
