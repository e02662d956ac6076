"""The OpenAI-compatible client against a scripted local endpoint (tests/conftest.py FakeLLM):
429 then 200, 500 forever, timeouts, dropped connections, bad requests, unreadable bodies,
budgets, concurrency, keys."""

import threading
import time

import pytest

from llava_jax.evaluation.openai_client import (
    ChatClient,
    Request,
    api_key_from_env,
    chat_completions_url,
)

FAST = {"initial_delay": 0.01, "max_delay": 0.05}


def _ask(n=1, text="hello"):
    return [Request(i, [{"role": "user", "content": f"{text} {i}"}]) for i in range(n)]


def _collect(client, requests, parse=lambda reply: True):
    replies = []

    def on_reply(reply):
        replies.append(reply)
        return reply.ok and parse(reply)

    counters = client.run(requests, on_reply, progress=False)
    return counters, sorted(replies, key=lambda r: r.key)


def test_endpoint_urls():
    assert chat_completions_url("http://127.0.0.1:8000/v1") == \
        "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_completions_url("http://127.0.0.1:8000/") == \
        "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_completions_url("https://api.openai.com/v1/") == \
        "https://api.openai.com/v1/chat/completions"
    full = "https://example.org/openai/deployments/x/chat/completions"
    assert chat_completions_url(full) == full
    with pytest.raises(ValueError, match="not an http"):
        chat_completions_url("127.0.0.1:8000")


def test_api_key_comes_from_the_named_variable(fake_llm, monkeypatch):
    assert api_key_from_env(None) is None
    monkeypatch.delenv("LLAVA_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="LLAVA_TEST_KEY"):
        api_key_from_env("LLAVA_TEST_KEY")
    monkeypatch.setenv("LLAVA_TEST_KEY", "sk-test")
    server = fake_llm(lambda body, call: ("reply", "hi"))
    with ChatClient(server.url, "m", api_key=api_key_from_env("LLAVA_TEST_KEY"),
                    temperature=0.3, max_tokens=7) as client:
        reply = client.complete(_ask()[0])
    assert reply.ok and reply.text == "hi" and reply.usage["total_tokens"] == 15
    body, headers = server.requests[0]
    assert headers["Authorization"] == "Bearer sk-test"
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hello 0"}],
                    "temperature": 0.3, "max_tokens": 7}
    with ChatClient(server.url, "m") as client:  # no key: no header
        client.complete(_ask()[0])
    assert "Authorization" not in server.requests[1][1]


def test_429_then_200_is_retried_honouring_retry_after(fake_llm):
    server = fake_llm(lambda body, call: ("status", 429, {"Retry-After": "3"}) if call < 2
                      else ("reply", "fine"))
    waits = []
    with ChatClient(server.url, "m", max_retries=5, **FAST) as client:
        client._sleep = waits.append
        counters, replies = _collect(client, _ask())
    assert (counters.ok, counters.retried, counters.failed) == (1, 2, 0)
    assert replies[0].text == "fine" and replies[0].attempts == 3
    assert waits == [0.05, 0.05]  # Retry-After (3 s), capped at max_delay


def test_500_forever_gives_up_after_n_and_the_run_finishes(fake_llm):
    server = fake_llm(lambda body, call: ("status", 500) if "bad" in
                      body["messages"][0]["content"] else ("reply", "ok"))
    requests = _ask(3) + _ask(2, text="bad")
    for i, request in enumerate(requests):
        request.key = i
    with ChatClient(server.url, "m", max_retries=3, concurrency=2, **FAST) as client:
        counters, replies = _collect(client, requests)
    assert (counters.ok, counters.failed, counters.retried) == (3, 2, 6)
    failed = [r for r in replies if not r.ok]
    assert [r.key for r in failed] == [3, 4]
    assert all(r.attempts == 4 and "gave up after 4 attempts" in r.error
               and "HTTP 500" in r.error for r in failed)
    bad_calls = [b for b, _ in server.requests if "bad" in b["messages"][0]["content"]]
    assert len(bad_calls) == 8


def test_timeouts_are_retried(fake_llm):
    server = fake_llm(lambda body, call: ("sleep", 1.5, ("reply", "late")) if call == 0
                      else ("reply", "on time"))
    with ChatClient(server.url, "m", timeout=0.3, max_retries=2, **FAST) as client:
        counters, replies = _collect(client, _ask())
    assert (counters.ok, counters.retried) == (1, 1) and replies[0].text == "on time"

    server = fake_llm(lambda body, call: ("sleep", 1.0, ("reply", "late")))
    with ChatClient(server.url, "m", timeout=0.2, max_retries=1, **FAST) as client:
        reply = client.complete(_ask()[0])
    assert not reply.ok and "timed out" in reply.error and reply.attempts == 2


def test_dropped_connections_and_refused_ports_are_retried(fake_llm):
    server = fake_llm(lambda body, call: ("drop",) if call < 2 else ("reply", "back"))
    with ChatClient(server.url, "m", max_retries=3, **FAST) as client:
        counters, replies = _collect(client, _ask())
    assert (counters.ok, counters.retried) == (1, 2) and replies[0].text == "back"

    server.close()  # nothing listens there any more
    with ChatClient(server.url, "m", max_retries=2, **FAST) as client:
        reply = client.complete(_ask()[0])
    assert not reply.ok and "connection error" in reply.error and reply.attempts == 3


def test_client_errors_fail_at_once_and_unreadable_bodies_are_retried(fake_llm):
    server = fake_llm(lambda body, call: ("status", 400))
    with ChatClient(server.url, "m", max_retries=5, **FAST) as client:
        counters, replies = _collect(client, _ask())
    assert (counters.failed, counters.retried) == (1, 0) and len(server.requests) == 1
    assert replies[0].error == "HTTP 400: scripted 400"

    server = fake_llm(lambda body, call: ("garbage",) if call == 0 else ("reply", "ok"))
    with ChatClient(server.url, "m", **FAST) as client:
        counters, _ = _collect(client, _ask())
    assert (counters.ok, counters.retried) == (1, 1)


def test_unparsable_replies_are_counted(fake_llm):
    server = fake_llm(lambda body, call: ("reply", "good" if call % 2 else "junk"))
    with ChatClient(server.url, "m", concurrency=1) as client:
        counters, _ = _collect(client, _ask(4), parse=lambda reply: reply.text == "good")
    assert (counters.ok, counters.unparsable, counters.failed) == (2, 2, 0)
    assert counters.tokens == 4 * 15


def test_request_cap_and_token_budget_stop_the_run(fake_llm):
    server = fake_llm(lambda body, call: ("reply", "x"))
    with ChatClient(server.url, "m", max_requests=2, concurrency=4) as client:
        counters, replies = _collect(client, _ask(5))
    assert (counters.ok, counters.not_sent, counters.stopped_by) == (2, 3, "max_requests")
    with ChatClient(server.url, "m", token_budget=30, concurrency=1) as client:
        counters, _ = _collect(client, _ask(5))
    assert (counters.ok, counters.not_sent, counters.tokens) == (2, 3, 30)
    assert counters.stopped_by == "token_budget"


def test_concurrency_limit_and_backoff_schedule(fake_llm):
    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    def behave(body, call):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.2)
        with lock:
            state["now"] -= 1
        return ("reply", "x")

    server = fake_llm(behave)
    with ChatClient(server.url, "m", concurrency=3) as client:
        counters, _ = _collect(client, _ask(9))
    assert counters.ok == 9 and state["most"] == 3

    client = ChatClient(server.url, "m", initial_delay=1.0, max_delay=10.0)
    for attempt, full in enumerate([1, 2, 4, 8, 10, 10]):
        assert all(full / 2 <= client.delay(attempt) <= full for _ in range(20))
    client.close()
