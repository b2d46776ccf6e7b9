"""A fault-injecting HTTP proxy in front of a real S3 endpoint (moto), stdlib only.

Faults, each armed for the next N matching requests (None: every one until `heal()`):
- `slow_down(n)`: answer 503 with S3's SlowDown error body instead of forwarding;
- `drop_upload_parts(n)`: on a multipart UploadPart, read part of the body, then close the
  connection without answering (what a dying load balancer does).
Every request is recorded as (method, path?query, outcome) so tests can count what happened.
"""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message><RequestId>faulty-proxy</RequestId></Error>")
HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FaultyProxy:
    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._faults: dict[str, int | None] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FaultyProxy":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def slow_down(self, n: int | None) -> None:
        self._arm("503", n)

    def drop_upload_parts(self, n: int | None) -> None:
        self._arm("drop", n)

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()

    def count(self, outcome: str) -> int:
        return sum(1 for _, _, o in self.log if o == outcome)

    def _arm(self, fault: str, n: int | None) -> None:
        with self._lock:
            self._faults[fault] = n

    def _take(self, fault: str) -> bool:
        """Consume one armed fault, if any."""
        with self._lock:
            if fault not in self._faults:
                return False
            left = self._faults[fault]
            if left is not None:
                if left <= 1:
                    del self._faults[fault]
                else:
                    self._faults[fault] = left - 1
            return True

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore's pool expects

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _record(self, outcome: str) -> None:
                with proxy._lock:
                    proxy.log.append((self.command, self.path, outcome))

            def _is_upload_part(self) -> bool:
                q = parse_qs(urlsplit(self.path).query)
                return self.command == "PUT" and "partNumber" in q and "uploadId" in q

            def _serve(self) -> None:
                if self._is_upload_part() and proxy._take("drop"):
                    self.rfile.read(max(int(self.headers.get("Content-Length") or 0) // 2, 1))
                    self._record("dropped")
                    self.connection.shutdown(socket.SHUT_RDWR)  # no response, mid-body
                    self.close_connection = True
                    return
                body = self._body()
                if proxy._take("503"):
                    self._record("503")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP | {"expect"}}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self._record(str(resp.status))
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP | {"content-length"}:
                        self.send_header(k, v)
                # HEAD answers carry the object's length but no body: pass the upstream value on.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

        return Handler
