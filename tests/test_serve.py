"""python -m llava_jax.serve through its real HTTP interface: one server process (a tiny random
checkpoint with the demo tokenizer) on a free localhost port for the whole module; the official
`openai` client, plain httpx, and the web page in headless Chromium (skipped, with the reason,
when no Chromium is installed). Answers are compared with `generate`'s greedy tokens."""

import base64
import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import serve_process

# Every test here talks to one server: with `pytest -n N --dist loadgroup` (.ci/run) they stay
# on one worker, so the module starts one server.
pytestmark = pytest.mark.xdist_group("serve")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TOKENS = 16
CONTEXT = 256
QUESTION = "What color is the shape?"
STOP = ["</s>"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: str

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()


@pytest.fixture(scope="module")
def checkpoint(tiny_demo_checkpoint):
    return tiny_demo_checkpoint


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, shape in (("scene.png", (48, 64, 3)), ("other.png", (40, 40, 3))):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def server(checkpoint, image_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("log") / "server.log")
    args = ["--max-batch=16", "--max-queue=16", "--prefill-batch=4", f"--context={CONTEXT}",
            "--max-tokens=200", "--max-images=2", f"--allow-local-images={image_dir}",
            "--log-level=warning",
            "--warmup=none"]  # compile on first use: only what the tests use (greedy)
    with serve_process(checkpoint, args, log) as (url, process):
        yield Server(url, process, log)


@pytest.fixture(scope="module")
def pretrained(checkpoint):
    from llava_jax.checkpoint import load_pretrained

    return load_pretrained(checkpoint)


def _data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def _pixels(pretrained, path):
    from llava_jax.data import decode_image, preprocess_image

    config = pretrained.config
    return preprocess_image(decode_image(str(path)), config.vision.image_size,
                            config.image_aspect)


def _expected(pretrained, rows):
    """generate()'s greedy answers for rows of (question, [image paths], history, template):
    one right-padded batch (each row computed as alone; tests/test_generation.py), so the
    module compiles few programs. Returns (answers, prompt lengths)."""
    from llava_jax.data import tokenize_generation_prompt
    from llava_jax.inference.generation import decode_new_tokens, generate

    config, tok = pretrained.config, pretrained.tokenizer
    ids = [tokenize_generation_prompt(question, tok, template, config.num_image_tokens,
                                      config.image_token_index, history=history)
           for question, _, history, template in rows]
    length = max(map(len, ids))
    images = max(1, max(len(paths) for _, paths, _, _ in rows))
    batch = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(batch)
    size = config.vision.image_size
    pixels = np.zeros((len(rows), images, size, size, 3), np.float32)
    image_mask = np.zeros((len(rows), images), bool)
    for row, ((_, paths, _, _), prompt) in enumerate(zip(rows, ids)):
        batch[row, :len(prompt)], mask[row, :len(prompt)] = prompt, 1
        for index, path in enumerate(paths):
            pixels[row, index], image_mask[row, index] = _pixels(pretrained, path), True
    tokens = generate(pretrained.model, batch, pixels, attention_mask=mask, image_mask=image_mask,
                      max_new_tokens=MAX_TOKENS, stop_strings=STOP, tokenizer=tok)
    return [decode_new_tokens(row, tok, stop_strings=STOP) for row in tokens], [len(p) for p in ids]


SYSTEM = "You describe pictures."


def _concurrent_rows(image_dir):
    """16 (text, image paths): 41 to 77 tokens, two prompt buckets, with and without image."""
    images = [image_dir / "scene.png", image_dir / "other.png"]
    return [(" ".join([f"Question {index}:"] + ["describe"] * (index % 6)),
             [images[index % 2]] * (index % 3 == 0)) for index in range(16)]


@pytest.fixture(scope="module")
def expected(pretrained, image_dir):
    """Every answer the tests expect, from two batched generate() calls."""
    from llava_jax.data import get_template

    image = image_dir / "scene.png"
    first = f"<image>\n{QUESTION}"
    rows = [(first, [image], [], "vicuna_v1")] + [
        ("".join("<image>\n" for _ in paths) + text, paths, [], "vicuna_v1")
        for text, paths in _concurrent_rows(image_dir)]
    answers, lengths = _expected(pretrained, rows)
    history = [(first, answers[0])]
    system = dataclasses.replace(get_template("vicuna_v1"), system=SYSTEM)
    second, _ = _expected(pretrained, [("Are you sure?", [image], history, "vicuna_v1"),
                                       ("Are you sure?", [image], history, system)])
    return {"first": answers[0], "first_prompt_tokens": lengths[0], "concurrent": answers[1:],
            "second": second[0], "second_with_system": second[1]}


def _user(text, *paths):
    if not paths:
        return {"role": "user", "content": text}
    parts = [{"type": "image_url", "image_url": {"url": _data_url(p)}} for p in paths]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def _sse(response) -> tuple[str, list[dict]]:
    """(text, chunks) of a streamed answer; checks the framing ends with [DONE]."""
    chunks, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: ") and not done, line
        if line == "data: [DONE]":
            done = True
            continue
        chunks.append(json.loads(line[len("data: "):]))
    assert done
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks


def _ok(server, **extra):
    """A correct request answers (the server kept serving)."""
    with server.client() as client:
        response = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0,
            **extra})
    assert response.status_code == 200, response.text
    return response.json()


# ----------------------------------------------------------------------------------------------


def test_models_health_and_the_page(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list()] == ["tiny"]
    health = server.health()
    assert health["status"] == "ok" and health["max_batch"] == 16 and health["active"] == 0
    page = httpx.get(server.url + "/").text
    assert "<title>llava_jax chat</title>" in page and 'type="file"' in page
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere


def test_openai_client_streamed_and_not_equal_generate(server, expected, image_dir):
    import openai

    image = image_dir / "scene.png"
    expected, prompt_tokens = expected["first"], expected["first_prompt_tokens"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [_user(QUESTION, image)]
    answer = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                            max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.choices[0].finish_reason in ("stop", "length")
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_completion_tokens=MAX_TOKENS,
            stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1
    assert finish == answer.choices[0].finish_reason
    assert usage.completion_tokens == answer.usage.completion_tokens
    assert usage.total_tokens == prompt_tokens + usage.completion_tokens


def test_several_turns_a_system_prompt_and_local_image_paths(server, expected, image_dir):
    image = image_dir / "scene.png"
    reply, expected = expected["first"], expected["second_with_system"]
    history = [{"role": "user", "content": [
        {"type": "text", "text": QUESTION},  # images go first, wherever the part is
        {"type": "image_url", "image_url": {"url": "file://" + str(image)}}]},
        {"role": "assistant", "content": reply}]
    with server.client() as client:
        body = {"model": "tiny", "temperature": 0, "max_tokens": MAX_TOKENS,
                "messages": [{"role": "system", "content": SYSTEM}, *history,
                             {"role": "user", "content": "Are you sure?"}]}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected
        # A path relative to the allowed folder is the same image.
        history[0]["content"][1]["image_url"]["url"] = "scene.png"
        response = client.post("/v1/chat/completions", json=body)
        assert response.json()["choices"][0]["message"]["content"] == expected


def test_16_concurrent_requests_of_different_lengths_each_get_their_own_answer(
        server, expected, image_dir):
    rows, expected = _concurrent_rows(image_dir), expected["concurrent"]
    stats = server.health()["stats"]

    def ask(index):
        time.sleep(0.02 * index)  # arrive while others decode: admitted at different steps
        text, paths = rows[index]
        body = {"messages": [_user(text, *paths)], "temperature": 0, "max_tokens": MAX_TOKENS,
                "stream": index % 2 == 0}
        with server.client() as client:
            if body["stream"]:
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    return _sse(response)[0]
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == expected
    after = server.health()["stats"]
    assert after["completed"] - stats.get("completed", 0) == 16
    assert after["prefills"] - stats.get("prefills", 0) > 1


def _bad_cases(image_dir):
    text_file = base64.b64encode(b"just some text, not an image").decode()
    image = _user(QUESTION, image_dir / "scene.png")["content"][0]
    hi = [{"role": "user", "content": "Hi"}]
    return [
        ("malformed JSON", b'{"messages": [', 400, None),
        ("not an object", [1, 2], 400, None),
        ("no messages", {"model": "tiny"}, 400, "messages"),
        ("empty messages", {"messages": []}, 400, "messages"),
        ("unknown role", {"messages": [{"role": "robot", "content": "Hi"}]}, 400,
         "messages[0].role"),
        ("ends with assistant", {"messages": hi + [{"role": "assistant", "content": "x"}]}, 400,
         "messages"),
        ("unknown part", {"messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400,
         "messages[0].content[0]"),
        ("bad base64", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@notbase64@@"}}]}]},
         400, "invalid_image"),
        ("not an image", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + text_file}}]}]},
         400, "invalid_image"),
        ("remote URL", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
         400, "invalid_image"),
        ("path outside the folder", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "../../../etc/passwd"}}]}]},
         400, "invalid_image"),
        ("too many images", {"messages": [{"role": "user", "content": [image] * 3}]}, 400,
         "too_many_images"),
        ("prompt longer than the context", {"messages": [
            {"role": "user", "content": "describe " * CONTEXT}]}, 400, "context_length_exceeded"),
        ("max_tokens past the context", {"messages": [
            {"role": "user", "content": "describe " * 60}], "max_tokens": 200}, 400,
         "context_length_exceeded"),
        ("max_tokens 0", {"messages": hi, "max_tokens": 0}, 400, "max_tokens"),
        ("max_tokens over --max-tokens", {"messages": hi, "max_completion_tokens": 201}, 400,
         "max_completion_tokens"),
        ("temperature too high", {"messages": hi, "temperature": 2.5}, 400, "temperature"),
        ("temperature not a number", {"messages": hi, "temperature": "hot"}, 400, "temperature"),
        ("top_p 0", {"messages": hi, "top_p": 0}, 400, "top_p"),
        ("top_p over 1", {"messages": hi, "top_p": 1.5}, 400, "top_p"),
        ("n 2", {"messages": hi, "n": 2}, 400, "n"),
        ("stop not text", {"messages": hi, "stop": 5}, 400, "stop"),
        ("stream not a bool", {"messages": hi, "stream": "yes"}, 400, "stream"),
        ("logit_bias", {"messages": hi, "logit_bias": {"1": 5}}, 400, "logit_bias"),
        ("unknown model", {"model": "gpt-9", "messages": hi}, 404, "model_not_found"),
    ]


def test_every_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, image_dir):
    cases = _bad_cases(image_dir)
    with server.client() as client:
        for name, body, status, where in cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = client.post("/v1/chat/completions", content=content,
                                   headers={"Content-Type": "application/json"})
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert error["message"] and error["type"] in (
                "invalid_request_error", "not_found_error"), (name, error)
            if where is not None:
                assert where in (error["param"], error["code"]), (name, error)
            assert _ok(server)["choices"][0]["message"]["role"] == "assistant", name
        for method, path, status in (("GET", "/v1/nothing", 404), ("DELETE", "/v1/models", 405)):
            response = client.request(method, path)
            assert response.status_code == status and response.json()["error"]["message"]


def _wait_idle(server, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = server.health()
        if health["active"] == 0 and health["queued"] == 0:
            return health
        time.sleep(0.05)
    pytest.fail(f"the server is still busy: {server.health()}")


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = _wait_idle(server)["stats"]
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 200, "ignore_eos": True, "stream": True, "temperature": 0}
    with server.client() as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]  # 3 events and their blank lines
            assert server.health()["active"] == 1
    # The connection is closed here, long before 200 tokens.
    assert all(line.startswith("data: {") for line in received if line)
    after = _wait_idle(server, timeout=30)["stats"]
    assert after["cancelled"] == before.get("cancelled", 0) + 1
    assert after.get("completed", 0) == before.get("completed", 0)
    _ok(server)


def test_a_full_queue_answers_503_and_recovers(server):
    _wait_idle(server)
    release = threading.Event()
    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 200,
            "ignore_eos": True, "stream": True, "temperature": 0}
    results = []

    def hold():
        with server.client() as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    results.append((response.status_code, response.json(), response.headers))
                    return
                results.append((200, None, None))
                next(response.iter_lines())
                release.wait(60)  # hold the slot (or the place in the queue), then hang up

    threads = [threading.Thread(target=hold) for _ in range(48)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(results) < 48 and time.monotonic() < deadline:
        time.sleep(0.05)
    release.set()
    for thread in threads:
        thread.join(60)
    rejected = [(body, headers) for status, body, headers in results if status == 503]
    assert len(results) == 48 and rejected, results
    assert len(results) - len(rejected) <= 16 + 16  # slots + queue
    for error, headers in rejected:
        assert error["error"]["type"] == "server_error" and error["error"]["code"] == "queue_full"
        assert "--max-queue" in error["error"]["message"] and headers["retry-after"]
    _wait_idle(server)
    _ok(server)


# ----------------------------------------------------------------------------------------------
# The page, in a real browser


def _browser(tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the serve extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--window-size=1100,720",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_the_page_in_headless_chromium(server, expected, image_dir, tmp_path):
    driver = _browser(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = image_dir / "scene.png"
    reply, second = expected["first"], expected["second"]
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        driver.find_element(By.ID, "image-input").send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#drop img"))
        for field, value in (("temperature", "0"), ("max-tokens", str(MAX_TOKENS))):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        # Count how often the answer's text changes: a streamed answer arrives in pieces.
        driver.execute_script(
            "window.updates = 0; new MutationObserver(() => window.updates++).observe("
            "document.getElementById('messages'), {subtree: true, childList: true, "
            "characterData: true});")
        answers = []
        for question in (QUESTION, "Are you sure?"):
            driver.find_element(By.ID, "question").send_keys(question)
            driver.find_element(By.ID, "send").click()
            done = len(answers) + 1
            wait.until(lambda d: len(d.find_elements(
                By.CSS_SELECTOR, ".message.assistant[data-state=done]")) == done)
            bubble = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
            answers.append(bubble.find_element(By.CLASS_NAME, "text").get_attribute("textContent"))
        assert answers == [reply, second]
        assert driver.execute_script("return window.updates") > 6  # 2 questions, 2 answers, pieces
        assert len(driver.find_elements(By.CSS_SELECTOR, ".message.user img")) == 1
        if os.environ.get("LLAVA_JAX_PAGE_SCREENSHOT"):  # the README's picture
            driver.save_screenshot(os.environ["LLAVA_JAX_PAGE_SCREENSHOT"])
        driver.find_element(By.ID, "new-chat").click()
        assert not driver.find_elements(By.CSS_SELECTOR, ".message")
    finally:
        driver.quit()
