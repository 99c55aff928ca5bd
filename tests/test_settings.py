"""Settings, names and the opt-in that keeps tests and CI away from real AWS."""
import json

import pytest

from helpers.cloud.clients import use_local_cloud
from helpers.cloud.settings import AwsModeRefused, forget_settings, load_settings


def test_aws_mode_is_refused_under_tests_even_when_confirmed():
    with pytest.raises(AwsModeRefused, match="never"):
        load_settings("aws", aws_confirm=True)


def test_aws_mode_needs_confirmation(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    with pytest.raises(AwsModeRefused, match="aws_confirm = True"):
        load_settings("aws")


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="mode"):
        load_settings("cloud")


def test_names_come_from_one_saved_id():
    forget_settings("local")
    first = load_settings("local")
    again = load_settings("local")
    assert first == again  # a later notebook finds the same resources
    assert first.workbook_id.startswith("fmriwb-")
    names = [first.input_bucket, first.output_bucket, first.role_name, first.function_name,
             first.failure_queue]
    assert all(n.startswith(first.workbook_id) for n in names)
    assert len(set(names)) == len(names)
    assert first.input_bucket != first.output_bucket  # outputs can never re-trigger
    assert first.tags == {"project": "fmri-cloud-workbook", "workbook-id": first.workbook_id}
    saved = json.loads((first.build_dir / "workbook-local.json").read_text())
    assert saved["workbook_id"] == first.workbook_id
    forget_settings("local")
    assert load_settings("local").workbook_id != first.workbook_id


def test_local_cloud_must_be_on_this_machine():
    with pytest.raises(ValueError, match="this machine"):
        use_local_cloud("https://s3.amazonaws.com")
