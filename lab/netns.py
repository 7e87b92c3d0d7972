"""Network namespaces for the demo and the tests: created with unique names, deleted by those names (ours
alone) when the test is done; processes started in them are stopped by PID."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

_counter = itertools.count()
LAB = Path(__file__).resolve().parent
PYTHON = sys.executable


class CommandFailed(RuntimeError):
    pass


def sh(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, **kwargs)
    if check and result.returncode:
        raise CommandFailed(f"{' '.join(args)} exited {result.returncode}: "
                            f"{result.stderr.strip()}")
    return result


class Netns:
    def __init__(self, role: str):
        self.name = f"of-{role}-{os.getpid()}-{next(_counter)}"
        sh("ip", "netns", "add", self.name)
        self._processes: list[subprocess.Popen] = []
        self.run("ip", "link", "set", "lo", "up")

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh(*self.prefix(), *args, check=check)

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        process = subprocess.Popen([*self.prefix(), *args], **kwargs)
        self._processes.append(process)
        return process

    def traffic(self, *args: str) -> subprocess.CompletedProcess:
        """lab/traffic.py in this namespace."""
        return self.run(PYTHON, str(LAB / "traffic.py"), *args)

    def delete(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
        sh("ip", "netns", "delete", self.name, check=False)


def veth_pair(left: Netns, right: Netns, left_address: str, right_address: str) -> None:
    """A veth between two namespaces, addresses with prefix length, links up."""
    suffix = left.name.rsplit("-", 2)[-1] + left.name.rsplit("-", 1)[-1]
    a, b = f"va{suffix}"[:15], f"vb{suffix}"[:15]
    sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
    sh("ip", "link", "set", a, "netns", left.name)
    sh("ip", "link", "set", b, "netns", right.name)
    for ns, device, address in ((left, a, left_address), (right, b, right_address)):
        ns.run("ip", "addr", "add", address, "dev", device)
        ns.run("ip", "link", "set", device, "up")
