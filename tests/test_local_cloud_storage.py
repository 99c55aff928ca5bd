"""The local cloud's memory stays bounded however much a study stores: S3 objects live on
disk (beyond a small buffer per object), not in the server's memory."""
import os
from pathlib import Path

import pytest

from helpers.cloud.clients import client

pytestmark = pytest.mark.slow  # the local cloud (see pyproject's markers)


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:"))
               .split()[1]) / 1024


def test_stored_objects_do_not_grow_the_servers_memory(cloud):
    s3 = client("s3")
    s3.create_bucket(Bucket="storage-bound")
    body = os.urandom(4 * 2**20)  # incompressible, 4 MB: under moto's default 5 MB buffer
    s3.put_object(Bucket="storage-bound", Key="warm-up", Body=body)
    rss = [_rss_mb(cloud["pid"])]
    for batch in range(2):  # 80 MB each
        for k in range(20):
            s3.put_object(Bucket="storage-bound", Key=f"obj-{batch}-{k:02d}", Body=body)
        rss.append(_rss_mb(cloud["pid"]))
    first, second = rss[1] - rss[0], rss[2] - rss[1]
    print(f"\nserver RSS grew {first:.0f} MB, then {second:.0f} MB, per 80 MB stored")
    # Held in memory, each 80 MB would add about 80 MB (measured: 233 MB for 160 MB); on
    # disk, only the request buffers' first growth remains and the second batch adds little.
    assert second < 0.25 * 80
    assert s3.get_object(Bucket="storage-bound", Key="obj-1-19")["Body"].read() == body
