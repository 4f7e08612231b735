"""A TLS front on loopback for a plain-text TCP service: mutual TLS outside, the bytes relayed as they are.

It stands in front of a local Orthanc's HTTP port so that STOW-RS over HTTPS reaches a real archive
(Orthanc's own HTTPS is not usable in Debian's build).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

IDLE_S = 30.0


class TlsFront:
    def __init__(self, backend_port: int, cert: Path, key: Path, client_ca: Path) -> None:
        self.backend_port = backend_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_cert_chain(str(cert), str(key))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.handshake_failures = 0
        self._relays: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="tls-front", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            relay = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            relay.start()
            self._relays.append(relay)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(IDLE_S)
        try:
            outside = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshake_failures += 1
            raw.close()
            return
        inside = socket.create_connection(("127.0.0.1", self.backend_port), timeout=IDLE_S)
        back = threading.Thread(target=_pump, args=(inside, outside), daemon=True)
        back.start()
        _pump(outside, inside)
        back.join(IDLE_S)
        outside.close()
        inside.close()

    def close(self) -> None:
        self._stopping.set()
        self.listener.close()
        self._thread.join(5)
        for relay in self._relays:
            relay.join(IDLE_S)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    # Either side ending ends the exchange; shutting both down wakes the other direction's recv.
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
