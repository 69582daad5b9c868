"""Small HTML builders for the report: every text goes through ``esc``; only these helpers emit markup.

The page is static: inline CSS, images as data URIs, collapsible parts as ``<details>``; no script, no link
to any other file or host, so it opens the same from a laptop, a mail attachment or an offline cluster.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

CSS = """
:root { --fg: #1d2330; --muted: #5b6472; --line: #dde1e8; --bg: #f6f7f9; --ok: #1a7f37; --bad: #b42318; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header { background: #1d2330; color: #fff; padding: 24px 32px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 0; color: #c5cad3; }
nav { padding: 10px 32px; background: #fff; border-bottom: 1px solid var(--line); position: sticky; top: 0; }
nav a { margin-right: 18px; color: #2456c7; text-decoration: none; white-space: nowrap; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 24px 48px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px 24px 20px;
          margin: 20px 0; }
h2 { font-size: 21px; border-bottom: 1px solid var(--line); padding-bottom: 6px; }
h3 { font-size: 16px; margin: 20px 0 8px; }
p.hint { color: var(--muted); margin: 4px 0 12px; }
p.note { color: #7a4d00; background: #fff7e6; border-left: 4px solid #f0a020; padding: 8px 12px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { padding: 4px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #eef1f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; }
figure.artefact img { min-width: 256px; image-rendering: pixelated; }
.query { margin: 14px 0 22px; }
.query .text { font-weight: 600; margin-bottom: 6px; }
.hits { display: flex; gap: 10px; flex-wrap: wrap; }
.hit { width: 104px; text-align: center; font-size: 12px; color: var(--muted); }
.hit img { width: 96px; height: 96px; object-fit: contain; background: #fff; border: 3px solid var(--line);
           border-radius: 6px; image-rendering: pixelated; }
.hit.ok img { border-color: var(--ok); }
.hit.ok .mark { color: var(--ok); font-weight: 700; }
details { margin: 8px 0; }
pre { background: var(--bg); padding: 12px; overflow-x: auto; font-size: 13px; }
"""


@dataclass
class Section:
    anchor: str
    title: str
    body: str


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _attrs(attrs: dict[str, object]) -> str:
    """Escaped attributes; a trailing underscore in a name is dropped (``class_`` -> ``class``)."""
    return "".join(f' {key.rstrip("_")}="{esc(value)}"' for key, value in attrs.items())


def tag(name: str, body: str = "", **attrs: object) -> str:
    """``<name attrs>body</name>``; ``body`` is markup from these helpers."""
    return f"<{name}{_attrs(attrs)}>{body}</{name}>"


def text(name: str, content: object, **attrs: object) -> str:
    return tag(name, esc(content), **attrs)


def img(uri: str, alt: str, **attrs: object) -> str:
    return f'<img src="{esc(uri)}" alt="{esc(alt)}"{_attrs(attrs)}>'


def figure(uri: str, caption: str) -> str:
    """An image named by its caption; small images (16 px patches, 64 px heatmaps) are shown enlarged."""
    return tag("figure", img(uri, caption) + text("figcaption", caption), class_="artefact")


def plot(uri: str, alt: str) -> str:
    """A figure whose title is drawn in the image itself, so it needs no caption."""
    return tag("figure", img(uri, alt))


def grid(items: Sequence[str]) -> str:
    return tag("div", "".join(items), class_="grid")


def hint(message: str) -> str:
    """A sentence on how to read what follows."""
    return text("p", message, class_="hint")


def not_computed(what: str, how: str) -> str:
    """The visible placeholder of a missing part: what is missing and the command or file that provides it."""
    return tag("p", tag("strong", "Not computed:") + " " + esc(what) + ". " + esc(how), class_="note")


def table(header: Sequence[str] | None, rows: Sequence[Sequence[object]]) -> str:
    """Numbers are right-aligned; everything else is escaped text. ``header`` None: a key/value table."""

    def cell(value: object) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return text("td", number(value), class_="num")
        return text("td", value)

    head = tag("thead", tag("tr", "".join(text("th", h) for h in header))) if header else ""
    body = "".join(tag("tr", "".join(cell(v) for v in row)) for row in rows)
    return tag("table", head + tag("tbody", body))


def number(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def details(summary: str, body: str) -> str:
    return tag("details", text("summary", summary) + body)


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    nav = "".join(text("a", s.title, href=f"#{s.anchor}") for s in sections)
    content = "".join(tag("section", text("h2", s.title) + s.body, id=s.anchor) for s in sections)
    return (
        "<!DOCTYPE html>\n"
        + '<html lang="en"><head><meta charset="utf-8">'
        + '<meta name="viewport" content="width=device-width, initial-scale=1">'
        + text("title", title)
        + tag("style", CSS)
        + "</head><body>"
        + tag("header", text("h1", title) + text("p", subtitle))
        + tag("nav", nav)
        + tag("main", content)
        + "</body></html>\n"
    )
