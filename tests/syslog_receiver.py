"""An audit record repository on loopback for tests: syslog over TLS (a client certificate required) or TCP,
octet-counted frames (RFC 5425 / RFC 6587) collected as they arrive."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path

from .certs import Issued


class SyslogReceiver:
    """An audit repository on loopback: syslog over TLS (a client certificate required) or TCP, octet-counted."""

    def __init__(self, port: int = 0, tls: tuple[Issued, Path] | None = None) -> None:
        self.context: ssl.SSLContext | None = None
        if tls is not None:
            server, client_ca = tls
            self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_cert_chain(str(server.cert), str(server.key))
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.messages: list[bytes] = []
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            reader = threading.Thread(target=self._read, args=(raw,), daemon=True)
            reader.start()
            self._threads.append(reader)

    def _read(self, raw: socket.socket) -> None:
        raw.settimeout(0.2)
        with contextlib.ExitStack() as closing:
            closing.callback(raw.close)
            try:
                connection = self.context.wrap_socket(raw, server_side=True) if self.context else raw
            except (ssl.SSLError, OSError):
                return
            closing.callback(connection.close)
            buffer = b""
            while not self._stopping.is_set():
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

    def close(self) -> None:
        self._stopping.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(5)
