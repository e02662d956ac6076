"""Shared fixtures: tiny configs, random models, transformers reference models."""

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = REPO_ROOT.parent / "shared" / "assets" / "llama2-tokenizer" / "tokenizer.json"


def pytest_configure(config):
    # grain worker processes read absl flags; tests never parse argv.
    from absl import flags

    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def llama_tokenizer_path():
    if not SHARED_TOKENIZER.exists():
        pytest.skip(f"{SHARED_TOKENIZER} not present (../shared is absent)")
    return SHARED_TOKENIZER


@pytest.fixture(scope="session")
def tiny_demo_checkpoint(tmp_path_factory) -> str:
    """A saved random tiny LLaVA with the demo tokenizer (what chat and serve tests load)."""
    from llava_jax.checkpoint import save_model
    from llava_jax.data import demo
    from llava_jax.models.config import get_preset
    from llava_jax.models.llava import create_model

    tok = demo.load_tokenizer()
    config = get_preset("tiny", text={"vocab_size": len(tok)},
                        image_token_index=tok.convert_tokens_to_ids("<image>"),
                        pad_token_id=tok.pad_token_id)
    return str(save_model(create_model(config, seed=1), tmp_path_factory.mktemp("c") / "tiny",
                          tokenizer=tok))


def torch_module_state(tensors: dict, prefix_map: dict[str, str]) -> dict:
    """Canonical names -> names of a specific torch module, as torch tensors."""
    from llava_jax.convert.reference import torch_state

    return torch_state(tensors, prefix_map)


def hf_llava_from_model(model):
    """A transformers LlavaForConditionalGeneration (float32, eval) holding `model`'s weights."""
    from llava_jax.convert.reference import transformers_llava

    return transformers_llava(model)


def hf_onevision_processor(**kwargs):
    """transformers' LlavaOnevisionProcessor without a video processor: its video processor
    needs torchvision, which is not installed, and images never touch it."""
    from transformers import LlavaOnevisionProcessor

    class ImagesOnly(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImagesOnly(video_processor=None, **kwargs)


class FakeLLM:
    """A scripted OpenAI-compatible chat-completions endpoint on 127.0.0.1 (http.server in a
    thread). `behave(body, call)` (call counts from 0 over the whole server) returns what to
    do with one request:

        ("reply", text[, finish_reason])   200 with a chat.completion (usage included)
        ("status", code[, headers])        that HTTP status with an OpenAI error body
        ("sleep", seconds, action)         wait, then do `action` (a timeout when long enough)
        ("drop",)                          close the connection without answering
        ("garbage",)                       200 with a body that is not a completion

    `requests` holds (body, headers) of every request received, in arrival order.
    """

    def __init__(self, behave):
        import http.server
        import json
        import threading
        import time

        self.behave, self.requests, self.lock = behave, [], threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    call = len(fake.requests)
                    fake.requests.append((body, dict(self.headers)))
                action = fake.behave(body, call)
                while action[0] == "sleep":
                    time.sleep(action[1])
                    action = action[2]
                if action[0] == "drop":
                    self.close_connection = True
                    return
                if action[0] == "reply":
                    text, reason = action[1], (action[2] if len(action) > 2 else "stop")
                    payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": reason,
                                            "message": {"role": "assistant", "content": text}}],
                               "usage": {"prompt_tokens": 10, "completion_tokens": 5,
                                         "total_tokens": 15}}
                    status, headers = 200, {}
                elif action[0] == "status":
                    payload = {"error": {"message": f"scripted {action[1]}", "type": "x"}}
                    status, headers = action[1], (action[2] if len(action) > 2 else {})
                else:
                    payload, status, headers = {"unexpected": True}, 200, {}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for key, value in {"Content-Type": "application/json",
                                       "Content-Length": str(len(data)), **headers}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_llm():
    """fake_llm(behave) -> a running FakeLLM, shut down after the test."""
    servers = []

    def start(behave):
        servers.append(FakeLLM(behave))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_process(checkpoint: str, args: list[str], log: str):
    """`python -m llava_jax.serve` on a free loopback port, up once /health answers.

    Yields (url, process); the server is terminated (killed after 20 s) on exit.
    """
    import subprocess
    import time

    import httpx

    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "llava_jax.serve", f"--checkpoint={checkpoint}",
               f"--port={port}", *args]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{open(log).read()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not come up:\n{open(log).read()}")
            time.sleep(0.25)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
