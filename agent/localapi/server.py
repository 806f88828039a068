"""The local inference API: HTTP/1.1 over a Unix domain socket, one thread per connection.

Why a Unix socket: on-device apps reach it without a network port, and the file's owner, group and mode (plus an
optional allow-list of peer uids/gids checked with ``SO_PEERCRED``) decide which local users may call it. Why a
thread per connection: a request runs in the thread that read it (no hand-off), and concurrent connections batch
together in the model's :class:`~agent.runtime.batcher.CombiningBatcher`. Connections are capped
(``max_connections``; the next one gets ``503 busy`` and is closed), bodies are capped (``413``), slow or idle
clients time out, and every failure answers with a JSON error ``{"error": {"code", "message", "field"}}`` while
the server keeps serving everyone else.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config import ApiConfig
from agent.localapi.wire import Head, ProtocolViolation, SocketReader, message, reason_phrase, set_io_timeout
from agent.model import RequestError
from agent.runtime import BusyError, InferenceFailedError, ModelHost, RuntimeErrorBase, UnknownModelError

__all__ = ["LocalApiServer"]

log = logging.getLogger("edge_agent.localapi")
_PEERCRED = struct.Struct("3i")
_INFER_SUFFIX = "/infer"
_MODELS_PREFIX = "/v1/models/"


class _Reply(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def _error_body(code: str, message: str, field: str | None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return json.dumps({"error": err}).encode()


def _absolute_path(body: bytes, example: str) -> Path:
    """The ``{"path": "/absolute/..."}`` body of the admin file actions."""
    try:
        value = json.loads(body)["path"]
        if not isinstance(value, str) or not value.startswith("/"):
            raise ValueError("path must be absolute")
    except (ValueError, KeyError, TypeError) as exc:
        raise _Reply(400, "bad_request", f'body must be {{"path": "{example}"}}: {exc}') from None
    return Path(value)


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason_phrase(status)}".encode()
    return line


class LocalApiServer:
    """Serves a :class:`ModelHost` on a Unix socket. ``start()`` binds and returns; ``stop()`` drains."""

    def __init__(self, host: ModelHost, config: ApiConfig, *, ready: Callable[[], str] = lambda: "ready",
                 admin: Callable[[], Any] = lambda: None) -> None:
        self._host = host
        self._cfg = config
        self._state = ready
        self._admin = admin
        self._sock: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._refusers = threading.BoundedSemaphore(16)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._stopping = threading.Event()
        self.counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        path = self._cfg.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if path.is_socket():
                path.unlink()
            elif path.exists():
                raise OSError(f"{path} exists and is not a socket; refusing to replace it")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # never briefly world-accessible between bind and chmod
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, self._cfg.socket_mode)
        if self._cfg.socket_group:
            try:
                gid = grp.getgrnam(self._cfg.socket_group).gr_gid
            except KeyError:
                sock.close()
                path.unlink()
                raise OSError(f"api.socket_group {self._cfg.socket_group!r} does not exist on this system") from None
            os.chown(path, -1, gid)
        sock.listen(max(self._cfg.max_connections, 128))  # a short backlog makes connect() fail with EAGAIN
        self._sock = sock
        self._accept_thread = threading.Thread(target=self._accept_loop, name="localapi-accept", daemon=True)
        self._accept_thread.start()
        log.info("local API listening on %s", path, extra={"socket": str(path)})

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (up to ``timeout``), close, remove the socket."""
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:  # wakes idle keep-alive readers; a request being served finishes first
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RD)
        deadline = threading.Event()
        for _ in range(int(timeout * 100)):
            with self._conns_lock:
                if not self._conns:
                    break
            deadline.wait(0.01)
        with contextlib.suppress(FileNotFoundError):
            self._cfg.socket_path.unlink()

    def _count(self, key: str) -> None:
        with self._counters_lock:
            self.counters[key] += 1

    # -- connections ---------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            if not self._peer_allowed(conn):
                self._count("denied_peer")
                self._refuse(conn, 403, "forbidden", "this user is not allowed to call the inference API")
                continue
            if not self._slots.acquire(blocking=False):
                self._count("busy_connections")
                self._refuse(conn, 503, "busy",
                             f"too many connections (limit {self._cfg.max_connections}); retry later")
                continue
            with self._conns_lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve_conn, args=(conn,), name="localapi-conn", daemon=True).start()

    def _peer_allowed(self, conn: socket.socket) -> bool:
        if not self._cfg.allowed_uids and not self._cfg.allowed_gids:
            return True  # the socket file's mode and group are the gate
        _pid, uid, gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        return uid == os.getuid() or uid in self._cfg.allowed_uids or gid in self._cfg.allowed_gids

    def _refuse(self, conn: socket.socket, status: int, code: str, message_text: str) -> None:
        """Answer a connection we will not serve, in a short-lived thread (bounded in number and time).

        The request is read first so the answer is an ordinary HTTP exchange: closing a Unix socket with unread
        data resets it, and the client would see a reset instead of the reason.
        """
        if not self._refusers.acquire(blocking=False):
            conn.close()  # refusing is itself bounded: past that, just close
            return

        def answer() -> None:
            try:
                set_io_timeout(conn, 1.0)
                reader = SocketReader(conn)
                with contextlib.suppress(OSError, ProtocolViolation):
                    head = reader.read_head()
                    if head is not None:
                        with contextlib.suppress(ProtocolViolation):
                            reader.read_body(head.content_length(self._cfg.max_request_bytes))
                    conn.sendall(message(_status_line(status), _error_body(code, message_text, None), close=True))
            finally:
                conn.close()
                self._refusers.release()

        threading.Thread(target=answer, name="localapi-refuse", daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        reader = SocketReader(conn)
        _pid, peer_uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 _PEERCRED.size))
        # One kernel timeout for every read and write (no per-call poll); idle time is counted in ticks of it.
        tick = min(self._cfg.read_timeout_s, self._cfg.idle_timeout_s)
        set_io_timeout(conn, tick)
        idle = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    head = reader.read_head()
                except TimeoutError:
                    idle += tick
                    if reader.buffered or idle >= self._cfg.idle_timeout_s:
                        if reader.buffered:
                            self._count("slow_client")
                        return  # a head that never completes, or an idle keep-alive connection: close
                    continue
                except ProtocolViolation as exc:
                    self._count("malformed")
                    conn.sendall(message(_status_line(exc.status), _error_body("bad_request", exc.message, None),
                                         close=True))
                    return
                if head is None:
                    return
                idle = 0.0
                if not self._handle(conn, reader, head, peer_uid):
                    return
        except (ConnectionError, TimeoutError, OSError) as exc:
            self._count("client_gone")
            log.debug("client connection ended: %s", exc)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            self._slots.release()
            with contextlib.suppress(OSError):
                conn.close()

    def _handle(self, conn: socket.socket, reader: SocketReader, head: Head, peer_uid: int) -> bool:
        """Answer one request; return whether the connection stays open."""
        start = head.start
        if len(start) != 3 or not start[2].startswith("HTTP/1."):
            self._count("malformed")
            conn.sendall(message(_status_line(400), _error_body("bad_request", "malformed request line", None),
                                 close=True))
            return False
        method, target, version = start
        close = version == "HTTP/1.0" or head.headers.get("connection", "").lower() == "close"
        try:
            length = head.content_length(self._cfg.max_request_bytes)
        except ProtocolViolation as exc:
            self._count("too_large" if exc.status == 413 else "malformed")
            code = "too_large" if exc.status == 413 else "bad_request"
            conn.sendall(message(_status_line(exc.status), _error_body(code, exc.message, None), close=True))
            return False
        try:
            body = reader.read_body(length) if length else b""
        except ConnectionResetError:
            self._count("client_gone")
            return False
        try:
            status, payload = (self._admin_route(method, target, body, peer_uid) if target.startswith("/v1/admin/")
                               else self._route(method, target, body))
        except _Reply as r:
            status, payload = r.status, _error_body(r.code, r.message, r.field)
        except Exception as exc:  # the top of a request: answer 500 and keep the connection, never drop it silently
            log.exception("request %s %s failed", method, target)
            self._count("internal_error")
            status, payload = 500, _error_body("internal", f"the agent failed to handle this request: {exc}", None)
        conn.sendall(message(_status_line(status), payload, close=close))
        return not close

    # -- routes --------------------------------------------------------------------------------------------
    def _route(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        path = target.split("?", 1)[0]
        if path.startswith(_MODELS_PREFIX) and path.endswith(_INFER_SUFFIX):
            if method != "POST":
                raise _Reply(405, "method_not_allowed", "use POST to run inference")
            return self._infer(path[len(_MODELS_PREFIX) : -len(_INFER_SUFFIX)], body)
        if method != "GET":
            if path in ("/v1/health", "/v1/models", "/v1/stats") or path.startswith(_MODELS_PREFIX):
                raise _Reply(405, "method_not_allowed", f"use GET for {path}")
            raise _Reply(404, "not_found", f"no such endpoint: {path}")
        if path == "/v1/health":
            state = self._state()
            return (200 if state == "ready" else 503), json.dumps(
                {"status": state, "models": [f"{m.name}@{m.version}" for m in self._host.models()]}).encode()
        if path == "/v1/models":
            return 200, json.dumps({"models": [m.describe() for m in self._host.models()]}).encode()
        if path == "/v1/stats":
            with self._counters_lock:
                api = dict(self.counters)
            models = {m.name: {"version": m.version, **m.stats.to_dict(), "batches": m.batcher.batches,
                               "batched_requests": m.batcher.batched_items} for m in self._host.models()}
            return 200, json.dumps({"api": api, "models": models}).encode()
        if path.startswith(_MODELS_PREFIX):
            model = self._get_model(path[len(_MODELS_PREFIX):])
            return 200, json.dumps({**model.describe(), "schema": model.schema.to_dict(),
                                    "stats": model.stats.to_dict()}).encode()
        raise _Reply(404, "not_found", f"no such endpoint: {path}")

    def _admin_route(self, method: str, target: str, body: bytes, peer_uid: int) -> tuple[int, bytes]:
        """Operator actions: only the agent's own user and root may call them, whatever the socket mode."""
        if peer_uid not in (0, os.getuid()):
            self._count("denied_admin")
            raise _Reply(403, "forbidden", "admin endpoints are for the agent's own user and root only")
        agent = self._admin()
        if agent is None:
            raise _Reply(503, "not_ready", "the agent is not running an admin interface")
        path = target.split("?", 1)[0]
        if path == "/v1/admin/install" and method == "POST":
            outcome = agent.install(_absolute_path(body, "/absolute/bundle/path"))  # the answer is the outcome
            return 200, json.dumps({
                "status": outcome.status, "model": outcome.model, "version": outcome.version,
                "reason": outcome.reason, "message": outcome.message}).encode()
        if path == "/v1/admin/trust-root" and method == "POST":
            return 200, json.dumps(agent.rotate_root(_absolute_path(body, "/absolute/root.json"))).encode()
        if path == "/v1/admin/events" and method == "GET":
            return 200, json.dumps({"events": [
                {"kind": e.kind, "command_id": e.command_id, "model": e.model, "version": e.version,
                 "reason": e.reason, "message": e.message} for e in list(agent.events)]}).encode()
        raise _Reply(404, "not_found", f"no such admin endpoint: {method} {path}")

    def _get_model(self, name: str) -> Any:
        try:
            return self._host.get(name)
        except UnknownModelError as exc:
            self._count("unknown_model")
            raise _Reply(404, exc.code, exc.message, "model") from None

    def _infer(self, name: str, body: bytes) -> tuple[int, bytes]:
        model = self._get_model(name)
        inputs = self._decode_inputs(model, body)
        try:
            result = model.infer(inputs)
        except RequestError as exc:
            raise _Reply(422, exc.code, exc.message, exc.field) from None
        except BusyError as exc:
            raise _Reply(503, exc.code, exc.message) from None
        except InferenceFailedError as exc:
            raise _Reply(500, exc.code, exc.message) from None
        except RuntimeErrorBase as exc:
            raise _Reply(500, exc.code, exc.message) from None
        out: dict[str, Any] = {
            "model": result.model,
            "version": result.version,
            "outputs": {k: v.tolist() for k, v in result.outputs.items()},
        }
        if result.flags is not None:
            out["flags"] = {"out_of_range": list(result.flags.out_of_range),
                            "non_finite": list(result.flags.non_finite)}
        return 200, json.dumps(out).encode()

    def _decode_inputs(self, model: Any, body: bytes) -> dict[str, npt.NDArray[Any]]:
        """JSON → arrays in the schema's dtypes. Every failure names the field and counts on the model."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            model.count_error("bad_json")
            raise _Reply(400, "bad_json", f"request body is not valid JSON: {exc}") from None
        raw = doc.get("inputs") if isinstance(doc, dict) else None
        if not isinstance(raw, dict) or not raw:
            model.count_error("bad_request")
            raise _Reply(400, "bad_request", 'request body must be {"inputs": {"<input name>": [[...], ...]}}',
                         "inputs")
        checker = model.checker
        arrays: dict[str, npt.NDArray[Any]] = {}
        for key, value in raw.items():
            try:
                dtype = checker.dtype_of(key)
            except KeyError:
                model.count_error("unknown_input")
                raise _Reply(422, "unknown_input", f"unknown input '{key}'; the model's inputs are: "
                                                   f"{', '.join(checker.input_names)}", key) from None
            arrays[key] = self._to_array(model, key, value, dtype)
        return arrays

    @staticmethod
    def _to_array(model: Any, key: str, value: object, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):
            model.count_error("shape_mismatch")
            raise _Reply(422, "shape_mismatch", f"input '{key}' is not a rectangular array (ragged rows)",
                         key) from None
        if arr.dtype.kind not in "biuf":
            model.count_error("dtype_mismatch")
            raise _Reply(422, "dtype_mismatch", f"input '{key}' must hold only numbers (the model expects "
                                                f"{dtype}); got {arr.dtype.name} values", key)
        if dtype.kind in "iu":
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
                model.count_error("dtype_mismatch")
                raise _Reply(422, "dtype_mismatch", f"input '{key}' expects integers ({dtype}); got fractions",
                             key)
            info = np.iinfo(dtype)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                model.count_error("dtype_mismatch")
                raise _Reply(422, "dtype_mismatch",
                             f"input '{key}' expects {dtype} values in {info.min}..{info.max}", key)
        return arr.astype(dtype, copy=False)
