"""Per-mail render time of the shipped templates (subject, HTML and text), with the render budget.

    python bench/render.py                          # this tree
    python bench/render.py --against OLD/render.py  # alternated with another flows/content/render.py, in one process

Every trigger × language × stage × sample customer is rendered 20 times per round; the
rounds alternate old and new five times, since this machine's speed drifts between runs.
"""

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.content import render as current
from flows.content.context import sample_contexts
from flows.run_context import load
from flows.settings import Settings

STAGES = ["prospect", "new", "active", "loyal", "at_risk", "lapsed"]
ROUNDS, REPEATS = 5, 20


def cases(settings: Settings) -> list[tuple[object, dict[str, object]]]:
    project = load(settings)
    catalog = current.TemplateCatalog(settings.templates_dir, settings.default_language)
    found = []
    for trigger in project.triggers.values():
        for lang in ("de", "en"):
            for stage in STAGES:
                for sample in sample_contexts(None, settings.base_url, settings.shop_url):
                    context = {**sample, "stage": stage, "lang": lang}
                    try:
                        catalog.render(trigger.email, context)
                    except current.RenderError:  # a kind's template needs its own sample (a cart, a complaint)
                        continue
                    found.append((trigger.email, context))
    return found


def per_mail(module: ModuleType, settings: Settings, mails: list[tuple[object, dict[str, object]]]) -> float:
    catalog = module.TemplateCatalog(settings.templates_dir, settings.default_language)
    for email, context in mails:  # compiled once, as in a run
        catalog.render(email, context)
    start = time.perf_counter()
    for _ in range(REPEATS):
        for email, context in mails:
            catalog.render(email, context)
    return (time.perf_counter() - start) / (REPEATS * len(mails)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, help="another flows/content/render.py to alternate with")
    args = parser.parse_args()
    settings = Settings(triggers_dir=ROOT / "triggers", templates_dir=ROOT / "templates")
    mails = cases(settings)
    modules = {"this tree": current}
    if args.against:
        spec = importlib.util.spec_from_file_location("render_against", args.against)
        assert spec and spec.loader
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        modules = {"against": other, "this tree": current}
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(ROUNDS):
        for name, module in modules.items():
            times[name].append(per_mail(module, settings, mails))
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.1f} µs a mail "
              f"(rounds {', '.join(f'{v:.1f}' for v in values)}; {len(mails)} mails × {REPEATS} a round)")


if __name__ == "__main__":
    main()
