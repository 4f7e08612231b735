"""A TCP server on loopback for tests: accepts on its own thread and hands each connection to ``handle``."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path


def mutual_tls(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """A server's TLS context that requires a client certificate signed by ``client_ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(cert), str(key))
    return context


class LoopbackServer:
    """Subclasses define ``handle(connection)``; each runs on a thread of its own until ``close``."""

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def handle(self, raw: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            worker = threading.Thread(target=self.handle, args=(raw,), daemon=True)
            worker.start()
            self._threads.append(worker)

    def close(self, join_s: float = 5.0) -> None:
        self._stopping.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(join_s)
