"""Lifecycle: trigger files compiled into Prefect flows that send lifecycle email exactly once.

The packages read as the pipeline: ``spec`` and ``kinds`` (trigger files) → ``audience``
(who is due) → ``content`` (personalised templates) → ``message`` (MIME, DKIM) → ``send``
(SMTP, the exactly-once ledger) → ``feedback`` (bounces, complaints); ``run`` wires them
over one ``RunContext``, and ``surfaces`` holds what people and schedulers touch (the CLI,
the web, serve, the Prefect flows and deployments, the demo).

What a shop embedding Lifecycle may import from here (pinned by tests/test_public_api.py)::

    from flows import Settings, run_trigger
    summary = run_trigger("abandoned-cart", settings=Settings())
    print(summary.headline())

Everything else is internal and may move between releases.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.outcomes import Outcome
    from flows.run import execute, run_trigger
    from flows.run_context import RunContext, load, prepare
    from flows.settings import Settings
    from flows.spec.problems import Problem, SpecError
    from flows.summary import RunSummary

# Imported on first use: ``lifecycle --help`` and the sender processes import only what they need.
_HOMES = {"Outcome": "flows.outcomes", "execute": "flows.run", "run_trigger": "flows.run",
          "RunContext": "flows.run_context", "load": "flows.run_context", "prepare": "flows.run_context",
          "Settings": "flows.settings", "Problem": "flows.spec.problems", "SpecError": "flows.spec.problems",
          "RunSummary": "flows.summary"}
__all__ = ["Outcome", "Problem", "RunContext", "RunSummary", "Settings", "SpecError", "execute", "load", "prepare",
           "run_trigger"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'flows' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return __all__
