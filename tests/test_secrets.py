"""The session's check that no file holds a credential (tests/conftest.py) finds one where it is, and
the environment every test and server runs in carries the marker credentials it looks for."""

from __future__ import annotations

import os
import time

from tests.conftest import SECRETS, _files_holding_secrets


def test_the_session_runs_with_marker_credentials():
    assert all(os.environ[name] == value for name, value in SECRETS.items())


def test_a_written_credential_is_found_across_a_read_boundary_and_an_old_file_is_not(tmp_path):
    since = time.time() - 1
    secret = SECRETS["MLFLOW_TRACKING_PASSWORD"].encode()
    (tmp_path / "clean.log").write_bytes(b"x" * (1 << 24))
    (tmp_path / "deep" / "er").mkdir(parents=True)
    # Straddling the 8 MiB reads: half the marker in each.
    (tmp_path / "deep" / "er" / "state.json").write_bytes(b"y" * ((1 << 23) - 10) + secret + b"z")
    old = tmp_path / "old.txt"
    old.write_bytes(secret)
    os.utime(old, (since - 100, since - 100))
    found = _files_holding_secrets([tmp_path, tmp_path / "missing"], since)
    for path in (tmp_path / "deep" / "er" / "state.json", old):  # or the session would find them too
        path.unlink()
    assert found == [str(tmp_path / "deep" / "er" / "state.json")]


def test_config_dumps_redact_credentials_and_keep_the_rest():
    from pipeline.config import load_config
    from pipeline.tracking import REDACTED, _flatten

    tree = {"train": {"lr": 1e-5, "storage_options": {"secret": "s3cr3t", "key": "AKIA", "session_token": "tok",
                                                        "aws_access_key": "ak", "password": ""}},
            "tracking": {"tracking_uri": "http://ml:hunter2@head:5000", "experiment": "x"},
            "data": {"max_tokens": 512, "output": "s3://bucket/data"}}
    flat = _flatten(tree)
    assert flat["train.storage_options.secret"] == flat["train.storage_options.session_token"] == REDACTED
    assert flat["train.storage_options.aws_access_key"] == REDACTED and flat["train.storage_options.password"] == ""
    assert flat["tracking.tracking_uri"] == f"http://ml:{REDACTED}@head:5000"
    assert (flat["train.lr"], flat["data.max_tokens"], flat["data.output"]) == ("1e-05", "512", "s3://bucket/data")
    assert flat["train.storage_options.key"] == "AKIA"  # a name alone is not a credential
    shipped = _flatten(load_config("configs/wan_1_3b_framewise.yaml", []).to_dict())
    assert REDACTED not in "".join(shipped.values())  # nothing of the shipped configs is mistaken for one
