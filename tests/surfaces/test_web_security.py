"""Security headers on every response of the web app, and no token in any of its log lines."""

import base64
import hashlib
import logging
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from uvicorn.logging import AccessFormatter

from flows.content.links import PREVIEW, click_token, open_token, preferences_url, sign, unsubscribe_url
from flows.redaction import TOKEN_ROUTES, Redacting, redact
from flows.settings import Settings
from flows.surfaces.outbox import free_port
from flows.surfaces.web import create_app
from flows.surfaces.web_reports import REPORTS_CSP
from flows.surfaces.web_security import (
    HSTS,
    PAGE_CSP,
    PREVIEW_CSP,
    carries_token,
    first_segment,
    style_hash,
)
from models.db import dispose_engines
from tests.support.builders import Store
from tests.support.children import child_env
from tests.support.web_server import WebServer
from tests.tracking.test_clicks import tracked_send


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Headers and logs do not depend on the store: SQLite only."""
    dispose_engines()
    return f"sqlite:///{tmp_path / 'store.db'}"


EVERYWHERE = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}


def secret_of(settings: Settings) -> str:
    return settings.secret.get_secret_value()


def genuine_tokens(settings: Settings, store: Store) -> dict[str, str]:
    """A valid token for each token route we can sign one for here, by first path segment."""
    secret = secret_of(settings)
    customer = store.customer("Lena", locale="en-GB")
    preview = sign(secret, PREVIEW, {"t": "winback-lapsed", "s": "lapsed", "l": "de", "x": int(time.time()) + 3600})
    _, digest = tracked_send(store, customer=customer)
    return {
        "u": unsubscribe_url("", secret, customer.external_id, "campaign").rpartition("/")[2],
        "preferences": preferences_url("", secret, customer.external_id).rpartition("/")[2],
        "preview": preview,
        "c": click_token(secret, digest, 0),
        "o": open_token(secret, digest),
    }


def check_headers(response: httpx.Response, https: bool = False) -> None:
    """What every response must carry; the framing policy by route (previews: our own pages only)."""
    where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    headers = response.headers
    for name, value in EVERYWHERE.items():
        assert headers.get(name) == value, f"{where}: {name}"
    assert "permissions-policy" in headers and "camera=()" in headers["permissions-policy"], where
    # The open pixel is shown inside webmail's own pages; everything else is ours alone.
    pixel = first_segment(response.request.url.path) == "o"
    assert headers.get("cross-origin-resource-policy") == ("cross-origin" if pixel else "same-origin"), where
    preview = first_segment(response.request.url.path) == "preview"
    reports = first_segment(response.request.url.path) == "reports"  # its own policy (web_reports)
    assert headers.get("content-security-policy") == (
        PREVIEW_CSP if preview else REPORTS_CSP if reports else PAGE_CSP), where
    assert headers.get("x-frame-options") == ("SAMEORIGIN" if preview else "DENY"), where
    assert "no-store" in headers.get("cache-control", ""), where
    if carries_token(response.request.url.path):
        assert headers["cache-control"] == "no-store", where
    assert headers.get("strict-transport-security") == (HSTS if https else None), where
    assert headers.get("content-type"), where
    assert len(headers.get_list("content-security-policy")) == 1, where


def check_page_styles(response: httpx.Response) -> None:
    """An HTML page of ours runs no script and uses only the inline styles its CSP allows."""
    if not response.headers.get("content-type", "").startswith("text/html"):
        return
    html = response.text
    if first_segment(response.request.url.path) == "preview":  # a mail's HTML, or our page: styles allowed
        assert not re.search(r"<script|\son\w+\s*=|javascript:", html, re.IGNORECASE)
        return
    assert not re.search(r"<(script|style|link|iframe|object|embed)\b", html, re.IGNORECASE), response.request.url
    for style in re.findall(r'\sstyle="([^"]*)"', html):
        assert style_hash(style) in response.headers["content-security-policy"], \
            f"add {style!r} to flows.surfaces.web_security.PAGE_STYLES"


def requests_for(route: APIRoute, tokens: dict[str, str]) -> Iterator[tuple[str, str, dict]]:
    """Each method of ``route``, with a forged token and (where we can sign one) a genuine one,
    and a method the route does not allow."""
    segment = first_segment(route.path)
    values = ["forged-token"] + ([tokens[segment]] if segment in tokens else [])
    for value in values:
        path = re.sub(r"\{[^}]+\}", value, route.path)
        for method in sorted(route.methods):
            if method == "POST" and path.startswith("/webhooks/"):
                yield method, path, {"json": {}}
            elif method == "POST":
                yield method, path, {"data": {"List-Unsubscribe": "One-Click", "category": "campaign",
                                              "confirm": "1"}}
            else:
                yield method, path, {}
        yield "PUT", path, {}


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    app = create_app(settings)

    def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/test-only/broken", broken)  # added after create_app, as a later route would be
    return app


@pytest.fixture
def web(app: FastAPI) -> Iterator[WebServer]:
    server = WebServer(app).start()
    yield server
    server.stop()


def test_every_route_and_every_error_carries_the_security_headers(settings: Settings, store: Store, app: FastAPI,
                                                                  web: WebServer) -> None:
    tokens = genuine_tokens(settings, store)
    statuses: dict[str, set[int]] = {}
    routes = [route for route in app.routes if isinstance(route, APIRoute)]
    assert {"/u/{token}", "/preview/{token}", "/webhooks/ses", "/healthz"} <= {route.path for route in routes}
    expired_preview = sign(secret_of(settings), PREVIEW, {"t": "winback-lapsed", "s": "lapsed", "l": "de", "x": 1})
    # A connection each: uvicorn closes one after a 500, and one whose request body was left unread.
    for route in routes:
        for method, path, body in requests_for(route, tokens):
            response = httpx.request(method, web.url + path, timeout=30, **body)
            check_headers(response)
            check_page_styles(response)
            statuses.setdefault(route.path, set()).add(response.status_code)
    errors = [
        httpx.get(web.url + "/nowhere", timeout=30),  # 404 outside any route
        httpx.get(web.url + "/u/", timeout=30),
        httpx.post(f"{web.url}/u/{tokens['u']}", data={"something": "else"}, timeout=30),  # 400
        httpx.post(web.url + "/webhooks/ses", content=b"{not json", timeout=30),  # 400
        httpx.post(web.url + "/webhooks/ses", content=b" " * 1_000_001, timeout=30),  # 413
        httpx.delete(web.url + "/healthz", timeout=30),  # 405
        httpx.get(web.url + "/test-only/broken", timeout=30),  # 500, sent by Starlette's outermost middleware
        httpx.get(web.url + "/preview/forged-token?x=1", timeout=30),
        httpx.get(f"{web.url}/preview/{expired_preview}", timeout=30),  # 410
    ]
    for response in errors:
        check_headers(response)
        check_page_styles(response)
    assert [r.status_code for r in errors] == [404, 404, 400, 400, 413, 405, 500, 404, 410]
    tracking = [httpx.get(f"{web.url}/c/{tokens['c']}", timeout=30),
                httpx.get(f"{web.url}/o/{tokens['o']}", timeout=30),
                httpx.get(f"{web.url}/c/forged-token", timeout=30),
                httpx.post(f"{web.url}/o/{tokens['o']}", timeout=30)]
    for response in tracking:  # answered before Starlette's routing (flows.surfaces.web_tracking)
        check_headers(response)
        check_page_styles(response)
    assert [r.status_code for r in tracking] == [302, 200, 404, 405]
    assert statuses["/u/{token}"] >= {200, 404, 405} and statuses["/preferences/{token}"] >= {200, 404}
    assert 200 in statuses["/preview/{token}"] and statuses["/webhooks/ses"] >= {403}


def test_a_preview_forbids_scripts_and_framing_by_others_and_every_other_page_all_framing(
        settings: Settings, store: Store, web: WebServer) -> None:
    tokens = genuine_tokens(settings, store)
    preview = httpx.get(f"{web.url}/preview/{tokens['preview']}", timeout=30)
    assert preview.status_code == 200 and "<html" in preview.text.lower()
    policy = dict(part.strip().partition(" ")[::2] for part in preview.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == policy["script-src"] == "'none'"
    assert policy["frame-ancestors"] == "'self'" and policy["form-action"] == "'none'"
    assert policy["sandbox"].split() == ["allow-popups", "allow-popups-to-escape-sandbox"]  # no scripts, no forms
    assert preview.headers["x-frame-options"] == "SAMEORIGIN"
    page = httpx.get(f"{web.url}/u/{tokens['u']}", timeout=30)
    policy = dict(part.strip().partition(" ")[::2] for part in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert "'unsafe-inline'" not in policy["style-src"] and "script-src" not in policy
    assert page.headers["x-frame-options"] == "DENY"


def test_strict_transport_security_only_when_the_base_url_is_https(settings: Settings) -> None:
    for base_url, https in (("https://links.shop.example", True), ("http://127.0.0.1:8025", False)):
        server = WebServer(create_app(settings.model_copy(update={"base_url": base_url}))).start()
        try:
            for path in ("/healthz", "/u/forged-token", "/nowhere"):
                check_headers(httpx.get(server.url + path, timeout=30), https=https)
        finally:
            server.stop()


def test_every_route_with_a_path_parameter_is_redacted_in_logs(app: FastAPI) -> None:
    with_parameters = [route.path for route in app.routes if isinstance(route, APIRoute) and "{" in route.path]
    assert with_parameters
    for path in with_parameters:
        assert first_segment(path) in TOKEN_ROUTES, f"{path}: add its first segment to TOKEN_ROUTES"
        assert redact(re.sub(r"\{[^}]+\}", "SECRET-TOKEN", path)) == f"/{first_segment(path)}/…"


@pytest.mark.parametrize(("text", "clean"), [
    ('127.0.0.1:5 - "GET /u/eyJjIjoiYy0xIn0.abcdefghijklmnopqrstuvwxyz0 HTTP/1.1" 200',
     '127.0.0.1:5 - "GET /u/… HTTP/1.1" 200'),
    ("/preferences/abc.def?utm_source=mail", "/preferences/…?…"),
    ("/confirm/x", "/confirm/…"),
    ("/preview/x/y", "/preview/…/y"),
    ("/c/abc", "/c/…"),
    ("/o/abc.gif", "/o/…"),
    ("/healthz?token=abc", "/healthz?…"),
    ("link https://links.shop.example/u/abc?x=1 then", "link https://links.shop.example/u/…?… then"),
    ("SNS topic 'eyJjIjoiYy0xIn0.abcdefghijklmnopqrstuvwxyz0'", "SNS topic '…'"),
    ("a compressed .eJyrVkpUslIqSS0uUdJRKi1O.abcdefghijklmnopqrstuvwxyz", "a compressed …"),
    ("/healthz", "/healthz"),
    ("Stop marketing emails to k***@example.de? and/or? yes", "Stop marketing emails to k***@example.de? and/or? yes"),
    ("/webhooks/ses", "/webhooks/ses"),
])
def test_redact(text: str, clean: str) -> None:
    assert redact(text) == clean
    assert redact(clean) == clean


def test_a_record_is_redacted_in_its_format_its_arguments_and_its_traceback() -> None:
    token = "eyJjIjoiYy0xIn0.abcdefghijklmnopqrstuvwxyz0"
    try:
        raise ValueError(f"bad link /u/{token}")
    except ValueError:
        exc_info = sys.exc_info()
    records = [
        logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                          ("127.0.0.1:5", "GET", f"/u/{token}?t={token}", "1.1", 200), None),
        logging.LogRecord("flows.surfaces.web", logging.WARNING, __file__, 1, "refused %s", (f"/preview/{token}",),
                          None),
        logging.LogRecord("flows.surfaces.web", logging.WARNING, __file__, 1, "/u/%s", (token,), None),  # put together
        logging.LogRecord("flows.surfaces.web", logging.WARNING, __file__, 1, "%(path)s", ({"path": f"/c/{token}"},),
                          None),
        logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application", (), exc_info),
    ]
    handler_output = []
    formatter = logging.Formatter("%(message)s")
    for record in records:
        assert Redacting().filter(record)
        handler_output.append(formatter.format(record))
    handler_output.append(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s').format(records[0]))
    text = "\n".join(handler_output)
    assert token not in text, text
    assert "/u/…?…" in text and "/preview/…" in text and "/c/…" in text and "bad link /u/…" in text


# -- the real `lifecycle web` process --------------------------------------------------


def lifecycle_web(settings: Settings, port: int, log: Path) -> subprocess.Popen:
    script = Path(sys.executable).with_name("lifecycle")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from flows.surfaces.cli import app; app()"]
    return subprocess.Popen([*command, "web", "--host", "127.0.0.1", "--port", str(port)],
                            env=child_env(settings, PYTHONUNBUFFERED="1"), stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def test_lifecycle_web_never_logs_a_token(settings: Settings, store: Store, tmp_path: Path) -> None:
    marker = f"tokenmarker{uuid.uuid4().hex}"
    tokens = genuine_tokens(settings, store)
    port, log = free_port(), tmp_path / "web.log"
    process = lifecycle_web(settings, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=30) as client:
            answers = [
                client.get(f"/u/{marker}"),
                client.post(f"/u/{marker}", data={"List-Unsubscribe": "One-Click"}),
                client.get(f"/preferences/{marker}?ref={marker}"),
                client.post(f"/preferences/{marker}", data={"all": "1"}),
                client.get(f"/confirm/{marker}"),
                client.post(f"/confirm/{marker}", data={"confirm": "1"}),
                client.get(f"/preview/{marker}"),
                client.get(f"/c/{marker}"),
                client.get(f"/o/{marker}.gif"),
                client.get(f"/healthz?token={marker}"),
                client.put(f"/u/{marker}"),
                client.get(f"/u/{tokens['u']}"),
                client.get(f"/preferences/{tokens['preferences']}"),
                client.get(f"/preview/{tokens['preview']}"),
                client.get(f"/c/{tokens['c']}?token={marker}"),
                client.get(f"/o/{tokens['o']}"),
                client.post(f"/u/{tokens['u']}", data={"List-Unsubscribe": "One-Click"}),
                # Our own log line, with what a caller sent in it: a token path, and a bare token.
                client.post("/webhooks/ses", json={"TopicArn": f"https://evil.example/u/{marker}?q={marker}"}),
                client.post("/webhooks/ses", json={"TopicArn": tokens["preferences"]}),
            ]
        assert [a.status_code for a in answers[-8:]] == [200, 200, 200, 302, 200, 200, 403, 403]
        for answer in answers:
            assert "server" not in answer.headers
            check_headers(answer)
    finally:
        process.terminate()
        process.wait(20)
    output = log.read_text(encoding="utf-8")
    assert marker not in output, output
    for token in tokens.values():
        assert token not in output, output
    for line in ('"GET /u/… HTTP/1.1" 404', '"POST /u/… HTTP/1.1" 404', '"GET /preferences/…?… HTTP/1.1" 404',
                 '"GET /confirm/… HTTP/1.1" 404', '"POST /confirm/… HTTP/1.1" 404', '"GET /preview/… HTTP/1.1" 404',
                 '"GET /c/… HTTP/1.1" 404', '"GET /o/… HTTP/1.1" 404', '"GET /healthz?… HTTP/1.1" 200',
                 '"PUT /u/… HTTP/1.1" 405', '"GET /u/… HTTP/1.1" 200', '"GET /preview/… HTTP/1.1" 200',
                 '"GET /c/…?… HTTP/1.1" 302', '"GET /o/… HTTP/1.1" 200',
                 '"POST /u/… HTTP/1.1" 200', "SNS topic 'https://evil.example/u/…?…'", "SNS topic '…'"):
        assert line in output, f"{line!r} not in\n{output}"


def test_the_page_styles_allowed_are_the_pages_styles() -> None:
    digest = hashlib.sha256(b"font-size:22px").digest()
    assert style_hash("font-size:22px") == f"'sha256-{base64.b64encode(digest).decode()}'"
    assert style_hash("font-size:22px") in PAGE_CSP
