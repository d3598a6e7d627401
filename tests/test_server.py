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
])
def test_bad_requests_get_error_objects_and_server_keeps_serving(client, body, status, field):
    r = client.post("/v1/generate", json=body)
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


def test_stream(client):
    with client.stream("POST", "/v1/generate", json={"prompt": "Name a colour.", "chat": True,
                                                     "max_new_tokens": 8, "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events and "text" in events[-1]
    assert "".join(e for e in events[:-1] if isinstance(e, str)) == events[-1]["text"]
