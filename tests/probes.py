"""Probes into the running process for leak checks: live trio tasks, open file descriptors, RSS."""

from __future__ import annotations

import os
from collections.abc import Iterator

import trio


def live_tasks(*, skip: str | None = None) -> int:
    """Every task in the current trio run, found by walking the task tree from the root.

    ``skip`` leaves out every task whose name contains it, with its whole subtree (e.g. ``"simulator"``, so a
    leak check counts the gateway's tasks, not those of the simulator sharing the process).
    """
    count = 0
    root = trio.lowlevel.current_root_task()
    assert root is not None, "call inside trio.run"
    pending = [root]
    while pending:
        task = pending.pop()
        if skip is not None and skip in task.name:
            continue
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


def _tcp_table() -> Iterator[tuple[int, int, str, str]]:
    """Every TCP socket of this network namespace (IPv4 and IPv6): ``(local port, remote port, state, inode)``."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, remote = (int(fields[i].rsplit(":", 1)[1], 16) for i in (1, 2))
                yield local, remote, fields[3], fields[9]


def _fd_socket_inodes() -> Iterator[str | None]:
    """One entry per open file descriptor of this process: its socket inode, or ``None`` if it is no socket."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        yield target[8:-1] if target.startswith("socket:[") else None


def open_fds(*, skip_port: int | None = None) -> int:
    """Open file descriptors of this process; ``skip_port`` leaves out sockets listening/accepted on that port."""
    skipped = {inode for local, _, _, inode in _tcp_table() if local == skip_port} if skip_port is not None else set()
    return sum(1 for inode in _fd_socket_inodes() if inode is None or inode not in skipped)


def rss_kib() -> int:
    """Resident set size of this process in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


TCP_ESTABLISHED = "01"
TCP_CLOSE_WAIT = "08"


def tcp_sockets(*, local_port: int | None = None, remote_port: int | None = None) -> dict[tuple[int, int], str]:
    """The TCP sockets of this network namespace (IPv4 and IPv6) with that local and/or remote port, as
    ``(local port, remote port) → state`` (the hex code of ``/proc/net/tcp``: ``"01"`` established, ``"08"``
    close-wait, ...). A socket that was reset is no longer listed, even while its file descriptor is open."""
    found: dict[tuple[int, int], str] = {}
    for local, remote, state, _ in _tcp_table():
        if (local_port is None or local == local_port) and (remote_port is None or remote == remote_port):
            found[(local, remote)] = state
    return found


def sockets_on_port(port: int) -> int:
    """Open socket fds of this process whose local or remote TCP port is ``port`` (both ends of a loopback
    connection to a server in this process count, one fd each)."""
    inodes = {inode for local, remote, _, inode in _tcp_table() if port in (local, remote)}
    return sum(1 for inode in _fd_socket_inodes() if inode is not None and inode in inodes)
