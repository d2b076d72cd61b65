"""What an embedding shop may import from ``flows``: pinned, so a change to it is a decision."""

import subprocess
import sys

import flows

PUBLIC = ["Outcome", "Problem", "RunContext", "RunSummary", "Settings", "SpecError", "execute", "load", "prepare",
          "run_trigger"]


def test_the_exported_names_are_exactly_these() -> None:
    assert flows.__all__ == PUBLIC
    assert dir(flows) == PUBLIC


def test_each_exported_name_is_the_object_its_module_defines() -> None:
    from flows import outcomes, run, run_context, settings, summary
    from flows.spec import problems

    homes = {"Outcome": outcomes, "Problem": problems, "RunContext": run_context, "RunSummary": summary,
             "Settings": settings, "SpecError": problems, "execute": run, "load": run_context,
             "prepare": run_context, "run_trigger": run}
    for name in PUBLIC:
        assert getattr(flows, name) is getattr(homes[name], name), name


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        flows.compile_flow  # noqa: B018 -- gone: one flow serves every trigger
    except AttributeError as exc:
        assert "compile_flow" in str(exc)
    else:
        raise AssertionError("flows.compile_flow should not exist")


def test_importing_the_api_imports_no_prefect() -> None:
    code = ("import sys; from flows import run_trigger, Settings, RunSummary; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'typer', 'starlette', 'apscheduler'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
