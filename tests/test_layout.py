"""The layout is the pipeline: the README's tree is the tree, only the surfaces import the
frameworks, and importing a module runs nothing."""

import re
import subprocess
import sys

from tests.support import ROOT

FRAMEWORKS = {"prefect", "typer", "starlette", "fastapi", "apscheduler", "uvicorn"}


def modules(package: str) -> list[str]:
    """Every module of ``package`` (dotted), migrations' versions aside."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if "versions" in parts or "migrations" in parts:  # Alembic runs these scripts itself
            continue
        found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def readme_tree() -> set[str]:
    """The paths the README's Layout section lists, from its indentation."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^## Layout\n.*?^```\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has no Layout section with a tree"
    stack: list[str] = []
    paths = set()
    for line in block.group(1).splitlines():
        name = line.strip().split(" ", 1)[0]
        depth = (len(line) - len(line.lstrip(" "))) // 2
        stack = [*stack[:depth], name.rstrip("/")]
        paths.add("/".join(stack) + ("/" if name.endswith("/") else ""))
    return paths


def test_the_readme_layout_lists_every_module_and_nothing_else() -> None:
    listed = readme_tree()
    for package in ("flows", "models"):
        listed_here = {p for p in listed if p.startswith(f"{package}/") and p.endswith(".py")}
        actual = {str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py")
                  if "versions" not in p.parts and p.name != "__init__.py"}
        if package == "flows":
            actual.add("flows/__init__.py")  # the public names: listed for what it holds
        assert listed_here == actual, (f"{package}: in the README only: {sorted(listed_here - actual)}; "
                                       f"missing from it: {sorted(actual - listed_here)}")
        folders = {p.rstrip("/") for p in listed
                   if p.startswith(f"{package}/") and p.endswith("/") and p != f"{package}/"}
        real = {str(p.parent.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py")
                if "versions" not in p.parts and p.parent != ROOT / package}
        assert folders == real


def imported_by(module: str) -> set[str]:
    """The top-level packages importing ``module`` pulls in, in a fresh interpreter."""
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.split())


def test_only_the_surfaces_import_prefect_typer_starlette_or_apscheduler() -> None:
    core = [m for m in modules("flows") + modules("models") if not m.startswith("flows.surfaces")]
    # One interpreter for the whole core: what one module imports, the others may reuse.
    assert FRAMEWORKS.isdisjoint(imported_by(", ".join(core))), "a core module imports a framework"


def test_importing_any_module_changes_no_environment_logging_or_signal() -> None:
    everything = modules("flows") + modules("models")
    code = f"""
import logging, os, signal, sys, threading
environ, factory = dict(os.environ), logging.getLogRecordFactory()
handlers = {{s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}}
threads = threading.active_count()
import {", ".join(everything)}
assert dict(os.environ) == environ, set(os.environ.items()) ^ set(environ.items())
assert logging.getLogRecordFactory() is factory, "a log record factory was installed at import"
assert {{s: signal.getsignal(s) for s in handlers}} == handlers, "a signal handler was installed at import"
assert threading.active_count() == threads, "a thread was started at import"
print("quiet")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "quiet", result.stderr[-2000:]
