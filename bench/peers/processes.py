"""Process plumbing the benchmark peers share: free loopback ports and log tails for errors."""

from __future__ import annotations

import socket
from pathlib import Path

HOST = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together so that none repeats)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file, for error messages."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"
