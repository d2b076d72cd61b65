"""A real Prefect server (``prefect server start``) and process worker on loopback, for deployment tests."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from flows.surfaces.outbox import free_port
from tests.support import ROOT


def prefect_bin() -> str:
    found = shutil.which("prefect")
    assert found, "prefect is installed with the project"
    return found


class PrefectServer:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = home / "server.log"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_API_URL=self.api_url,
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO")
        env.update(extra)
        return env

    def start(self, timeout: float = 90) -> "PrefectServer":
        env = self.env()
        del env["PREFECT_API_URL"]
        self.process = subprocess.Popen(
            [prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.5)
        raise TimeoutError(f"Prefect server did not start: {self.log.read_text()[-3000:]}")

    def run(self, *args: str, cwd: Path | None = None, timeout: float = 180,
            **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([prefect_bin(), "--no-prompt", *args], cwd=cwd, env=self.env(**env),
                              capture_output=True, text=True, timeout=timeout)

    def spawn(self, args: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, cwd=cwd, env=self.env(**env), stdout=log.open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    def deploy(self, root: Path, pool: str = "lifecycle", only: str | None = None) -> None:
        """The site in ``root`` (``copy_site``) deployed (``prefect deploy --all``, or
        ``--name only``) to a new process pool."""
        created = self.run("work-pool", "create", pool, "--type", "process")
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = self.run("deploy", *(["--name", only] if only else ["--all"]), cwd=root)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    def worker(self, root: Path, log: Path, pool: str = "lifecycle", *options: str,
               **env: str) -> subprocess.Popen[bytes]:
        """A process worker of ``pool`` in ``root``, polling every second."""
        return self.spawn([prefect_bin(), "worker", "start", "--pool", pool, "--type", "process", *options],
                          cwd=root, log=log, PREFECT_WORKER_QUERY_SECONDS="1", **env)

    def stop(self) -> None:
        if self.process:
            stop(self.process)


def copy_site(root: Path) -> Path:
    """This project's flows, models, triggers, templates and ``prefect.yaml`` in ``root``, as a site deploys them."""
    for folder in ("flows", "models", "triggers", "templates"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", root / "prefect.yaml")
    return root


def stop(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
