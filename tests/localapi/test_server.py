"""The local inference API over a real Unix socket, with the real models: what apps see, and what bad clients
cannot do to it."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.localapi import LocalApiError, LocalClient
from tests.conftest import samples
from tests.services.required import unavailable

ROW = samples("cancer_mlp_int8")["inputs"]["features"][0]


def raw(sock_path: Path, data: bytes, *, read: bool = True, timeout: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; return everything the agent answers until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(data)
        if not read:
            return b""
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def still_serving(sock_path: Path) -> None:
    with LocalClient(sock_path) as c:
        out = c.infer("cancer-mlp", {"features": [ROW]})
    assert out["model"] == "cancer-mlp" and len(out["outputs"]["probabilities"][0]) == 2


def test_infer_over_socket_matches_in_process(start_agent: Any) -> None:
    agent = start_agent()
    s = samples("digits_int8")
    with LocalClient(agent.config.api.socket_path) as c:
        for stem in ("cancer_mlp_int8", "digits_mlp_int8", "digits_int8"):
            s = samples(stem)
            rows = s["inputs"]["features"]
            got = [int(np.argmax(c.infer(s["model"], {"features": [r]})["outputs"]["probabilities"][0]))
                   for r in rows[:10]]
            assert got == s["expected_top1"][:10]
        health = c.health()
        assert health["status"] == "ready"
        assert set(health["models"]) == {"cancer-mlp@1", "digits-mlp@1", "digits-tflite@1"}
        models = {m["name"]: m for m in c.models()}
        assert models["digits-tflite"]["runtime"] in ("litert", "tflite-runtime")
        assert c.stats()["models"]["cancer-mlp"]["ok"] == 10


@pytest.mark.parametrize(
    ("inputs", "status", "code", "field"),
    [
        ({"features": [ROW[:-1]]}, 422, "shape_mismatch", "features"),
        ({"features": [[*ROW[:3], float("nan"), *ROW[4:]]]}, 422, "non_finite", "features[3] mean area"),
        ({"features": [["a"] * 30]}, 422, "dtype_mismatch", "features"),
        ({"features": [ROW, ROW[:5]]}, 422, "shape_mismatch", "features"),
        ({"pixels": [ROW]}, 422, "unknown_input", "pixels"),
        ({"features": [[None] * 30]}, 422, "dtype_mismatch", "features"),
    ],
)
def test_bad_request_gets_clear_error_and_agent_keeps_serving(
        start_agent: Any, inputs: dict[str, Any], status: int, code: str, field: str) -> None:
    agent = start_agent(models=("cancer_mlp_int8.onnx",))
    with LocalClient(agent.config.api.socket_path) as c:
        with pytest.raises(LocalApiError) as err:
            c.infer("cancer-mlp", inputs)
        assert (err.value.status, err.value.code, err.value.field) == (status, code, field)
        assert err.value.message
        assert c.stats()["models"]["cancer-mlp"]["errors"][code] == 1
    still_serving(agent.config.api.socket_path)


def test_unknown_model_and_route_errors(start_agent: Any) -> None:
    agent = start_agent(models=("cancer_mlp_int8.onnx",))
    sock = agent.config.api.socket_path
    with LocalClient(sock) as c:
        with pytest.raises(LocalApiError) as e:
            c.infer("nope", {"features": [ROW]})
        assert (e.value.status, e.value.code) == (404, "unknown_model")
        with pytest.raises(LocalApiError) as e:
            c.request("GET", "/v1/models/cancer-mlp/infer")
        assert e.value.status == 405
        with pytest.raises(LocalApiError) as e:
            c.request("GET", "/v2/everything")
        assert e.value.status == 404
    answer = raw(sock, b"POST /v1/models/cancer-mlp/infer HTTP/1.1\r\nContent-Length: 9\r\n\r\n{not json")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"bad_json" in answer


@pytest.mark.parametrize(
    ("frame", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"\x00\x01\x02\x03\r\n\r\n", b"400"),
        (b"GET /v1/health HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (b"GET /v1/health HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"431"),
        (b"".join(b"X-%d: y\r\n" % i for i in range(100)).join([b"GET /v1/health HTTP/1.1\r\n", b"\r\n"]), b"431"),
        (b"POST /v1/models/cancer-mlp/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
         b"501"),
        (b"POST /v1/models/cancer-mlp/infer HTTP/1.1\r\nContent-Length: -5\r\n\r\n", b"400"),
        (b"GET /v1/health SPDY/3\r\n\r\n", b"400"),
    ],
)
def test_malformed_frames_answered_and_closed(start_agent: Any, frame: bytes, status: bytes) -> None:
    agent = start_agent(models=("cancer_mlp_int8.onnx",))
    sock = agent.config.api.socket_path
    answer = raw(sock, frame)
    assert answer.split(b" ", 2)[1] == status, answer[:200]
    assert b'"error"' in answer
    assert agent.api.counters["malformed"] >= 1
    still_serving(sock)


def test_oversized_request_refused_before_reading_it(start_agent: Any) -> None:
    agent = start_agent(api_extra="max_request_bytes = 4096", models=("cancer_mlp_int8.onnx",))
    sock = agent.config.api.socket_path
    answer = raw(sock, b"POST /v1/models/cancer-mlp/infer HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ") and b"too_large" in answer
    with LocalClient(sock) as c, pytest.raises(LocalApiError) as e:
        c.infer("cancer-mlp", {"features": [ROW] * 200})
    assert e.value.status == 413
    still_serving(sock)


def test_client_disconnecting_mid_request_does_not_hurt_the_agent(start_agent: Any) -> None:
    agent = start_agent(models=("cancer_mlp_int8.onnx",))
    sock = agent.config.api.socket_path
    for partial in (b"POST /v1/models/cancer-mlp/infer HTTP/1.1\r\nContent-Length: 5000\r\n\r\n{\"inp",
                    b"POST /v1/models/cancer-mlp/inf", b"GET /v1/health HTTP/1.1\r\nHost: x\r\n"):
        raw(sock, partial, read=False)  # close right after sending part of a request
    # And one that leaves before reading its answer.
    body = json.dumps({"inputs": {"features": [ROW] * 50}}).encode()
    raw(sock, b"POST /v1/models/cancer-mlp/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
        read=False)
    time.sleep(0.2)
    still_serving(sock)
    with LocalClient(sock) as c:
        assert c.health()["status"] == "ready"


def test_slow_client_times_out_without_blocking_others(start_agent: Any) -> None:
    agent = start_agent(api_extra="read_timeout_s = 0.3\nidle_timeout_s = 0.3", models=("cancer_mlp_int8.onnx",))
    sock = agent.config.api.socket_path
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(str(sock))
        slow.sendall(b"POST /v1/models/cancer-mlp/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        still_serving(sock)  # others are served while the slow one dawdles
        slow.settimeout(3)
        assert slow.recv(100) == b""  # the agent gave up on it and closed


def test_flood_gets_busy_answers_and_everything_else_is_served(start_agent: Any) -> None:
    agent = start_agent(api_extra="max_pending = 2\nmax_batch = 1\nmax_connections = 8",
                        models=("digits_mlp_int8.onnx",))
    sock = agent.config.api.socket_path
    row = samples("digits_mlp_int8")["inputs"]["features"][0]
    codes: list[str] = []
    lock = threading.Lock()

    def flood(threads: int, each: int) -> None:
        def app() -> None:
            with LocalClient(sock) as c:
                for _ in range(each):
                    try:
                        c.infer("digits-mlp", {"features": [row]})
                        code = "ok"
                    except LocalApiError as exc:
                        code = exc.code
                    with lock:
                        codes.append(code)

        ts = [threading.Thread(target=app) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)

    # Every connection slot taken by apps that stay connected: newcomers are told 'busy' at once.
    held = [LocalClient(sock) for _ in range(8)]
    for c in held:
        c.health()
    flood(8, 10)
    assert codes == ["busy"] * 80
    assert agent.api.counters["busy_connections"] == 80
    for c in held:
        c.close()
    # Then a flood that fits the connection limit but not the model's queue: 'ok' or 'busy', nothing else.
    codes.clear()
    time.sleep(0.1)
    flood(8, 50)
    assert len(codes) == 400  # every request got an answer
    assert set(codes) <= {"ok", "busy"}, set(codes)
    assert codes.count("ok") > 0
    still = LocalClient(sock).infer("digits-mlp", {"features": [row]})
    assert still["version"] == 1


def test_concurrent_requests_are_micro_batched(start_agent: Any) -> None:
    agent = start_agent(api_extra="max_batch = 16\nmax_pending = 256", models=("digits_mlp_int8.onnx",))
    sock = agent.config.api.socket_path
    s = samples("digits_mlp_int8")
    rows, expected = s["inputs"]["features"], s["expected_top1"]
    wrong: list[int] = []

    def app(k: int) -> None:
        with LocalClient(sock) as c:
            for i in range(60):
                j = (k + i) % len(rows)
                out = c.infer("digits-mlp", {"features": [rows[j]]})
                if int(np.argmax(out["outputs"]["probabilities"][0])) != expected[j]:
                    wrong.append(j)

    threads = [threading.Thread(target=app, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert wrong == []  # batching never mixes up whose answer is whose
    st = LocalClient(sock).stats()["models"]["digits-mlp"]
    assert st["ok"] == 480
    assert st["batches"] > 0 and st["batched_requests"] >= 2 * st["batches"]


def test_socket_file_mode_restricts_callers(start_agent: Any) -> None:
    agent = start_agent(api_extra='socket_mode = "0660"', models=("cancer_mlp_int8.onnx",))
    mode = stat.S_IMODE(os.stat(agent.config.api.socket_path).st_mode)
    assert mode == 0o660
    assert not mode & 0o007  # no access for 'other'


def _as_nobody(sock: Path, request: bytes = b"GET /v1/health HTTP/1.1\r\n\r\n") -> str:
    """Connect as user 'nobody' (a forked child drops privileges) and say what happened."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest, no threads of ours; just the socket calls
        result = "?"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                try:
                    s.connect(str(sock))
                except PermissionError:
                    result = "permission_denied"
                else:
                    s.sendall(request)
                    result = s.recv(4096).split(b"\r\n", 1)[0].decode()
        except BaseException as exc:
            result = f"error {exc!r}"
        finally:
            os.write(w, result.encode())
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return f.read()


def _need_root() -> None:
    if os.geteuid() != 0:
        unavailable("needs root to switch to user 'nobody' (CI runs as root)")


def test_other_local_user_cannot_call_without_permission(start_agent: Any) -> None:
    _need_root()
    agent = start_agent(api_extra='socket_mode = "0600"', models=("cancer_mlp_int8.onnx",))
    assert _as_nobody(agent.config.api.socket_path) == "permission_denied"  # EACCES on the socket file


def test_peer_credentials_allow_list_enforced(start_agent: Any) -> None:
    _need_root()
    nogroup = "nogroup"
    agent = start_agent(api_extra=f'socket_mode = "0660"\nsocket_group = "{nogroup}"\nallowed_uids = [1]',
                        models=("cancer_mlp_int8.onnx",))
    # The file mode lets 'nobody' in (group nogroup); the SO_PEERCRED allow-list does not.
    assert _as_nobody(agent.config.api.socket_path) == "HTTP/1.1 403 Forbidden"
    assert agent.api.counters["denied_peer"] == 1


def test_admin_endpoints_refuse_other_users_even_with_socket_access(start_agent: Any) -> None:
    _need_root()
    agent = start_agent(api_extra='socket_mode = "0660"\nsocket_group = "nogroup"', models=("cancer_mlp_int8.onnx",))
    body = b'{"path": "/etc/passwd"}'
    req = b"POST /v1/admin/install HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert _as_nobody(agent.config.api.socket_path) == "HTTP/1.1 200 OK"  # an app may infer ...
    assert _as_nobody(agent.config.api.socket_path, req) == "HTTP/1.1 403 Forbidden"  # ... but not administer
    assert agent.api.counters["denied_admin"] == 1


def test_admin_install_with_bad_body_is_a_clear_400(start_agent: Any) -> None:
    agent = start_agent(models=("cancer_mlp_int8.onnx",))
    with LocalClient(agent.config.api.socket_path) as c:
        for body in ({"path": "relative/file"}, {"nopath": 1}):
            with pytest.raises(LocalApiError) as err:
                c.request("POST", "/v1/admin/install", body)
            assert err.value.status == 400 and "absolute" in err.value.message
        out = c.request("POST", "/v1/admin/install", {"path": "/nonexistent.bundle"})
        assert (out["status"], out["reason"]) == ("rejected", "disabled")  # no trust root configured here


def test_unexpected_failure_answers_500_and_keeps_serving(start_agent: Any) -> None:
    agent = start_agent(models=("cancer_mlp_int8.onnx",))

    def broken() -> None:
        raise RuntimeError("injected fault")

    real = agent.host.models
    agent.host.models = broken  # a bug in a handler, injected
    with LocalClient(agent.config.api.socket_path) as c:
        with pytest.raises(LocalApiError) as err:
            c.models()
        assert (err.value.status, err.value.code) == (500, "internal") and "injected fault" in err.value.message
        agent.host.models = real
        assert c.infer("cancer-mlp", {"features": [ROW]})["version"] == 1  # same connection, still served
    assert agent.api.counters["internal_error"] == 1
