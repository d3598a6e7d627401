"""The OpenAI-compatible endpoints, driven by the official `openai` client."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from paradecode import generate
from paradecode.server import create_app

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def http(default_model):
    return TestClient(create_app(default_model))


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def name(default_model):
    return default_model.info.name


def test_models(client, name):
    assert [m.id for m in client.models.list()] == [name]
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("method", ["plain", "pld", "quantspec"])
def test_chat_greedy_is_the_library_answer(client, default_model, name, method):
    lib = generate(default_model, CHAT, max_new_tokens=20)
    r = client.chat.completions.create(model=name, messages=CHAT, max_tokens=20, temperature=0,
                                       extra_body={"method": method})
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == lib.text
    assert choice.finish_reason == {"eos": "stop", "length": "length"}[lib.finish_reason]
    assert r.usage.prompt_tokens == len(lib.prompt_ids) and r.usage.completion_tokens == len(lib.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ours = r.model_extra["paradecode"]
    assert ours["method"] == method and ours["stats"]["new_tokens"] == len(lib.token_ids)
    assert ours["stats"]["model_calls"] >= 1


def test_content_parts_are_joined_text(client, default_model, name):
    parts = [{"type": "text", "text": "Name three "}, {"type": "text", "text": "colours."}]
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": parts}], max_tokens=8,
                                       temperature=0)
    lib = generate(default_model, [{"role": "user", "content": "Name three colours."}], max_new_tokens=8)
    assert r.choices[0].message.content == lib.text


def test_default_temperature_samples_like_the_library_at_temperature_1(client, default_model, name):
    """OpenAI's default temperature is 1: the same seed gives the library's sampled tokens."""
    lib = generate(default_model, CHAT, max_new_tokens=12, temperature=1.0, seed=7)
    greedy = generate(default_model, CHAT, max_new_tokens=12)
    r = client.chat.completions.create(model=name, messages=CHAT, max_tokens=12, seed=7)
    assert r.choices[0].message.content == lib.text
    assert lib.text != greedy.text        # the seed was chosen so that sampling shows


def test_chat_stream(client, default_model, name):
    lib = generate(default_model, CHAT, max_new_tokens=16)
    chunks = list(client.chat.completions.create(model=name, messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"method": "pld"}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == lib.text
    assert with_choices[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert with_choices[-1].model_extra["paradecode"]["method"] == "pld"
    usage = chunks[-1]
    assert not usage.choices and usage.usage.completion_tokens == len(lib.token_ids)
    assert len({c.id for c in chunks}) == 1


def test_stop_string(client, default_model, name):
    lib = generate(default_model, CHAT, max_new_tokens=40, stop=["\n"])
    r = client.chat.completions.create(model=name, messages=CHAT, max_tokens=40, temperature=0, stop="\n")
    assert r.choices[0].message.content == lib.text and "\n" not in lib.text
    assert r.choices[0].finish_reason == "stop"


def test_completions(client, default_model, name):
    lib = generate(default_model, "The capital of France is", max_new_tokens=16)
    r = client.completions.create(model=name, prompt="The capital of France is", temperature=0)   # 16 by default
    assert r.object == "text_completion" and r.choices[0].text == lib.text
    assert r.usage.completion_tokens == len(lib.token_ids) <= 16
    ids = default_model.tokenizer.encode("The capital of France is")
    by_ids = client.completions.create(model=name, prompt=ids, temperature=0, max_tokens=16)
    assert by_ids.choices[0].text == lib.text
    stream = client.completions.create(model=name, prompt=["The capital of France is"], temperature=0, stream=True)
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert "".join(pieces) == lib.text


@pytest.mark.parametrize("change, param, status", [
    ({"model": "gpt-4"}, "model", 404),
    ({"n": 2}, "n", 400),
    ({"presence_penalty": 0.5}, "presence_penalty", 400),
    ({"frequency_penalty": 0.5}, "frequency_penalty", 400),
    ({"logprobs": True}, "logprobs", 400),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", 400),
    ({"response_format": {"type": "json_object"}}, "response_format", 400),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", 400),
    ({"messages": []}, "messages", 400),
    ({"max_tokens": 0}, "max_tokens", 400),
    ({"max_tokens": 10**6}, "max_tokens", 400),
    ({"max_completion_tokens": 0}, "max_completion_tokens", 400),
    ({"top_p": 2.0}, "top_p", 400),
    ({"temperature": -1.0}, "temperature", 400),
    ({"extra_body": {"method": "nope"}}, "method", 400),
    ({"extra_body": {"method": "pld", "options": {"bogus": 1}}}, "bogus", 400),
    ({"temperature": 0.5, "seed": 2 ** 70}, "seed", 400),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}]},
     "messages", 400),                                                     # nothing in a part is dropped
    ({"stream_options": {"include_usage": True}}, "stream_options", 400),  # without stream
    ({"extra_body": {"method": "draft", "options": {"draft_model": "/etc/passwd"}}}, "draft_model", 400),
])
def test_chat_refusals_are_openai_errors_and_the_server_keeps_serving(client, http, name, change, param, status):
    args = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **change}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == status
    err = e.value.body
    assert err["param"] == param and err["message"] and err["fix"]
    assert err["type"] == "invalid_request_error"
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("change, param", [
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": 2}, "logprobs"),
    ({"prompt": [10**9]}, "prompt"),
    ({"logprobs": 0}, "logprobs"),                  # 0 still asks for the chosen tokens' logprobs
])
def test_completion_refusals(client, name, change, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": name, "prompt": "hi", "max_tokens": 4, **change})
    assert e.value.body["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"prompt": "Hi \ud800", "max_tokens": 2}, "prompt"),                       # an unpaired surrogate
    ({"prompt": "hi", "max_tokens": 2, "temperature": 1e309}, "temperature"),     # Infinity
    ({"prompt": [True, 2], "max_tokens": 2}, "prompt"),                          # JSON types as they are
    ({"prompt": "hi", "max_tokens": 2, "stream": "yes"}, "stream"),
    ({"prompt": "hi", "max_tokens": 2, "stop": 5}, "stop"),                     # not "stop.str"
    ({"prompt": "hi", "model": 5}, "model"),                                    # 400: a type, not a model
    ({"prompt": "hi", "method": "jacobi", "stream": True}, "temperature"),      # sampling by default: refused
])
def test_raw_json_refusals(http, body, param):
    r = http.post("/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_null_max_tokens_is_openai_default_and_huge_bodies_are_413(http):
    r = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": None, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16
    r = http.post("/v1/chat/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                "max_completion_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


def test_what_apps_send_as_defaults_is_taken(http, default_model, name):
    from paradecode import generate

    hi = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    want = generate(default_model, hi, max_new_tokens=4).text
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 4, "temperature": 0, "top_p": None, "n": None, "presence_penalty": None, "store": False,
        "logit_bias": {}, "tool_choice": "none", "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want      # developer is the system role
    ids = default_model.tokenizer.encode("The capital of France is")
    one = http.post("/v1/completions", json={"prompt": [ids], "max_tokens": 3, "temperature": 0})
    assert one.status_code == 200 and one.json()["choices"][0]["text"] == \
        generate(default_model, ids, max_new_tokens=3).text
    for field, value in (("store", True), ("logit_bias", {"50": 5.0}), ("tool_choice", "auto")):
        r = http.post("/v1/chat/completions", json={"messages": hi, "max_tokens": 4, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_our_own_endpoint_keeps_its_error_shape(http):
    r = http.post("/v1/generate", json={"prompt": "hi", "top_p": 2.0})
    assert r.status_code == 400 and set(r.json()["error"]) >= {"type", "message", "field"}
    assert r.json()["error"]["type"] == "invalid_request"


def test_an_api_key_is_required_when_given(default_model, name):
    http = TestClient(create_app(default_model, api_key="s3cret"))
    assert http.get("/health").status_code == 200                          # liveness stays open
    r = http.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 2})
    assert r.status_code == 401 and "no API key" in r.json()["error"]["message"]
    wrong = openai.OpenAI(base_url="http://testserver/v1", api_key="guess", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.body["code"] == "invalid_api_key" and "wrong API key" in e.value.body["message"]
    right = openai.OpenAI(base_url="http://testserver/v1", api_key="s3cret", http_client=http, max_retries=0)
    assert [m.id for m in right.models.list()] == [name]
    r = right.completions.create(model=name, prompt="The capital of France is", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
