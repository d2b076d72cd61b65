"""The text part derived from a template's HTML: readable, links kept, layout gone."""

import pytest

from flows.content.plaintext import html_to_text


def test_layout_tables_and_their_whitespace_leave_nothing_behind() -> None:
    html = "<table><tr><td>  <p>Hallo</p>  </td></tr><tr><td><a href='https://x.example/u/1'>Abmelden</a></td></tr></table>"
    assert html_to_text(html) == "Hallo\n\n[Abmelden](https://x.example/u/1)\n"


def test_the_head_styles_scripts_and_comments_are_not_text() -> None:
    html = ("<html><head><title>Betreff</title><style>p{color:red}</style></head>"
            "<body><!-- note --><script>alert(1)</script><p>Inhalt</p></body></html>")
    assert html_to_text(html) == "Inhalt\n"


def test_paragraphs_are_separated_by_one_blank_line_and_br_breaks_a_line() -> None:
    html = "<h1>Willkommen</h1><p>Erste   Zeile<br>zweite\n Zeile</p><p></p><p>Ende</p>"
    assert html_to_text(html) == "Willkommen\n\nErste Zeile\nzweite Zeile\n\nEnde\n"


def test_table_rows_are_lines_and_cells_stand_two_spaces_apart() -> None:
    html = ("<table><tr><td><a href='https://shop.example/p/1'>Schuh</a></td> <td>1 × 129,90 €</td></tr>"
            "<tr><td><strong>Summe</strong></td><td>129,90 €</td></tr></table>")
    assert html_to_text(html) == "[Schuh](https://shop.example/p/1)  1 × 129,90 €\nSumme  129,90 €\n"


def test_list_items_get_a_dash() -> None:
    assert html_to_text("<ul><li>Merkliste</li><li>Versand <em>gratis</em></li></ul>") == \
        "- Merkliste\n- Versand gratis\n"


@pytest.mark.parametrize(("html", "expected"), [
    ("<a href='https://shop.example'>https://shop.example</a>", "https://shop.example\n"),  # not twice
    ("<a href='https://shop.example'><img src='logo.png' alt='Unser Shop'></a>", "[Unser Shop](https://shop.example)\n"),
    ("<a href='https://shop.example'></a>", "https://shop.example\n"),
    ("<a href='#top'>nach oben</a>", "nach oben\n"),
    ("<a>ohne Ziel</a>", "ohne Ziel\n"),
])
def test_links_keep_their_target(html: str, expected: str) -> None:
    assert html_to_text(html) == expected


def test_entities_are_decoded_and_text_is_not_escaped() -> None:
    assert html_to_text("<p>Tom &amp; Jerry &lt;3 &#8364;</p>") == "Tom & Jerry <3 €\n"


def test_empty_html_gives_an_empty_text_part() -> None:
    assert html_to_text("") == "\n"
    assert html_to_text("<p> </p>") == "\n"
