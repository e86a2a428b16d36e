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
  → one entry per parameter, each with the shared description (griffe expects one name per entry).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_GROUPED_ARG = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+):(\s.*)?$")
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")


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


def rst_to_markdown(text: str) -> str:
    """The docstring ``text`` with its reST constructs rewritten as Markdown (see the module docstring)."""
    lines = _split_grouped_args(text.split("\n"))
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
