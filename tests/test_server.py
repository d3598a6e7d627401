"""Server: answers, proper error objects for bad requests, keeps serving."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from paradecode.server import create_app


@pytest.fixture(scope="module")
def client(default_model):
    return TestClient(create_app(default_model))


def test_health_and_methods(client):
    assert client.get("/health").json()["status"] == "ok"
    names = {m["name"] for m in client.get("/v1/methods").json()}
    assert "plain" in names


def test_generate(client):
    r = client.post("/v1/generate", json={"prompt": "What is the capital of France?", "chat": True,
                                          "max_new_tokens": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Paris" in body["text"]
    assert body["stats"]["model_calls"] >= 1 and len(body["token_ids"]) == body["stats"]["new_tokens"]


def test_generate_matches_library(client, default_model):
    from paradecode import generate

    r = client.post("/v1/generate", json={"messages": [{"role": "user", "content": "List three fruits."}],
                                          "max_new_tokens": 12})
    lib = generate(default_model, [{"role": "user", "content": "List three fruits."}], max_new_tokens=12)
    assert r.json()["token_ids"] == lib.token_ids


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": "hi", "top_p": 2.0}, 400, "top_p"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ({"prompt": "hi", "method": "nope"}, 400, "method"),
    ({"prompt": "hi", "options": {"bogus": 1}}, 400, "bogus"),
    ({"prompt": "   "}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "hi", "max_new_tokens": "many"}, 422, "max_new_tokens"),
    ({"prompt": "word " * 9000}, 400, "prompt"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "user"}]}, 422, "messages.0.content"),
    # what a JSON client can send that Python callers cannot (audit, session 24)
    ({"prompt": "Hi \ud800"}, 400, "prompt"),                              # an unpaired surrogate
    ({"messages": [{"role": "user", "content": "Hi \udfff"}]}, 400, "messages"),
    ({"prompt": "hi", "stop": ["\ud800"]}, 400, "stop"),
    ({"prompt": "hi", "temperature": 0.5, "seed": 2 ** 70}, 400, "seed"),
    ({"prompt": "hi", "temperature": 0.5, "seed": -1}, 400, "seed"),     # would alias 2**64 - 1
    ({"prompt": "hi", "temperature": float("inf")}, 400, "temperature"),
    ({"prompt": "hi", "method": "selfspec", "options": {"skip_layers": 5}}, 400, "skip_layers"),
    ({"prompt": "hi", "method": "selfspec", "options": {"skip_layers": "1,,2"}}, 400, "skip_layers"),
    ({"prompt": "hi", "method": "draft", "options": {"draft_model": "/etc/passwd"}}, 400,
     "draft_model"),                                                # no files of the client's choosing
    ({"prompt": "hi", "temprature": 0.5}, 422, "temprature"),               # unknown fields are refused
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 422, "messages.0.name"),
    ({"prompt": "hi", "max_new_tokens": True}, 422, "max_new_tokens"),      # JSON types as they are
    ({"prompt": "hi", "max_new_tokens": "2"}, 422, "max_new_tokens"),
    ({"prompt": "hi", "stream": "yes"}, 422, "stream"),
    # the second audit
    ({"prompt": "hi", "method": "jacobi", "options": {"block_size": "2"}}, 400, "block_size"),     # JSON types
    ({"prompt": "hi", "method": "selfspec", "options": {"confidence_threshold": False}}, 400,
     "confidence_threshold"),
    ({"prompt": "hi", "top_k": 5}, 400, "top_k"),                    # greedy would drop it
    ({"prompt": "hi", "seed": 3}, 400, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat": False}, 400, "chat"),
])
def test_bad_requests_get_error_objects_and_server_keeps_serving(client, body, status, field):
    # json.dumps as a client would send it: "\ud800" escaped, Infinity allowed (the test client refuses both)
    r = client.post("/v1/generate", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request" and err["message"]
    assert err.get("field") == field
    assert client.get("/health").status_code == 200  # still serving


def test_a_body_that_is_not_json_gets_an_error_object(client):
    r = client.post("/v1/generate", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["message"] == "the body is not valid JSON (at character 0)" and "field" not in err
    assert client.get("/health").status_code == 200


def test_a_tiny_temperature_samples_the_argmax_instead_of_failing(client):
    greedy = client.post("/v1/generate", json={"prompt": "The capital of France is", "max_new_tokens": 4})
    for t in (1e-40, 1e-300, 5e-324):                # 1e-300 is 0 in float32
        tiny = client.post("/v1/generate", json={"prompt": "The capital of France is", "max_new_tokens": 4,
                                                 "temperature": t, "seed": 1})
        assert tiny.status_code == 200, tiny.text
        assert tiny.json()["token_ids"] == greedy.json()["token_ids"]


@pytest.mark.parametrize("body, field", [
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "word " * 9000}, "prompt"),
    ({"prompt": "hi", "max_new_tokens": 99999}, "max_new_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"prompt": "hi", "method": "jacobi", "temperature": 0.7}, "temperature"),   # refused by the method's decode
    ({"prompt": "hi", "method": "selfspec", "options": {"skip_layers": [1000]}}, "skip_layers"),
])
def test_a_bad_stream_request_is_refused_before_the_stream_starts(client, body, field):
    r = client.post("/v1/generate", json={**body, "stream": True})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
    assert r.json()["error"]["field"] == field


def test_compressed_or_non_utf8_bodies_are_refused_and_health_takes_head(client):
    for headers in ({"content-type": "application/json", "content-encoding": "gzip"},
                    {"content-type": "application/json; charset=iso-8859-1"}):
        r = client.post("/v1/generate", content=b'{"prompt": "hi"}', headers=headers)
        assert r.status_code == 415 and r.json()["error"]["message"], r.text
    assert client.head("/health").status_code == 200


def test_unknown_routes_methods_and_huge_bodies_get_error_objects(client):
    from paradecode.server.app import MAX_BODY

    for r, status in [(client.get("/nope"), 404), (client.delete("/v1/generate"), 405),
                      (client.post("/v1/generate", content=b"x" * (MAX_BODY + 1),
                                   headers={"content-type": "application/json"}), 413),
                      (client.post("/v1/generate", content=iter([b"x" * MAX_BODY, b"x"]),        # chunked
                                   headers={"content-type": "application/json"}), 413)]:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["type"] and err["message"] and "detail" not in r.json()
    assert client.get("/health").status_code == 200


def test_a_server_started_with_a_draft_model_lets_requests_name_it(default_model, tmp_path):
    from paradecode.server import create_app

    path = str(tmp_path / "draft.gguf")               # not loaded: the option is checked first
    app = TestClient(create_app(default_model, draft_models=[path]))
    r = app.post("/v1/generate", json={"prompt": "hi", "method": "draft", "options": {"draft_model": path}})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]    # past the allowlist


def test_stream(client):
    with client.stream("POST", "/v1/generate", json={"prompt": "Name a colour.", "chat": True,
                                                     "max_new_tokens": 8, "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events and "text" in events[-1]
    assert "".join(e for e in events[:-1] if isinstance(e, str)) == events[-1]["text"]


# --- a client that leaves stops its decode ---------------------------------------------------------------

COUNTING = "1, 2, 3, 4, 5,"          # greedy continues counting past 300 tokens (no early EOS)


def test_cancel_ends_a_decode_for_every_method(tiny):
    """``cancel`` is asked after every model call; the decode ends there, for every method."""
    from paradecode import generate
    from paradecode.methods import all_methods

    for name in all_methods():
        options = {"draft_model": tiny} if name == "draft" else None    # the target drafting for itself
        calls = []
        out = generate(tiny, [5, 6, 7, 5, 6], name, options, max_new_tokens=40, ignore_eos=True,
                       cancel=lambda: calls.append(1) or len(calls) > 3)
        assert out.finish_reason == "cancelled", name
        assert len(out.token_ids) < 40 and len(calls) == 4, name


@pytest.fixture()
def live_server(default_model, monkeypatch, request):
    """The app on a real socket (uvicorn in a thread), with every decode's result recorded; parametrized
    indirectly, its parameter is the server's API key."""
    import socket
    import threading
    import time

    import uvicorn

    import paradecode.api as api

    results = []
    real = api.generate

    def recording(*a, **kw):
        out = real(*a, **kw)
        results.append(out)
        return out

    monkeypatch.setattr(api, "generate", recording)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(default_model, api_key=getattr(request, "param", None))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", results
    server.should_exit = True
    thread.join(timeout=30)


def _wait_for(results, n, timeout=120.0):
    import time

    t0 = time.monotonic()
    while len(results) < n and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    assert len(results) >= n, "the decode did not end"


@pytest.mark.parametrize("path, body", [
    ("/v1/generate", {"prompt": COUNTING, "max_new_tokens": 300, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count from 1 to 500."}],
                              "max_tokens": 300, "temperature": 0, "stream": True}),
])
def test_a_stream_whose_client_leaves_stops_decoding(live_server, path, body):
    import httpx

    url, results = live_server
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: "))
    _wait_for(results, 1)
    assert results[0].finish_reason == "cancelled" and len(results[0].token_ids) < 300
    after = httpx.post(url + "/v1/generate", json={"prompt": "Hi", "max_new_tokens": 3}, timeout=60)
    assert after.status_code == 200 and after.json()["stats"]["new_tokens"] == 3     # still serving


@pytest.mark.parametrize("path, body", [
    ("/v1/generate", {"prompt": COUNTING, "max_new_tokens": 300}),
    ("/v1/completions", {"prompt": COUNTING, "max_tokens": 300, "temperature": 0}),
])
def test_a_request_whose_client_leaves_stops_decoding(live_server, path, body):
    import httpx

    url, results = live_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + path, json=body, timeout=httpx.Timeout(60, read=1.0))
    _wait_for(results, 1)
    assert results[0].finish_reason == "cancelled" and len(results[0].token_ids) < 300


@pytest.mark.parametrize("live_server", ["s3cret"], indirect=True)
def test_a_client_that_leaves_stops_its_decode_behind_an_api_key_too(live_server):
    """The key is checked in plain ASGI: an ``@app.middleware`` hid the disconnect, so the decode ran on."""
    import httpx

    url, results = live_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/generate", json={"prompt": COUNTING, "max_new_tokens": 300},
                   headers={"authorization": "Bearer s3cret"}, timeout=httpx.Timeout(60, read=1.0))
    _wait_for(results, 1)
    assert results[0].finish_reason == "cancelled" and len(results[0].token_ids) < 300


def test_a_stream_whose_client_leaves_while_queued_is_never_decoded(live_server):
    """The stream waits for its decode's first piece before answering; a client that leaves meanwhile (its
    request queued behind another) cancels it, so the decode never runs."""
    import threading
    import time

    import httpx

    url, results = live_server
    first = threading.Thread(target=lambda: httpx.post(url + "/v1/generate", timeout=60,
                                                       json={"prompt": COUNTING, "max_new_tokens": 60}))
    first.start()
    time.sleep(0.3)                                            # the first request holds the lock
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", url + "/v1/generate", json={"prompt": COUNTING, "max_new_tokens": 120,
                                                              "stream": True}, timeout=httpx.Timeout(60, read=0.3)):
            pass
    first.join()
    time.sleep(1.0)
    assert [r.finish_reason for r in results] == ["length"]   # the first alone
