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


# --- where the aws workbook id lives, and its region ---------------------------------------

import shutil  # noqa: E402

from helpers.cloud import settings as settings_module  # noqa: E402
from helpers.cloud.settings import (LOG_RETENTION_DAYS, NoSavedWorkbook, Settings,  # noqa: E402
                                    choose_execution_role, state_file)


@pytest.fixture
def aws_user(monkeypatch, tmp_path):
    """A user's home for aws mode: its own config folder and AWS config file, no AWS
    variables, and the opt-in of a person (not CI, not pytest). Nothing here talks to AWS:
    load_settings only reads and writes files."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws" / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws" / "credentials"))
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "CI", "PYTEST_CURRENT_TEST"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "aws").mkdir()
    return tmp_path


@pytest.fixture
def load_aws(aws_user, monkeypatch):
    """load_settings("aws", aws_confirm=True, ...), as a person would call it (pytest sets
    PYTEST_CURRENT_TEST again for each test phase: drop it at the call)."""
    def load(**kwargs):
        monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
        return load_settings("aws", aws_confirm=True, **kwargs)
    return load


def write_aws_config(home, text):
    (home / "aws" / "config").write_text(text)


def test_aws_id_is_kept_outside_the_build_folder(aws_user, load_aws, monkeypatch):
    """`make clean` deletes build/: the aws workbook id must survive it."""
    # a build folder of this test's own: the session's holds its local cloud
    monkeypatch.setattr(settings_module, "BUILD_DIR", aws_user / "build")
    first = load_aws()
    path = state_file("aws")
    assert path == aws_user / "config" / "fmri-cloud-workbook" / "workbook-aws.json"
    assert settings_module.BUILD_DIR not in path.parents
    shutil.rmtree(settings_module.BUILD_DIR, ignore_errors=True)  # what `make clean` does
    assert load_aws().workbook_id == first.workbook_id
    assert state_file("local").parent == settings_module.BUILD_DIR  # local state stays in build/


def test_a_relative_xdg_config_home_is_ignored(aws_user, load_aws, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/config")
    monkeypatch.setenv("HOME", str(aws_user / "home"))
    assert state_file("aws") == aws_user / "home" / ".config" / "fmri-cloud-workbook" / "workbook-aws.json"


def test_region_comes_from_the_profile_aws_configure_wrote(aws_user, load_aws, monkeypatch, capsys):
    write_aws_config(aws_user, "[default]\nregion = eu-west-2\n\n"
                               "[profile lab]\nsso_region = us-east-1\nregion = ap-southeast-2\n")
    assert load_aws().region == "eu-west-2"
    assert "eu-west-2 (from your AWS profile 'default')" in capsys.readouterr().out
    forget_settings("aws")
    monkeypatch.setenv("AWS_PROFILE", "lab")  # an SSO profile
    assert load_aws().region == "ap-southeast-2"


def test_region_environment_and_parameter_win(aws_user, load_aws, monkeypatch):
    write_aws_config(aws_user, "[default]\nregion = eu-west-2\n")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    assert load_aws().region == "eu-central-1"
    forget_settings("aws")
    assert load_aws(region="sa-east-1").region == "sa-east-1"


def test_no_region_anywhere_says_so(aws_user, load_aws, capsys):
    assert load_aws().region == "us-east-1"
    assert "no region is configured" in capsys.readouterr().out


def test_a_saved_workbook_keeps_its_region(aws_user, load_aws, monkeypatch, capsys):
    write_aws_config(aws_user, "[default]\nregion = eu-west-2\n")
    saved = load_aws()
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert load_aws().region == "eu-west-2"
    assert "lives in eu-west-2" in capsys.readouterr().out
    with pytest.raises(ValueError, match=f"{saved.workbook_id} lives in eu-west-2, not us-west-2"):
        load_aws(region="us-west-2")


def test_cleanup_does_not_mint_a_new_id(aws_user, load_aws):
    with pytest.raises(NoSavedWorkbook, match="--all"):
        load_aws(create=False)
    assert not state_file("aws").exists()


@pytest.mark.parametrize("region,partition", [("us-east-1", "aws"), ("eu-west-1", "aws"),
                                              ("cn-north-1", "aws-cn"),
                                              ("us-gov-west-1", "aws-us-gov")])
def test_partition_follows_the_region(region, partition):
    assert Settings(mode="aws", workbook_id="fmriwb-x", region=region).partition == partition


def test_expiry_and_log_retention_are_separate_and_checked():
    cfg = Settings(mode="local", workbook_id="fmriwb-x", object_expiry_days=10,
                   log_retention_days=14)
    assert (cfg.object_expiry_days, cfg.log_retention_days) == (10, 14)
    assert 10 not in LOG_RETENTION_DAYS  # fine for S3, refused by CloudWatch Logs
    with pytest.raises(ValueError, match="log_retention_days=10 is not a value CloudWatch"):
        Settings(mode="local", workbook_id="fmriwb-x", log_retention_days=10)
    with pytest.raises(ValueError, match="object_expiry_days"):
        Settings(mode="local", workbook_id="fmriwb-x", object_expiry_days=0)


def test_a_state_file_from_before_the_split_still_loads():
    path = state_file("local")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"mode": "local", "workbook_id": "fmriwb-old", "region": "us-east-1",
                                "retention_days": 10, "input_prefix": "raw/",
                                "output_prefix": "derivatives/"}))
    cfg = load_settings("local")
    assert (cfg.workbook_id, cfg.object_expiry_days, cfg.log_retention_days) == ("fmriwb-old", 10, 7)
    forget_settings("local")


def test_a_pre_made_role_is_remembered_and_named(aws_user, load_aws):
    cfg = load_aws()
    assert cfg.owns_role and cfg.role_name == f"{cfg.workbook_id}-lambda-role"
    arn = "arn:aws:iam::123456789012:role/service/LabRole"
    chosen = choose_execution_role(cfg, arn)
    assert (chosen.role_name, chosen.owns_role) == ("LabRole", False)
    assert load_aws().existing_role_arn == arn  # later notebooks
    with pytest.raises(ValueError, match="not an IAM role ARN"):
        choose_execution_role(cfg, "LabRole")
    with pytest.raises(ValueError, match="partition"):
        choose_execution_role(cfg, "arn:aws-cn:iam::123456789012:role/LabRole")
