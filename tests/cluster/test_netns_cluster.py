"""A standalone cluster whose master, workers, driver and endpoint each have a network of their own.

``test_cluster_job`` runs every process on 127.0.0.1, where an address that works only on the
driver's own host (a broker bound to the loopback, a ``spark.driver.host`` of 127.0.0.1) goes
unnoticed. Here each role lives in its own network namespace with its own address on a private
bridge, as on four machines of one subnet:

    master 10.77.0.2 (Spark master)      driver 10.77.0.3 (the user's program: session, broker, progress)
    endpoint 10.77.0.4 (the simulator)   worker0 10.77.0.10, worker1 10.77.0.11 (a worker and its executor each)

The bridge sits in a namespace of its own (``hub``), so the host's own network and firewall are never
touched, and every name carries a per-run tag, so concurrent test sessions never meet. Loopback
is up in each namespace (the JVMs need it) but nothing is served on it: a service bound to
127.0.0.1 is unreachable from the other namespaces. Where the kernel or the container refuses
namespaces or veth pairs (no CAP_SYS_ADMIN / CAP_NET_ADMIN, no ``ip``), the test is skipped and
says why. Everything is torn down at the end, processes first (by group), then the namespaces.

What it shows: the query answers every row once through executors in another network; usage
equals what the provider served; the quota broker, the concurrency leases and the progress
collector were announced on the driver's address and reached from the workers (the broker
counted every request); the Spark UI is on and answers on the driver's address; and a driver
told to use its loopback (``SPARK_LOCAL_IP=127.0.0.1``) is refused at once with the fix.

Mutations it catches: ``services_host`` answering 127.0.0.1 for a cluster master (the announced
addresses), the broker binding 127.0.0.1 while announcing the driver's address (the broker counts
0 of 40 requests: the workers fell back to their static share and the rows were still answered),
``check_reachable`` not refusing a loopback address (the driver waits for executors instead).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster._standalone import spark_home, stop_all, wait_for

SUBNET = "10.77.0"
ROLES = {"master": 2, "driver": 3, "endpoint": 4, "worker0": 10, "worker1": 11}
WORKERS = ("worker0", "worker1")
ROWS = 40
ROOT = Path(__file__).resolve().parents[2]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class Namespaces:
    """The hub with its bridge, one namespace per role wired to it by a veth pair; ``close()`` removes all."""

    def __init__(self, tag: str) -> None:
        self.hub = f"aiq{tag}-hub"
        self.names = {role: f"aiq{tag}-{role}" for role in ROLES}
        self.created: list[str] = []

    def addr(self, role: str) -> str:
        return f"{SUBNET}.{ROLES[role]}"

    def _must(self, *args: str) -> None:
        out = _ip(*args)
        if out.returncode != 0:
            raise OSError(f"ip {' '.join(args)}: {out.stderr.strip()}")

    def create(self) -> None:
        for ns in (self.hub, *self.names.values()):
            self._must("netns", "add", ns)
            self.created.append(ns)
            self._must("-n", ns, "link", "set", "lo", "up")
        self._must("netns", "exec", self.hub, "true")  # entering one (it remounts /sys) may be refused too
        self._must("-n", self.hub, "link", "add", "br0", "type", "bridge")
        self._must("-n", self.hub, "link", "set", "br0", "up")
        for role, ns in self.names.items():
            # made inside the hub, the peer moved straight into the role's namespace: no name
            # ever appears in the host's namespace
            self._must("-n", self.hub, "link", "add", f"v-{role}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._must("-n", self.hub, "link", "set", f"v-{role}", "master", "br0", "up")
            self._must("-n", ns, "addr", "add", f"{self.addr(role)}/24", "dev", "eth0")
            self._must("-n", ns, "link", "set", "eth0", "up")

    def close(self) -> None:
        for ns in reversed(self.created):
            _ip("netns", "delete", ns)
        self.created.clear()


def _start(ns: str, cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    # `ip netns exec` execs the command: the Popen is the command, in a group of its own
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=ROOT)


@pytest.fixture
def netns(tmp_path):
    if shutil.which("ip") is None:
        pytest.skip("the network-namespace cluster test needs iproute2's `ip` (not found on PATH)")
    spaces = Namespaces(os.urandom(3).hex())
    try:
        try:
            spaces.create()
        except OSError as exc:
            pytest.skip(f"the kernel or container refused network namespaces / veth pairs ({exc}); "
                        "this test needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN")
        yield spaces
    finally:
        spaces.close()


@pytest.mark.spark
def test_master_workers_driver_and_endpoint_in_separate_networks(netns, tmp_path):
    home, scala = spark_home(tmp_path)
    base = {k: v for k, v in os.environ.items() if k not in ("SPARK_LOCAL_IP", "AIQ_DRIVER_HOST", "SPARK_MASTER_HOST")}
    base.update(SPARK_HOME=str(home), SPARK_SCALA_VERSION=scala, PYSPARK_PYTHON=sys.executable,
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    def env(role: str) -> dict:
        return dict(base, SPARK_LOCAL_IP=netns.addr(role))

    java = ["java", "-Xmx512m", "-cp", f"{home}/jars/*"]
    master_url = f"spark://{netns.addr('master')}:7077"
    sim_url = f"http://{netns.addr('endpoint')}:8000"
    procs: list[subprocess.Popen] = []
    try:
        master = _start(netns.names["master"], [*java, "org.apache.spark.deploy.master.Master", "--host", netns.addr("master"),
                                                "--port", "7077", "--webui-port", "8080"], tmp_path / "master.log",
                        dict(env("master"), SPARK_MASTER_HOST=netns.addr("master")))
        procs.append(master)
        sim = _start(netns.names["endpoint"], [sys.executable, "-m", "ai_query.testing", "--host", netns.addr("endpoint"),
                                               "--port", "8000", "--api-key", "sk-sim", "--latency", "0.01"],
                     tmp_path / "endpoint.log", env("endpoint"))
        procs.append(sim)
        wait_for(tmp_path / "master.log", r"Starting Spark master at spark://", master)
        for w in WORKERS:
            procs.append(_start(netns.names[w], [*java, "org.apache.spark.deploy.worker.Worker", master_url, "--host", netns.addr(w),
                                                 "--cores", "1", "--memory", "1g", "--webui-port", "8081",
                                                 "--work-dir", str(tmp_path / w)], tmp_path / f"{w}.log", env(w)))
        for w, proc in zip(WORKERS, procs[2:]):
            wait_for(tmp_path / f"{w}.log", r"Successfully registered with master", proc)
        wait_for(tmp_path / "endpoint.log", r"provider simulator listening on", sim, timeout=60)

        # the driver told to use its loopback (a user's exported SPARK_LOCAL_IP=127.0.0.1) is refused
        # before Spark starts, with the fix, instead of waiting for executors that never register
        refused_log = tmp_path / "driver-refused.log"
        refused = _start(netns.names["driver"], [sys.executable, "-m", "tests.cluster._netns_driver", master_url, sim_url, str(ROWS),
                                                 str(tmp_path / "unused.json")], refused_log, dict(base, SPARK_LOCAL_IP="127.0.0.1"))
        procs.append(refused)
        try:
            refused.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a driver on 127.0.0.1 was not refused: {refused_log.read_text(errors='replace')[-3000:]}")
        message = f"SPARK_LOCAL_IP=127.0.0.1 is a loopback address, but the master {master_url}"
        assert refused.returncode != 0 and message in refused_log.read_text(errors="replace"), refused_log.read_text()[-3000:]

        driver_log, result_file = tmp_path / "driver.log", tmp_path / "driver-result.json"
        driver = _start(netns.names["driver"], [sys.executable, "-m", "tests.cluster._netns_driver", master_url, sim_url, str(ROWS),
                                                str(result_file)], driver_log, env("driver"))
        procs.append(driver)
        try:
            driver.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the driver did not finish in 300 s: {driver_log.read_text(errors='replace')[-3000:]}")
        assert driver.returncode == 0 and result_file.exists(), driver_log.read_text(errors="replace")[-4000:]
        result = json.loads(result_file.read_text())
    finally:
        stop_all(procs)

    driver_addr = netns.addr("driver")
    # every row answered once, by executors in the workers' networks
    rows = result["rows"]
    assert sorted(r["id"] for r in rows) == list(range(ROWS))
    assert all(r["status"] == "ok" and r["answer"] for r in rows), [r for r in rows if r["status"] != "ok"][:3]
    served = result["served"]
    assert served["requests"] == ROWS
    assert sum(r["prompt_tokens"] for r in rows) == served["prompt_tokens"]
    assert sum(r["completion_tokens"] for r in rows) == served["completion_tokens"]
    # the driver and its services announced the driver's own address, never the loopback...
    assert result["driver_host"] == driver_addr
    assert result["broker_address"][0] == driver_addr and result["progress_address"][0] == driver_addr
    # ...and the executors reached them from the other network: the broker admitted every
    # request (a worker that cannot reach it keeps a static share and the broker counts none)
    assert result["broker_used"]["requests"] == ROWS
    assert result["progress_rows"] >= ROWS
    # the Spark UI is on for a cluster master and answers on the driver's address
    assert result["ui"].startswith(f"http://{driver_addr}:") and result["ui_answered"]
    # an executor ran in each worker's network (its app directory and logs are there)
    assert all(list((tmp_path / w).glob("app-*/*/stderr")) for w in WORKERS), list(tmp_path.rglob("app-*"))
