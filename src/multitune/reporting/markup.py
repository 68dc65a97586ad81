"""Small HTML builders for the report: escaped text, tables, embedded figures, collapsible blocks."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from multitune.errors import printable


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A cell: integers with thousands separators, floats with four decimals (or scientific when tiny)."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.2f}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    """A table; numeric cells are right-aligned. Cells are escaped (HTML, and control characters shown as
    ``\\x1b``, see :func:`~multitune.errors.printable`) unless they are :class:`Raw`."""
    head = "".join(f"<th>{esc(printable(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            text = str(cell) if isinstance(cell, Raw) else esc(printable(fmt(cell)))
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    cls_attr = f' class="{esc(cls)}"' if cls else ""
    return f"<table{cls_attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Raw(str):
    """Markup that a table cell takes as it is."""


def figure(path: Path, caption: str, figure_id: str) -> str:
    """The PNG at ``path`` embedded as base64 (the page needs no other file), with a caption."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = printable(caption)
    return (f'<figure id="{esc(figure_id)}"><img src="data:image/png;base64,{data}" alt="{esc(caption)}" '
            f'data-file="{esc(path.parent.name)}/{esc(path.name)}"><figcaption>{esc(caption)}</figcaption></figure>')


def details(summary: str, inner: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{inner}</details>"


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def para(text: str) -> str:
    """A paragraph of plain text (escaped)."""
    return f"<p>{esc(text)}</p>"
