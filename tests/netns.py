"""Test hosts made of Linux network namespaces.

Each host is a namespace with one veth pair to a bridge in the caller's own
namespace, which holds the subnet's first address; processes started in a
host (`ip netns exec NAME ...`) are reachable at the host's address and
traffic never leaves the machine. Names carry the test process's pid and a
sequence number, and the /24 is one no interface uses yet, so concurrent test
runs do not collide. Needs root.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

_seq = itertools.count()


def available() -> str | None:
    """None if hosts can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "iproute2 (ip) is not installed"
    probe = f"corral-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _used_subnets(first_octets: str) -> set[int]:
    """Third octets of the `first_octets`.N.0/24 networks some address or route here already uses."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    out += subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True, check=True).stdout
    return {int(m.group(1)) for m in re.finditer(rf"\b{re.escape(first_octets)}\.(\d+)\.", out)}


class Hosts:
    """`count` hosts at 10.77.N.11, .12, ... with the bridge at 10.77.N.1."""

    def __init__(self, count: int, first_octets: str = "10.77"):
        tag = f"{os.getpid():x}x{next(_seq)}"
        self.bridge = f"cb{tag}"  # interface names: at most 15 characters
        self.names = [f"corral-{tag}-h{i}" for i in range(count)]
        self._veths: list[str] = []
        self._created: list[str] = []
        self._bridge_made = False
        # The lock makes choosing a free /24 and taking it (the bridge's
        # address) one step for every test run on this machine.
        lock = Path(tempfile.gettempdir()) / "corral-netns.lock"
        with open(lock, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                used = _used_subnets(first_octets)
                net = next(n for n in range(256) if n not in used)
                self.prefix = f"{first_octets}.{net}"
                self.gateway = f"{self.prefix}.1"
                self.addrs = [f"{self.prefix}.{11 + i}" for i in range(count)]
                _ip("link", "add", "name", self.bridge, "type", "bridge")
                self._bridge_made = True
                _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            except Exception:
                self.destroy()
                raise
        try:
            for i, (name, addr) in enumerate(zip(self.names, self.addrs)):
                outside = f"cv{tag}h{i}"
                _ip("netns", "add", name)
                self._created.append(name)
                _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", name)
                self._veths.append(outside)
                _ip("link", "set", outside, "master", self.bridge)
                _ip("link", "set", outside, "up")
                _ip("-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except Exception:
            self.destroy()
            raise

    def exec_prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program inside host `i`."""
        return ["ip", "netns", "exec", self.names[i]]

    def leftovers(self) -> list[str]:
        """Namespaces and interfaces of these hosts that still exist."""
        out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False).stdout
        links = {m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)", out, re.MULTILINE)}
        return [n for n in namespaces() if n in self.names] + sorted(links & {self.bridge, *self._veths})

    def destroy(self) -> None:
        """Deletes the namespaces (which takes their veth ends along) and the bridge."""
        for name in self._created:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        for veth in self._veths:
            subprocess.run(["ip", "link", "del", veth], check=False, capture_output=True)
        if self._bridge_made:
            subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)
