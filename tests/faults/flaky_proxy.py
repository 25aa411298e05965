"""An HTTP proxy in front of the moto S3 server that answers a seeded share of requests with S3's
throttling error (503 ``SlowDown``), by dropping the connection before any reply, or by stalling
(no reply for ``stall_s`` seconds, past the client's read timeout, then the connection dropped), as a
busy object store does; every other request is passed through unchanged."""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultCounts:
    def __init__(self) -> None:
        self.passed = self.throttled = self.dropped = self.stalled = 0
        self.lock = threading.Lock()

    def add(self, kind: str) -> None:
        with self.lock:
            setattr(self, kind, getattr(self, kind) + 1)


def _handler(upstream: str, rng: random.Random, throttle: float, drop: float, stall: float, stall_s: float,
             counts: FaultCounts):
    target = urlsplit(upstream)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            return

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    out += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return out
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _forward(self) -> None:
            body = self._body()
            with lock:
                roll = rng.random()
            if roll < drop + stall:
                if roll >= drop:
                    counts.add("stalled")
                    time.sleep(stall_s)
                else:
                    counts.add("dropped")
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if roll < drop + stall + throttle:
                counts.add("throttled")
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
            counts.add("passed")
            headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
            headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
            finally:
                conn.close()
            self.send_response(reply.status)
            for key, value in reply.getheaders():
                if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


@contextlib.contextmanager
def flaky_proxy(upstream: str, *, seed: int, throttle: float, drop: float, stall: float = 0.0,
                stall_s: float = 0.0) -> Iterator[tuple[str, FaultCounts]]:
    """Serve the proxy on a free loopback port; yields its URL and the running fault counts."""
    counts = FaultCounts()
    handler = _handler(upstream, random.Random(seed), throttle, drop, stall, stall_s, counts)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counts
    finally:
        server.shutdown()
        server.server_close()
