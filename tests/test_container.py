"""The Kubernetes recipe's claims that can be checked without a cluster:
corral as PID 1 of its own PID namespace (as in a container) drains on
SIGTERM and exits 0, and the manifest probes paths corral serves."""

import os
import re
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from front_ends import free_port
from support import CORRAL, ROOT, Server, wait_until

DOC = ROOT / "docs" / "deploy" / "kubernetes.md"


def _child_of(pid):
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        return int(entry)
            except OSError:
                continue
    return None


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_pid_1_in_a_container_drains_and_exits_0(tmp_path):
    stats = free_port()
    server = Server(
        "behaviour:application",
        "--stats",
        f"127.0.0.1:{stats}",
        "--shutdown-delay",
        "1",
        workers=2,
        command=["unshare", "--fork", "--pid", "--mount-proc", *CORRAL],
    )
    try:
        server.wait_started()
        # The master logs its pid as seen inside the namespace: 1.
        assert server.grep(r"Starting corral .* pid 1$"), server.log
        master = wait_until(lambda: _child_of(server.proc.pid), 5)
        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(server.request, "GET", f"/slow?secs=2&id=k{i}", timeout=30) for i in range(2)]
            server.wait_for(r"slow request started: k\d", count=2)
            os.kill(master, signal.SIGTERM)  # what the kubelet does
            assert [f.result(30).status for f in slow] == [200, 200]
        # unshare exits with PID 1's status.
        assert server.wait_exit(30) == 0
        assert server.grep(r"Shutdown complete")
    finally:
        server.cleanup()


def test_manifest_probes_what_corral_serves():
    text = DOC.read_text()
    assert re.search(r"readinessProbe:\s+httpGet: \{path: /readyz, port: stats\}", text)
    assert re.search(r"livenessProbe:\s+httpGet: \{path: /healthz, port: stats\}", text)
    assert "containerPort: 9100" in text and '"--stats", "0.0.0.0:9100"' in text
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", text).group(1))
    delay = int(re.search(r'"--shutdown-delay", "(\d+)"', text).group(1))
    graceful = int(re.search(r'"--graceful-timeout", "(\d+)"', text).group(1))
    assert grace > delay + graceful
    # Every option in the image's command is one corral accepts.
    help_text = subprocess.run([*CORRAL, "--help"], capture_output=True, text=True, check=True).stdout
    for opt in re.findall(r'"(--[a-z-]+)"', text):
        assert opt in help_text, opt
