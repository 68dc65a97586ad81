"""The HTTP server on loopback: every task from one backbone pass, micro-batching under concurrent clients,
limits as 4xx JSON, no traceback ever, metrics, the CLI, and a bounded schemathesis fuzz of its OpenAPI spec.
Also :func:`multitune.inference.predict_all` against one-task-at-a-time prediction."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

from multitune.config import parse_config  # noqa: E402
from multitune.inference import InputError, UnknownTaskError, predict_all  # noqa: E402
from multitune.model import load  # noqa: E402
from multitune.serving import ServerSettings, create_app, uvicorn_config  # noqa: E402
from multitune.training import train  # noqa: E402
from tests.conftest import text2text_config, write_toy_data  # noqa: E402

TASKS = ("sentiment", "ner", "similarity", "sentiment_text")
TEXTS = ["the film was great", "Anna Smith visited Oslo today", "the meal was dull", "Boris left Lima",
         "a lovely song", "the hotel near Paris was awful and the trip was boring"]
PAIRS = [{"text": "the film was great", "text_pair": "the film was lovely"},
         {"text": "the book was dull", "text_pair": "a game is superb"}]


@pytest.fixture(scope="module")
def run_dir(tiny_t5, tmp_path_factory) -> Path:
    """A tiny encoder-decoder run with a classifier, a tagger, a pair regressor and a text-to-text task."""
    tmp = tmp_path_factory.mktemp("serve-run")
    raw = text2text_config(write_toy_data(tmp / "data"), tiny_t5, tmp / "run", tasks=TASKS, max_steps=4,
                           eval_every=4)
    train(parse_config(raw), progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def model(run_dir):
    return load(run_dir)


class LiveServer:
    """uvicorn on 127.0.0.1 (a free port) in a background thread, configured as ``multitune serve`` does it
    (header timeout, connection bound, keep-alive) from the app's settings."""

    def __init__(self, app):
        # proto IPPROTO_TCP, as uvicorn's own sockets have it: asyncio sets TCP_NODELAY only then, and without
        # it every response (headers and body: two writes) waits ~40 ms for a delayed ACK
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, app.state.settings, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="module")
def server(run_dir):
    # its own model instance: the server's model thread never shares a model with the tests
    settings = ServerSettings(max_batch_size=16, max_wait_ms=20, max_inputs=8, max_chars=200, max_body_bytes=4096)
    with LiveServer(create_app(load(run_dir), settings)) as live:
        yield live


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _expected(model, task, inputs):
    return model.predict(task, [x if isinstance(x, str) else (x["text"], x["text_pair"]) for x in inputs])


def assert_same(got, want):
    """Equal predictions, with scores compared to float tolerance (the padded batches differ)."""
    if isinstance(want, dict):
        assert set(got) == set(want), (got, want)
        for k in want:
            assert_same(got[k], want[k])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-4)
    else:
        assert got == want


def test_predict_all_equals_one_task_at_a_time(model):
    got = predict_all(model, TEXTS + PAIRS, batch_size=4)
    for i in range(len(TEXTS)):
        assert set(got[i]) == {"sentiment", "ner", "sentiment_text"}  # default: every single-text task
    for i in range(len(PAIRS)):
        assert set(got[len(TEXTS) + i]) == {"similarity"}
    for task in ("sentiment", "ner", "sentiment_text"):
        assert_same([g[task] for g in got[:len(TEXTS)]], _expected(model, task, TEXTS))
    assert_same([g["similarity"] for g in got[len(TEXTS):]], _expected(model, "similarity", PAIRS))
    one = predict_all(model, TEXTS[:2], tasks=["ner"])
    assert [set(p) for p in one] == [{"ner"}, {"ner"}]
    with pytest.raises(UnknownTaskError, match="has no task 'nope'; its tasks: sentiment, ner"):
        predict_all(model, TEXTS[:1], tasks=["nope"])
    with pytest.raises(InputError, match=r"inputs\[0\]: task 'similarity' takes a text pair"):
        predict_all(model, TEXTS[:1], tasks=["similarity"])
    with pytest.raises(InputError, match=r"inputs\[1\].text: is empty"):
        predict_all(model, ["x", "  "])


def test_one_backbone_pass_per_batch(model, monkeypatch):
    calls = []
    original = type(model).encode

    def counting(self, input_ids, *args, **kwargs):
        calls.append(tuple(input_ids.shape))
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "encode", counting)
    predict_all(model, TEXTS, tasks=["sentiment", "ner"], batch_size=len(TEXTS))
    # one pass, and the classifier and the tagger read the same rows (same tokens): encoded once
    assert len(calls) == 1 and calls[0][0] == len(TEXTS), calls


@pytest.mark.parametrize("arrangement", ["per_task", "shared"])
def test_predict_all_routes_adapters_per_task(tiny_backbone, arrangement):
    from multitune.adapters import AdapterConfig
    from multitune.backbones import load_backbone
    from multitune.config.parse import from_dict
    from multitune.model import MultiTaskModel
    from multitune.tasks import TASKS as REGISTRY

    backbone, tok = load_backbone(tiny_backbone)
    tasks = {}
    for name, kind, labels in (("sentiment", "classification", ["neg", "pos"]),
                               ("ner", "token_classification", ["O", "B-PER", "I-PER"])):
        tasks[name] = REGISTRY.get(kind)(name, from_dict(REGISTRY.get(kind).config_class,
                                                         {"type": kind, "labels": labels}))
        tasks[name].setup([])
    torch.manual_seed(0)
    lora = MultiTaskModel(backbone, tasks, tok, adapters=from_dict(AdapterConfig, {
        "method": "lora", "arrangement": arrangement}, "adapters"))
    with torch.no_grad():  # trained-looking adapters, so that routing to the wrong one would show
        for p in lora.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    got = predict_all(lora, TEXTS)
    for task in tasks:
        assert_same([g[task] for g in got], lora.predict(task, TEXTS))


def test_tasks_health_openapi(client):
    tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
    assert set(tasks) == set(TASKS)
    assert tasks["sentiment"]["labels"] == ["negative", "positive"] and tasks["sentiment"]["input"] == "text"
    assert tasks["similarity"]["input"] == "pair" and tasks["sentiment_text"]["generates"]
    assert tasks["ner"]["labels"][0] == "O"
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/tasks", "/health", "/metrics"} <= set(spec["paths"])


def test_predict_over_http_equals_model_predict(client, model):
    r = client.post("/v1/predict", json={"inputs": TEXTS[:3], "tasks": ["sentiment", "ner", "sentiment_text"]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    for task in ("sentiment", "ner", "sentiment_text"):
        assert_same([p[task] for p in preds], _expected(model, task, TEXTS[:3]))
    assert "text" in preds[0]["sentiment_text"]  # text-to-text generates
    r = client.post("/v1/predict", json={"inputs": PAIRS})  # default tasks: those that take pairs
    assert_same([p["similarity"] for p in r.json()["predictions"]], _expected(model, "similarity", PAIRS))
    r = client.post("/v1/predict", json={"inputs": [TEXTS[1]], "tasks": ["ner"]})
    assert list(r.json()["predictions"][0]) == ["ner"]


def test_concurrent_clients_are_micro_batched(server, model):
    before = json.loads(httpx.get(f"{server.url}/metrics").text)["batches"]
    jobs = [(TEXTS[i % len(TEXTS):][:1 + i % 3], ["sentiment", "ner"] if i % 2 else None) for i in range(48)]

    def call(job):
        inputs, tasks = job
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/v1/predict", json={"inputs": inputs, **({"tasks": tasks} if tasks else {})})
        assert r.status_code == 200, r.text
        return r.json()["predictions"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, jobs))
    cache = {t: dict(zip(TEXTS, _expected(model, t, TEXTS))) for t in ("sentiment", "ner", "sentiment_text")}
    for (inputs, tasks), preds in zip(jobs, answers):
        for x, p in zip(inputs, preds):
            assert set(p) == set(tasks or ("sentiment", "ner", "sentiment_text"))
            for t in p:
                assert_same(p[t], cache[t][x])
    after = httpx.get(f"{server.url}/metrics").json()["batches"]
    batches, requests = after["count"] - before["count"], after["requests"] - before["requests"]
    assert requests == len(jobs) and batches < requests  # requests shared model batches
    assert after["largest"] <= 16


def _is_clean_error(r, status, kind):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"] == kind and "\n" not in body["message"] and "Traceback" not in r.text, body
    return body


def test_limits_and_bad_requests_are_4xx_json(client):
    ok = {"inputs": ["a fine film"]}
    _is_clean_error(client.post("/v1/predict", content=b"x" * 5000, headers={"content-type": "application/json"}),
                    413, "too_large")
    body = _is_clean_error(client.post("/v1/predict", json={"inputs": ["a"] * 9}), 413, "too_large")
    assert "--max-inputs" in body["message"]
    body = _is_clean_error(client.post("/v1/predict", json={"inputs": ["a" * 201]}), 413, "too_large")
    assert body["message"].startswith("inputs[0]: 201 characters")
    body = _is_clean_error(client.post("/v1/predict", json={**ok, "tasks": ["sentiment", "nope"]}), 404,
                           "unknown_task")
    assert body["valid_tasks"] == list(TASKS) and "'nope'" in body["message"]
    body = _is_clean_error(client.post("/v1/predict", json={**ok, "tasks": ["similarity"]}), 422, "invalid_request")
    assert "takes a text pair" in body["message"]
    _is_clean_error(client.post("/v1/predict", json={"inputs": [" "]}), 422, "invalid_request")
    _is_clean_error(client.post("/v1/predict", json={"inputs": []}), 422, "invalid_request")
    _is_clean_error(client.post("/v1/predict", json={**ok, "tasks": []}), 422, "invalid_request")
    _is_clean_error(client.post("/v1/predict", json={**ok, "extra": 1}), 422, "invalid_request")
    _is_clean_error(client.post("/v1/predict", json={"inputs": [{"text_pair": "x"}]}), 422, "invalid_request")
    _is_clean_error(client.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"}),
                    422, "invalid_request")
    _is_clean_error(client.get("/v2/nothing"), 404, "not_found")
    _is_clean_error(client.get("/v1/predict"), 405, "method_not_allowed")


def test_server_error_is_json_without_traceback(run_dir, monkeypatch):
    import multitune.serving.app as app_module

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    app = create_app(load(run_dir))
    monkeypatch.setattr(app_module, "predict_planned", broken)  # after the app's warm-up
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        body = _is_clean_error(c.post("/v1/predict", json={"inputs": ["a film"]}), 500, "internal")
        assert "secret" not in json.dumps(body)
        assert c.get("/health").status_code == 200  # the server lives on
        assert c.get("/metrics").json()["requests"]["POST /v1/predict"] == {"500": 1}


def test_metrics_count_requests_and_latency(client):
    client.get("/v1/tasks")
    client.post("/v1/predict", json={"inputs": ["x"], "tasks": ["nope"]})
    m = client.get("/metrics").json()
    assert m["requests"]["GET /v1/tasks"]["200"] >= 1 and m["requests"]["POST /v1/predict"]["404"] >= 1
    assert {"p50", "p95", "p99", "mean"} <= set(m["latency_ms"]["GET /v1/tasks"])
    text = client.get("/metrics", params={"format": "prometheus"}).text
    assert 'multitune_requests_total{endpoint="GET /v1/tasks",status="200"}' in text
    assert 'multitune_request_latency_ms{endpoint="POST /v1/predict",quantile="0.95"}' in text


def test_openapi_fuzz_has_no_server_errors(server):
    """Schemathesis generates valid and invalid requests for every operation of the spec (bounded)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) == 4
    seen = []
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case):
                response = case.call(base_url=server.url, timeout=30)
                seen.append(response.status_code)
                assert response.status_code < 500, (case.method, case.path, case.body, response.text)
                assert "Traceback" not in response.text

            try:
                fuzz()
            except Unsatisfiable:  # no invalid request exists for an operation without parameters
                assert mode == GenerationMode.NEGATIVE
    counts = collections.Counter(seen)
    assert len(seen) >= 50 and counts[200] and any(400 <= s < 500 for s in counts), counts


def test_cli_serve_runs_and_stops(run_dir):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "multitune.cli", "serve", str(run_dir), "--port", str(port),
                             "--max-batch-size", "4", "--max-inputs", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "multitune serve did not come up"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": ["a", "b", "c"]})
        assert r.status_code == 413 and "at most 2" in r.json()["message"]  # the flags reached the server
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), out
    assert "Traceback" not in out, out


def test_cli_serve_bad_run_dir_is_one_line(tmp_path, capsys):
    from multitune.cli import main

    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("multitune: error:") and "not a multitune model directory" in err and "\n" not in err
    for flag, value, message in (("--max-batch-size", "0", "must be at least 1, got 0"),
                                 ("--port", "0", "expected a port number from 1 to 65535, got '0'"),
                                 ("--port", "65536", "from 1 to 65535"), ("--port", "http", "got 'http'"),
                                 ("--max-wait-ms", "nan", "expected a finite number"),
                                 ("--header-timeout", "-1", "must be greater than 0"),
                                 ("--max-connections", "2.5", "expected an integer, got '2.5'")):
        with pytest.raises(SystemExit) as exit_info:  # argparse, in the CLI's form: one line, status 2
            main(["serve", str(tmp_path), flag, value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"multitune: error: argument {flag}: ") and message in err and "\n" not in err, err
        assert err.endswith("(see multitune serve --help)")
    # checked before the model loads: the run directory does not matter
    assert main(["serve", str(tmp_path), "--max-body-bytes", "2000", "--max-buffered-bytes", "1000"]) == 2
    assert "max_body_bytes: 2000 is more than max_buffered_bytes (1000)" in capsys.readouterr().err


def test_cli_serve_flags_match_server_settings():
    """Every ServerSettings field is a flag of multitune serve, with the field's default."""
    import dataclasses

    from multitune.cli import build_parser

    args = build_parser().parse_args(["serve", "RUN"])
    for f in dataclasses.fields(ServerSettings):
        assert getattr(args, f.name) == f.default, f.name
    assert args.host == "127.0.0.1" and args.port == 8000
