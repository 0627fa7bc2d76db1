"""Where the driver and its services listen: loopback only for local masters (issue 14 item 3)."""

from __future__ import annotations

import pytest

from ai_query import ConfigError
from spark_udfs._session import is_local_master, services_host, session_conf


class _Conf:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)


class _ClassicSession:
    """What services_host reads of a classic SparkSession: its conf."""

    def __init__(self, **values: str) -> None:
        self.conf = _Conf(values)


@pytest.mark.parametrize("master, local", [
    ("local", True), ("local[2]", True), ("local[*]", True), ("local[4,3]", True),
    ("spark://10.0.0.5:7077", False), ("yarn", False), ("k8s://https://api:6443", False), ("localhost", False),
])
def test_local_masters_are_told_apart_from_cluster_masters(master, local):
    assert is_local_master(master) is local


def test_a_local_master_binds_loopback_and_the_ui_is_on_unless_asked():
    conf = session_conf("local[2]", {})
    assert conf["spark.driver.host"] == "127.0.0.1" and conf["spark.ui.enabled"] == "true"
    assert session_conf("local[2]", {}, ui=False)["spark.ui.enabled"] == "false"


def test_a_cluster_master_keeps_the_ui_and_sparks_own_driver_address():
    conf = session_conf("spark://10.0.0.5:7077", {})
    assert conf["spark.ui.enabled"] == "true"
    assert "spark.driver.host" not in conf  # Spark announces this host's name, reachable from the workers


@pytest.mark.parametrize("env, host", [
    ({"SPARK_LOCAL_IP": "10.0.0.9"}, "10.0.0.9"),
    ({"AIQ_DRIVER_HOST": "driver.internal", "SPARK_LOCAL_IP": "10.0.0.9"}, "driver.internal"),
])
def test_a_cluster_master_takes_the_configured_driver_address(env, host):
    assert session_conf("yarn", env)["spark.driver.host"] == host


def test_services_bind_loopback_only_for_local_masters(monkeypatch):
    monkeypatch.delenv("AIQ_DRIVER_HOST", raising=False)
    assert services_host(_ClassicSession(**{"spark.master": "local[2]", "spark.driver.host": "10.0.0.9"})) == "127.0.0.1"
    cluster = _ClassicSession(**{"spark.master": "spark://10.0.0.5:7077", "spark.driver.host": "10.0.0.9"})
    assert services_host(cluster) == "10.0.0.9"
    monkeypatch.setenv("AIQ_DRIVER_HOST", "driver.internal")
    assert services_host(cluster) == "driver.internal"
    assert services_host(_ClassicSession(**{"spark.master": "local[2]"})) == "driver.internal"


@pytest.mark.parametrize("master, env", [
    ("spark://10.0.0.5:7077", {"SPARK_LOCAL_IP": "127.0.0.1"}),
    ("spark://10.0.0.5:7077,10.0.0.6:7077", {"AIQ_DRIVER_HOST": "localhost", "SPARK_LOCAL_IP": "10.0.0.9"}),
    ("k8s://https://api.internal:6443", {"AIQ_DRIVER_HOST": "127.0.1.1"}),
    ("yarn", {"SPARK_LOCAL_IP": "::1"}),
])
def test_a_loopback_driver_address_is_refused_for_a_master_on_another_host(master, env):
    with pytest.raises(ConfigError) as err:
        session_conf(master, env)
    source = "AIQ_DRIVER_HOST" if "AIQ_DRIVER_HOST" in env else "SPARK_LOCAL_IP"
    assert f"{source}={env[source]} is a loopback address, but the master {master}" in str(err.value)
    assert "set AIQ_DRIVER_HOST (or SPARK_LOCAL_IP)" in str(err.value)


@pytest.mark.parametrize("master", ["local[2]", "spark://127.0.0.1:7077", "spark://localhost:7077", "k8s://https://127.0.0.1:6443"])
def test_loopback_is_fine_when_the_master_is_on_this_hosts_loopback_too(master):
    assert session_conf(master, {"SPARK_LOCAL_IP": "127.0.0.1"})["spark.driver.host"] == "127.0.0.1"


def test_services_refuse_a_loopback_aiq_driver_host_for_a_remote_master(monkeypatch):
    monkeypatch.setenv("AIQ_DRIVER_HOST", "127.0.0.1")
    with pytest.raises(ConfigError, match="AIQ_DRIVER_HOST=127.0.0.1 is a loopback address"):
        services_host(_ClassicSession(**{"spark.master": "spark://10.0.0.5:7077", "spark.driver.host": "10.0.0.9"}))
    assert services_host(_ClassicSession(**{"spark.master": "spark://127.0.0.1:7077"})) == "127.0.0.1"
