"""Griffe extension for the API pages: the reST bits of our Google-style docstrings, as Markdown.

The package's docstrings are Google style but use a few reST constructs (they read well in an IDE and
in ``help()``). mkdocstrings renders docstrings as Markdown, so, for the site only (the source is not
touched), this rewrites each docstring before it is parsed:

- ``.. math::`` + an indented block  →  a ``$$ … $$`` block (rendered by ``pymdownx.arithmatex``);
- ``:math:`x```  →  ``$x$``;
- ``:class:`~a.b.C```, ``:func:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:``  →  a code span (``C``);
- a paragraph ending in ``::`` + an indented literal block  →  the paragraph ending in ``:`` and a fenced
  code block (``yaml`` when it looks like a config, ``bash`` for a command line, else ``text``);
- ``Example:`` → ``Examples:``, the Google section griffe renders as code (it reads ``Example:`` as an
  admonition, and the doctest's ``>>>`` as nested quotes);
- an ``Args:`` entry that documents several parameters at once (``min_weight, max_weight: The bounds``)
  → one entry per parameter, each with the shared description (griffe expects one name per entry);
- a reST *simple table* (``====  ====`` borders, a header, continuation lines whose first column is
  blank) → a Markdown table;
- footnotes: ``[1]_`` → ``[^1]`` and ``.. [1] text`` → ``[^1]: text`` (the ``footnotes`` extension).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_GROUPED_ARG = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+):(\s.*)?$")
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_TABLE_BORDER = re.compile(r"^\s*=+(\s{2,}=+)+\s*$")
_FOOTNOTE_REF = re.compile(r"\[(\d+|#\w*)\]_")
_FOOTNOTE = re.compile(r"^(\s*)\.\. \[(\d+|#\w*)\]\s+(.*)$")
_CELL_GAP = re.compile(r"\s{2,}")


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _language(block: list[str]) -> str:
    text = "\n".join(block).strip()
    if text.startswith(("lightning-mtkd", "python ", "make ", "pip ")):
        return "bash"
    if re.match(r"^[\w.-]+:(\s|$)", text) or text.startswith("- "):
        return "yaml"
    return "text"


def _split_grouped_args(lines: list[str]) -> list[str]:
    """Inside ``Args:`` sections, one entry per parameter name (see the module docstring)."""
    out: list[str] = []
    section: int | None = None  # indent of the current "Args:" header, while inside it
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() in ("Args:", "Arguments:", "Parameters:"):
            section = _indent(line)
        elif section is not None and line.strip() and _indent(line) <= section:
            section = None
        match = _GROUPED_ARG.match(line) if section is not None else None
        if not match:
            out.append(line)
            i += 1
            continue
        indent, names, rest = match.group(1), match.group(2), match.group(3) or ""
        j = i + 1
        while j < len(lines) and lines[j].strip() and _indent(lines[j]) > len(indent):
            j += 1
        for name in (n.strip() for n in names.split(",")):
            out += [f"{indent}{name}:{rest}", *lines[i + 1 : j]]
        i = j
    return out


def _cells(line: str, starts: list[int]) -> list[str]:
    """The text of ``line`` per column: each run of text (split at 2+ spaces) goes to the column it starts in.

    A run may start up to two characters before its column (inside the gap between the borders), which
    reST would refuse but a reader sees as aligned.
    """
    cells = [""] * len(starts)
    position = 0
    for chunk in _CELL_GAP.split(line.rstrip()):
        at = line.index(chunk, position) if chunk else position
        position = at + len(chunk)
        if not chunk.strip():
            continue
        column = max(i for i, start in enumerate(starts) if start - 2 <= at or i == 0)
        cells[column] = f"{cells[column]} {chunk.strip()}".strip()
    return cells


def _simple_tables(lines: list[str]) -> list[str]:
    """reST simple tables → Markdown tables (see the module docstring)."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not _TABLE_BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        border = lines[i]
        starts = [match.start() for match in re.finditer(r"=+", border)]
        borders = [i]
        j = i + 1
        while j < len(lines) and len(borders) < 3:
            if lines[j].strip() == border.strip():
                borders.append(j)
            elif not lines[j].strip() and len(borders) < 3 and j + 1 < len(lines) and not lines[j + 1].strip():
                break  # two blank lines: not a table after all
            j += 1
        if len(borders) < 3:
            out.append(lines[i])
            i += 1
            continue
        header = [""] * len(starts)
        for line in lines[borders[0] + 1 : borders[1]]:
            header = [f"{a} {b}".strip() for a, b in zip(header, _cells(line, starts), strict=True)]
        rows: list[list[str]] = []
        for line in lines[borders[1] + 1 : borders[2]]:
            if not line.strip():
                continue
            cells = _cells(line, starts)
            if rows and not cells[0]:  # a continuation line
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
            else:
                rows.append(cells)
        pad = " " * _indent(border)
        out += ["", *(pad + "| " + " | ".join(row) + " |" for row in [header, ["---"] * len(starts), *rows]), ""]
        i = borders[2] + 1
    return out


def _footnotes(lines: list[str]) -> list[str]:
    """``.. [1] text`` (with its indented continuation) → ``[^1]: text``; ``[1]_`` → ``[^1]``."""
    out: list[str] = []
    note: int | None = None  # indent of the footnote being continued, if any
    for line in lines:
        match = _FOOTNOTE.match(line)
        if match:
            indent, label, text = match.groups()
            note = len(indent)
            out.append(f"{indent}[^{label}]: {text}")
        elif note is not None and line.strip() and _indent(line) > note:
            out.append(" " * (note + 4) + line.strip())  # Markdown continues a footnote by 4 spaces
        else:
            note = None if line.strip() else note
            out.append(line)
    return [_FOOTNOTE_REF.sub(lambda m: f"[^{m.group(1)}]", line) for line in out]


def rst_to_markdown(text: str) -> str:
    """The docstring ``text`` with its reST constructs rewritten as Markdown (see the module docstring)."""
    lines = _footnotes(_simple_tables(_split_grouped_args(text.split("\n"))))
    lines = ["Examples:" if line.strip() == "Example:" and not _indent(line) else line for line in lines]
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        is_math = stripped == ".. math::"
        is_literal = stripped.endswith("::") and not is_math and not stripped.startswith("..")
        if not (is_math or is_literal):
            out.append(line)
            i += 1
            continue
        base = _indent(line)
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block: list[str] = []
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
        if not block:  # "::" with nothing indented below: leave the line alone
            out.append(line)
            i += 1
            continue
        depth = min(_indent(b) for b in block if b.strip())
        body = [" " * base + b[depth:] if b.strip() else "" for b in block]
        pad = " " * base
        if is_math:
            out += [f"{pad}$$", *body, f"{pad}$$"]
        else:
            intro = line.rstrip()[:-2].rstrip()
            if intro.strip():
                out += [f"{intro}:", ""]
            out += [f"{pad}```{_language(block)}", *body, f"{pad}```"]
        out.append("")
        i = j
    text = "\n".join(out)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    return _ROLE.sub(_role, text)


class ReSTToMarkdown(griffe.Extension):
    """Rewrites every docstring with :func:`rst_to_markdown` as objects are loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
