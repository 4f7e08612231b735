"""An audit record repository on loopback for tests: syslog over TLS (a client certificate required) or TCP,
octet-counted frames (RFC 5425 / RFC 6587) collected as they arrive."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from pathlib import Path

from .certs import Issued
from .loopback_server import LoopbackServer, mutual_tls


class SyslogReceiver(LoopbackServer):
    """An audit repository on loopback: syslog over TLS (a client certificate required) or TCP, octet-counted."""

    def __init__(self, port: int = 0, tls: tuple[Issued, Path] | None = None) -> None:
        self.context = None if tls is None else mutual_tls(tls[0].cert, tls[0].key, tls[1])
        self.messages: list[bytes] = []
        super().__init__(port)

    def handle(self, raw: socket.socket) -> None:
        raw.settimeout(0.2)
        with contextlib.ExitStack() as closing:
            closing.callback(raw.close)
            try:
                connection = self.context.wrap_socket(raw, server_side=True) if self.context else raw
            except (ssl.SSLError, OSError):
                return
            closing.callback(connection.close)
            buffer = b""
            while not self.stopping:
                try:
                    chunk = connection.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while b" " in buffer:
                    length, rest = buffer.split(b" ", 1)
                    if len(rest) < int(length):
                        break
                    self.messages.append(rest[: int(length)])
                    buffer = rest[int(length) :]

    def wait_for(self, count: int, timeout_s: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.messages)
