"""Test hosts as Linux network namespaces: each gets a veth pair to a bridge
in the test's own namespace, so processes started in it are reachable at
their own address and traffic never leaves the machine. Needs root."""

from __future__ import annotations

import os
import shutil
import subprocess


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
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Hosts:
    """`count` hosts on 10.77.<net>.11, .12, ... with the bridge at .1."""

    def __init__(self, count: int, net: int = 77):
        tag = os.getpid() % 10000
        self.bridge = f"cbr{tag}"
        self.prefix = f"10.{net}.0"
        self.gateway = f"{self.prefix}.1"
        self.names = [f"corral-h{i}-{tag}" for i in range(count)]
        self.addrs = [f"{self.prefix}.{11 + i}" for i in range(count)]
        self._veths = []
        try:
            _ip("link", "add", "name", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, (name, addr) in enumerate(zip(self.names, self.addrs, strict=True)):
                outside, inside = f"cv{tag}o{i}", f"cv{tag}i{i}"
                _ip("netns", "add", name)
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                self._veths.append(outside)
                _ip("link", "set", inside, "netns", name)
                _ip("link", "set", outside, "master", self.bridge)
                _ip("link", "set", outside, "up")
                _ip("-n", name, "addr", "add", f"{addr}/24", "dev", inside)
                _ip("-n", name, "link", "set", inside, "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except Exception:
            self.destroy()
            raise

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]

    def destroy(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        for veth in self._veths:
            subprocess.run(["ip", "link", "del", veth], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)
