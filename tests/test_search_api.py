"""The search server on a real uvicorn on localhost: good requests, bad ones (each a 4xx JSON error, the server
keeps serving), path traversal in every parameter, and the page driven in headless Chromium."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from PIL import Image

from codebridge.search.api import create_app
from codebridge.search.index import build_index
from codebridge.search.searcher import Searcher
from helpers import free_port
from search_fixtures import caption, make_collection, make_model
from test_report import CHROMIUM, DevTools

N = 12
LIMIT = 20_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve")
    csv = make_collection(root / "data", N)
    (root / "secret.txt").write_text("not for the web")
    model = make_model(root / "model", bridge="codebook")
    index = build_index(model, str(csv), root / "index", "image", batch_size=8, progress=False)
    port = free_port()
    config = uvicorn.Config(create_app(Searcher(index), LIMIT), host="127.0.0.1", port=port, log_level="error")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port, csv
    uv.should_exit = True
    thread.join(10)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, content type, body) of one request; the path is sent exactly as given (no normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, response.getheader("content-type", ""), data


def call(port: int, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
    body = None if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    status, kind, data = request(port, method, path, body, {"Content-Type": "application/json"})
    assert kind.startswith("application/json"), (path, kind, data[:200])
    return status, json.loads(data)


def multipart(fields: dict[str, str], file: bytes, filename: str = "q.png") -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + file
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload(port: int, file: bytes, **fields: str) -> tuple[int, Any]:
    body, headers = multipart(fields, file)
    status, _, data = request(port, "POST", "/search/upload", body, headers)
    return status, json.loads(data)


# ------------------------------------------------------------------------------------------------ good
def test_health_info_and_text_search(server):
    port, _ = server
    assert call(port, "GET", "/health") == (200, {"status": "ok", "items": N})
    status, info = call(port, "GET", "/info")
    assert status == 200 and info["modality"] == "image" and info["modes"] == ["dense", "sparse", "hybrid"]
    status, body = call(port, "POST", "/search", {"text": caption(3), "k": 5, "mode": "hybrid", "explain": True})
    assert status == 200 and len(body["hits"]) == 5 and all("matched" in h for h in body["hits"])
    status, body = call(port, "GET", "/search?q=item%203&k=2")
    assert status == 200 and [h["rank"] for h in body["hits"]] == [1, 2]


def test_upload_and_similar_find_the_item_itself(server):
    port, csv = server
    status, body = upload(port, (csv.parent / "4.png").read_bytes(), k="3")
    assert status == 200 and body["hits"][0]["id"] == 4
    status, body = call(port, "POST", "/search", {"id": 7, "k": 2})
    assert status == 200 and body["hits"][0]["id"] == 7


def test_item_and_thumbnail(server):
    port, _ = server
    status, item = call(port, "GET", "/items/2")
    assert status == 200 and item["caption"] == caption(2)
    status, kind, data = request(port, "GET", "/items/2/thumbnail")
    assert status == 200 and kind == "image/png" and Image.open(io.BytesIO(data)).size == (24, 24)
    assert call(port, "GET", "/items/2/audio")[0] == 404


# ------------------------------------------------------------------------------------------------ bad
def test_oversized_upload_is_413(server):
    port, _ = server
    status, body = upload(port, b"\0" * (LIMIT + 1))
    assert status == 413 and "limit" in body["error"]


def test_not_an_image_is_415(server):
    port, _ = server
    status, body = upload(port, b"this is plain text, not a picture")
    assert status == 415 and "not an image format" in body["error"]


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "message"),
    [
        ("GET", "/items/999", None, 404, "unknown item id 999"),
        ("POST", "/search", {"id": 999}, 404, "unknown item id"),
        ("POST", "/search", b"{not json", 400, "not valid JSON"),
        ("POST", "/search", [1, 2], 400, "exactly one of"),
        ("POST", "/search", {"text": ""}, 400, "non-empty"),
        ("POST", "/search", {"text": "x", "k": 0}, 400, "k must be"),
        ("POST", "/search", {"text": "x", "mode": "magic"}, 400, "mode must be"),
        ("GET", "/search?q=x&k=lots", None, 400, "k must be"),
        ("GET", "/nowhere", None, 404, "Not Found"),
    ],
)
def test_bad_requests_get_clear_4xx(server, method, path, payload, status, message):
    port, _ = server
    got, body = call(port, method, path, payload)
    assert got == status and message in body["error"], body
    assert call(port, "GET", "/health")[0] == 200  # still serving


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("GET", "/items/../secret.txt", None),
        ("GET", "/items/..%2F..%2Fsecret.txt/thumbnail", None),
        ("GET", "/items/%2e%2e%2fsecret.txt/audio", None),
        ("GET", "/items/1/../../secret.txt", None),
        ("GET", "/search?q=x&k=../../secret.txt", None),
        ("GET", "/search?q=x&mode=../../secret.txt", None),
        ("POST", "/search", {"id": "../secret.txt"}),
        ("POST", "/search", {"id": "/etc/passwd"}),
        ("POST", "/search", {"text": "x", "k": "../../etc/passwd"}),
    ],
)
def test_path_traversal_is_refused_everywhere(server, method, path, payload):
    port, csv = server
    body = None if payload is None else json.dumps(payload).encode()
    status, _, data = request(port, method, path, body, {"Content-Type": "application/json"})
    assert 400 <= status < 500 and b"not for the web" not in data
    assert (csv.parent.parent / "secret.txt").read_text() == "not for the web"
    upload_status, upload_body = upload(port, (csv.parent / "1.png").read_bytes(), modality="../../secret.txt")
    assert upload_status == 400 and "modality must be" in upload_body["error"]


# ------------------------------------------------------------------------------------------------ browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_page_searches_in_headless_chromium(server, tmp_path):
    port, _ = server
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,1000", "--remote-debugging-pipe", "about:blank",
    ]  # fmt: skip
    browser = DevTools(command, tmp_path / "chromium.log")
    try:
        target = next(t for t in browser.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        session = browser.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": f"http://127.0.0.1:{port}/"}, session=session)
        browser.wait(lambda m: m.get("method") == "Page.loadEventFired")

        def evaluate(expression: str) -> Any:
            reply = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
            return reply["result"].get("value")

        wait_for(lambda: evaluate("document.getElementById('mode').options.length") == 3)
        evaluate("document.getElementById('query').focus()")
        browser.send("Input.insertText", {"text": caption(5)}, session=session)
        evaluate("document.getElementById('explain').checked = true; document.getElementById('mode').value = 'hybrid'")
        evaluate("document.querySelector('#text-form button').click()")
        loaded = "Array.from(document.querySelectorAll('#results img'), i => i.complete && i.naturalWidth > 0)"
        wait_for(lambda: (images := evaluate(loaded)) and len(images) == N and all(images))
        assert "12 results" in evaluate("document.getElementById('status').textContent")
        assert evaluate("document.querySelectorAll('#results .codes li').length") > 0
        evaluate("document.getElementById('query').value = ''; document.querySelector('#text-form button').click()")
        assert "type a few words" in evaluate("document.getElementById('status').textContent")
    finally:
        browser.close()
    errors = browser.page_errors()
    assert errors == [], errors


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the page did not get there")
        time.sleep(0.1)


def test_page_is_self_contained():
    page = (Path(__file__).parents[1] / "src/codebridge/search/static/search.html").read_text()
    assert "http://" not in page and "https://" not in page and "innerHTML" not in page
