"""The documentation: the site builds with ``--strict``, and every code block in README.md and docs/ runs or is checked.

How a fenced code block is tested
---------------------------------
Blocks are read from README.md and docs/**/*.md in page order. A ``--8<-- "path"`` line (pymdownx.snippets)
is replaced by that file, as the site does, so a block that includes ``configs/multimnist/shared.yaml`` is
tested as that config; README.md is tested once, as itself (docs/index.md only includes it).

Each page gets a fresh working directory holding ``configs/`` (a link to the repository's) and the teachers'
checkpoints ``checkpoints/multimnist/teacher{,_left,_right}.ckpt``, trained once per session by the documented
commands (``lightning-mtkd fit --config configs/multimnist/teacher*.yaml``, cut short as below). A page's blocks
run there in page order, so a page may build on its earlier blocks (fit, then test, then export).

- ``python``: executed. The python blocks of a page share one fresh namespace (``__name__ == "__main__"``).
  The code is the page's own; only the length of training is cut: while a block runs, ``lightning.Trainer``
  is constructed with FAST_TRAINER on top of the page's arguments (one epoch of two batches, one
  validation / test / predict batch, no sanity check). That is the one test-only substitution.
- ``bash``: every command line (``\\`` continuations joined, ``#`` comments dropped, ``VAR=value`` prefixes
  set in the environment while it runs):

  - ``lightning-mtkd fit|validate|test|predict ...``: run in this process through ``lightning_mtkd.cli.main``
    (what the ``lightning-mtkd`` script calls), with FAST_CLI appended (the same cut as above);
    ``--print_config`` runs print the config and stop;
  - ``lightning-mtkd export ...``: run;
  - ``make [VAR=value] target``: the target (and the variable) exist in the Makefile;
  - ``pip install ...``: each extra named exists in pyproject.toml, each package is one of its dependencies;
  - ``python script.py --flag ...``, ``python -m module --flag ...`` (any python executable): the script or
    module exists and defines each ``--flag`` (in its source, or in ``benchmarks/_common.py`` that it imports).

  Any other command fails the test.
- ``yaml``: parsed and instantiated by the CLI (``main([...], run=False)``): a config with ``model`` and
  ``data`` on its own; a fragment on top of ``configs/multimnist/shared.yaml``, the way fragments are used
  (``--config run.yaml --config fragment.yaml``).
- any other language fails the test.

Markers: an HTML comment on the line right before the fence.

- ``<!-- not-run: why -->``: nothing runs; the reason is required (needs a cluster, an account, a directory
  listing that is not code).
- ``<!-- parse-only: why -->`` (bash only): each ``lightning-mtkd`` command is parsed and its objects built
  (``run=False``), not run — for commands that read data files the repository does not hold.

The whole file takes about two minutes on two CPU cores.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch import Trainer

from lightning_mtkd.cli import main

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

#: Added to every Trainer a python block builds: the page's own code, trained for a moment.
FAST_TRAINER: dict[str, Any] = {
    "max_epochs": 1,
    "max_steps": -1,
    "limit_train_batches": 2,
    "limit_val_batches": 1,
    "limit_test_batches": 1,
    "limit_predict_batches": 1,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
#: Appended to every `lightning-mtkd <subcommand>` a bash block runs (the same cut, as CLI options).
FAST_CLI = [
    "--trainer.max_epochs=1",
    "--trainer.max_steps=-1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--report.latency_repeats=1",
    "--report.latency_warmup=0",
]
TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")
TEACHERS = ("teacher", "teacher_left", "teacher_right")
FRAGMENT_BASE = ROOT / "configs" / "multimnist" / "shared.yaml"

FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*(?P<kind>not-run|parse-only):\s*(?P<reason>.*?)\s*-->$")
SNIPPET = re.compile(r'^\s*--8<--\s+"(?P<path>[^"]+)"\s*$')
HANDLED = ("python", "yaml", "bash")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None = None
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def expand_snippets(lines: list[str]) -> list[str]:
    """Replace ``--8<-- "path"`` lines by the file's lines (``path:start:end`` ranges as pymdownx reads them)."""
    out: list[str] = []
    for line in lines:
        match = SNIPPET.match(line)
        if not match:
            out.append(line)
            continue
        spec = match.group("path")
        path, _, span = spec.partition(":")
        if path == "README.md":  # the front page: README.md is tested as itself
            continue
        text = (ROOT / path).read_text(encoding="utf-8").splitlines()
        if span:
            start, _, end = span.partition(":")
            text = text[int(start) - 1 if start else 0 : int(end) if end else None]
        out.extend(text)
    return out


def read_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, in order, with the marker on the line before each."""
    lines = expand_snippets(page.read_text(encoding="utf-8").splitlines())
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, start = match.group("fence"), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (lines[i].startswith(fence) and not lines[i].strip(fence[0]).strip()):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{start + 1}: code block never closed")
        code = "\n".join(expand_snippets(body)) + "\n"
        marker = MARKER.match(lines[start - 1].strip()) if start else None
        blocks.append(
            Block(
                page,
                start + 1,
                match.group("lang"),
                code,
                marker.group("kind") if marker else None,
                marker.group("reason") if marker else "",
            )
        )
        i += 1
    return blocks


def problem(block: Block) -> str | None:
    """Why the test cannot handle ``block`` (None when it can)."""
    if block.marker and not block.reason:
        return f"{block.where}: <!-- {block.marker}: ... --> needs a reason"
    if block.marker == "not-run":
        return None
    if block.lang not in HANDLED:
        return f"{block.where}: a ```{block.lang or '(no language)'} block: use python, yaml or bash, or mark it"
    if block.marker == "parse-only" and block.lang != "bash":
        return f"{block.where}: parse-only applies to bash blocks of lightning-mtkd commands"
    return None


ALL_BLOCKS = {page: read_blocks(page) for page in PAGES}


# ------------------------------------------------------------------------------------------------ the site
def test_site_builds_strict(tmp_path):
    """mkdocs --strict: broken links and anchors, missing references, pages left out of the nav all fail."""
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    front = (site / "index.html").read_text(encoding="utf-8")
    assert "Six strategies" in front and 'href="getting-started/"' in front  # README, its links made site-relative
    assert (site / "benchmarks" / "results" / "quality-multimnist.png").is_file()
    benchmarks = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert "scratch-per-task" in benchmarks  # benchmarks/results/quality-multimnist.md, included
    api = (site / "api" / "strategies" / "index.html").read_text(encoding="utf-8")
    assert 'id="lightning_mtkd.SharedDistiller"' in api and 'class="arithmatex"' in api
    # reST simple tables and footnotes in module docstrings come out as Markdown tables (docs/_hooks/griffe_rst.py)
    base = (site / "api" / "base" / "index.html").read_text(encoding="utf-8")
    assert re.search(r"<td><code>configure_extra_modules</code></td>", base)  # the strategy-hook table
    losses = (site / "api" / "tasks" / "index.html").read_text(encoding="utf-8")
    assert re.search(r"<td><code>dkd_loss</code> \(needs labels\)</td>", losses) and 'class="footnote' in losses


def test_readme_is_the_short_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; keep it the short front page (≤ 200)"
    assert '--8<-- "README.md"' in (ROOT / "docs" / "index.md").read_text(encoding="utf-8")


def test_every_code_block_is_run_checked_or_marked():
    blocks = [block for page_blocks in ALL_BLOCKS.values() for block in page_blocks]
    assert len(blocks) > 40
    problems = [p for p in map(problem, blocks) if p]
    assert not problems, "\n".join(problems)


def test_the_scheme_refuses_what_it_cannot_check(monkeypatch):
    page = ROOT / "docs" / "example.md"
    assert problem(Block(page, 1, "text", "a listing\n")) is not None  # unmarked, unknown language
    assert problem(Block(page, 1, "", "anything\n")) is not None  # no language at all
    assert problem(Block(page, 1, "bash", "srun x\n", "not-run", "")) is not None  # a marker without a reason
    assert problem(Block(page, 1, "python", "x = 1\n", "parse-only", "why")) is not None
    assert problem(Block(page, 1, "text", "a listing\n", "not-run", "a listing")) is None
    with pytest.raises(AssertionError, match="no rule for this command"):
        run_bash(Block(page, 1, "bash", "wandb sync wandb/offline-run-*\n"), monkeypatch)
    with pytest.raises(AssertionError, match="no such target"):
        run_bash(Block(page, 1, "bash", "make no-such-target\n"), monkeypatch)
    with pytest.raises(AssertionError, match="not an option"):
        run_bash(Block(page, 1, "bash", "python benchmarks/quality.py --no-such-flag\n"), monkeypatch)
    with pytest.raises(AssertionError, match="no extra"):
        run_bash(Block(page, 1, "bash", 'pip install -e ".[no-such-extra]"\n'), monkeypatch)


# ------------------------------------------------------------------------------------------------ running them
@contextlib.contextmanager
def fast_trainer() -> Iterator[None]:
    """``Trainer(...)`` gets FAST_TRAINER on top of its arguments while the block runs."""
    original = Trainer.__init__

    @functools.wraps(original)
    def init(self: Trainer, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **{**kwargs, **FAST_TRAINER})

    Trainer.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        Trainer.__init__ = original  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def teachers(tmp_path_factory) -> Path:
    """``checkpoints/multimnist/teacher*.ckpt``, trained by the documented commands (cut short)."""
    root = tmp_path_factory.mktemp("teachers")
    (root / "configs").symlink_to(ROOT / "configs")
    here = os.getcwd()
    os.chdir(root)
    try:
        for name in TEACHERS:
            main(["fit", "--config", f"configs/multimnist/{name}.yaml", *FAST_CLI])
    finally:
        os.chdir(here)
    return root / "checkpoints"


def run_cli(words: list[str], parse_only: bool) -> None:
    if words and words[0] == "export":
        main(words)
        return
    assert words and words[0] in TRAINER_SUBCOMMANDS, f"unknown subcommand in lightning-mtkd {' '.join(words)}"
    if parse_only:
        main(words[1:], run=False)
        return
    try:
        main([*words, *FAST_CLI])
    except SystemExit as stop:  # --print_config, --help: print, then exit 0
        assert stop.code in (0, None), f"lightning-mtkd {' '.join(words)} exited with {stop.code}"


def makefile_names() -> tuple[set[str], str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([\w.-]+):", text, flags=re.M)), text


def check_make(words: list[str]) -> None:
    targets, text = makefile_names()
    for word in words:
        if "=" in word:
            variable = word.split("=", 1)[0]
            assert re.search(rf"\b{variable}\b", text), f"make {word}: no variable {variable} in the Makefile"
        else:
            assert word in targets, f"make {word}: no such target in the Makefile ({sorted(targets)})"


def check_pip(words: list[str]) -> None:
    assert words[:1] == ["install"], f"pip {' '.join(words)}: only `pip install` is checked"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    requirements = [*project["dependencies"], *(r for group in extras.values() for r in group)]
    known = {re.split(r"[\[<>=!~ ]", r, maxsplit=1)[0].lower() for r in requirements}
    for word in words[1:]:
        if word.startswith("-"):
            continue
        name, _, extra = word.partition("[")
        if name in (".", "lightning-mtkd", project["name"]):
            for wanted in filter(None, extra.rstrip("]").split(",")):
                assert wanted.strip() in extras, f"pip install {word}: no extra {wanted!r} in pyproject.toml"
        else:
            assert re.split(r"[<>=!~]", name)[0].lower() in known, f"pip install {word}: not a dependency"


def check_python(words: list[str]) -> None:
    if words[0] == "-m":
        spec = importlib.util.find_spec(words[1])
        assert spec is not None and spec.origin, f"python -m {words[1]}: no such module"
        sources = [Path(spec.origin)]
        flags = words[2:]
    else:
        script = ROOT / words[0]
        assert script.is_file(), f"python {words[0]}: no such script"
        sources = [script]
        if re.search(r"^import _common", script.read_text(encoding="utf-8"), flags=re.M):
            sources.append(script.parent / "_common.py")
        flags = words[1:]
    text = "\n".join(source.read_text(encoding="utf-8") for source in sources)
    for flag in (word.split("=", 1)[0] for word in flags if word.startswith("--")):
        assert f'"{flag}"' in text, f"python {' '.join(words)}: {flag} is not an option of {sources[0].name}"


def shell_commands(code: str) -> Iterator[tuple[str, dict[str, str], list[str]]]:
    """``(line, environment, words)`` per command line of a bash block."""
    for line in re.sub(r"\\\n\s*", " ", code).splitlines():
        words = shlex.split(line, comments=True)
        env = {}
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if words:
            yield line.strip(), env, words


def finish_wandb_run() -> None:
    """End a W&B run a block started: a later WandbLogger in this process would otherwise join it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def run_bash(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    for line, env, words in shell_commands(block.code):
        program, args = words[0], words[1:]
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            try:
                if program == "lightning-mtkd":
                    run_cli(args, parse_only=block.marker == "parse-only")
                elif program == "make":
                    check_make(args)
                elif program == "pip":
                    check_pip(args)
                elif program == "python" or program.endswith("/python"):
                    check_python(args)
                else:
                    raise AssertionError("no rule for this command: mark the block <!-- not-run: why --> or add one")
            except BaseException as error:
                raise AssertionError(f"{block.where}: `{line}` failed: {error!r}") from error
            finally:
                finish_wandb_run()  # each command line is its own process in a shell


def check_yaml(block: Block, directory: Path) -> None:
    config = yaml.safe_load(block.code)
    assert isinstance(config, dict), f"{block.where}: a YAML block must be a (partial) LightningCLI config"
    path = directory / f"block-{block.line}.yaml"
    path.write_text(block.code, encoding="utf-8")
    configs = [path] if {"model", "data"} <= set(config) else [FRAGMENT_BASE, path]
    try:
        cli = main([arg for config_path in configs for arg in ("--config", str(config_path))], run=False)
    except BaseException as error:
        raise AssertionError(f"{block.where}: the YAML does not parse or build: {error!r}") from error
    model = config.get("model", {})
    if "class_path" in model:
        assert type(cli.model).__name__ == model["class_path"].rsplit(".", 1)[-1], block.where


def run_python(block: Block, namespace: dict[str, Any]) -> None:
    try:
        with fast_trainer():
            exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102 - the page's own example
    except BaseException as error:
        raise AssertionError(f"{block.where}: the python block failed: {error!r}") from error


@pytest.mark.parametrize(
    "page",
    [page for page, blocks in ALL_BLOCKS.items() if any(b.marker != "not-run" for b in blocks)],
    ids=lambda page: str(page.relative_to(ROOT)),
)
def test_page_code_blocks_run(page, teachers, tmp_path, monkeypatch):
    blocks = [block for block in ALL_BLOCKS[page] if block.marker != "not-run"]
    assert not [p for p in map(problem, blocks) if p]
    shutil.copytree(teachers, tmp_path / "checkpoints")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    namespace: dict[str, Any] = {"__name__": "__main__"}
    try:
        for block in blocks:
            if block.lang == "python":
                run_python(block, namespace)
            elif block.lang == "bash":
                run_bash(block, monkeypatch)
            else:
                check_yaml(block, tmp_path)
    finally:
        finish_wandb_run()
