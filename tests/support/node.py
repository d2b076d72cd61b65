"""Segment's Node.js library, installed from the npm registry for the tests that drive it with Node.js.

It is installed once into ``tests/.node_cache/`` (not tracked by git; ``LIFECYCLE_TEST_NODE_CACHE``
moves it), one folder per pinned version, and reused by later runs. Several pytest workers may ask
at once: one installs under a file lock while the others wait, and an install becomes visible only
once complete (a temporary folder renamed into place), so a run interrupted midway leaves nothing
that looks installed.
"""

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGE = "@segment/analytics-node"
VERSION = "3.1.0"  # the current major; it needs Node.js 20 or newer
NODE_MAJOR = 20
CACHE = Path(os.environ.get("LIFECYCLE_TEST_NODE_CACHE") or Path(__file__).resolve().parent.parent / ".node_cache")


def node_bin() -> str:
    """The ``node`` executable, checked to be new enough for ``VERSION``."""
    node = shutil.which("node")
    assert node and shutil.which("npm"), "Node.js and npm are needed for the Node client's tests"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    assert int(version.lstrip("v").split(".")[0]) >= NODE_MAJOR, f"{PACKAGE}@{VERSION} needs Node.js >= {NODE_MAJOR}"
    return node


def _installed(folder: Path) -> bool:
    manifest = folder / "node_modules" / PACKAGE / "package.json"
    try:
        return bool(json.loads(manifest.read_text())["version"] == VERSION)
    except (OSError, ValueError, KeyError):
        return False


def analytics_node() -> Path:
    """The ``node_modules`` folder holding ``PACKAGE@VERSION`` (for ``NODE_PATH``); installed if missing."""
    node_bin()
    folder = CACHE / f"analytics-node-{VERSION}"
    if _installed(folder):
        return folder / "node_modules"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed(folder):  # not installed by another worker meanwhile
            staging = Path(tempfile.mkdtemp(prefix=".install-", dir=CACHE))
            try:
                installed = subprocess.run(
                    ["npm", "install", "--no-audit", "--no-fund", "--save-exact", "--loglevel=error",
                     "--prefix", str(staging), f"{PACKAGE}@{VERSION}"],
                    capture_output=True, text=True, timeout=300, check=False)
                assert installed.returncode == 0, f"npm install {PACKAGE}@{VERSION} failed:\n{installed.stderr}"
                assert _installed(staging), f"npm install left no {PACKAGE}@{VERSION}"
                shutil.rmtree(folder, ignore_errors=True)  # a broken earlier copy, if any
                staging.rename(folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return folder / "node_modules"
