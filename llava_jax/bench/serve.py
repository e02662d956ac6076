"""Serving throughput: N concurrent clients against `python -m llava_jax.serve` on localhost.

`python -m llava_jax.bench serve [--clients=1,4,16] [--requests=32] [--max-tokens=64]
 [--width=512] [--layers=4] [--max-batch=16] [--json=PATH]`

A small random LLaVA (LLaMA `width` x `layers`, the demo tokenizer; CLIP 256 wide x 4 layers at
112 px, 64 image tokens) is saved to a temporary folder and served by a real server process.
The workload is `requests` chat completions of different lengths (a third with an image),
greedy, `ignore_eos` so each answer is exactly `max_tokens` tokens. Phases, in one run:

  sequential   the requests one after another (non-streamed POSTs)
  clients=C    C clients take requests from the same list concurrently, streaming (SSE)

Per phase: total completion tokens / wall time, and percentiles of time to first token
(TTFT: request sent -> first content chunk), per-token latency (TPOT: (last chunk - first
chunk) / (tokens - 1) per request) and request latency. Every phase runs once untimed first
(compilation of the prefill shapes it uses), then timed. The goal (issue 17): 16 clients get
>= 4x the tokens/s of sequential requests.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from llava_jax.bench import common


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m llava_jax.bench serve")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def _checkpoint(folder: str, args) -> str:
    from llava_jax.checkpoint import save_model
    from llava_jax.data import demo
    from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig
    from llava_jax.models.llava import create_model

    tokenizer = demo.load_tokenizer()
    config = LlavaConfig(
        vision=VisionConfig(**common.small_clip()),
        text=TextConfig(vocab_size=len(tokenizer), hidden_size=args.width,
                        intermediate_size=args.width * 11008 // 4096, num_layers=args.layers,
                        num_heads=max(1, args.width // 64), num_kv_heads=max(1, args.width // 64),
                        max_position_embeddings=1024),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id)
    return str(save_model(create_model(config, seed=0), os.path.join(folder, "bench-model"),
                          tokenizer=tokenizer))


def _workload(count: int, max_tokens: int) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buffer, "PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    bodies = []
    for index in range(count):
        text = " ".join([f"Request {index}: describe"] + ["this"] * int(rng.integers(0, 40)))
        content = text if index % 3 else [{"type": "image_url", "image_url": {"url": image}},
                                          {"type": "text", "text": text}]
        bodies.append({"messages": [{"role": "user", "content": content}], "temperature": 0,
                       "max_tokens": max_tokens, "ignore_eos": True})
    return bodies


def _one(client, body: dict, stream: bool) -> dict:
    """Sends one request; times of its chunks."""
    start = time.perf_counter()
    if not stream:
        response = client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        end = time.perf_counter()
        return {"tokens": response.json()["usage"]["completion_tokens"], "latency": end - start}
    body = dict(body, stream=True, stream_options={"include_usage": True})
    first = last = None
    tokens = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    end = time.perf_counter()
    result = {"tokens": tokens, "latency": end - start}
    if first is not None:
        result["ttft"] = first - start
        if tokens > 1:
            result["tpot"] = (last - first) / (tokens - 1)
    return result


def _phase(url: str, bodies: list[dict], clients: int, stream: bool) -> dict:
    import httpx

    work: queue.Queue = queue.Queue()
    for body in bodies:
        work.put(body)
    results, lock = [], threading.Lock()

    def client_loop():
        with httpx.Client(base_url=url, timeout=600) as client:
            while True:
                try:
                    body = work.get_nowait()
                except queue.Empty:
                    return
                result = _one(client, body, stream)
                with lock:
                    results.append(result)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)

    def percentiles(name):
        values = sorted(r[name] for r in results if name in r)
        if not values:
            return None
        pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
        return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}

    return {"clients": clients, "stream": stream, "requests": len(results), "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_s": percentiles("ttft"),
            "tpot_s": percentiles("tpot"), "latency_s": percentiles("latency")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(checkpoint: str, args) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    command = [sys.executable, "-m", "llava_jax.serve", f"--checkpoint={checkpoint}",
               f"--port={port}", f"--max-batch={args.max_batch}", "--max-queue=1024",
               f"--max-tokens={args.max_tokens}", "--log-level=warning"]
    process = subprocess.Popen(command, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not start within 600 s")


def _ms(stats) -> str:
    if not stats:
        return "        -"
    return f"{stats['p50'] * 1e3:6.1f}/{stats['p90'] * 1e3:.1f}/{stats['p99'] * 1e3:.1f}"


def main(argv=None) -> None:
    args = _parse(argv)
    clients = [int(c) for c in args.clients.split(",") if c]
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = _checkpoint(folder, args)
        bodies = _workload(args.requests, args.max_tokens)
        process, url = _start_server(checkpoint, args)
        try:
            phases = [("sequential", 1, False)] + [(f"clients={c}", c, True) for c in clients]
            results = {}
            for name, count, stream in phases:
                _phase(url, bodies, count, stream)  # untimed: compiles this phase's shapes
                results[name] = _phase(url, bodies, count, stream)
        finally:
            process.terminate()
            process.wait(timeout=60)
    print(f"model: LLaMA {args.width} x {args.layers} layers, demo tokenizer; {args.requests} "
          f"requests x {args.max_tokens} tokens, max batch {args.max_batch}")
    print(f"{'phase':<12} {'tokens/s':>9} {'wall s':>7}  {'TTFT ms p50/p90/p99':>22}  "
          f"{'per-token ms p50/p90/p99':>24}  {'request ms p50/p90/p99':>24}")
    base = results["sequential"]["tokens_per_s"]
    for name, result in results.items():
        print(f"{name:<12} {result['tokens_per_s']:9.1f} {result['wall_s']:7.2f}  "
              f"{_ms(result['ttft_s']):>22}  {_ms(result['tpot_s']):>24}  "
              f"{_ms(result['latency_s']):>24}   x{result['tokens_per_s'] / base:.2f}")
    common.write_json(args.json, {"args": vars(args), "phases": results,
                                  "machine": common.machine_line()})
