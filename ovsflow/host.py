"""What this host and network namespace are, for telling apart what is kept on disk between
runs: the boot (conntrack does not outlive a reboot) and the network namespace (its
conntrack table is its own). Standard library only: `ovsflow conntrack`'s start imports it."""

from __future__ import annotations

import os
import socket
import struct

SO_NETNS_COOKIE = 71  # Linux 5.14: a number per network namespace, never reused in a boot


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as file:
        return file.read().strip()


def boot_time() -> float:
    """When this host booted (Unix time, /proc/stat `btime`): the same for every process of
    a boot, another after a reboot (the kernel derives it from the clock: it can differ by
    a second between two reads)."""
    with open("/proc/stat") as file:
        for line in file:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise OSError("/proc/stat has no btime line")


def network_namespace() -> int:
    """This network namespace's cookie (the inode of /proc/self/ns/net, which can be
    reused once a namespace is gone, only where the kernel has no cookies)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            return struct.unpack("=Q", probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE,
                                                        8))[0]
        except OSError:
            return os.stat("/proc/self/ns/net").st_ino
