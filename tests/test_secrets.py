"""No secret setting reaches anything an operator or a Prefect UI user can read.

Each secret is a unique marker; after failing and succeeding runs, the test reads
everything that was written: Prefect's database file (logs, flow- and task-run states,
parameters, artifacts, events), the same records through Prefect's API, the log records
this process made, and the CLI's output.
"""

import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import make_url

from flows.run_context import load
from flows.settings import Settings
from flows.surfaces.environment import settings_from_environment
from flows.surfaces.prefect_flows import trigger_flow
from tests.conftest import WORKER, ensure_database, postgres_url
from tests.support.builders import NOW, Store, ago
from tests.support.children import child_env, lifecycle_bin

pytestmark = pytest.mark.usefixtures("prefect")


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: the PostgreSQL cases below bring their own URL, with a password."""
    from models.db import dispose_engines

    dispose_engines()
    yield f"sqlite:///{tmp_path / 'store.db'}"


def marker(prefix: str = "pw") -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class Records(logging.Handler):
    """Every log record this process makes, formatted as a handler would write it (traceback included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("", "prefect", "lifecycle", "flows")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def prefect_database() -> bytes:
    """The bytes of the Prefect server's SQLite files: every row it wrote, in whatever table."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url.get_secret_value()
    path = Path(url.split(":///", 1)[1])
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-journal")]
    return b"".join(file.read_bytes() for file in files if file.exists())


def prefect_records(flow_run_id: object, expect: str) -> str:
    """The flow run, its states, task runs, logs and artifacts as the API returns them, as
    JSON text; waits until the logs hold ``expect`` (the logs are written in the background)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    run_id = str(flow_run_id)
    deadline = time.monotonic() + 20
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            text = "\n".join(log.message for log in logs)
            if expect in text or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert expect in text, f"the run's logs never showed {expect!r}: {text[-2000:]}"
        run = client.read_flow_run(flow_run_id)
        states = client.read_flow_run_states(run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        # The client's read_artifacts sends nulls this server version rejects; ask the API directly.
        artifacts = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 50, "offset": 0, "sort": "ID_DESC"}).json()
    parts = [run.model_dump_json(), *(s.model_dump_json() for s in states), *(t.model_dump_json() for t in tasks),
             *(log.model_dump_json() for log in logs), json.dumps(artifacts)]
    return "\n".join(parts)


def run_trigger(trigger: str = "complaint-ack"):
    """A real Prefect run of the trigger flow; returns its final state."""
    settings_from_environment.cache_clear()
    settings = settings_from_environment()
    assert load(settings).trigger(trigger)
    return trigger_flow(trigger=trigger, now=NOW.isoformat(), return_state=True)


def assert_nowhere(secret: str, state, records: Records, expect: str) -> str:
    """``secret`` is in none of the places a run writes; returns what was read (for more checks)."""
    seen = prefect_records(state.state_details.flow_run_id, expect)
    assert secret not in (state.message or "")
    assert secret not in seen
    assert secret.encode() not in prefect_database()
    assert secret not in records.text
    return seen


def test_a_malformed_smtp_url_s_password_reaches_no_prefect_record(settings: Settings, store: Store,
                                                                   records: Records,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The defect as reported: ``smtp+starttls://`` is not a scheme we know, and the error
    quoted the whole URL into stderr, Prefect's log table and the run's state message."""
    store.complaint(store.customer("Uwe"), ago(hours=1))
    password = marker()
    monkeypatch.setenv("LIFECYCLE_SMTP_URL", f"smtp+starttls://user:{password}@host:2525")
    state = run_trigger()
    assert state.is_failed()
    assert "LIFECYCLE_SMTP_URL" in state.message  # the error itself reached Prefect
    seen = assert_nowhere(password, state, records, expect="LIFECYCLE_SMTP_URL")
    assert "smtp+starttls://***@host:2525" in seen  # still says which URL is wrong


# -- the SMTP URL --------------------------------------------------------------------------


def chain(exc: BaseException) -> str:
    """The exception as a traceback prints it, every chained cause and context included."""
    import traceback

    return "".join(traceback.format_exception(exc)) + repr(exc)


SMTP_URLS = [
    "smtp+starttls://user:{pw}@host:2525",  # a scheme we do not know (the report)
    "user:{pw}@host:2525",  # no scheme at all
    "smtp://user:ab#{pw}@host:2525",  # unencoded: the parser reads "ab" as the port
    "smtp://user:ab/{pw}@host",
    "smtp://user:ab?{pw}@host",
    "smtp://user:12#{pw}@host:25",  # a port it can read: the password's head would be the port
    "smtp://user:{pw}@host:notaport",
    "smtp://user:{pw}@host:25?connections=many",
    "smtp://user:{pw}@host:25?tls=sometimes",
    "smtp://user:%40%3A{pw}%2F@host:port",  # percent-encoded, and still malformed
]


@pytest.mark.parametrize("template", SMTP_URLS)
def test_no_smtp_url_error_shows_its_password(template: str) -> None:
    from flows.send.smtp import SmtpConfig

    password = marker()
    with pytest.raises(ValueError, match="LIFECYCLE_SMTP_URL") as failure:
        SmtpConfig.from_url(template.format(pw=password))
    shown = chain(failure.value)
    assert password not in shown and "***" in shown
    assert password[:6] not in shown.replace("LIFECYCLE", "")  # no prefix of it either


def test_a_parsed_smtp_config_does_not_print_its_password() -> None:
    from flows.send.smtp import SmtpConfig

    password = marker()
    config = SmtpConfig.from_url(f"smtp://user:%40{password}@127.0.0.1:2525")
    assert config.password == f"@{password}"
    assert password not in repr(config) and password not in str(config)


def smtp_with_login(password: str):
    from tests.support.smtp_server import SmtpServer

    return SmtpServer(credentials=("shop", password)).start()


@pytest.mark.parametrize("case", ["unencoded", "login refused", "unreachable"])
def test_smtp_urls_that_fail_a_real_run_show_no_password(case: str, settings: Settings, store: Store,
                                                         records: Records, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.surfaces.outbox import free_port

    store.complaint(store.customer("Uwe"), ago(hours=1))
    password = marker()
    server = smtp_with_login("the-right-one")
    try:
        url, expect = {
            "unencoded": (f"smtp://shop:ab#{password}@127.0.0.1:{server.port}", "percent-encode"),
            "login refused": (f"smtp://shop:%2F{password}@127.0.0.1:{server.port}?timeout=5", "refused our login"),
            "unreachable": (f"smtp://shop:{password}@127.0.0.1:{free_port()}?timeout=1", "unreachable"),
        }[case]
        monkeypatch.setenv("LIFECYCLE_SMTP_URL", url)
        monkeypatch.setenv("LIFECYCLE_SMTP_ATTEMPTS", "1")
        state = run_trigger()
    finally:
        server.stop()
    assert state.is_failed() and expect in state.message
    assert_nowhere(password, state, records, expect=expect)


# -- every secret at once ------------------------------------------------------------------

# A database of its own (the URLs carry passwords; trust authentication ignores them): test_f,
# or under pytest-xdist one per worker, <base>_f_<worker> (tests/conftest.py).
SECRETS_DATABASE = make_url(postgres_url("_f")).database if WORKER else "test_f"
POSTGRES = "postgresql://postgres:{pw}@127.0.0.1:{port}/" + SECRETS_DATABASE


def dkim_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def key_markers(pem: str) -> list[str]:
    """Pieces of the key's body, any of which in a record would be the key leaking."""
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    return [body[1], body[len(body) // 2], body[-2]]


class Secrets:
    """A marker for every setting that holds a secret, set in the environment."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, smtp_port: int) -> None:
        self.smtp = marker("smtp")
        self.smtp_password = f"@:/ {self.smtp}"  # needs percent-encoding
        self.database = marker("db")
        self.secret = marker("secret")
        self.postmark = marker("postmark")
        self.pem = dkim_key()
        self.database_url = POSTGRES.format(pw=self.database, port=5432)
        env = {
            "LIFECYCLE_SMTP_URL": f"smtp://shop:%40%3A%2F%20{self.smtp}@127.0.0.1:{smtp_port}?timeout=5",
            "LIFECYCLE_DATABASE_URL": self.database_url,
            "LIFECYCLE_SECRET": self.secret,
            "LIFECYCLE_DKIM_SELECTOR": "mail2026",
            "LIFECYCLE_DKIM_PRIVATE_KEY": self.pem,
            "LIFECYCLE_POSTMARK_WEBHOOK_USER": "postmark",
            "LIFECYCLE_POSTMARK_WEBHOOK_PASSWORD": self.postmark,
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        self.env = env

    @property
    def all(self) -> list[str]:
        return [self.smtp, self.database, self.secret, self.postmark, *key_markers(self.pem)]

    def assert_absent(self, text: str) -> None:
        for secret in self.all:
            assert secret not in text
            assert secret[-12:] not in text  # nor the end of it (pydantic shortens what it quotes)


@pytest.fixture
def postgres_store() -> Iterator[None]:
    """SECRETS_DATABASE, emptied (trust authentication: any password connects)."""
    from sqlalchemy import text
    from sqlmodel import SQLModel

    import models  # noqa: F401
    from models.db import dispose_engines, make_engine

    dispose_engines()
    ensure_database(POSTGRES.format(pw="any", port=5432))  # a clean machine has only `test`
    engine = make_engine(POSTGRES.format(pw="any", port=5432))
    SQLModel.metadata.drop_all(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
    yield
    dispose_engines()


def cli(*args: str) -> str:
    """``lifecycle ARGS`` in this process: its stdout, its stderr and any traceback it ended with."""
    from typer.testing import CliRunner

    from flows.surfaces.cli import app

    settings_from_environment.cache_clear()
    result = CliRunner().invoke(app, list(args))
    return result.output + (chain(result.exception) if result.exception and not isinstance(
        result.exception, SystemExit) else "")


def assert_absent_everywhere(secrets: list[str], state, records: Records, expect: str) -> str:
    seen = prefect_records(state.state_details.flow_run_id, expect)
    database = prefect_database()
    for secret in secrets:
        for piece in (secret, secret[-12:]):  # the end of it too: pydantic shortens what it quotes
            assert piece not in (state.message or "")
            assert piece not in seen
            assert piece.encode() not in database
            assert piece not in records.text
    return seen


def test_a_run_with_every_secret_set_shows_none_of_them(settings: Settings, records: Records, postgres_store: None,
                                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from models.db import create_schema, get_engine

    server = smtp_with_login("")
    try:
        secrets = Secrets(monkeypatch, server.port)
        server.credentials = ("shop", secrets.smtp_password)
        create_schema(get_engine(secrets.database_url))
        Store(get_engine(secrets.database_url)).complaint(Store(get_engine(secrets.database_url)).customer("Ida"),
                                                         ago(hours=1))
        state = run_trigger()
        assert state.is_completed(), state.message
        # Every secret was used:
        assert len(server.received) == 1 and server.logins and all(ok for _, ok in server.logins)
        assert b"DKIM-Signature" in server.received[0].data
        seen = assert_absent_everywhere(secrets.all, state, records, expect="Finished in state Completed")
        assert "complaint-ack-summary" in seen  # the artifacts were read

        store = Store(get_engine(secrets.database_url))
        store.complaint(store.customer("Jo"), ago(hours=1))
        output = "\n".join([cli("run", "complaint-ack", "--now", NOW.isoformat()), cli("validate"),
                            cli("run", "complaint-ack", "--dry-run", "--now", NOW.isoformat()),
                            cli("deployments", "--check", "--file", str(tmp_path / "prefect.yaml"))])
    finally:
        server.stop()
    assert "sent" in output and "All good" in output and "deployments --write" in output
    assert len(server.received) == 2
    secrets.assert_absent(output + records.text)
    secrets.assert_absent(prefect_database().decode("latin-1"))
    assert secrets.smtp_password not in output + records.text


def test_the_signing_secret_kept_in_the_store_is_shown_nowhere(settings: Settings, store: Store, records: Records,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import text

    monkeypatch.delenv("LIFECYCLE_SECRET")
    store.complaint(store.customer("Ida"), ago(hours=1))
    state = run_trigger()
    assert state.is_completed(), state.message
    with store.engine.connect() as connection:
        secret = connection.execute(text("SELECT value FROM store_meta WHERE key = 'signing_secret'")).scalar_one()
    assert len(secret) > 40
    assert_absent_everywhere([secret], state, records, expect="Finished in state Completed")
    store.complaint(store.customer("Jo"), ago(hours=1))
    output = cli("run", "complaint-ack", "--now", NOW.isoformat()) + cli("validate")
    assert "sent" in output and secret not in output + records.text


# -- failures: the database URL, the settings, the DKIM key ---------------------------------


@pytest.mark.parametrize("case", ["unparsable", "unencoded @", "refused"])
def test_database_urls_that_fail_show_no_password(case: str, settings: Settings, records: Records,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.surfaces.outbox import free_port

    password = marker()
    url, expect = {
        "unparsable": (POSTGRES.format(pw=password, port="notaport"), "LIFECYCLE_DATABASE_URL"),
        "unencoded @": (POSTGRES.format(pw=f"ab@{password}", port=5432), "percent-encode"),
        "refused": (POSTGRES.format(pw=password, port=free_port()), "Connection refused"),
    }[case]
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", url)
    state = run_trigger() if case == "refused" else None
    if case != "refused":  # settings that cannot load fail the run as it starts: settings_from_environment in the flow
        settings_from_environment.cache_clear()
        from flows.surfaces.prefect_flows import trigger_flow

        state = trigger_flow(trigger="complaint-ack", now=NOW.isoformat(), return_state=True)
    assert state.is_failed() and expect in state.message
    seen = assert_nowhere(password, state, records, expect=expect)
    assert "postgresql://***@" in seen or case == "refused"
    output = cli("run", "complaint-ack") + cli("validate") + cli("deployments", "--check")
    assert expect in output and password not in output + records.text


@pytest.mark.parametrize("bad", [{"LIFECYCLE_BATCH_SIZE": "0"}, {"LIFECYCLE_SENDER": "nobody"},
                                 {"LIFECYCLE_ENVIRONMENT": "staging"}, {"LIFECYCLE_SECRET": "{short}"}],
                         ids=["batch size", "sender", "environment", "short secret"])
def test_a_settings_error_echoes_no_secret(bad: dict[str, str], settings: Settings, records: Records,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic quotes the input of a failed validation (``input_value=``), and the input of a
    model-wide check is the whole environment."""
    from pydantic import ValidationError

    from flows.surfaces.prefect_flows import trigger_flow

    secrets = Secrets(monkeypatch, 25)
    short = marker("s")[:15]  # too short, and still a secret: the check's input is the whole environment
    secrets.secret = short if "{short}" in bad.values() else secrets.secret
    for name, value in bad.items():
        monkeypatch.setenv(name, value.format(short=short))
    with pytest.raises(ValidationError) as failure:
        Settings()
    secrets.assert_absent(chain(failure.value))
    settings_from_environment.cache_clear()
    state = trigger_flow(trigger="complaint-ack", now=NOW.isoformat(), return_state=True)
    assert state.is_failed() and "validation error for Settings" in state.message
    assert_absent_everywhere(secrets.all, state, records, expect="validation error for Settings")
    output = cli("validate") + cli("run", "complaint-ack") + cli("deployments", "--check")
    assert "Configuration error" in output
    secrets.assert_absent(output + records.text)


def test_settings_and_what_holds_them_print_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.send.smtp import SmtpConfig

    secrets = Secrets(monkeypatch, 25)
    loaded = Settings()
    shown = repr(loaded) + str(loaded) + repr(SmtpConfig.from_url(loaded.smtp_url))
    secrets.assert_absent(shown)
    assert f"//***@127.0.0.1:5432/{SECRETS_DATABASE}" in shown and "//***@127.0.0.1:25" in shown


def test_a_dkim_key_that_cannot_sign_is_not_shown(settings: Settings, store: Store, records: Records,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pem = dkim_key()
    lines = pem.splitlines()
    broken = "\n".join([lines[0], *lines[1:-1][::-1][1:], lines[-1]])  # a PEM whose body is not a key
    monkeypatch.setenv("LIFECYCLE_DKIM_SELECTOR", "mail2026")
    monkeypatch.setenv("LIFECYCLE_DKIM_PRIVATE_KEY", broken)
    store.complaint(store.customer("Ida"), ago(hours=1))
    state = run_trigger()
    seen = prefect_records(state.state_details.flow_run_id, expect="Finished in state")
    for piece in key_markers(broken):
        assert piece not in seen and piece.encode() not in prefect_database() and piece not in records.text
        assert piece not in (state.message or "")


def test_a_url_in_a_library_s_log_record_is_redacted(records: Records) -> None:
    """The last line of defence (``flows.redaction.redact_every_record``, installed with the flows):
    a message we did not write."""
    password = marker()
    url = f"postgresql://postgres:{password}@127.0.0.1:5432/test_f?password={password}"
    logging.getLogger("some.library").warning("connecting to %s", url)
    logging.getLogger("some.library").warning(f"connecting to {url}")
    try:
        raise RuntimeError(f"cannot reach {url}")
    except RuntimeError:
        logging.getLogger("some.library").exception("failed")
    assert records.text.count("//***@127.0.0.1:5432/test_f?…") == 3  # the query elided whole
    assert password not in records.text


# -- the long-running commands' start-up -----------------------------------------------------


def start_up_output(args: list[str], ready: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> str:
    """``lifecycle ARGS`` as its own process, until it prints ``ready``; then stopped. Its output."""
    import os
    import signal
    import subprocess

    log = cwd / f"{args[0]}.log"
    process = subprocess.Popen([lifecycle_bin(), *args], cwd=cwd, env=env, stdout=log.open("wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while ready not in log.read_text(errors="replace") and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    output = log.read_text(errors="replace")
    assert ready in output, output[-3000:]
    return output


def test_serve_and_web_start_up_show_no_secret(settings: Settings, postgres_store: None, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.surfaces.outbox import free_port
    from models.db import create_schema, get_engine

    server = smtp_with_login("")
    try:
        secrets = Secrets(monkeypatch, server.port)
        server.credentials = ("shop", secrets.smtp_password)
        create_schema(get_engine(secrets.database_url))
        marked = Settings()  # the environment, every secret a marker
        env = child_env(marked)
        serve = start_up_output(["serve", "--workers", "1"], "Next run of", env, tmp_path)
        port = free_port()
        web = start_up_output(["web", "--port", str(port)], "Uvicorn running", env, tmp_path)
        # Both again with a store that refuses: what they say as they fail.
        refused = child_env(marked, LIFECYCLE_DATABASE_URL=POSTGRES.format(pw=secrets.database, port=free_port()))
        failing = (start_up_output(["serve"], "Connection refused", refused, tmp_path)
                   + start_up_output(["web", "--port", str(port)], "Uvicorn running", refused, tmp_path))
    finally:
        server.stop()
    secrets.assert_absent(serve + web + failing)
    assert secrets.smtp_password not in serve + web + failing
