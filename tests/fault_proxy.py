"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the S3 test server (moto).

Every request is forwarded to the upstream server, except that, with bounded counts:
- every ``slowdown_every``-th request gets ``503 SlowDown`` (S3's throttling answer);
- every ``reset_every``-th request has its connection reset (no answer at all);
- every ``truncate_every``-th GET with a body gets its full headers but half its body, then the
  connection is closed (a response cut short).
``stop()`` closes the listening socket and every open connection (the store is gone:
connections are refused); ``start()`` listens on the same port again.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FaultProxy:
    def __init__(self, upstream_port: int, slowdown_every: int = 0, reset_every: int = 0, truncate_every: int = 0,
                 max_each: int = 4) -> None:
        self.upstream_port = upstream_port
        self.every = {"slowdown": slowdown_every, "reset": reset_every, "truncate": truncate_every}
        self.max_each = max_each
        self.counts = {"requests": 0, "gets": 0, "slowdown": 0, "reset": 0, "truncate": 0}
        self.lock = threading.Lock()
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.open: set[socket.socket] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy.lock:
                    proxy.open.add(self.connection)

            def finish(self) -> None:
                with proxy.lock:
                    proxy.open.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def do_GET(self) -> None:
                try:
                    proxy.handle(self)
                except OSError:  # the client went away (or stop() closed it)
                    self.close_connection = True

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        with self.lock:
            conns, self.open = list(self.open), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the handler blocked on the next request
            except OSError:
                pass
            _reset(conn)

    def disarm(self) -> None:
        self.every = {k: 0 for k in self.every}

    def _fault(self, kind: str, n: int) -> bool:
        every = self.every[kind]
        if every and n % every == 0 and self.counts[kind] < self.max_each:
            self.counts[kind] += 1
            return True
        return False

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        with self.lock:
            self.counts["requests"] += 1
            n = self.counts["requests"]
            slowdown = self._fault("slowdown", n)
            reset = not slowdown and self._fault("reset", n + 1)
        if reset:
            _reset(h.connection)
            h.close_connection = True
            return
        if slowdown:
            h.send_response(503, "Slow Down")
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(SLOWDOWN)))
            h.end_headers()
            h.wfile.write(SLOWDOWN)
            return
        up = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        up.request(h.command, h.path, body=body, headers=headers)
        resp = up.getresponse()
        data = resp.read()
        up.close()
        truncate = False
        if h.command == "GET" and len(data) > 64:
            with self.lock:
                self.counts["gets"] += 1
                truncate = self._fault("truncate", self.counts["gets"])
        h.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP and k.lower() != "content-length":
                h.send_header(k, v)
        length = resp.getheader("Content-Length") if h.command == "HEAD" else str(len(data))
        if length is not None:
            h.send_header("Content-Length", length)
        h.end_headers()
        if h.command == "HEAD":
            return
        if truncate:
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            _reset(h.connection)
            h.close_connection = True
            return
        h.wfile.write(data)


def _read_body(h: BaseHTTPRequestHandler) -> bytes | None:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(h.rfile.read(size))
            h.rfile.readline()
    length = h.headers.get("Content-Length")
    return h.rfile.read(int(length)) if length else (b"" if h.command in ("PUT", "POST") else None)


def _reset(conn: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees 'connection reset'."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    except OSError:
        pass
