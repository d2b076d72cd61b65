"""Loading the whole project: stage rules, every trigger file, every template.

Everything is checked and every problem collected, so ``lifecycle validate`` can show
them all at once and a run can go ahead with the healthy triggers.
"""

import difflib
import re
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from flows.content.context import sample_contexts
from flows.content.render import TemplateCatalog
from flows.kinds import KINDS
from flows.kinds.base import Kind
from flows.spec.common import EmailSpec
from flows.spec.journey import journey_problems
from flows.spec.policy import Policy
from flows.spec.problems import Path_, Problem, SpecError, format_path
from flows.spec.stages import StageRules
from flows.spec.trigger import TriggerBase
from flows.spec.yaml_source import (
    MAX_YAML_BYTES,
    YamlDocument,
    YamlSyntaxError,
    load_yaml,
    read_source,
)

M = TypeVar("M", bound=BaseModel)
STAGES_FILE = "stages.yaml"
POLICY_FILE = "policy.yaml"
NOT_TRIGGERS = {STAGES_FILE, POLICY_FILE}


@dataclass
class Project:
    triggers_dir: Path
    catalog: TemplateCatalog
    stages: StageRules | None
    policy: Policy = field(default_factory=Policy)
    triggers: dict[str, TriggerBase] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # shown by validate; the trigger still loads
    rejected: dict[str, list[Problem]] = field(default_factory=dict)  # trigger name → why it is not loaded
    unread: set[str] = field(default_factory=set)  # triggers a partial load (``only``) left out, by declared name

    def kind(self, trigger: TriggerBase) -> Kind:
        return KINDS[trigger.kind]

    def trigger(self, name: str) -> TriggerBase:
        """The named trigger, or a SpecError with that trigger's problems."""
        if name in self.triggers:
            return self.triggers[name]
        if name in self.rejected:
            raise SpecError(self.rejected[name])
        names = sorted(set(self.triggers) | self.unread)
        known = ", ".join(names) or "none"
        hint = difflib.get_close_matches(name, names, n=1)
        suffix = f"; did you mean {hint[0]!r}?" if hint else ""
        raise SpecError([Problem(self.triggers_dir, None, "", f"no trigger named {name!r}{suffix} (valid: {known})")])


def load_project(triggers_dir: Path, templates_dir: Path, default_language: str = "en",
                 base_url: str = "http://localhost", shop_url: str = "https://shop.example",
                 only: Collection[str] | None = None) -> Project:
    """The project, every problem collected. ``only``: the triggers a run runs; the other
    trigger files are not read past the name they declare, and only these triggers'
    templates are test-rendered (the stage rules and the policy are always checked)."""
    catalog = TemplateCatalog(templates_dir, default_language)
    project = Project(triggers_dir, catalog, stages=None)
    if not triggers_dir.is_dir():
        project.problems.append(Problem(triggers_dir, None, "", "triggers folder not found"))
        return project
    if not templates_dir.is_dir():
        project.problems.append(Problem(templates_dir, None, "", "templates folder not found"))

    project.stages = _load_model(triggers_dir / STAGES_FILE, StageRules, project.problems)
    policy_file = triggers_dir / POLICY_FILE
    if policy_file.is_file():  # optional: without it no caps, no quiet hours
        project.policy = _load_model(policy_file, Policy, project.problems) or Policy()
    stage_names = project.stages.names if project.stages else None

    for path in sorted(triggers_dir.glob("*.y*ml")):
        if path.name in NOT_TRIGGERS:
            continue
        if only is not None and (declared := _declared_name(path)) not in only:
            project.unread.add(declared)
            continue
        before = len(project.problems)
        try:  # each file its own error boundary: whatever one file does, the others are checked
            spec = _load_trigger(path, stage_names, catalog, project.problems, project.warnings)
            if spec is not None:
                if spec.name in project.files:
                    used_by = project.files[spec.name]
                    project.problems.append(
                        Problem(path, None, "name", f"trigger name {spec.name!r} is already used by {used_by}"))
                else:
                    project.problems.extend(_check_templates(spec, project, base_url, shop_url, path))
                    if len(project.problems) == before:
                        project.triggers[spec.name] = spec
                        project.files[spec.name] = path
        except Exception as exc:  # noqa: BLE001 -- a defect a check missed still names its file
            del project.problems[before:]
            project.problems.append(_unchecked(path, exc))
        if len(project.problems) > before:
            project.rejected[_declared_name(path)] = project.problems[before:]
    if templates_dir.is_dir() and only is None:  # a run's own templates were compiled by their test render
        known = {(p.file, p.line) for p in project.problems}
        try:
            syntax = catalog.check_syntax()
        except Exception as exc:  # noqa: BLE001
            syntax = [_unchecked(templates_dir, exc)]
        project.problems.extend(p for p in syntax if (p.file, p.line) not in known)
    return project


def _unchecked(path: Path, exc: Exception) -> Problem:
    return Problem(path, None, "", f"could not be checked ({type(exc).__name__}: {exc}); its trigger is not loaded")


def _declared_name(path: Path) -> str:
    """The name a broken file meant to declare (or its file name), for error look-ups. A file
    YAML cannot parse is searched for its ``name:`` line, so running the trigger by name
    shows the syntax error rather than "no trigger named"."""
    try:
        text = read_source(path)
    except (YamlSyntaxError, OSError):  # too large, or not UTF-8: its first bytes may still name it
        with path.open("rb") as handle:
            text = handle.read(MAX_YAML_BYTES).decode("utf-8", errors="replace")
    try:
        data = load_yaml(path).data
    except Exception:  # noqa: BLE001 -- any file YAML cannot (safely) load
        line = re.search(r"^name:[ \t]*[\"']?([\w.-]+)", text, re.MULTILINE)
        return line.group(1) if line else path.stem
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else path.stem


def _load_model(path: Path, model: type[M], problems: list[Problem]) -> M | None:
    if not path.is_file():
        problems.append(Problem(path, None, "", f"{path.name} not found"))
        return None
    try:
        doc = load_yaml(path)
    except YamlSyntaxError as exc:
        problems.append(exc.problem)
        return None
    except Exception as exc:  # noqa: BLE001 -- named, never a crash of every trigger
        problems.append(_unchecked(path, exc))
        return None
    try:
        return model.model_validate(doc.data or {})
    except ValidationError as exc:
        problems.extend(problems_from(doc, exc, model))
        return None


def _load_trigger(path: Path, stages: list[str] | None, catalog: TemplateCatalog,
                  problems: list[Problem], warnings: list[Problem]) -> TriggerBase | None:
    try:
        doc = load_yaml(path)
    except YamlSyntaxError as exc:
        problems.append(exc.problem)
        return None
    if not isinstance(doc.data, dict):
        problems.append(doc.problem((), "", "expected a mapping of fields (name, kind, schedule, email…)"))
        return None
    kind_name = doc.data.get("kind")
    if kind_name not in KINDS:
        message = f"unknown kind {kind_name!r}; valid kinds: {', '.join(KINDS)}" if kind_name else (
            f"required field is missing; valid kinds: {', '.join(KINDS)}")
        problems.append(doc.problem(("kind",), "kind", message))
        return None
    model = KINDS[kind_name].spec
    try:
        spec = model.model_validate(doc.data, context={"stages": stages})
    except ValidationError as exc:
        problems.extend(problems_from(doc, exc, model))
        return None
    journey = spec.journey
    if journey is not None:
        tree = journey_problems(journey, doc)
        if tree:
            problems.extend(tree)
            return None
    errors: list[Problem] = []
    for at, email in spec.mails():
        if not catalog.exists(email.template):
            choices = sorted(p.name for p in catalog.root.iterdir() if p.is_dir() and not p.name.startswith("_")) \
                if catalog.root.is_dir() else []
            where = (*at, "template")
            problems.append(doc.problem(where, format_path(where), f"no folder templates/{email.template}/; "
                                                                   f"valid templates: {', '.join(choices)}"))
            return None
        found, notes = _language_problems(spec, email, at, doc, catalog)
        errors.extend(found)
        warnings.extend(notes)
    problems.extend(errors)
    return spec if not errors else None


def _needs_default_language(spec: TriggerBase, email: EmailSpec, catalog: TemplateCatalog) -> bool:
    """Whether some recipient can get the default language: anyone, unless the audience
    is limited to languages the email is written in."""
    locales = spec.audience.locales
    supported = catalog.languages_for(email)
    return locales is None or any(lang not in supported for lang in locales)


def _language_problems(spec: TriggerBase, email: EmailSpec, at: tuple[str | int, ...], doc: YamlDocument,
                       catalog: TemplateCatalog) -> tuple[list[Problem], list[Problem]]:
    """A language the trigger targets but cannot write in whole is sent in the default
    language (a warning: nobody gets a mixed mail); no subject for the default language
    itself leaves those recipients without one (an error). ``at``: where the file states
    the mail (``email``, a step's ``email``, a variant)."""
    default = catalog.default_language
    supported = catalog.languages_for(email)
    errors: list[Problem] = []
    subject_at, template_at = (*at, "subject"), (*at, "template")
    if _needs_default_language(spec, email, catalog) and not email.has_subject(default):
        errors.append(doc.problem(subject_at, format_path(subject_at),
                                  f"no subject for the default language {default!r}, which every customer whose "
                                  f"language has no subject or template gets; add `{default}: …`"))
    targeted: dict[str, str] = {}
    for index, lang in enumerate(spec.audience.locales or []):
        targeted.setdefault(lang, f"audience.locales (line {doc.line_of(('audience', 'locales', index))})")
    for lang in sorted(catalog.languages(email.template)):
        targeted.setdefault(lang, f"templates/{email.template}/ has {lang} files")
    for lang in email.subject:
        targeted.setdefault(lang, f"{format_path(subject_at)} has {lang}")
    warnings = []
    for lang, why in targeted.items():
        if lang in ("*", default) or lang in supported:
            continue
        if not email.has_subject(lang):
            path, missing = subject_at, f"no subject for {lang!r}"
        else:
            path = template_at
            missing = f"no templates/{email.template}/default.{lang}.html.j2 (nor a language-neutral default.html.j2)"
        warnings.append(replace(doc.problem(path, format_path(path), f"language {lang!r} is targeted ({why}) but "
                                            f"has {missing}; {lang} customers get the whole mail in {default!r}"),
                                severity="warning"))
    return errors, warnings


def _check_templates(spec: TriggerBase, project: Project, base_url: str, shop_url: str,
                     path: Path | None = None) -> list[Problem]:
    """Every mail the file can send (each step's, each variant's) test-rendered for every
    stage and language it can go out in."""
    catalog = project.catalog
    all_stages = project.stages.names if project.stages else ["default"]
    stages = spec.audience.stages or all_stages
    samples = sample_contexts(KINDS[spec.kind].reference, base_url, shop_url)
    located: list[Problem] = []
    doc = None
    for at, email in spec.mails():
        # Any other language renders as the default one (TemplateCatalog.render), so these are all there is.
        languages = set(catalog.languages_for(email))
        if _needs_default_language(spec, email, catalog):
            languages.add(catalog.default_language)
        for problem in catalog.check(email, stages, languages, samples):
            if path is not None and _is_subject_problem(problem, catalog):
                # A subject's failure is the trigger file's: its line, as for its other errors.
                doc = doc or load_yaml(path)
                case = _TEST_RENDER_LANGUAGE.search(problem.message)
                lang = case.group(1) if case else "*"
                key = (*at, "subject", lang) if lang in email.subject else (*at, "subject")
                problem = doc.problem(key, format_path(key), problem.message.removeprefix("subject: "))
            located.append(problem)
    return located


_TEST_RENDER_LANGUAGE = re.compile(r"\(test render: [^()]*language (\w+)\)$")


def _is_subject_problem(problem: Problem, catalog: TemplateCatalog) -> bool:
    return problem.file == catalog.root and problem.line is None and problem.message.startswith("subject: ")


# -- pydantic errors → located problems ---------------------------------------------

def problems_from(doc: YamlDocument, exc: ValidationError, model: type[BaseModel]) -> list[Problem]:
    out = []
    for error in exc.errors():
        path = _data_path(doc.data, tuple(error["loc"]))
        out.append(doc.problem(path, format_path(path), _describe(error, model, path)))
    return out


def _data_path(data: Any, loc: tuple[Any, ...]) -> Path_:
    """Keep the parts of a pydantic location that exist in the data (drop union tags)."""
    path: list[str | int] = []
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and part < len(node)):
            node = node[part]
            path.append(part)
        elif isinstance(node, dict) and isinstance(part, str) and not part.startswith(("function-", "union[")):
            path.append(part)  # a missing field: its parent's line is the best we have
            node = None
    return tuple(path)


def _describe(error: ErrorDetails, model: type[BaseModel], path: Path_) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        valid = sorted(_fields_at(model, path[:-1]))
        close = difflib.get_close_matches(str(path[-1]), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown field{hint} (valid fields: {', '.join(valid)})"
    if kind == "missing":
        return "required field is missing"
    if message.startswith("Value error, "):
        return message.removeprefix("Value error, ")
    if "input" in error and not isinstance(error["input"], (dict, list)):
        return f"{message[0].lower()}{message[1:]}, got {error['input']!r}"
    return message[0].lower() + message[1:]


def _fields_at(model: type[BaseModel], path: Path_) -> list[str]:
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        current = _inner_model(fields[part].annotation)
    return list(getattr(current, "model_fields", {}))


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):  # Optional[...], list[...], Annotated[...]
        found = _inner_model(arg)
        if found is not None:
            return found
    return None
