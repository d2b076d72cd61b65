"""A rendered mail's links, rewritten to tracked ones: ``LIFECYCLE_BASE_URL/c/TOKEN``.

Pure: the caller says which links are ours and must stay (unsubscribe, preferences,
confirmation), and how a position becomes a URL. Each distinct destination gets one
position, in order of first appearance, so the same link twice is one link in reports.
Only ``http(s)`` links in ``<a href>`` are tracked; ``mailto:``, ``tel:`` and anchors are
left alone. The text part gets the same tracked URLs wherever it shows a destination.
"""

import html
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from urllib.parse import urlsplit

from flows.content.links import MAX_TRACKED_LINKS
from flows.content.render import Rendered

# An anchor's href, quoted either way (our renderer and css-inline write double quotes).
_HREF = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)
# Where a destination shown in text ends: not where the URL goes on (a sentence's full stop may follow).
_URL_ENDS = r"(?![\w/?#&=%~+-]|\.\w)"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


def on_hosts(url: str, hosts: Collection[str]) -> bool:
    """Whether ``url`` goes to one of ``hosts`` or a subdomain of one (``www.shop.example``)."""
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return False
    return any(host == h or host.endswith("." + h) for h in hosts)


def _trackable(url: str, kept: Sequence[str]) -> bool:
    lowered = url[:8].lower()
    if _CONTROL.search(url):  # no header carries them (Location), and the ledger keeps one per line
        return False
    if not (lowered.startswith("https://") or lowered.startswith("http://")):
        return False
    return not any(url.startswith(prefix) for prefix in kept)


def track_links(rendered: Rendered, kept: Sequence[str], tracked_url: Callable[[int], str],
                hosts: Collection[str] | None = None) -> tuple[Rendered, list[str]]:
    """The mail with its links rewritten, and the destinations by position. ``kept``: URL
    prefixes never rewritten (our own token pages). ``hosts``: only links to these (and their
    subdomains) are tracked; a link elsewhere, say a product URL from the shop's event data,
    goes straight to its destination, so our domain never redirects to one we do not know."""
    destinations: list[str] = []
    positions: dict[str, int] = {}

    def position(url: str) -> int | None:
        found = positions.get(url)
        if found is None and len(destinations) < MAX_TRACKED_LINKS:
            found = positions[url] = len(destinations)
            destinations.append(url)
        return found

    def swap(match: re.Match[str]) -> str:
        raw = match.group(2) if match.group(2) is not None else match.group(3)
        url = html.unescape(raw).strip()
        if not _trackable(url, kept) or (hosts is not None and not on_hosts(url, hosts)):
            return match.group(0)
        n = position(url)
        if n is None:
            return match.group(0)
        return f'{match.group(1)}"{tracked_url(n)}"'

    body = _HREF.sub(swap, rendered.html)
    if not destinations:
        return rendered, []
    text = rendered.text
    # Longest first, so a destination that is a prefix of another does not break it.
    for url in sorted(destinations, key=len, reverse=True):
        if url in text:
            text = re.sub(re.escape(url) + _URL_ENDS, tracked_url(positions[url]).replace("\\", r"\\"), text)
    return replace(rendered, html=body, text=text), destinations


def add_pixel(rendered: Rendered, pixel_url: str) -> Rendered:
    """A 1×1 image before ``</body>`` (or at the end): the open pixel, when opens are on."""
    tag = f'<img src="{html.escape(pixel_url)}" width="1" height="1" alt="" style="display:block;border:0">'
    body, found = _BODY_END.subn(lambda m: tag + m.group(0), rendered.html, count=1)
    return replace(rendered, html=body if found else rendered.html + tag)
