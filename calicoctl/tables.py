"""The two table layouts calicoctl prints, reproduced so scripts that parse them work.

`column_table`: `get` (Go's tabwriter: minimum width 5, padding 3; every cell is padded,
the last too, and a blank line ends the table).
`box_table`: `ipam show` (olekukonko/tablewriter: centred headers, numbers right-aligned,
everything else left-aligned).
"""

from __future__ import annotations

import re

_MIN_WIDTH = 5
_PADDING = 3
# tablewriter's notion of a number, which it right-aligns.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})*|\d+)(?:\.\d+)?")


def _widths(headers: list[str], rows: list[list[str]]) -> list[int]:
    return [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]


def column_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(w + _PADDING, _MIN_WIDTH) for w in _widths(headers, rows)]
    lines = [
        "".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [headers, *rows]
    ]
    return "\n".join(lines) + "\n\n"


def _centred(text: str, width: int) -> str:
    left = (width - len(text)) // 2
    return " " * left + text + " " * (width - len(text) - left)


def _aligned(text: str, width: int) -> str:
    return text.rjust(width) if _NUMBER.fullmatch(text) else text.ljust(width)


def box_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = _widths(headers, rows)
    border = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    out = [border, line([_centred(h, w) for h, w in zip(headers, widths, strict=True)]), border]
    out += [line([_aligned(c, w) for c, w in zip(row, widths, strict=True)]) for row in rows]
    out.append(border)
    return "\n".join(out) + "\n"
