"""The one process helper: /proc reads, parent-death signals, process groups, stop with escalation."""

import os
import signal
import subprocess
import sys
import time

from ai_query.process import (
    children_of,
    cmdline,
    descendants,
    group_alive,
    is_gone,
    proc_stat,
    process_identity,
    process_state,
    stop_process,
    tree_rss_bytes,
)

IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"


def _started(code: str, **kwargs) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, **kwargs)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    return proc


def test_proc_stat_reads_the_fields_after_a_command_name_with_spaces_and_parentheses(tmp_path):
    odd = tmp_path / "a) b (c"  # the kernel puts this name between the first "(" and the last ")"
    os.symlink("/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "30"])
    deadline = time.monotonic() + 10
    while b"30" not in cmdline(proc.pid) and time.monotonic() < deadline:  # until it has exec'd
        time.sleep(0.02)
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as fh:
            assert fh.read().startswith(f"{proc.pid} (a) b (c) ".encode())
        stat = proc_stat(proc.pid)
        assert stat is not None and stat.ppid == os.getpid() and stat.state in ("R", "S")
        assert process_identity(proc.pid) == f"{proc.pid}:{stat.start_time}"
        assert b"30" in cmdline(proc.pid)
        assert proc.pid in children_of(os.getpid()) and not is_gone(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert proc_stat(proc.pid) is None and is_gone(proc.pid) and process_state(proc.pid) is None
    assert process_identity(proc.pid) == str(proc.pid) and cmdline(proc.pid) == b""


def test_a_zombie_counts_as_gone_and_is_no_child():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while process_state(proc.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert process_state(proc.pid) == "Z" and is_gone(proc.pid)
        assert proc.pid not in children_of(os.getpid())
    finally:
        proc.wait()


def test_descendants_and_their_memory_cover_the_whole_tree():
    proc = _started("import subprocess, sys, time; subprocess.Popen(['sleep', '30']); print('up', flush=True); time.sleep(30)")
    try:
        tree = descendants(proc.pid)
        assert len(tree) == 1 and b"sleep" in cmdline(tree[0])
        assert tree_rss_bytes(proc.pid) > tree_rss_bytes(tree[0]) > 0
    finally:
        stop_process(proc.pid, 5.0, proc=proc)
        for pid in tree:
            os.kill(pid, signal.SIGKILL)


def test_stop_process_escalates_to_sigkill_only_after_the_grace_period():
    polite = _started("import time; print('up', flush=True); time.sleep(300)")
    assert stop_process(polite.pid, 5.0, proc=polite) is True and polite.returncode == -signal.SIGTERM
    stubborn = _started(IGNORE_TERM)
    started = time.monotonic()
    assert stop_process(stubborn.pid, 0.5, proc=stubborn) is False
    assert stubborn.returncode == -signal.SIGKILL and time.monotonic() - started >= 0.5


def test_stop_process_on_a_group_waits_for_every_member():
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0));"
        f"subprocess.Popen([sys.executable, '-c', {IGNORE_TERM!r}]); time.sleep(0.5); print('up', flush=True); time.sleep(300)"
    )
    leader = _started(code, start_new_session=True)
    assert group_alive(leader.pid) and len(descendants(leader.pid)) == 1
    assert stop_process(leader.pid, 1.0, proc=leader, group=True) is False  # a member ignored SIGTERM
    assert not group_alive(leader.pid)


def test_die_with_parent_signals_a_child_whose_parent_dies():
    code = (
        "import os, subprocess, sys, time;"
        "child = subprocess.Popen([sys.executable, '-c', 'import os, sys, time; from ai_query.process import die_with_parent;"
        " ok = die_with_parent(int(sys.argv[1])); print(os.getpid(), ok, flush=True); time.sleep(300)', str(os.getpid())],"
        " stdout=sys.stdout); time.sleep(300)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid, ok = parent.stdout.readline().split()
        assert ok == "True" and not is_gone(int(pid))
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while not is_gone(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert is_gone(int(pid))
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    not_parent = subprocess.run([sys.executable, "-c", "from ai_query.process import die_with_parent; print(die_with_parent(1))"],
                                capture_output=True, text=True, check=True)
    assert not_parent.stdout.strip() == "False"  # its parent is this process, not pid 1: it has gone already
