"""The documentation stays true: every relative link in README.md, ARCHITECTURE.md and docs/*.md points to a file
(and heading) that exists, every `mllm <command> [<action>] --option` quoted in them is one the CLI accepts, and
every script, recipe or DeepSpeed config they name is in the repository."""

from __future__ import annotations

import argparse
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

from mllm.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`]+)`")  # a span may wrap onto the next line
REPO_PATH = re.compile(r"(?<![\w./-])((?:scripts|data_recipes|zero_configs|docs)/[\w.*-]+)")
TRAIN_SCRIPT = re.compile(r"scripts/(?:pretrain|finetune)\.py(.*)")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def split_fences(text: str) -> tuple[list[str], list[str]]:
    """Markdown text → (prose lines, lines inside ``` code fences)."""
    prose, code, inside = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
        elif inside:
            code.append(line)
        else:
            prose.append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces → hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> set[str]:
    """Every heading anchor of a markdown page (repeated headings get -1, -2, … as on GitHub)."""
    prose, _ = split_fences(page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"^#{1,6} (.+)$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """The relative links of `page` whose file or heading does not exist, each with why."""
    prose, _ = split_fences(page.read_text())
    bad = []
    for target in LINK.findall("\n".join(prose)):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


def quoted_commands(text: str) -> list[str]:
    """Every `mllm …` command line the page quotes: in code fences (a line or a `&&`/`;` segment starting with
    `mllm `, backslash continuations joined, comments cut) and in inline code spans starting with `mllm `. A run of
    scripts/pretrain.py or scripts/finetune.py (which take `mllm train`'s options) counts as `mllm train`."""
    prose, code = split_fences(text)
    joined = re.sub(r"\\\n", " ", "\n".join(code))
    commands = []
    for line in joined.splitlines():
        for part in re.split(r"&&|;", line.split(" #")[0]):
            part = part.strip().removeprefix("$ ")
            if part.startswith("mllm "):
                commands.append(part)
            elif script := TRAIN_SCRIPT.search(part):
                commands.append("mllm train" + script.group(1))
    for span in INLINE_CODE.findall("\n".join(prose)):
        span = " ".join(span.split())
        if span.startswith("mllm "):
            commands.append(span)
    return commands


@cache
def command_parser(words: tuple[str, ...]) -> argparse.ArgumentParser | None:
    """The parser of `mllm WORDS[0] [WORDS[1]]`, as `mllm.cli.main` builds it; None if no such command."""
    if words[0] not in COMMANDS:
        return None
    parser = argparse.ArgumentParser(prog=f"mllm {words[0]}")
    importlib.import_module(COMMANDS[words[0]][0]).add_arguments(parser)
    actions = subcommands(parser)
    if actions:
        return actions.get(words[1]) if len(words) > 1 else None
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse offers no public listing of a parser's actions; reading them is all this test does
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_errors(command: str) -> list[str]:
    """What is wrong with one quoted `mllm …` line: an unknown command or action, or an option it lacks."""
    words = command.split()[1:3]
    if not words or words[0] not in COMMANDS:
        return [f"`{command}`: mllm has no command {words[0] if words else ''!r}"]
    parser = command_parser(tuple(words))
    if parser is None:
        return [f"`{command}`: `mllm {words[0]}` has no action {words[1] if len(words) > 1 else ''!r}"]
    options = parser._option_string_actions  # read only, as above
    return [
        f"`{command}`: `mllm {' '.join(words)}` has no option {flag}"
        for flag in FLAG.findall(command)
        if flag not in options
    ]


def missing_repo_paths(page: Path) -> list[str]:
    """Paths under scripts/, data_recipes/, zero_configs/ or docs/ the page names that are not in the tree."""
    names = set(REPO_PATH.findall(page.read_text()))
    return sorted(n for n in names if not any(ROOT.glob(n.rstrip(".,:"))))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_mllm_commands_exist(page: Path):
    errors = [e for c in quoted_commands(page.read_text()) for e in command_errors(c)]
    assert errors == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repo_files_exist(page: Path):
    assert missing_repo_paths(page) == []


def test_readme_links_every_docs_page():
    """A page nobody can find from the README is lost: each docs/*.md gets a line in its Documentation table."""
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", (ROOT / "README.md").read_text()))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert not pages - linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_readme_keeps_its_test_command():
    """CI (.ci/run) runs `make test`, and the README says so: both halves must stay true."""
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert re.search(r"make test\b.*\.ci/run", (ROOT / "README.md").read_text())


def test_the_checks_catch_what_they_claim(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [gone](nowhere.md) [bad anchor](#nope)\n")
    assert len(broken_links(page)) == 2
    text = (
        "```bash\nmllm trian --output x\nmllm data chek\nmllm train --no-such-flag \\\n  --stage 1\n"
        "deepspeed --num_gpus 2 scripts/finetune.py --lr 1e-4 --no-such-option\n```\n"
    )
    errors = [e for c in quoted_commands(text) for e in command_errors(c)]
    assert len(errors) == 4 and "--no-such-flag" in errors[2] and "--no-such-option" in errors[3]
    assert command_errors("mllm train --stage 1 --output x") == []
    assert slug("Clusters: multi-node, `mllm` (CPU)") == "clusters-multi-node-mllm-cpu"
