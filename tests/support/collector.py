"""A real ``lifecycle web`` process serving the tracking API, as a shop's analytics libraries meet it.

It listens on a free loopback port with two write keys (one per source), and can be stopped as
an operator stops it, killed with SIGKILL, and started again on the same port, which is what a
client retrying its batch sees when the server crashes and comes back.
"""

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import httpx

from flows.settings import Settings
from flows.surfaces.outbox import free_port
from tests.support.children import child_env, lifecycle_bin

SOURCES = ("backend", "storefront")


class Collector:
    def __init__(self, settings: Settings, folder: Path, port: int | None = None) -> None:
        self.settings, self.folder = settings, folder
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A random key per source and per test: nothing accepts a key it was not given.
        self.keys = {source: secrets.token_urlsafe(24) for source in SOURCES}
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def write_keys(self) -> str:
        return ",".join(f"{source}:{key}" for source, key in self.keys.items())

    @property
    def log(self) -> str:
        """What every start of the server printed so far."""
        return "".join(path.read_text(errors="replace") for path in sorted(self.folder.glob("web-*.log")))

    def start(self, timeout: float = 60) -> "Collector":
        assert self.process is None, "already running"
        self.starts += 1
        output = (self.folder / f"web-{self.starts}.log").open("wb")
        env = child_env(self.settings, LIFECYCLE_WRITE_KEYS=self.write_keys, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        env.pop("PREFECT_API_URL", None)  # complaints are announced to no Prefect server here
        self.process = subprocess.Popen(
            [lifecycle_bin(), "web", "--host", "127.0.0.1", "--port", str(self.port)], cwd=self.folder, env=env,
            stdout=output, stderr=subprocess.STDOUT)
        output.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"lifecycle web exited with {self.process.returncode}:\n{self.log}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"lifecycle web did not answer /healthz within {timeout} s:\n{self.log}")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as an operator or a supervisor stops it: uvicorn drains and the app shuts down."""
        assert self.process is not None
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"lifecycle web did not stop within {timeout} s:\n{self.log}") from None

    def kill(self) -> None:
        """SIGKILL: the process ends at once, mid-request, with nothing flushed or answered."""
        assert self.process is not None
        process, self.process = self.process, None
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def restart(self, timeout: float = 60) -> "Collector":
        """Start again on the same port (after ``kill`` or ``stop``)."""
        return self.start(timeout)

    def close(self) -> None:
        if self.process is not None:
            self.stop()

    def __enter__(self) -> "Collector":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()
