"""Child processes: the environment that gives a ``lifecycle`` process a test's settings, and running one."""

import os
import shutil
import subprocess
from pathlib import Path

from pydantic import SecretStr

from flows.settings import Settings

PREFIX = "LIFECYCLE_"


def lifecycle_variables(settings: Settings) -> dict[str, str]:
    """``settings`` as ``LIFECYCLE_*`` variables, one for every field that has a value (secrets in clear)."""
    variables = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        variables[f"{PREFIX}{name.upper()}"] = str(value)
    return variables


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """This process's environment with ``settings`` in it, as a child ``lifecycle`` process reads them.

    A field that is None is unset in the child, whatever this process has; ``extra`` is set last.
    """
    unset = {f"{PREFIX}{name.upper()}" for name in type(settings).model_fields if getattr(settings, name) is None}
    env = {key: value for key, value in os.environ.items() if key not in unset}
    env.update(lifecycle_variables(settings))
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.update(extra)
    return env


def lifecycle_bin() -> str:
    found = shutil.which("lifecycle")
    assert found, "the lifecycle console script is installed with the project"
    return found


def lifecycle(*args: str, settings: Settings, cwd: Path | None = None, timeout: float = 300,
              **extra: str) -> subprocess.CompletedProcess[str]:
    """``lifecycle ARGS`` as its own process with ``settings`` (see ``child_env``), to the end; its output as text."""
    return subprocess.run([lifecycle_bin(), *args], cwd=cwd, env=child_env(settings, **extra), check=False,
                          capture_output=True, text=True, timeout=timeout)
