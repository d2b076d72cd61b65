"""``GET /reports`` in ``lifecycle web``: what the mail did, for the people who decide about it.

Per-trigger cards (delivered, bounced, unique human clicks, click rate, conversions,
revenue per currency, and the holdout lift with its interval and verdict), the share of
customers in each stage at each week's end, the movement between stages over the
period as a heat map, each stage's KPIs, and attributed revenue per trigger over time,
one chart per currency. ``?since=&until=`` (dates or ISO 8601 moments; ``until``
exclusive) choose the period; by default the last ``DEFAULT_WEEKS`` weeks.

The page shows business figures, so:

- it exists only when ``LIFECYCLE_ADMIN_TOKEN`` is set (otherwise ``/reports`` is 404 in
  every environment, and the start-up log says how to turn it on);
- every request carries the token, as HTTP basic auth (the password; any user name) or
  as ``Authorization: Bearer TOKEN``, compared in constant time; without it the answer
  is 401 with a ``WWW-Authenticate`` challenge, and nothing is read from the store;
- it is never cached (``no-store``) and never shows a customer: only counts and sums,
  no address, name or id;
- it runs no script and loads nothing: the charts are SVG drawn on the server
  (``flows.surfaces.charts``) and inlined, styled by presentation attributes, and the
  page's one stylesheet is allowed by its hash (``REPORTS_CSP``), nothing else inline.

Every figure comes from the stored attributions and the ledger (``flows.analysis``),
never the event log: run the attribution (``lifecycle attribute``, the daily job of
``lifecycle serve`` or the ``lifecycle-report`` deployment) for orders to show up; the
page says how many orders it has not looked at yet.
"""

import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment
from markupsafe import Markup
from sqlalchemy import Engine

from flows.settings import Settings
from models.types import utcnow

if TYPE_CHECKING:
    from flows.analysis.holdouts import HoldoutLift
    from flows.analysis.report import Report, ReportRow
    from flows.analysis.stages import StageKpis
    from flows.spec.project import Project

log = logging.getLogger(__name__)

REPORTS_ROUTE = "reports"
PATH = f"/{REPORTS_ROUTE}"
DEFAULT_WEEKS = 8
REALM = 'Basic realm="Lifecycle reports", charset="UTF-8"'

# The page's one stylesheet; the CSP allows exactly this text, by hash. No class or rule
# here may be needed by an element in a ``style=""`` attribute: the page has none.
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#18181b;background:#fafafa}
header{background:#18181b;color:#fafafa;padding:16px 24px}
header h1{margin:0;font-size:20px;font-weight:600}
header p{margin:4px 0 0;color:#d4d4d8;font-size:13px}
main{padding:16px 24px;max-width:1200px}
form.period{display:flex;gap:12px;align-items:end;margin:8px 0 16px;font-size:13px}
form.period label{display:flex;flex-direction:column;gap:2px}
section{margin:24px 0}
h2{font-size:16px;margin:0 0 8px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.card{background:#fff;border:1px solid #e4e4e7;border-radius:8px;padding:12px 14px}
.card h3{margin:0 0 8px;font-size:15px}
.card dl{display:grid;grid-template-columns:auto 1fr;gap:2px 12px;margin:0;font-size:13px}
.card dt{color:#52525b}
.card dd{margin:0;text-align:right;font-variant-numeric:tabular-nums}
.holdout{margin-top:10px;padding-top:8px;border-top:1px solid #e4e4e7;font-size:13px}
.holdout p{margin:2px 0}
.verdict{font-weight:600}
.verdict.conclusive{color:#047857}
.verdict.open{color:#92400e}
.note{color:#52525b;font-size:12px}
.figure{background:#fff;border:1px solid #e4e4e7;border-radius:8px;padding:8px;overflow-x:auto;margin-bottom:16px}
svg.chart{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:13px;background:#fff}
th,td{border-bottom:1px solid #e4e4e7;padding:4px 10px;text-align:right;font-variant-numeric:tabular-nums}
th:first-child,td:first-child{text-align:left}
p.error{color:#b91c1c}
"""


def _source_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


REPORTS_CSP = "; ".join((
    "default-src 'none'",  # no script, image, font, frame or connection of any kind
    f"style-src {_source_hash(CSS)}",  # the one <style> element above; the charts use attributes
    "form-action 'self'",  # the period form (GET, to this page)
    "frame-ancestors 'none'",
    "base-uri 'none'",
))
HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache", "X-Robots-Tag": "noindex, nofollow",
           "Content-Security-Policy": REPORTS_CSP, "Referrer-Policy": "no-referrer"}

_TEMPLATES = Environment(autoescape=True)
_PAGE = _TEMPLATES.from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex"><title>{{ title }}</title><style>{{ css }}</style></head>
<body><header><h1>{{ title }}</h1>{% if subtitle %}<p>{{ subtitle }}</p>{% endif %}</header><main>
{% if message %}<p class="{{ 'error' if error else 'note' }}">{{ message }}</p>{% endif %}
{% if view %}
<form class="period" method="get" action="{{ path }}">
<label>Since <input type="date" name="since" value="{{ view.since_day }}"></label>
<label>Until (exclusive) <input type="date" name="until" value="{{ view.until_day }}"></label>
<button type="submit">Show</button></form>
<p class="note">Attribution: last touch ({{ view.basis }}) within {{ view.window }}. {{ view.unattributed }}</p>
<section id="triggers"><h2>Triggers</h2>
{% if not view.cards %}<p class="note">No marketing mail in this period.</p>{% endif %}
<div class="cards">{% for card in view.cards %}
<article class="card" data-trigger="{{ card.trigger }}"><h3>{{ card.trigger }}</h3><dl>
{% for label, value in card.figures %}<dt>{{ label }}</dt><dd data-figure="{{ label }}">{{ value }}</dd>{% endfor %}
</dl>{% for h in card.holdouts %}<div class="holdout" data-currency="{{ h.currency }}">
<p><strong>Holdout{% if h.currency %} ({{ h.currency }}){% endif %}</strong></p>
{% for line in h.lines %}<p>{{ line }}</p>{% endfor %}
<p class="verdict {{ 'conclusive' if h.conclusive else 'open' }}">{{ h.verdict }}</p></div>{% endfor %}
</article>{% endfor %}</div>
<p class="note">Unique clicks are mails with at least one click by a person (machine clicks are recorded, not
counted). Opens are unreliable (Apple Mail fetches every image) and are not shown or used for attribution.</p>
</section>
<section id="stages"><h2>Customers by stage</h2>
{% if view.stages_problem %}<p class="error">{{ view.stages_problem }}</p>{% else %}
<div class="figure">{{ view.distribution_chart }}</div>
<h2>Movement between stages</h2><div class="figure">{{ view.transition_chart }}</div>
<h2>Per stage</h2><table><thead><tr><th>stage</th><th>customers</th><th>conversion rate</th>
<th>repeat-purchase rate</th><th>average order value</th><th>purchase frequency</th><th>click rate</th></tr></thead>
<tbody>{% for row in view.stage_rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>{% endif %}
</section>
<section id="revenue"><h2>Attributed revenue over time</h2>
{% for chart in view.revenue_charts %}<div class="figure">{{ chart }}</div>{% else %}
<p class="note">No attributed revenue in this period.</p>{% endfor %}
</section>
{% endif %}
</main></body></html>""")


@dataclass(frozen=True)
class Holdout:
    currency: str
    lines: list[str]
    verdict: str
    conclusive: bool


@dataclass(frozen=True)
class Card:
    trigger: str
    figures: list[tuple[str, str]]
    holdouts: list[Holdout] = field(default_factory=list)


@dataclass(frozen=True)
class View:
    """Everything the page shows, as text and inline SVG (``gather`` makes it)."""

    since_day: str
    until_day: str
    window: str
    basis: str
    unattributed: str
    cards: list[Card]
    distribution_chart: Markup = field(default_factory=Markup)
    transition_chart: Markup = field(default_factory=Markup)
    stage_rows: list[list[str]] = field(default_factory=list)
    revenue_charts: list[Markup] = field(default_factory=list)
    stages_problem: str = ""


class PeriodError(ValueError):
    """``since``/``until`` that are no date, or that give an empty period."""


def _moment(value: str, name: str) -> datetime:
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(0), UTC)
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise PeriodError(f"{name}: expected a date such as 2026-03-16 or an ISO 8601 moment, got {value!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def period(since: str | None, until: str | None, now: datetime) -> tuple[datetime, datetime]:
    """``[since, until)``: given, or the last ``DEFAULT_WEEKS`` weeks up to the end of today (UTC)."""
    stop = _moment(until, "until") if until else datetime.combine(now.astimezone(UTC).date() + timedelta(days=1),
                                                                  time(0), UTC)
    start = _moment(since, "since") if since else stop - timedelta(weeks=DEFAULT_WEEKS)
    if start >= stop:
        raise PeriodError(f"since ({start:%Y-%m-%d %H:%M}) must be before until ({stop:%Y-%m-%d %H:%M})")
    return start, stop


def authorized(header: str | None, token: str) -> bool:
    """The admin token, as basic auth's password (any user) or a bearer token. Compared as
    SHA-256 digests in constant time, so neither the token's content nor its length shows."""
    scheme, _, value = (header or "").strip().partition(" ")
    given = b""
    if scheme.lower() == "bearer":
        given = value.strip().encode()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            given = b""
    same = hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(token.encode()).digest())
    return bool(token) and bool(given) and same


# -- what the page says ---------------------------------------------------------------------------

def number(value: int) -> str:
    return f"{value:,}"


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def money(cents: float, currency: str) -> str:
    return f"{currency} {cents / 100:,.2f}"


def moneys(amounts: dict[str, int] | dict[str, float]) -> str:
    """Each currency on its own, never added up: ``EUR 1,234.50 · USD 12.00``."""
    return " · ".join(money(cents, currency) for currency, cents in sorted(amounts.items())) or "-"


def points(difference: float) -> str:
    """An absolute difference of rates in percentage points, signed."""
    return f"{difference * 100:+.1f} pts"


def _card(row: "ReportRow", lifts: Sequence["HoldoutLift"]) -> Card:
    figures = [("delivered", number(row.delivered)), ("bounced", number(row.bounced)),
               ("unique clicks", number(row.unique_clicks)), ("click rate", percent(row.click_rate)),
               ("conversions", number(row.conversions)), ("conversion rate", percent(row.conversion_rate)),
               ("revenue", moneys(row.revenue)), ("revenue per recipient", moneys(row.revenue_per_recipient))]
    return Card(row.trigger, figures, [_holdout(lift) for lift in lifts])


def _holdout(lift: "HoldoutLift") -> Holdout:
    """Intention to treat: conversions within the window after the (would-be) send, both arms."""
    treated, held = lift.treated, lift.held_out
    low, high = lift.lift_ci
    lines = [f"treated: {percent(treated.rate)} of {number(treated.recipients)} converted",
             f"held out: {percent(held.rate)} of {number(held.recipients)} converted",
             f"lift: {points(lift.lift)} (95 % interval {points(low)} to {points(high)})"]
    if lift.currency:
        lines.append(f"revenue per recipient: {money(treated.revenue_per_recipient_cents, lift.currency)} vs "
                     f"{money(held.revenue_per_recipient_cents, lift.currency)}")
        incremental = f"incremental revenue: {money(lift.incremental_revenue_cents, lift.currency)}"
        if lift.incremental_revenue_ci is not None:
            low_cents, high_cents = lift.incremental_revenue_ci
            incremental += (f" (95 % interval {money(low_cents, lift.currency)} to "
                            f"{money(high_cents, lift.currency)})")
        lines.append(incremental)
    return Holdout(lift.currency, lines, lift.verdict, lift.conclusive)


def _stage_row(kpis: "StageKpis") -> list[str]:
    frequency = "-" if kpis.purchase_frequency is None else f"{kpis.purchase_frequency:.2f}"
    return [kpis.stage, number(kpis.customers), percent(kpis.conversion_rate), percent(kpis.repeat_purchase_rate),
            moneys(kpis.average_order_value), frequency, percent(kpis.click_rate)]


def _days(window: timedelta) -> str:
    from flows.clock import format_duration

    return format_duration(window)


def chart_dates(since: datetime, until: datetime) -> list[date]:
    """The week ends (Sundays) in the period, or its last day if it holds none."""
    from flows.analysis.stages import week_ends

    last = (until - timedelta(microseconds=1)).date()
    return week_ends(since.date(), last) or [last]


def gather(engine: Engine, project: "Project", since: datetime, until: datetime) -> View:
    """The page's figures and charts for ``[since, until)``: grouped queries and drawing, no customer."""
    from flows.analysis.report import build_report, revenue_over_time
    from flows.analysis.stages import distribution, stage_kpis, transitions
    from flows.surfaces import charts

    report: Report = build_report(engine, since=since, until=until, policy=project.policy)
    cards = [_card(row, [lift for lift in report.holdouts if lift.trigger == row.trigger])
             for row in report.rows_of("trigger")]
    missing = report.unattributed
    unattributed = (f"Orders in the period with no mail to credit: {number(missing.orders)}"
                    f" ({moneys(missing.revenue)}).")
    if missing.pending:
        unattributed += (f" {number(missing.pending)} order(s) not attributed yet: they count once the attribution "
                         "has run (lifecycle attribute).")
    series = revenue_over_time(engine, since=since, until=until)
    revenue_charts = [Markup(charts.revenue_over_time(series, currency)) for currency in charts.currencies(series)]
    attribution = project.policy.attribution
    view = View(since_day=f"{since:%Y-%m-%d}", until_day=f"{until:%Y-%m-%d}", window=_days(attribution.window),
                basis=" or ".join(attribution.basis), unattributed=unattributed, cards=cards,
                revenue_charts=revenue_charts)
    rules = project.stages
    if rules is None:
        return replace(view, stages_problem="The stage rules (triggers/stages.yaml) do not load: run "
                                            "`lifecycle validate` to see why.")
    shares = distribution(engine, rules, chart_dates(since, until))
    matrix = transitions(engine, rules, since, until)
    return replace(view, distribution_chart=Markup(charts.stage_distribution(shares, rules.names)),
                   transition_chart=Markup(charts.transition_heatmap(matrix, rules.names, start=since, end=until)),
                   stage_rows=[_stage_row(kpis) for kpis in stage_kpis(engine, rules, since, until)])


def render(view: View | None, *, subtitle: str = "", message: str = "", error: bool = False) -> str:
    return _PAGE.render(title="Lifecycle reports", subtitle=subtitle, css=Markup(CSS), view=view, message=message,
                        error=error, path=PATH)


def _response(html: str, status: int = 200, **extra: str) -> HTMLResponse:
    return HTMLResponse(html, status_code=status, headers={**HEADERS, **extra})


# -- the route -------------------------------------------------------------------------------------

def add_reports(app: FastAPI, settings: Settings, engine: Engine, clock: Callable[[], datetime] = utcnow) -> None:
    """Mount ``GET /reports`` on ``app`` when ``LIFECYCLE_ADMIN_TOKEN`` is set (once per app)."""
    if getattr(app.state, "reports", False):
        return
    app.state.reports = True
    if settings.admin_token is None or not settings.reports_page_on:
        log.info("The reports page (%s) is off: set LIFECYCLE_ADMIN_TOKEN to a long random secret to turn it on",
                 PATH)
        return
    token = settings.admin_token.get_secret_value()
    if len(token) < 16:
        log.warning("LIFECYCLE_ADMIN_TOKEN is shorter than 16 characters: anyone who guesses it sees the reports")

    @app.get(PATH, response_class=HTMLResponse)
    def reports(request: Request, since: str | None = None, until: str | None = None) -> HTMLResponse:
        """A sync handler: FastAPI runs it in the thread pool, so the queries and the drawing
        never block the event loop (and the web's statement timeout bounds the queries)."""
        if not authorized(request.headers.get("authorization"), token):
            if request.headers.get("authorization"):
                log.warning("%s: refused a request with a wrong admin token", PATH)
            return _response(render(None, message="Sign in with the admin token (LIFECYCLE_ADMIN_TOKEN) as the "
                                                  "password, or send it as a bearer token.", error=True),
                             401, **{"WWW-Authenticate": REALM})
        try:
            since_at, until_at = period(since, until, clock())
        except PeriodError as exc:
            return _response(render(None, message=str(exc), error=True), 400)
        from flows.run_context import load

        project = load(settings, only=[])  # the policy and the stage rules, as they are now
        view = gather(engine, project, since_at, until_at)
        subtitle = f"{since_at:%Y-%m-%d %H:%M} to {until_at:%Y-%m-%d %H:%M} UTC (until exclusive), by the send's moment"
        return _response(render(view, subtitle=subtitle))
