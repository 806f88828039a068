"""A small Python client for the local inference API (what ``edge-agent infer`` uses).

One persistent connection over the Unix socket; not thread-safe (use one client per thread). Errors from the
agent arrive as :class:`LocalApiError` carrying the agent's stable ``code`` (``busy``, ``shape_mismatch``, …).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.localapi.wire import ProtocolViolation, SocketReader, message, set_io_timeout

__all__ = ["LocalApiError", "LocalClient"]


class LocalApiError(Exception):
    """The agent answered with an error, or could not be reached (``code`` = ``unreachable``)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (field: {field})" if field else ""))
        self.status, self.code, self.message, self.field = status, code, message, field


class LocalClient:
    """``LocalClient("/run/edge-agent/api.sock").infer("cancer-mlp", {"features": rows})``."""

    def __init__(self, socket_path: str | Path, *, timeout: float = 10.0) -> None:
        self._path = str(socket_path)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: SocketReader | None = None

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None

    def _connect(self) -> tuple[socket.socket, SocketReader]:
        if self._sock is None or self._reader is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            set_io_timeout(s, self._timeout)
            try:
                self._connect_retrying(s)
            except OSError as exc:
                s.close()
                raise LocalApiError(0, "unreachable", f"cannot connect to {self._path}: {exc.strerror or exc}; "
                                                      "is edge-agent running, and may this user use its socket?"
                                    ) from None
            self._sock, self._reader = s, SocketReader(s)
        return self._sock, self._reader

    def _connect_retrying(self, s: socket.socket) -> None:
        """A full listen backlog makes a Unix-socket connect fail at once with EAGAIN: back off and retry."""
        deadline = time.monotonic() + self._timeout
        delay = 0.001
        while True:
            try:
                s.connect(self._path)
                return
            except BlockingIOError:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """Send one request and return the decoded JSON answer; raise :class:`LocalApiError` on errors."""
        payload = b"" if body is None else json.dumps(body).encode()
        msg = message(f"{method} {path} HTTP/1.1".encode(), payload, extra=b"Host: edge-agent\r\n")
        for attempt in (0, 1):
            reused = self._sock is not None
            sock, reader = self._connect()
            try:
                # The agent may have answered and closed already (503 busy): then read what it said.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(msg)
                head = reader.read_head()
                if head is None:
                    raise ConnectionResetError("connection closed by the agent")
                data = reader.read_body(head.content_length(1 << 30))
            except (ConnectionError, BrokenPipeError) as exc:
                self.close()
                if reused and attempt == 0:
                    continue  # the agent closed an idle keep-alive connection; one fresh try
                raise LocalApiError(0, "unreachable", f"connection to the agent failed: {exc}") from None
            except (TimeoutError, BlockingIOError):
                self.close()
                raise LocalApiError(0, "timeout", f"no answer from the agent within {self._timeout} s") from None
            except ProtocolViolation as exc:
                self.close()
                raise LocalApiError(0, "bad_response", exc.message) from None
            if head.headers.get("connection", "").lower() == "close":
                self.close()
            status = int(head.start[1]) if len(head.start) > 1 and head.start[1].isdigit() else 0
            doc = json.loads(data) if data else {}
            if status != 200:
                err = doc.get("error", {}) if isinstance(doc, dict) else {}
                raise LocalApiError(status, err.get("code", "http_error"), err.get("message", f"HTTP {status}"),
                                    err.get("field"))
            return doc
        raise AssertionError("unreachable")  # pragma: no cover

    def wait_ready(self, timeout: float = 60.0, *, alive: Callable[[], bool] = lambda: True) -> dict[str, Any]:
        """Poll ``/v1/health`` until the agent is ready; ``alive`` lets a caller stop early if the agent died."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.health()
            except LocalApiError as exc:
                if not alive():
                    raise LocalApiError(0, "unreachable", "the agent process exited before it was ready") from None
                if time.monotonic() > deadline:
                    raise LocalApiError(0, "timeout",
                                        f"the agent was not ready within {timeout:.0f} s: {exc}") from None
                time.sleep(0.05)

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/health")
        return result

    def models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/v1/models")["models"]
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/stats")
        return result

    def infer(self, model: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run ``inputs`` (name → nested lists or numpy arrays) on ``model``; returns outputs and version."""
        body = {"inputs": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in inputs.items()}}
        result: dict[str, Any] = self.request("POST", f"/v1/models/{model}/infer", body)
        return result
