"""Stream servers the live-source tests run as their own processes on 127.0.0.1.

    python tests/stream_servers.py mjpeg PORT        an HTTP multipart MJPEG camera at 30 fps
    python tests/stream_servers.py udp PORT SECONDS  H.264 in MPEG-TS sent to udp://127.0.0.1:PORT

Frames are 160x120 with a white column that moves one step per frame. Each
server runs until it is killed (mjpeg) or for SECONDS (udp).
"""

from __future__ import annotations

import http.server
import socketserver
import sys
import time

import cv2
import numpy as np

WIDTH, HEIGHT, FPS = 160, 120, 30


def frame(index: int) -> np.ndarray:
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[:, (index * 4) % WIDTH] = 255
    return image


class _Camera(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        index = 0
        while True:
            data = cv2.imencode(".jpg", frame(index))[1].tobytes()
            head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            try:
                self.wfile.write(head + data + b"\r\n")
            except OSError:
                return
            index += 1
            time.sleep(1 / FPS)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve_mjpeg(port: int) -> None:
    _Server(("127.0.0.1", port), _Camera).serve_forever()


def send_udp(port: int, seconds: float) -> None:
    import av

    with av.open(f"udp://127.0.0.1:{port}?pkt_size=1316", "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency", "g": "10"}
        start = time.monotonic()
        index = 0
        while time.monotonic() - start < seconds:
            video = av.VideoFrame.from_ndarray(frame(index), format="rgb24")
            video.pts = index
            for packet in stream.encode(video):
                container.mux(packet)
            index += 1
            time.sleep(1 / FPS)


if __name__ == "__main__":
    if sys.argv[1] == "mjpeg":
        serve_mjpeg(int(sys.argv[2]))
    else:
        send_udp(int(sys.argv[2]), float(sys.argv[3]))
