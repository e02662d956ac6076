"""A client for OpenAI-compatible chat-completions endpoints, built for batch jobs.

Every command that sends many prompts to a text LLM goes through this one module: the data
generator (`python -m llava_jax.datagen`), the LLaVA-Bench judge and its reference answers
(`python -m llava_jax.eval --task=llava_bench`), and any later judge-based benchmark (MM-Vet
scores the same way). Any server that speaks `POST .../v1/chat/completions` works: OpenAI or
another hosted API, `python -m llava_jax.serve`, vLLM, llama.cpp, Ollama.

    ChatClient(endpoint, model, ...)           one endpoint and its retry policy
    client.complete(request) -> Reply          one request, retried; never raises for HTTP
    client.run(requests, on_reply) -> Counters many requests, `concurrency` in flight, a
                                               progress bar, a token / request budget
    add_client_flags(parser, prefix)           the same flags in every command line
    client_from_args(args, prefix)             ... and the client they describe

Retries: HTTP 408, 409, 425, 429 and every 5xx, timeouts, refused or dropped connections and
unreadable 200 bodies are retried `max_retries` times, waiting `initial_delay * 2**k` seconds
(capped at `max_delay`, jittered by up to -50% so that concurrent requests spread out; a
longer `Retry-After` header wins). Any other 4xx fails at once: a bad request stays bad (a
wrong key, an unknown model, a prompt over the context). A request that fails is reported as
a Reply with `error` set and counted; `run` goes on with the others.

Lives in evaluation/ (design.md: "judge client") and is pure Python over httpx: no jax, no
model, so datagen imports it without loading an accelerator stack (tests/test_layout.py lets
datagen/ import this module and nothing else of evaluation/).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import os
import random
import threading
import time
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import httpx
from tqdm import tqdm

log = logging.getLogger(__name__)

# Worth another try: rate limits, "try later" statuses and every server-side error.
RETRY_STATUSES = frozenset({408, 409, 425, 429})


def chat_completions_url(endpoint: str) -> str:
    """The chat-completions URL of `endpoint`: a base URL as the `openai` client takes it
    ("https://api.openai.com/v1", "http://127.0.0.1:8000/v1"), a bare server
    ("http://127.0.0.1:8000": /v1 is added) or the full ".../chat/completions" URL."""
    endpoint = endpoint.strip()
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"endpoint {endpoint!r} is not an http(s) URL; give the API's base "
                         "URL, e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1")
    endpoint = endpoint.rstrip("/")
    if endpoint.endswith("/chat/completions"):
        return endpoint
    if parts.path.strip("/") == "":
        return endpoint + "/v1/chat/completions"
    return endpoint + "/chat/completions"


def api_key_from_env(variable: str | None) -> str | None:
    """The key held by environment variable `variable` (None: no key, for local servers)."""
    if not variable:
        return None
    key = os.environ.get(variable, "").strip()
    if not key:
        raise ValueError(f"the environment variable {variable} (named by --api-key-env) is "
                         "not set or empty; export the API key there, or leave the flag out "
                         "for a server that needs no key.")
    return key


@dataclasses.dataclass
class Request:
    """One chat completion to ask for. `key` is the caller's handle, given back in the Reply;
    `params` adds or overrides body fields (max_tokens, temperature, stop, seed, ...)."""

    key: Any
    messages: list[dict]
    params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Reply:
    """The outcome of a Request: `text` on success, else `error` (the last failure)."""

    key: Any
    text: str | None = None
    finish_reason: str | None = None  # "stop", "length" (cut by max_tokens), ...
    usage: dict | None = None  # the endpoint's token counts, when it reports them
    attempts: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.text is not None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclasses.dataclass
class Counters:
    """What a `run` did. ok + unparsable + failed = requests sent; `retried` counts retry
    attempts (a request that got 429 twice, then 200, adds 2); `not_sent` counts requests
    left when the budget ran out; `tokens` sums the replies' usage.total_tokens (estimated
    at 4 characters a token when the endpoint reports none)."""

    ok: int = 0
    retried: int = 0
    failed: int = 0
    unparsable: int = 0
    not_sent: int = 0
    tokens: int = 0
    stopped_by: str | None = None  # "max_requests" / "token_budget" when a budget stopped it

    def postfix(self) -> dict:
        return {"ok": self.ok, "retried": self.retried, "failed": self.failed,
                "unparsable": self.unparsable}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    pass


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None  # absent, or an HTTP date: use the backoff


def _error_message(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    return f"HTTP {response.status_code}: {message}"


def _estimate_tokens(messages: list[dict], text: str) -> int:
    chars = len(text) + sum(len(m.get("content") or "") if isinstance(m.get("content"), str)
                            else len(json.dumps(m.get("content"))) for m in messages)
    return max(1, chars // 4)


class ChatClient:
    """Requests to one OpenAI-compatible endpoint (thread-safe: one client, many threads).

    Args:
      endpoint: base URL ("http://127.0.0.1:8000/v1") or the chat-completions URL.
      model: the `model` of every request.
      api_key: sent as "Authorization: Bearer KEY"; None sends no header.
      temperature, max_tokens: body defaults (None: leave them to the endpoint).
      concurrency: requests in flight at once in `run`.
      max_retries: retries after the first attempt (0: one attempt only).
      timeout: seconds for connecting and for each read of the response.
      initial_delay, max_delay: the exponential backoff, in seconds.
      max_requests: `run` sends at most this many requests (retries not counted).
      token_budget: `run` sends no new request once its replies have used this many tokens
        (requests in flight finish, so the total can pass it by up to `concurrency` replies).
      transport: an httpx transport (tests).
    """

    def __init__(self, endpoint: str, model: str, *, api_key: str | None = None,
                 temperature: float | None = None, max_tokens: int | None = None,
                 concurrency: int = 8, max_retries: int = 5, timeout: float = 120.0,
                 initial_delay: float = 1.0, max_delay: float = 60.0,
                 max_requests: int | None = None, token_budget: int | None = None,
                 transport: httpx.BaseTransport | None = None):
        if not model:
            raise ValueError("a model name is needed (the `model` field of every request).")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("concurrency must be >= 1, retries >= 0 and the timeout > 0.")
        self.url = chat_completions_url(endpoint)
        self.model = model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.concurrency, self.max_retries = concurrency, max_retries
        self.initial_delay, self.max_delay = initial_delay, max_delay
        self.max_requests, self.token_budget = max_requests, token_budget
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout), transport=transport,
            limits=httpx.Limits(max_connections=concurrency,
                                max_keepalive_connections=concurrency))
        self._sleep = time.sleep
        self._random = random.Random()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # One request

    def body(self, request: Request) -> dict:
        body: dict[str, Any] = {"model": self.model, "messages": request.messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(request.params)
        return body

    def _send(self, body: dict) -> tuple[str, str | None, dict | None]:
        try:
            response = self._http.post(self.url, json=body)
        except httpx.TimeoutException as error:
            raise _Retryable(f"timed out ({type(error).__name__})") from None
        except httpx.TransportError as error:  # refused, reset, dropped without a response
            raise _Retryable(f"connection error ({type(error).__name__}: {error})") from None
        status = response.status_code
        if status in RETRY_STATUSES or status >= 500:
            raise _Retryable(_error_message(response), _retry_after(response))
        if status >= 400:
            raise _Fatal(_error_message(response))
        try:
            data = response.json()
            choice = data["choices"][0]
            content = choice["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Retryable(f"HTTP {status} with an unreadable body: "
                             f"{response.text[:200]!r}") from None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        return content or "", choice.get("finish_reason"), usage

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` + 1 (attempt 0 = after the first try)."""
        wait = min(self.max_delay, self.initial_delay * 2 ** attempt)
        wait *= 1.0 - 0.5 * self._random.random()
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay))
        return wait

    def complete(self, request: Request,
                 on_retry: Callable[[str], None] | None = None) -> Reply:
        """Sends `request`, retrying as the module docstring says; `on_retry(message)` is
        called before each retry. Returns the Reply (error set when it gave up)."""
        body = self.body(request)
        message = ""
        for attempt in range(self.max_retries + 1):
            try:
                text, finish_reason, usage = self._send(body)
            except _Fatal as error:
                return Reply(request.key, attempts=attempt + 1, error=str(error))
            except _Retryable as error:
                message = str(error)
                if attempt == self.max_retries:
                    break
                if on_retry is not None:
                    on_retry(message)
                self._sleep(self.delay(attempt, error.retry_after))
                continue
            if usage is None:
                usage = {"total_tokens": _estimate_tokens(request.messages, text),
                         "estimated": True}
            return Reply(request.key, text=text, finish_reason=finish_reason, usage=usage,
                         attempts=attempt + 1)
        return Reply(request.key, attempts=self.max_retries + 1,
                     error=f"gave up after {self.max_retries + 1} attempts: {message}")

    # ------------------------------------------------------------------------------------------
    # Many requests

    def _budget_left(self, sent: int, tokens: int) -> str | None:
        if self.max_requests is not None and sent >= self.max_requests:
            return "max_requests"
        if self.token_budget is not None and tokens >= self.token_budget:
            return "token_budget"
        return None

    def run(self, requests: Iterable[Request], on_reply: Callable[[Reply], bool], *,
            total: int | None = None, progress: bool = True,
            desc: str = "requests") -> Counters:
        """Sends `requests` with up to `concurrency` in flight and hands every Reply, in
        arrival order and on the calling thread, to `on_reply` (so it may write files without
        locks). `on_reply` returns whether the reply was usable: False counts it unparsable.
        Failed replies (error set) are also handed over and always count as failed.

        Stops sending when the request cap or the token budget is reached; what was not
        sent is counted in `not_sent`. The bar shows ok / retried / failed / unparsable.
        """
        counters = Counters()
        lock = threading.Lock()

        def on_retry(message: str) -> None:
            with lock:
                counters.retried += 1
            log.info("retrying: %s", message)

        bar = tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, disable=not progress)
        pending: set[concurrent.futures.Future] = set()
        pool = concurrent.futures.ThreadPoolExecutor(self.concurrency,
                                                     thread_name_prefix="chat-client")
        iterator = iter(requests)
        sent = 0
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.concurrency:
                    stop = self._budget_left(sent, counters.tokens)
                    if stop is not None:
                        counters.stopped_by = stop
                        exhausted = True
                        counters.not_sent = sum(1 for _ in iterator)
                        break
                    request = next(iterator, None)
                    if request is None:
                        exhausted = True
                        break
                    pending.add(pool.submit(self.complete, request, on_retry))
                    sent += 1
                if not pending:
                    break
                done, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    reply = future.result()
                    if reply.usage:
                        counters.tokens += int(reply.usage.get("total_tokens") or 0)
                    if not reply.ok:
                        counters.failed += 1
                        log.warning("request %r failed: %s", reply.key, reply.error)
                        on_reply(reply)
                    elif on_reply(reply):
                        counters.ok += 1
                    else:
                        counters.unparsable += 1
                    bar.update(1)
                    with lock:
                        bar.set_postfix(counters.postfix(), refresh=False)
        finally:
            pool.shutdown(wait=not pending, cancel_futures=True)
            bar.close()
        if counters.stopped_by:
            log.warning("stopped by --%s: %d requests not sent",
                        counters.stopped_by.replace("_", "-"), counters.not_sent)
        return counters


# ----------------------------------------------------------------------------------------------
# Command lines


def add_client_flags(parser: argparse.ArgumentParser, prefix: str = "", *, what: str = "LLM",
                     temperature: float | None = None, required: bool = False) -> None:
    """Adds --{prefix}endpoint, --{prefix}model, --{prefix}api-key-env and the retry /
    concurrency / budget flags of one endpoint (`what` names it in the help)."""
    group = parser.add_argument_group(f"{what} endpoint" + (f" (--{prefix}*)" if prefix else ""))
    flag = f"--{prefix}"
    group.add_argument(f"{flag}endpoint", required=required, metavar="URL",
                       help=f"OpenAI-compatible base URL of the {what}, e.g. "
                       "http://127.0.0.1:8000/v1 or https://api.openai.com/v1")
    group.add_argument(f"{flag}model", required=required, metavar="NAME",
                       help=f"model name sent to the {what} endpoint")
    group.add_argument(f"{flag}api-key-env", metavar="VAR",
                       help="environment variable holding the API key (none: no key)")
    group.add_argument(f"{flag}concurrency", type=int, default=8, help="requests in flight")
    group.add_argument(f"{flag}retries", type=int, default=5,
                       help="retries of a request on 429 / 5xx / timeouts / dropped connections")
    group.add_argument(f"{flag}timeout", type=float, default=120.0, help="seconds per request")
    group.add_argument(f"{flag}retry-delay", type=float, default=1.0,
                       help="first backoff in seconds (doubles each retry)")
    group.add_argument(f"{flag}max-retry-delay", type=float, default=60.0,
                       help="longest backoff in seconds")
    group.add_argument(f"{flag}temperature", type=float, default=temperature,
                       help="sampling temperature (none: the endpoint's default)")
    group.add_argument(f"{flag}max-tokens", type=int,
                       help="max_tokens of each reply (none: the endpoint's default)")
    group.add_argument(f"{flag}max-requests", type=int,
                       help="send at most this many requests in this run")
    group.add_argument(f"{flag}token-budget", type=int,
                       help="send no more requests once replies have used this many tokens")


def client_from_args(args: argparse.Namespace, prefix: str = "", *,
                     model: str | None = None) -> ChatClient:
    """The ChatClient the flags of `add_client_flags(parser, prefix)` describe (`model`
    stands in for an unset --{prefix}model)."""
    name = prefix.replace("-", "_")

    def get(field: str):
        return getattr(args, name + field)

    return ChatClient(
        get("endpoint"), get("model") or model, api_key=api_key_from_env(get("api_key_env")),
        temperature=get("temperature"), max_tokens=get("max_tokens"),
        concurrency=get("concurrency"), max_retries=get("retries"), timeout=get("timeout"),
        initial_delay=get("retry_delay"), max_delay=get("max_retry_delay"),
        max_requests=get("max_requests"), token_budget=get("token_budget"))
