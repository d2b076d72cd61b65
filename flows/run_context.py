"""One run's context: everything a run of one trigger needs, made once and passed to every stage.

A run loads and validates the project once (``prepare``), resolves its settings once
(the signing secret included) and opens its store once. Every stage receives the same
immutable ``RunContext``; nothing is derived again mid-run, and nothing is read back
from the environment: the surfaces (CLI, serve, the Prefect flows, the web) read it,
once, and hand their ``Settings`` in as a value.

A sender process gets the context once, as a pickle: the trigger, the stage rules, the
policy, the settings and the moment travel; the template catalog (compiled Jinja does
not pickle) and the engine (a connection pool is per process) are made again there,
from those same settings, without validating again.
"""

import uuid
from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from flows.audience.shards import Shard
from flows.content.render import TemplateCatalog
from flows.kinds import KINDS
from flows.kinds.base import Kind
from flows.message.compose import Sender
from flows.message.dkim import DkimSigner
from flows.settings import Settings
from flows.signing_secret import resolved
from flows.spec.common import EmailSpec
from flows.spec.journey import StepPlan, plans, variant_email
from flows.spec.policy import Policy
from flows.spec.problems import SpecError
from flows.spec.project import STAGES_FILE, Project, load_project
from flows.spec.stages import StageRules
from flows.spec.trigger import TriggerBase
from models.db import get_engine


@dataclass(frozen=True)
class RunContext:
    """Everything one run of one trigger needs; immutable for the whole run."""

    trigger: TriggerBase
    kind: Kind
    stages: StageRules
    catalog: TemplateCatalog
    policy: Policy
    settings: Settings  # resolved: its signing secret is set
    engine: Engine
    now: datetime
    run_id: str
    dry_run: bool = False
    # A journey's run is one pass per step, each with its own context (``flows.run``): the
    # step, and the experiment's winner once the rule named one (None: the split as written).
    step: StepPlan | None = None
    winner: str | None = None
    # A large run reads and sends its audience in ``shards`` slices at once (``flows.shards``),
    # each pass of each slice with its own context: ``shard`` says which slice.
    shards: int = 1
    shard: Shard | None = None

    @property
    def email(self) -> EmailSpec:
        """The mail this pass sends: the trigger's one, or its step's."""
        if self.step is not None:
            return self.step.step.email
        assert self.trigger.email is not None, "a journey runs one pass per step"
        return self.trigger.email

    @cached_property
    def _variants(self) -> dict[str, EmailSpec]:
        experiment = self.step.step.experiment if self.step is not None else None
        if experiment is None:
            return {}
        return {v.name: variant_email(self.email, v) for v in experiment.variants}

    def email_for(self, variant: str) -> EmailSpec:
        """The mail of one arm of the step's experiment (``""``: the step's own)."""
        return self._variants[variant] if variant else self.email

    def passes(self) -> list["RunContext"]:
        """The run's passes: itself for a trigger's one mail; one per step for a journey, in
        the tree's reading order (``flows.spec.journey.plans``)."""
        journey = self.trigger.journey
        if journey is None or self.step is not None:
            return [self]
        return [replace(self, step=plan) for plan in plans(journey)]

    def variants(self) -> list[str]:
        """The arms of this pass's experiment (``[""]``: the step's own mail, no experiment)."""
        return list(self._variants) or [""]

    @cached_property
    def sender(self) -> Sender:
        return Sender.parse(self.email.sender or self.settings.sender)

    @cached_property
    def signer(self) -> DkimSigner | None:
        s = self.settings
        key = s.dkim_private_key.get_secret_value() if s.dkim_private_key else None
        ed25519 = s.dkim_ed25519_private_key.get_secret_value() if s.dkim_ed25519_private_key else None
        return DkimSigner.from_settings(s.dkim_selector, s.dkim_domain, key, s.dkim_private_key_file,
                                        self.sender.domain, s.dkim_ed25519_selector, ed25519,
                                        s.dkim_ed25519_private_key_file)

    def __reduce__(self) -> tuple[Any, ...]:
        """What a sender process receives: the values; the catalog and engine are its own."""
        return (_in_sender, (self.trigger, self.stages, self.policy, self.settings, self.now, self.run_id,
                             self.dry_run, self.step, self.winner, self.shards, self.shard))


def _in_sender(trigger: TriggerBase, stages: StageRules, policy: Policy, settings: Settings, now: datetime,
               run_id: str, dry_run: bool, step: StepPlan | None, winner: str | None, shards: int,
               shard: Shard | None) -> RunContext:
    return RunContext(trigger=trigger, kind=KINDS[trigger.kind], stages=stages, policy=policy, settings=settings,
                      catalog=TemplateCatalog(settings.templates_dir, settings.default_language),
                      engine=get_engine(settings.database_url), now=now, run_id=run_id, dry_run=dry_run,
                      step=step, winner=winner, shards=shards, shard=shard)


def load(settings: Settings, only: Collection[str] | None = None) -> Project:
    """The project the settings point at, every file validated and every template test-rendered
    (``only``: just these triggers, plus the stage rules and the policy)."""
    return load_project(settings.triggers_dir, settings.templates_dir, settings.default_language, settings.base_url,
                        settings.shop_url, only=only)


def prepare(
    trigger_name: str,
    now: datetime,
    *,
    settings: Settings,
    project: Project | None = None,
    engine: Engine | None = None,
    dry_run: bool = False,
    run_id: str | None = None,
    shards: int | None = None,
) -> RunContext:
    """The run's context, validated before anything is sent: a ``SpecError`` names the file,
    line and field of whatever is wrong with the trigger or its templates. A caller that
    has loaded the project already (``lifecycle run --all``, the deferred sweep) passes it.
    ``shards`` overrides the trigger's own ``shards:``."""
    if shards is not None and not 1 <= shards <= 64:
        raise ValueError(f"shards must be from 1 to 64, got {shards}")
    project = project or load(settings, only=[trigger_name])
    if project.stages is None:  # every run needs the stage rules: their own problems say why they did not load
        raise SpecError([p for p in project.problems if Path(p.file).name == STAGES_FILE] or project.problems)
    trigger = project.trigger(trigger_name)
    engine = engine or get_engine(settings.database_url)
    return RunContext(
        trigger=trigger,
        kind=KINDS[trigger.kind],
        stages=project.stages,
        catalog=project.catalog,
        policy=project.policy,
        settings=resolved(settings, engine),
        engine=engine,
        now=now,
        run_id=run_id or uuid.uuid4().hex,
        dry_run=dry_run,
        shards=trigger.shards if shards is None else shards,
    )
