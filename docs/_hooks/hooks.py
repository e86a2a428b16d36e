"""MkDocs hooks: README.md is the site's front page, and result images outside docs/ are published.

- ``docs/index.md`` holds one snippet line, ``--8<-- "README.md"``. This hook replaces that line with
  README.md itself and rewrites README's links into ``docs/`` (``docs/cli.md`` → ``cli.md``), so the
  same file reads right on GitHub (from the repository root) and on the site (from the docs root).
- The figures that README and the benchmark pages show (``benchmarks/results/*.png``) live beside the
  results they plot, outside ``docs/``; they are added to the site at the same relative path, so
  ``benchmarks/results/quality-multimnist.png`` resolves from README on GitHub and from the site's front page.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRONT_PAGE = '--8<-- "README.md"'
PUBLISHED = ["benchmarks/results/*.png"]


def readme_for_site() -> str:
    """README.md with its links into ``docs/`` made relative to the docs root."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files: Files, config: Any) -> Files:
    for pattern in PUBLISHED:
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            relative = os.path.relpath(path, ROOT).replace(os.sep, "/")
            files.append(File(relative, src_dir=ROOT, dest_dir=config["site_dir"], use_directory_urls=False))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri == "index.md" and FRONT_PAGE in markdown:
        return markdown.replace(FRONT_PAGE, readme_for_site())
    return markdown
