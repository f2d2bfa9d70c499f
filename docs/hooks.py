"""MkDocs hooks: pages generated at build time from the code and the repository, never copied by hand.

- ``cli.md``: ``<!-- cli-reference -->`` becomes every subcommand of ``pyrozoo.cli.build_parser()`` with its usage
  and options (flags, default, help), so the reference cannot drift from the parser.
- ``results.md``: ``<!-- results -->`` becomes ``experiments/RESULTS.md``, whose links to run folders and files
  outside the site become the files' repository paths (a link out of the site would fail a strict build).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cell(text: str) -> str:
    """Text for one Markdown table cell."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _default(action: argparse.Action) -> str:
    if action.default in (None, argparse.SUPPRESS, False, []):
        return ""
    value = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
    return f"`{value}`"


def cli_reference(parser: argparse.ArgumentParser) -> str:
    """Markdown for every subcommand of ``parser``: a heading, its help, its usage and a table of its options."""
    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines to the terminal's width: make pages repeatable
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    out = [f"```text\n{parser.format_usage().strip()}\n```\n"]
    for name, sub in commands.choices.items():
        out += [f"## pyrozoo {name} {{#{name}}}\n", f"{_cell(helps.get(name) or '')}\n"]
        out.append(f"```text\n{sub.format_usage().strip()}\n```\n")
        rows = []
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flags = ", ".join(f"`{flag}`" for flag in action.option_strings) or f"`{action.metavar or action.dest}`"
            if action.choices:
                flags += " {" + ",".join(map(str, action.choices)) + "}"
            rows.append(f"| {_cell(flags)} | {_cell(_default(action))} | {_cell(action.help or '')} |")
        if rows:
            out += ["| option | default | meaning |", "|---|---|---|", *rows, ""]
    return "\n".join(out)


def _results() -> str:
    """experiments/RESULTS.md, its headings one level down (under the page's title) and its relative links
    (outside the site) turned into repository paths."""
    lines, fenced = [], False
    for line in (ROOT / "experiments" / "RESULTS.md").read_text().splitlines():
        fenced ^= line.lstrip().startswith("```")
        lines.append("#" + line if line.startswith("#") and not fenced else line)
    text = "\n".join(lines)

    def local(match: re.Match) -> str:
        label, target = match.group(1), match.group(2)
        if re.match(r"[a-z]+:|#", target):
            return match.group(0)
        return f"{label} (`experiments/{target}`)"

    return re.sub(r"!?\[([^\]]*)\]\(([^)\s]+)\)", local, text)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- cli-reference -->" in markdown:
        sys.path.insert(0, str(ROOT))  # the checkout's parser, not an installed copy's
        from pyrozoo.cli import build_parser

        markdown = markdown.replace("<!-- cli-reference -->", cli_reference(build_parser()))
    if "<!-- results -->" in markdown:
        markdown = markdown.replace("<!-- results -->", _results())
    return markdown
