"""Serving: `python -m llava_jax.serve --checkpoint=DIR`, an OpenAI-compatible HTTP server.

    __main__.py   the command line: load, warm up, run uvicorn
    app.py        FastAPI routes (/v1/chat/completions with SSE streaming, /v1/models,
                  /health, the chat page at /)
    protocol.py   the request checked field by field, messages -> prompt ids + pixels,
                  OpenAI-style errors
    static/       the web chat page (plain HTML + JS, nothing fetched from elsewhere)

Decoding is `llava_jax.inference.engine.Engine` (continuous batching over a fixed-shape KV
cache). Needs the `serve` extra (fastapi, uvicorn). May import models/, data/, checkpoint
and inference/.
"""
