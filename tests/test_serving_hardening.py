"""The server on an open network: API key, slow and stalled clients, the connection bound and the byte budget
for bodies, inputs that no tokenizer reads (a burst where some requests carry a lone surrogate), a failing or
non-finite model output, a bounded /metrics label set, and the status codes of invalid JSON.

Servers run on 127.0.0.1 only: in-process (uvicorn in a thread) where the test needs the app, and as a
`multitune serve` process with 1 s timeouts where it is about connections. Every wait is a bounded loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from multitune.errors import ConfigError  # noqa: E402
from multitune.model import load  # noqa: E402
from multitune.serving import ServerSettings, create_app  # noqa: E402
from multitune.serving.guard import ByteBudget  # noqa: E402
from multitune.serving.inputs import first_non_finite  # noqa: E402
from tests.test_serving import TEXTS, LiveServer, _is_clean_error, model, run_dir  # noqa: E402, F401

KEY = "k3y-for-tests-0123456789abcdef"
JSON = {"content-type": "application/json"}


def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _read_until_closed(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection (the socket's timeout bounds each wait)."""
    data = b""
    for _ in range(1000):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _body(response: bytes) -> dict:
    return json.loads(response.partition(b"\r\n\r\n")[2])


@pytest.fixture(scope="module")
def guarded(run_dir):  # noqa: F811
    """An in-process server with a small byte budget (200 kB, large bodies may use 175 kB of it)."""
    settings = ServerSettings(max_batch_size=16, max_wait_ms=20, max_inputs=8, max_chars=500,
                              max_body_bytes=100_000, max_buffered_bytes=200_000)
    app = create_app(load(run_dir), settings)
    with LiveServer(app) as live:
        live.app = app
        yield live


@pytest.fixture(scope="module")
def keyed(run_dir):  # noqa: F811
    with LiveServer(create_app(load(run_dir), ServerSettings(api_key=KEY))) as live:
        yield live


@pytest.fixture(scope="module")
def slow_server(run_dir):  # noqa: F811
    """`multitune serve` with 1 s header and body timeouts and at most 30 connections."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MULTITUNE_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "multitune.cli", "serve", str(run_dir), "--port", str(port),
                             "--header-timeout", "1", "--body-timeout", "1", "--max-connections", "30",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("multitune serve did not come up")
        yield port
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out, out
    assert "without an API key" not in out, out  # loopback: no warning about a missing key


# -- API key --------------------------------------------------------------------------------------------------


def test_api_key_is_required_except_for_health(keyed):
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        r = c.get("/v1/tasks")
        body = _is_clean_error(r, 401, "unauthorized")
        assert "Authorization: Bearer" in body["message"]
        assert r.headers["www-authenticate"].startswith("Bearer")
        for header in (f"Bearer {KEY}x", f"Basic {KEY}", KEY, "Bearer", f"Bearer {KEY[:-1]}"):
            r = c.get("/v1/tasks", headers={"Authorization": header})
            _is_clean_error(r, 401, "unauthorized")
            assert 'error="invalid_token"' in r.headers["www-authenticate"]
        # refused before its body is read: the connection closes, so a client cannot trickle the body on
        r = c.post("/v1/predict", json={"inputs": ["a fine film"]})
        _is_clean_error(r, 401, "unauthorized")
        assert r.headers["connection"] == "close"
        _is_clean_error(c.get("/nothing/here"), 401, "unauthorized")  # paths are not revealed either
        assert c.get("/health").status_code == 200

        auth = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/v1/tasks", headers=auth).status_code == 200
        assert c.get("/v1/tasks", headers={"Authorization": f"bearer  {KEY}"}).status_code == 200
        r = c.post("/v1/predict", json={"inputs": ["a fine film"]}, headers=auth)
        assert r.status_code == 200 and r.json()["predictions"][0]["sentiment"]["label"]
        spec = c.get("/openapi.json", headers=auth).json()
        assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
        assert spec["security"] == [{"apiKey": []}] and spec["paths"]["/health"]["get"]["security"] == []
        counts = c.get("/metrics", headers=auth).json()["requests"]
    assert counts["GET /v1/tasks"]["401"] == 6 and counts["POST /v1/predict"]["401"] == 1
    assert counts["unmatched"]["401"] == 1


def test_api_key_settings(monkeypatch):
    from multitune.cli import build_parser
    from multitune.serving.settings import settings_from_flags

    with pytest.raises(ConfigError, match="api_key: must have at least 16 characters, got 6"):
        ServerSettings(api_key="secret").validate()
    with pytest.raises(ConfigError, match="api_key: must be printable ASCII without spaces"):
        ServerSettings(api_key="a key with spaces in it").validate()
    assert KEY not in repr(ServerSettings(api_key=KEY))  # a logged settings object never shows the key
    monkeypatch.setenv("MULTITUNE_API_KEY", KEY)
    assert settings_from_flags(build_parser().parse_args(["serve", "RUN"])).api_key == KEY
    flag_key = "another-key-0123456789"
    assert settings_from_flags(build_parser().parse_args(["serve", "RUN", "--api-key", flag_key])).api_key == flag_key
    monkeypatch.setenv("MULTITUNE_API_KEY", "")  # set but empty is an error, never "no key"
    with pytest.raises(ConfigError, match="api_key: must have at least 16"):
        settings_from_flags(build_parser().parse_args(["serve", "RUN"]))


def test_warning_without_key_off_loopback(run_dir, monkeypatch, capsys):  # noqa: F811
    import uvicorn

    from multitune.serving import serve
    from multitune.serving.app import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)  # nothing listens: only the start is tested
    serve(run_dir, host="0.0.0.0", port=8000)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("multitune: warning: listening on 0.0.0.0 without an "
                                                         "API key"), warnings
    serve(run_dir, host="0.0.0.0", port=8000, settings=ServerSettings(api_key=KEY))
    serve(run_dir, host="127.0.0.1", port=8000)
    assert "warning" not in capsys.readouterr().err


# -- slow and stalled clients, connections, the byte budget ----------------------------------------------------


def test_slow_headers_get_408_and_the_connection_closes(slow_server):
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 40 + b"\r\n\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", slow_server)) as sock:
        sock.settimeout(30)
        for byte in request:  # one byte per 0.5 s: the whole request would take 36 s
            readable, _, _ = select.select([sock], [], [], 0.5)
            if readable:  # the server answered (or closed) before the headers were complete
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sent += 1
        response = _read_until_closed(sock)
    assert sent < len(request)
    assert response.startswith(b"HTTP/1.1 408 "), response
    assert _body(response) == {"error": "timeout",
                               "message": "request headers not complete within 1 s (--header-timeout)"}


def test_stalled_bodies_are_closed_and_others_still_served(slow_server):
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 500\r\n\r\n")
    stalled = []
    try:
        for i in range(6):
            sock = socket.create_connection(("127.0.0.1", slow_server))
            sock.settimeout(30)
            sock.sendall(head + (b'{"inputs": ["a' if i % 2 else b""))  # part of the body, or none of it
            stalled.append(sock)
        r = httpx.post(f"http://127.0.0.1:{slow_server}/v1/predict", json={"inputs": ["a fine film"]}, timeout=30)
        assert r.status_code == 200, r.text
        for sock in stalled:
            response = _read_until_closed(sock)
            assert response.startswith(b"HTTP/1.1 408 "), response
            assert _body(response)["message"] == "request body not complete within 1 s (--body-timeout)"
            assert b"connection: close" in response.lower()
    finally:
        for sock in stalled:
            sock.close()
    metrics = httpx.get(f"http://127.0.0.1:{slow_server}/metrics", timeout=30).json()
    assert metrics["requests"]["POST /v1/predict"]["408"] >= 6


def test_connections_beyond_the_bound_get_503(slow_server):
    socks = []
    try:
        for _ in range(36):
            sock = socket.create_connection(("127.0.0.1", slow_server))
            sock.settimeout(30)
            socks.append(sock)
        # refused ones are answered at once; the others sent nothing and are closed silently after 1 s
        responses = [_read_until_closed(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    refused = [r for r in responses if r]
    assert 6 <= len(refused) <= 36 and responses.count(b"") == len(responses) - len(refused)
    for r in refused:
        assert r.startswith(b"HTTP/1.1 503 ") and _body(r)["error"] == "overloaded", r
        assert "--max-connections 30" in _body(r)["message"]
    assert httpx.get(f"http://127.0.0.1:{slow_server}/health", timeout=30).status_code == 200


def test_byte_budget_refuses_large_bodies_and_keeps_room_for_small_ones(guarded):
    port = int(guarded.url.rsplit(":", 1)[1])

    def head(length: int) -> bytes:
        return (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()

    def buffered() -> int:
        return httpx.get(f"{guarded.url}/metrics", timeout=30).json()["buffered_bytes"]

    holders = []
    try:
        for _ in range(2):  # two large bodies, one byte short of complete: 174,998 of the 175,000 they may use
            sock = socket.create_connection(("127.0.0.1", port))
            sock.settimeout(30)
            sock.sendall(head(87_500) + b" " * 87_499)
            holders.append(sock)
        for _ in range(200):
            if buffered() == 174_998:
                break
            time.sleep(0.05)
        assert buffered() == 174_998
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(30)
            sock.sendall(head(50_000))  # refused by its declared length, before a byte of it is read
            response = _read_until_closed(sock)
        assert response.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in response.lower(), response
        assert _body(response)["error"] == "overloaded" and "--max-buffered-bytes" in _body(response)["message"]
        # a small body still fits: the last 25,000 bytes of the budget are kept for bodies up to 64 KiB
        r = httpx.post(f"{guarded.url}/v1/predict", json={"inputs": ["a fine film"]}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        for sock in holders:
            sock.close()
    for _ in range(200):  # the clients went away: their bytes are given back
        if buffered() == 0:
            break
        time.sleep(0.05)
    assert buffered() == 0


def test_byte_budget_unit():
    budget = ByteBudget(800)
    assert budget.reserve == 100
    assert budget.take(600, 100_000) and not budget.take(101, 100_000)  # large: up to 700
    assert budget.take(200, 1_000)  # small: the rest
    assert not budget.take(1, 1_000)
    budget.give_back(800)
    assert budget.used == 0


# -- inputs, model failures, outputs ---------------------------------------------------------------------------


def test_poisoned_burst_bad_inputs_are_422_and_good_ones_all_succeed(guarded, model, monkeypatch,  # noqa: F811
                                                                     caplog):
    import multitune.serving.app as app_module

    model_inputs = []
    original = app_module.predict_planned

    def counting(m, inputs, plan, batch_size=32):
        model_inputs.append(len(inputs))
        return original(m, inputs, plan, batch_size=batch_size)

    monkeypatch.setattr(app_module, "predict_planned", counting)
    bodies = []
    for i in range(60):
        if i % 10 == 3:  # the JSON escape \ud800: valid JSON, but no UTF-8 text
            bodies.append((b'{"inputs": ["the film was great", "abc \\ud800"], "tasks": ["sentiment"]}',
                           "inputs[1]: not valid Unicode"))
        elif i % 10 == 7:
            bodies.append((b'{"inputs": [{"text": "a film", "text_pair": "\\udc80 b"}]}',
                           "inputs[0].text_pair: not valid Unicode"))
        else:
            bodies.append((json.dumps({"inputs": [TEXTS[i % len(TEXTS)]], "tasks": ["sentiment", "ner"]}).encode(),
                           None))

    def call(item):
        with httpx.Client(base_url=guarded.url, timeout=60) as c:
            return c.post("/v1/predict", content=item[0], headers=JSON)

    caplog.set_level(logging.WARNING)
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, bodies))
    expected = dict(zip(TEXTS, model.predict("sentiment", TEXTS)))
    good = 0
    for i, ((_, bad), r) in enumerate(zip(bodies, answers)):
        if bad is None:
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0]["sentiment"]["label"] == expected[TEXTS[i % len(TEXTS)]]["label"]
            good += 1
        else:
            body = _is_clean_error(r, 422, "invalid_request")
            assert body["message"].startswith(bad) and "\\ud" in body["message"].lower(), body
    assert sum(model_inputs) == good  # every good input ran once; no bad one ever reached the model
    assert not [r for r in caplog.records if r.name.startswith(("multitune", "uvicorn"))], caplog.text


def test_tokenizer_error_is_422_naming_the_input(guarded):
    check = guarded.app.state.input_check
    tokenizer = check.tokenizer

    class Picky:
        def __call__(self, texts, **kwargs):
            if any("zebra" in t for t in texts):
                raise ValueError("this tokenizer reads no zebras")
            return tokenizer(texts, **kwargs)

    check.tokenizer = Picky()
    try:
        r = httpx.post(f"{guarded.url}/v1/predict", json={"inputs": ["a fine film", "a zebra\nfilm"]}, timeout=30)
        body = _is_clean_error(r, 422, "invalid_request")
        assert body["message"] == ("inputs[1]: the model's tokenizer cannot read this text (ValueError: this "
                                   "tokenizer reads no zebras)")
        assert httpx.post(f"{guarded.url}/v1/predict", json={"inputs": ["a fine film"]}, timeout=30).status_code == 200
    finally:
        check.tokenizer = tokenizer


def test_failed_batch_fails_its_requests_once_without_retries():
    from multitune.serving.batcher import BatchFailedError, MicroBatcher

    calls = []

    def broken(inputs, plan):
        calls.append(list(inputs))
        raise RuntimeError("model broke")

    async def burst():
        batcher = MicroBatcher(broken, max_batch_size=32, max_wait_ms=50, max_queue=100)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit([f"x{i}"], [["t"]]) for i in range(4)),
                                        return_exceptions=True)
        finally:
            await batcher.stop()

    results = asyncio.run(burst())
    assert all(isinstance(r, BatchFailedError) for r in results), results
    assert calls == [["x0", "x1", "x2", "x3"]]  # one model call for the batch, none per request


def test_failed_batch_is_500_logged_once(run_dir, monkeypatch, caplog):  # noqa: F811
    import multitune.serving.app as app_module

    app = create_app(load(run_dir), ServerSettings(max_wait_ms=100))
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app_module, "predict_planned", broken)
    caplog.set_level(logging.INFO)
    with LiveServer(app) as live:
        def call(i):
            with httpx.Client(base_url=live.url, timeout=60) as c:
                return c.post("/v1/predict", json={"inputs": [f"film {i}"]})

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(call, range(6)))
    for r in answers:
        body = _is_clean_error(r, 500, "internal")
        assert "secret" not in r.text and body["message"] == "prediction failed (logged on the server)"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == len(calls) <= 6 and all(r.exc_info for r in errors), caplog.text
    assert all(r.getMessage().startswith("prediction failed for a batch of") for r in errors)


def test_non_finite_output_is_500_naming_the_input(run_dir, monkeypatch, caplog):  # noqa: F811
    import multitune.serving.app as app_module

    app = create_app(load(run_dir))

    def nan_for_second(m, inputs, plan, batch_size=32):
        return [{"sentiment": {"label": "positive", "score": float("nan") if i == 1 else 0.5}}
                for i in range(len(inputs))]

    monkeypatch.setattr(app_module, "predict_planned", nan_for_second)
    caplog.set_level(logging.WARNING)
    with LiveServer(app) as live:
        r = httpx.post(f"{live.url}/v1/predict", json={"inputs": ["a", "b", "c"], "tasks": ["sentiment"]},
                       timeout=30)

    def no_constants(name):
        raise AssertionError(f"{name} in a response")

    body = json.loads(r.text, parse_constant=no_constants)
    assert r.status_code == 500 and body["error"] == "non_finite", body
    assert body["message"].startswith("inputs[1]: the model's prediction sentiment.score is not a finite number")
    assert len([rec for rec in caplog.records if rec.name == "multitune.serving"]) == 1


def test_first_non_finite():
    assert first_non_finite({"a": {"scores": {"x": 0.1, "y": 1}}, "b": [0.5, "s", None, True]}) is None
    assert first_non_finite({"ner": {"entities": [{"score": 0.2}, {"score": -math.inf}]}}) == "ner.entities[1].score"
    assert first_non_finite({"t": {"scores": {"neg": math.nan}}}) == "t.scores.neg"


# -- metrics labels, invalid JSON ------------------------------------------------------------------------------


def test_metrics_labels_stay_bounded(guarded):
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        before = c.get("/metrics", params={"format": "prometheus"}).text.splitlines()
        for i in range(300):
            assert c.request(f"METHOD{i}", "/v1/predict").status_code == 405
            assert c.request(f"M{i}", f"/no/such/path/{i}").status_code == 404
            assert c.get(f"/also/not/{i}").status_code == 404
        after = c.get("/metrics", params={"format": "prometheus"}).text
        snapshot = c.get("/metrics").json()
    assert len(after.splitlines()) - len(before) <= 16, after
    assert 'multitune_requests_total{endpoint="other /v1/predict",status="405"} 300' in after
    assert 'multitune_requests_total{endpoint="unmatched",status="404"}' in after
    assert "METHOD" not in after and "/no/such" not in after
    assert {"other /v1/predict", "unmatched"} <= set(snapshot["requests"]) and len(snapshot["requests"]) <= 12


def test_invalid_json_is_422(guarded):
    cases = [(b"{not json", "body: not valid JSON: Expecting property name enclosed in double quotes (at "
                            "character 1)"),
             (b'{"inputs": ["caf\xe9"]}', "body: not valid JSON: not UTF-8 (byte 16)"),
             (b"[" * 50_000, "body: not valid JSON: nested too deeply"),
             (b"", "Field required")]
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        for content, message in cases:
            body = _is_clean_error(c.post("/v1/predict", content=content, headers=JSON), 422, "invalid_request")
            assert message in body["message"], body
        # a lone surrogate in a key or a task name is echoed escaped, on one line, as valid JSON
        r = c.post("/v1/predict", content=b'{"inputs": ["a"], "tasks": ["\\ud800\\nx"]}', headers=JSON)
        body = _is_clean_error(r, 404, "unknown_task")
        assert "'\\ud800\\nx'" in body["message"]
        _is_clean_error(c.post("/v1/predict", content=b'{"inputs": ["a"], "\\udfff": 1}', headers=JSON), 422,
                        "invalid_request")


def test_bytes_that_are_not_http_get_a_json_400(guarded):
    port = int(guarded.url.rsplit(":", 1)[1])
    for garbage in (b"HELLO THERE\r\n\r\n", b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(30)
            sock.sendall(garbage)
            response = _read_until_closed(sock)
        assert response.startswith(b"HTTP/1.1 400 "), response
        assert _body(response)["error"] == "bad_request"
