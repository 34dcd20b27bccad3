"""The documentation cannot drift from the code: every ``detrkit ...`` command shown in README.md, CHANGELOG.md,
benchmarks/README.md and docs/*.md (fenced shell blocks and inline code) parses with the current command line, and
every relative link points at a file that exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from detrkit.cli import _underscored, parser

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md",
        *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|shell)\n(.*?)```", re.S)
INLINE = re.compile(r"`(detrkit [^`]+)`")


def commands(text: str) -> list[str]:
    """The detrkit command lines of a Markdown text: fenced shell lines (continuations joined, comments dropped,
    torchrun's ``-m detrkit.cli``) and inline code spans that start with ``detrkit``."""
    found = []  # (command, complete): inline code may name a command without its required arguments
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, w in enumerate(words):
                if w == "detrkit" or (w == "detrkit.cli" and i and words[i - 1] == "-m"):
                    rest = words[i + 1:]
                    cut = next((j for j, x in enumerate(rest) if x in ("&&", "||", ";", "|")), len(rest))
                    found.append((shlex.join(rest[:cut]), True))
                    break
    for span in INLINE.findall(" ".join(text.split())):
        # placeholders (DIR, SIZE, MINUTES) stand for a value: "1" parses as a path, a name or a number
        words = ["1" if re.fullmatch(r"[A-Z_]+", w) else w for w in shlex.split(span)[1:]]
        if words and not any("..." in w or w.startswith(("<", "[", "|")) for w in words):
            found.append((shlex.join(words), False))
    return found


CASES = [(doc.name, c) for doc in DOCS for c in dict.fromkeys(commands(doc.read_text()))]


def test_the_docs_show_commands():
    """A negative control for the extraction: the README's own commands are found (the demo, train, predict)."""
    readme = [c for d, (c, _) in CASES if d == "README.md"]
    assert "demo" in readme and "train --data my_data" in readme
    assert any(c.startswith("predict ") for c in readme) and len(CASES) > 40


@pytest.mark.parametrize(("doc", "command"), CASES, ids=[f"{d}: {c[:60]}" for d, (c, _) in CASES])
def test_documented_command_parses(doc, command, tmp_path, monkeypatch, capsys):
    """``detrkit <command>`` as the page shows it is accepted by the subcommand's parser: every option exists and
    every value parses (a `--config FILE` it names is written empty first, since the parser reads it). A command
    in running text may leave out the arguments it requires; one in a shell block is complete."""
    command, complete = command
    words = [_underscored(w) if w.startswith("--") else w for w in shlex.split(command)]
    monkeypatch.chdir(tmp_path)
    for flag, value in zip(words, words[1:], strict=False):
        if flag == "--config":
            Path(value).parent.mkdir(parents=True, exist_ok=True)
            Path(value).write_text("{}\n")
    try:
        parser().parse_args(words)
    except SystemExit:
        error = capsys.readouterr().err.strip().splitlines()[-1:]
        if not complete and error and "arguments are required" in error[0]:
            return
        pytest.fail(f"{doc}: `detrkit {command}` does not parse ({error}): fix the page or the CLI")


def test_a_wrong_option_is_caught():
    """The check above can fail: an option the CLI lacks is refused."""
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--data", "d", "--no_such_option", "1"])


LINK = re.compile(r"\]\(([^)#\s]*)(#[^)\s]*)?\)")


def anchors(markdown: str) -> set[str]:
    """The ``#anchor`` names GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_anchors_follow_githubs_rule():
    """A negative control for the check below: a heading's anchor is found, a made-up one is not."""
    found = anchors("# Real photos: tree crowns\n## The demo's `fast-cpu` recipe\n```\n# not a heading\n```")
    assert found == {"real-photos-tree-crowns", "the-demos-fast-cpu-recipe"}


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_relative_links_exist(doc):
    """Every relative link points at a file that exists, and its ``#anchor`` at a heading of that file."""
    missing = []
    for target, anchor in LINK.findall(doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        path = doc.parent / target if target else doc
        if not path.exists():
            missing.append(target)
        elif anchor and path.suffix == ".md" and anchor[1:] not in anchors(path.read_text()):
            missing.append(target + anchor)
    assert not missing, f"{doc.name} links to missing files or headings: {missing}"
