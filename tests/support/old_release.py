"""An earlier release of the project, taken from this repository's history and run in child processes.

``extract`` unpacks a commit's ``flows``, ``models``, ``triggers`` and ``templates`` with
``git archive``; ``OldRelease.python`` runs code against that tree (its ``flows`` and
``models`` shadow the installed ones through ``PYTHONPATH``), so an upgrade test can let
the old code and the new one work over one store.
"""

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support import ROOT

FOLDERS = ("flows", "models", "triggers", "templates")


class Unavailable(Exception):
    """No git, no history, or not this commit: the old release cannot be had here."""


def extract(commit: str, target: Path, repo: Path = ROOT) -> "OldRelease":
    git = shutil.which("git")
    if git is None:
        raise Unavailable("git is not installed")
    if not (repo / ".git").exists():
        raise Unavailable(f"{repo} is not a git checkout (a tarball without history?)")
    found = subprocess.run([git, "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise Unavailable(f"commit {commit} is not in {repo}'s history (a shallow clone?)")
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen([git, "-C", str(repo), "archive", commit, *FOLDERS], stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, capture_output=True)
    assert archive.stdout is not None
    archive.stdout.close()
    if archive.wait() != 0 or untar.returncode != 0:
        raise Unavailable(f"git archive {commit} failed: {untar.stderr.decode(errors='replace')}")
    return OldRelease(commit, target)


def without_pythonpath(**extra: str) -> dict[str, str]:
    """The current environment without PYTHONPATH, plus ``extra``: a child that imports the installed code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


@dataclass(frozen=True)
class OldRelease:
    commit: str
    root: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The current environment with this tree first on the import path (and nothing else added to it)."""
        env = without_pythonpath(PYTHONPATH=str(self.root), PYTHONDONTWRITEBYTECODE="1")
        env.update(extra)
        return env

    def command(self, code: str, *args: str) -> list[str]:
        return [sys.executable, "-c", code, *args]

    def python(self, code: str, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(code, *args), cwd=self.root, env=self.env(**env),
                              capture_output=True, text=True, timeout=timeout)

    def spawn(self, code: str, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(code, *args), cwd=self.root, env=self.env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
