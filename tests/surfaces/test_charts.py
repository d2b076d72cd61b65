"""The reports page's charts: SVG elements safe to inline, the same bytes for the same data, money per currency."""

import re
import xml.etree.ElementTree as ET
from datetime import date, timedelta

import pytest

from flows.surfaces import charts

SVG = "{http://www.w3.org/2000/svg}"
XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
HOSTILE = ['<script>alert("x")</script>', '" onload="alert(1)', "a&b ]]> -->", "it's <b>"]
WEEKS = [date(2026, 1, 5) + timedelta(days=7 * i) for i in range(6)]


def distribution(stages: list[str]) -> list[tuple[date, dict[str, int]]]:
    return [(day, {stage: 10 * (n + 1) + i for n, stage in enumerate(stages)}) for i, day in enumerate(WEEKS)]


def matrix(stages: list[str]) -> dict[str, dict[str, int]]:
    return {a: {b: 3 * i + j + 1 for j, b in enumerate(stages)} for i, a in enumerate(stages)}


def revenue(triggers: list[str]) -> dict[str, list[tuple[date, dict[str, int]]]]:
    return {t: [(day, {"EUR": 1000 * (i + 1) * (n + 1), "USD": 777_700}) for i, day in enumerate(WEEKS)]
            for n, t in enumerate(triggers)}


def every_chart(stages: list[str], triggers: list[str]) -> list[str]:
    return [charts.stage_distribution(distribution(stages), stages),
            charts.transition_heatmap(matrix(stages), stages, start=WEEKS[0], end=WEEKS[-1]),
            charts.revenue_over_time(revenue(triggers), "EUR"), charts.revenue_over_time(revenue(triggers), "USD")]


def texts(svg: str) -> list[str]:
    return ["".join(element.itertext()) for element in ET.fromstring(svg).iter(f"{SVG}text")]


@pytest.fixture(scope="module")
def page() -> list[str]:
    """Every chart, as one page shows them."""
    return every_chart(["new", "active", "at_risk"], ["abandoned-cart", "winback"])


@pytest.mark.parametrize("index", range(4), ids=["stages", "transitions", "revenue-EUR", "revenue-USD"])
def test_each_chart_is_one_svg_element_without_prolog_metadata_or_inline_css(page: list[str], index: int) -> None:
    svg = page[index]
    assert svg.startswith("<svg ") and svg.endswith("</svg>")
    assert "<?xml" not in svg and "<!DOCTYPE" not in svg
    root = ET.fromstring(svg)
    tags = {element.tag.removeprefix(SVG) for element in root.iter()}
    assert tags <= {"svg", "g", "path", "rect", "text", "defs", "clipPath", "use"}, tags
    assert not any("style" in element.attrib for element in root.iter())  # presentation attributes instead
    assert root.get("role") == "img" and root.get("aria-label")
    assert root.iter(f"{SVG}path") and len(list(root.iter(f"{SVG}path"))) > 5


def test_the_same_data_gives_the_same_bytes_and_other_data_other_bytes(page: list[str]) -> None:
    assert every_chart(["new", "active", "at_risk"], ["abandoned-cart", "winback"]) == page
    assert charts.stage_distribution(distribution(["new", "lapsed"]), ["new", "lapsed"]) != page[0]
    assert not any(re.search(r"20\d\d-\d\d-\d\dT", svg) for svg in page)  # no date of drawing


def test_names_that_look_like_markup_stay_text() -> None:
    for svg in every_chart(HOSTILE, HOSTILE):
        root = ET.fromstring(svg)  # well-formed, whatever the names
        assert not any(element.tag.removeprefix(SVG) == "script" for element in root.iter())
        assert not any(name.lower().startswith("on") for element in root.iter() for name in element.attrib)
        assert "<script" not in svg and "<b>" not in svg
        shown = texts(svg)
        assert all(name in shown for name in HOSTILE), shown  # as stage names, or as triggers in the legend


def test_ids_are_prefixed_per_chart_and_every_reference_resolves_within_it(page: list[str]) -> None:
    seen: list[str] = []
    for svg in page:
        root = ET.fromstring(svg)
        ids = {element.get("id") for element in root.iter() if element.get("id")}
        references = set(re.findall(r"url\(#([^)]+)\)", svg))
        references |= {element.get(XLINK_HREF, "")[1:] for element in root.iter() if element.get(XLINK_HREF)}
        assert references and references <= ids
        seen += ids
    assert len(seen) == len(set(seen))  # no id twice on a page that shows them all


def test_the_heat_map_writes_every_cell_count_on_a_square_of_rectangles() -> None:
    stages = ["new", "active", "at_risk"]
    counts = matrix(stages)
    svg = charts.transition_heatmap(counts, stages)
    shown = texts(svg)
    for row in counts.values():
        for count in row.values():
            assert f"{count:,}" in shown
    cells = [p for p in ET.fromstring(svg).iter(f"{SVG}path") if p.get("stroke") == "#ffffff"]
    assert len(cells) == len(stages) ** 2


def test_the_heat_map_puts_rows_that_are_no_stage_first_and_keeps_the_rules_order() -> None:
    counts = {"(joined)": {"new": 4, "active": 0}, "active": {"new": 0, "active": 7}, "new": {"new": 1, "active": 2}}
    svg = charts.transition_heatmap(counts, ["new", "active"])
    shown = texts(svg)
    labels = [text for text in shown if text in ("(joined)", "new", "active")]
    assert labels == ["new", "active", "(joined)", "new", "active"]  # columns, then rows from the top
    cells = [p for p in ET.fromstring(svg).iter(f"{SVG}path") if p.get("stroke") == "#ffffff"]
    assert len(cells) == 3 * 2


def test_the_heat_map_shows_a_stage_that_only_appears_as_a_destination() -> None:
    shown = texts(charts.transition_heatmap({"new": {"churned": 4}}, ["new"]))
    assert "churned" in shown and "4" in shown


def test_stage_shares_leave_out_stages_no_one_is_in_and_keep_the_rules_order() -> None:
    points = [(day, {"active": 5, "new": 5, "lapsed": 0}) for day in WEEKS]
    shown = texts(charts.stage_distribution(points, ["new", "lapsed", "active"]))
    assert "lapsed" not in shown
    legend = [text for text in shown if text in ("new", "active")]
    assert legend == ["active", "new"]  # top of the stack first
    assert "100 %" in shown and "2026-01-05" in shown


def test_revenue_is_charted_per_currency_never_summed() -> None:
    series = revenue(["abandoned-cart", "winback"])
    assert charts.currencies(series) == ["EUR", "USD"]
    euro_ticks = [float(t.replace(",", "")) for t in texts(charts.revenue_over_time(series, "EUR"))
                  if re.fullmatch(r"[\d,]+", t)]
    highest_euro = max(cents for buckets in series.values() for _, amounts in buckets for cents in
                       [amounts["EUR"]]) / 100
    assert max(euro_ticks) < highest_euro * 1.5  # the axis is the euros', not euros plus dollars
    dollar_ticks = [float(t.replace(",", "")) for t in texts(charts.revenue_over_time(series, "USD"))
                    if re.fullmatch(r"[\d,]+", t)]
    assert max(dollar_ticks) >= 7_777
    assert charts.currencies({"a": [(WEEKS[0], {"EUR": 0})]}) == []


def test_no_data_gives_a_small_chart_that_says_so() -> None:
    assert "No customers in this period." in texts(charts.stage_distribution([], ["new"]))
    assert "No customers moved in this period." in texts(charts.transition_heatmap({"new": {"new": 0}}))
    assert "No attributed revenue in CHF in this period." in texts(charts.revenue_over_time(revenue(["a"]), "CHF"))


def test_a_style_property_that_is_no_presentation_attribute_is_refused() -> None:
    svg = '<svg xmlns="http://www.w3.org/2000/svg"><path style="behavior: url(x)" d="M 0 0"/></svg>'
    with pytest.raises(charts.ChartError, match="behavior"):
        charts._inline(svg, "x", "x")
