"""The reports page's charts, drawn on the server as SVG that is inlined into the page.

matplotlib draws them (its SVG renderer; figures are made with ``Figure``, never pyplot, so
no GUI backend and no global figure registry is involved); nothing is fetched when the
page is viewed and no script runs. Each chart function takes plain data and returns one
``<svg>`` element as a string:

- **Deterministic**: ``svg.hashsalt`` is fixed and the metadata (date, creator) is dropped,
  so the same data gives the same bytes (tests compare them).
- **Safe to inline**: text is matplotlib's ``<text>`` (``svg.fonttype: none``), escaped by
  the XML serializer, so a trigger or stage named ``<script>`` is text, never markup. The
  prolog, DOCTYPE and metadata are stripped; element ids get the chart's own prefix, so
  several charts on one page never share an id.
- **No inline CSS**: every ``style="…"`` matplotlib writes becomes SVG presentation
  attributes (``fill="…"``), which a Content-Security-Policy does not govern, and its
  one ``<style>`` element becomes attributes on the root. The page's CSP needs no
  ``style-src`` for the charts at all (``flows.surfaces.web_reports``).

Money is charted per currency: one chart per currency, never a sum across currencies.
"""

import io
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"
ET.register_namespace("", SVG_NS)
ET.register_namespace("xlink", XLINK_NS)

# rcParams are process-wide: charts are drawn one at a time, under these settings only.
_LOCK = threading.Lock()
_RC: dict[Any, Any] = {  # (matplotlib types the keys as a Literal of every rcParam)
    "svg.fonttype": "none",  # text stays text: small, selectable, and escaped like any XML text
    "svg.hashsalt": "lifecycle",  # clip-path ids from a fixed salt: the same data, the same bytes
    "svg.image_inline": True,
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#71717a",
    "axes.labelcolor": "#27272a",
    "xtick.color": "#52525b",
    "ytick.color": "#52525b",
    "legend.frameon": False,
}
_METADATA: dict[str, Any] = {"Date": None, "Creator": None, "Format": None, "Type": None}

# Colours that stay apart for the colour-blind (Okabe and Ito), in a fixed order.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999", "#000000")
HEAT = "Blues"

# The CSS properties matplotlib writes in ``style=""``; each is also an SVG presentation attribute.
PRESENTATION = frozenset({
    "fill", "fill-opacity", "fill-rule", "stroke", "stroke-width", "stroke-opacity", "stroke-linecap",
    "stroke-linejoin", "stroke-miterlimit", "stroke-dasharray", "stroke-dashoffset", "opacity", "font-family",
    "font-size", "font-style", "font-weight", "font-variant", "font-stretch", "text-anchor", "clip-path",
    "mix-blend-mode", "dominant-baseline", "letter-spacing",
})
_ID_REFERENCE = re.compile(r"url\(#([^)]+)\)")


class ChartError(ValueError):
    """matplotlib wrote something the inlining cannot make safe (a style property it does not know)."""


def _inline(svg: str, prefix: str, label: str) -> str:
    """matplotlib's SVG file as one element for an HTML page (see the module docstring)."""
    root = ET.fromstring(svg)
    ids = {element.get("id") for element in root.iter() if element.get("id")}

    def renamed(value: str) -> str:
        return f"{prefix}-{value}" if value in ids else value

    for parent in list(root.iter()):
        for child in list(parent):
            if child.tag in (f"{{{SVG_NS}}}metadata", f"{{{SVG_NS}}}style"):
                parent.remove(child)
    for element in root.iter():
        style = element.attrib.pop("style", None)
        for declaration in (style or "").split(";"):
            name, _, value = declaration.partition(":")
            name, value = name.strip(), value.strip()
            if not name:
                continue
            if name not in PRESENTATION:
                raise ChartError(f"style property {name!r} is not a presentation attribute")
            element.set(name, value)
        for attribute, value in list(element.attrib.items()):
            if attribute == "id":
                element.set("id", renamed(value))
            elif attribute == f"{{{XLINK_NS}}}href" and value.startswith("#"):
                element.set(attribute, "#" + renamed(value[1:]))
            elif "url(#" in value:
                element.set(attribute, _ID_REFERENCE.sub(lambda m: f"url(#{renamed(m.group(1))})", value))
    # What matplotlib's <style> said for every element, now inherited from the root instead.
    root.set("stroke-linejoin", "round")
    root.set("stroke-linecap", "butt")
    root.set("role", "img")
    root.set("aria-label", label)
    root.set("class", "chart")
    return ET.tostring(root, encoding="unicode")


def _svg(figure: Figure, prefix: str, label: str) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata=_METADATA)
    return _inline(buffer.getvalue(), prefix, label)


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _empty(prefix: str, label: str, message: str) -> str:
    figure = _figure(6.4, 1.2)
    figure.text(0.5, 0.5, message, ha="center", va="center", color="#71717a")
    return _svg(figure, prefix, label)


def _day(value: date | datetime) -> str:
    return f"{value:%Y-%m-%d}"


def _render(draw: Any, *args: Any) -> str:
    with _LOCK, matplotlib.rc_context(_RC):
        result: str = draw(*args)
        return result


def _ordered(known: Sequence[str], seen: set[str]) -> list[str]:
    """``known`` (the stage rules' order), then anything else seen, sorted."""
    return list(known) + sorted(seen - set(known))


# -- stage distribution over time --------------------------------------------------------------

def stage_distribution(points: Sequence[tuple[date | datetime, Mapping[str, int]]], stages: Sequence[str] = (),
                       *, prefix: str = "stages") -> str:
    """The share of customers in each stage at each date, as stacked bars (one bar per date,
    100 % each); the counts are in the legend's total. ``stages``: the rules' order."""
    label = "Customers by stage over time"
    if not points or not any(sum(counts.values()) for _, counts in points):
        return _render(_empty, prefix, label, "No customers in this period.")
    return _render(_stage_distribution, points, stages, prefix, label)


def _stage_distribution(points: Sequence[tuple[date | datetime, Mapping[str, int]]], stages: Sequence[str],
                        prefix: str, label: str) -> str:
    names = _ordered(stages, {name for _, counts in points for name in counts})
    names = [name for name in names if any(counts.get(name, 0) for _, counts in points)]
    totals = [sum(counts.values()) for _, counts in points]
    figure = _figure(7.2, 3.2)
    axes = figure.add_subplot()
    positions = list(range(len(points)))
    bottom = [0.0] * len(points)
    for index, name in enumerate(names):
        shares = [100 * counts.get(name, 0) / total if total else 0.0
                  for (_, counts), total in zip(points, totals, strict=True)]
        axes.bar(positions, shares, bottom=bottom, width=0.8, color=PALETTE[index % len(PALETTE)], label=name,
                 linewidth=0)
        bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
    axes.set_xticks(positions, [_day(moment) for moment, _ in points],
                    rotation=45 if len(points) > 6 else 0, ha="right" if len(points) > 6 else "center")
    axes.set_ylim(0, 100)
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.0f} %"))
    axes.set_ylabel("share of customers")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), reverse=True)
    axes.set_title(f"{label} (customers at the last date: {totals[-1]:,})", loc="left", fontsize=10)
    return _svg(figure, prefix, label)


# -- transitions between stages ------------------------------------------------------------------

def transition_heatmap(matrix: Mapping[str, Mapping[str, int]], stages: Sequence[str] = (), *,
                       start: date | datetime | None = None, end: date | datetime | None = None,
                       prefix: str = "transitions") -> str:
    """Who moved from which stage (rows) to which (columns) between two dates: cells shaded
    by count, with the count written in each cell. Drawn as rectangles (never an embedded
    raster image, which would need ``img-src``). Rows that are no stage (such as
    ``(joined)``: not a customer yet at the start) come first, in the matrix's order;
    then ``stages`` (the rules' order), then any other name, sorted."""
    label = "Movement between stages"
    if start is not None and end is not None:
        label += f" from {_day(start)} to {_day(end)}"
    if not any(count for row in matrix.values() for count in row.values()):
        return _render(_empty, prefix, label, "No customers moved in this period.")
    return _render(_transition_heatmap, matrix, stages, prefix, label)


def _axes_of(matrix: Mapping[str, Mapping[str, int]], stages: Sequence[str]) -> tuple[list[str], list[str]]:
    targets = {to for row in matrix.values() for to in row}
    named = set(stages) | targets
    rows = [source for source in matrix if source not in named] + _ordered(stages, set(matrix) & named)
    return rows, _ordered(stages, targets)


def _transition_heatmap(matrix: Mapping[str, Mapping[str, int]], stages: Sequence[str], prefix: str,
                        label: str) -> str:
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    rows, columns = _axes_of(matrix, stages)
    highest = max(count for row in matrix.values() for count in row.values())
    shade, norm = colormaps[HEAT], Normalize(vmin=0, vmax=highest)
    figure = _figure(1.8 + 0.8 * len(columns), 1.3 + 0.45 * len(rows))
    axes = figure.add_subplot()
    for y, source in enumerate(rows):
        for x, target in enumerate(columns):
            count = matrix.get(source, {}).get(target, 0)
            fill = shade(norm(count)) if count else (0.98, 0.98, 0.98, 1.0)
            axes.add_patch(Rectangle((x, y), 1, 1, facecolor=fill, edgecolor="#ffffff", linewidth=1))
            dark = count and norm(count) > 0.55
            axes.text(x + 0.5, y + 0.5, f"{count:,}", ha="center", va="center", fontsize=8,
                      color="#ffffff" if dark else "#a1a1aa" if not count else "#27272a")
    axes.set_xlim(0, len(columns))
    axes.set_ylim(len(rows), 0)
    axes.set_xticks([i + 0.5 for i in range(len(columns))], columns, rotation=30, ha="right")
    axes.set_yticks([i + 0.5 for i in range(len(rows))], rows)
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    axes.set_xlabel("to stage")
    axes.set_ylabel("from stage")
    axes.set_title(label, loc="left", fontsize=10)
    return _svg(figure, prefix, label)


# -- revenue over time ----------------------------------------------------------------------------

def currencies(series: Mapping[str, Sequence[tuple[date | datetime, Mapping[str, int]]]]) -> list[str]:
    """Every currency with revenue in ``series`` (trigger → buckets), sorted."""
    return sorted({currency for buckets in series.values() for _, amounts in buckets
                   for currency, cents in amounts.items() if cents})


def revenue_over_time(series: Mapping[str, Sequence[tuple[date | datetime, Mapping[str, int]]]], currency: str,
                      *, bucket_days: int = 7, prefix: str | None = None) -> str:
    """Attributed revenue in ``currency`` per bucket (one line per trigger), in the
    currency's major unit. Call once per currency (``currencies``): amounts in other
    currencies are not in this chart, and nothing is converted or added across them."""
    prefix = prefix or f"revenue-{''.join(ch for ch in currency if ch.isalnum())}"
    label = f"Attributed revenue per trigger, {currency}"
    if not any(amounts.get(currency, 0) for buckets in series.values() for _, amounts in buckets):
        return _render(_empty, prefix, label, f"No attributed revenue in {currency} in this period.")
    return _render(_revenue_over_time, series, currency, bucket_days, prefix, label)


def _revenue_over_time(series: Mapping[str, Sequence[tuple[date | datetime, Mapping[str, int]]]], currency: str,
                       bucket_days: int, prefix: str, label: str) -> str:
    starts = sorted({start for buckets in series.values() for start, _ in buckets})
    position = {start: index for index, start in enumerate(starts)}
    figure = _figure(7.2, 3.0)
    axes = figure.add_subplot()
    index = 0
    for trigger in sorted(series):
        amounts = {start: values.get(currency, 0) for start, values in series[trigger]}
        if not any(amounts.values()):
            continue
        axes.plot([position[start] for start in starts], [amounts.get(start, 0) / 100 for start in starts],
                  marker="o", markersize=3.5, linewidth=1.6, color=PALETTE[index % len(PALETTE)], label=trigger)
        index += 1
    axes.set_xticks(range(len(starts)), [_day(start) for start in starts],
                    rotation=45 if len(starts) > 6 else 0, ha="right" if len(starts) > 6 else "center")
    axes.set_ylim(bottom=0)
    axes.yaxis.set_major_locator(MaxNLocator(nbins=5, min_n_ticks=2))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.set_ylabel(f"{currency} per {'week' if bucket_days == 7 else f'{bucket_days} days'}, from")
    axes.grid(axis="y", color="#e4e4e7", linewidth=0.6)
    axes.set_axisbelow(True)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.set_title(label, loc="left", fontsize=10)
    return _svg(figure, prefix, label)
