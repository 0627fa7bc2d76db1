"""``[storage_options]``: parsed and checked, expanded per path, installed through the environment,
resolved where used, and mapped onto ``pyarrow.fs`` (the end-to-end run is ``tests/spark/test_s3_spec_credentials.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ai_query import ConfigError, SecretNotFoundError, storage
from ai_query._storage_options import ENV, expand, install, parse_section, references, resolved
from batch_runner import JobSpec

SECTION = {
    "AWS_ACCESS_KEY_ID": "{{secrets/s3/key_id}}", "AWS_SECRET_ACCESS_KEY": "{{secrets/s3/secret}}",
    "aws_region": "eu-west-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    "s3://raw/area": {"AWS_ACCESS_KEY_ID": "{{secrets/raw/key_id}}", "AWS_SECRET_ACCESS_KEY": "{{secrets/raw/secret}}"},
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.setenv(ENV, "{}")  # (restored after the test: install() writes it)
    monkeypatch.setenv("AIQ_SECRET_S3_KEY_ID", "AKIAJOB")
    monkeypatch.setenv("AIQ_SECRET_S3_SECRET", "job-secret")
    monkeypatch.setenv("AIQ_SECRET_RAW_KEY_ID", "AKIARAW")
    monkeypatch.setenv("AIQ_SECRET_RAW_SECRET", "raw-secret")


def test_job_wide_options_then_the_longest_prefix_over_them():
    section = parse_section(SECTION, "job.toml")
    assert section[""]["AWS_REGION"] == "eu-west-1"  # names are upper-cased
    entries = expand(section, ["s3://out/t", "s3://raw/area/reviews", "s3://raw/areal", "/local/path", "file:///x"])
    assert set(entries) == {"s3://raw/area", "s3://out/t", "s3://raw/area/reviews", "s3://raw/areal"}
    assert entries["s3://raw/area/reviews"]["AWS_ACCESS_KEY_ID"] == "{{secrets/raw/key_id}}"
    assert entries["s3://raw/area/reviews"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"  # job-wide underneath
    assert entries["s3://raw/areal"]["AWS_ACCESS_KEY_ID"] == "{{secrets/s3/key_id}}"  # a prefix is a path component


def test_installed_options_are_secret_names_and_resolve_where_used():
    install(expand(parse_section(SECTION, "job.toml"), ["s3://out/t"]))
    import os

    assert "job-secret" not in os.environ[ENV] and "{{secrets/s3/secret}}" in os.environ[ENV]
    assert references("s3://out/t.aiq/journal") is None  # "t.aiq" is not under "t"
    assert references("s3://out/t/_delta_log")["AWS_SECRET_ACCESS_KEY"] == "{{secrets/s3/secret}}"
    assert resolved("s3://raw/area/x")["AWS_SECRET_ACCESS_KEY"] == "raw-secret"
    assert storage.delta_options("s3://out/t")["AWS_ACCESS_KEY_ID"] == "AKIAJOB"
    assert storage.delta_options("/local/t") is None and storage.delta_options("s3://elsewhere/t") is None
    fs, path = storage.filesystem("s3://out/t/part-0.parquet")
    kwargs = fs.__reduce__()[1][0]
    assert (kwargs["access_key"], kwargs["secret_key"], kwargs["region"]) == ("AKIAJOB", "job-secret", "eu-west-1")
    assert (kwargs["endpoint_override"], kwargs["scheme"], path) == ("127.0.0.1:9000", "http", "out/t/part-0.parquet")
    with pytest.raises(ConfigError, match=r"storage options for s3://out/t differ between the jobs"):
        install({"s3://out/t": {"AWS_REGION": "us-east-1"}})


def test_an_unset_secret_names_itself_when_resolved(monkeypatch):
    install({"s3://out/t": {"AWS_SECRET_ACCESS_KEY": "{{secrets/s3/gone}}"}})
    with pytest.raises(SecretNotFoundError, match=r"\{\{secrets/s3/gone\}\} is not set: set the environment variable AIQ_SECRET_S3_GONE"):
        storage.delta_options("s3://out/t")


@pytest.mark.parametrize("raw, message", [
    ({"AWS_SECRET_ACCESS_KEY": "plain"}, r"storage_options.AWS_SECRET_ACCESS_KEY is a credential and must be a secret reference"),
    ({"AZURE_STORAGE_ACCOUNT_KEY": "plain"}, r"AZURE_STORAGE_ACCOUNT_KEY is a credential"),
    ({"ENDPOINT": "x"}, r"storage_options.ENDPOINT is not a storage option"),
    ({"raw": {"AWS_REGION": "x"}}, r"\[storage_options.raw\] must be named by a URI prefix"),
    ({"AWS_REGION": 3}, r"storage_options.AWS_REGION must be a non-empty string"),
    ("AWS", r"\[storage_options\] must be a table"),
])
def test_bad_sections_name_the_key_and_the_fix(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_section(raw, "job.toml")


def test_a_job_spec_carries_them_and_expands_them_over_its_paths(tmp_path: Path):
    spec = JobSpec.from_dict({"name": "j", "key": ["id"], "query": "SELECT id FROM t", "sources": {"t": "s3://in/t"},
                              "output": {"path": "s3://out/o", "mode": "merge"},
                              "storage_options": {"AWS_REGION": "eu-west-1"}}, tmp_path)
    entries = spec.storage_entries()
    assert set(entries) == {"s3://in/t", "s3://out/o", "s3://out/o.aiq", "s3://out/o.aiq/endpoint_usage"}
    assert json.loads(json.dumps(entries))["s3://out/o.aiq"] == {"AWS_REGION": "eu-west-1"}
