"""Marked sections of the project's docs: generated tables replace the text between two HTML comments.

Every tool that publishes numbers (the bench, tools/*.py) writes through `write_section`, so a section is found,
replaced or placed the same way everywhere."""

from __future__ import annotations

import re
from pathlib import Path

from qgguf.files import atomic_output


def markers(kind: str, slug: str = "") -> tuple[str, str]:
    """The begin and end comments of one section: `<!-- qgguf-KIND[:SLUG]:begin -->` and `...:end -->`."""
    name = f"qgguf-{kind}" + (f":{slug}" if slug else "")
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_marked_section(text: str, begin: str, end: str, section: str) -> str | None:
    """text with the span from `begin` to the first `end` after it (and one newline) replaced by `section`;
    None when the pair is not there (an `end` before its `begin` does not count)."""
    a = text.find(begin)
    if a < 0 or text.find(end, a) < 0:
        return None
    b = text.index(end, a) + len(end)
    b += 1 if text[b:b + 1] == "\n" else 0
    return text[:a] + section + text[b:]


def write_section(docs: Path, kind: str, slug: str, body: str, *, heading: str | None = None,
                  title: str | None = None) -> Path:
    """Put `body` between the section's markers in `docs` (atomically; other sections stay as they are).

    A section not there yet goes at the end of the `heading` section (the heading is added at the end of the file
    if missing), or at the end of the file when no heading is given. `title`, if given, becomes a `###` line.
    """
    docs = Path(docs)
    begin, end = markers(kind, slug)
    text = body if body.endswith("\n") else body + "\n"
    section = f"{begin}\n" + (f"### {title}\n\n" if title else "") + text + f"{end}\n"
    current = docs.read_text() if docs.is_file() else "# Benchmarks\n"
    new = replace_marked_section(current, begin, end, section)
    if new is None:
        if heading is None:
            new = current.rstrip("\n") + "\n\n" + section
        else:
            if heading not in current:
                current = current.rstrip("\n") + f"\n\n{heading}\n\n"
            a = current.index(heading) + len(heading)
            nxt = re.search(r"^## ", current[a:], re.M)
            at = a + nxt.start() if nxt else len(current)
            new = current[:at].rstrip("\n") + "\n\n" + section + ("\n" + current[at:] if nxt else "")
    with atomic_output(docs) as tmp:
        tmp.write_text(new)
    return docs


def split_heading_section(text: str, heading: str) -> tuple[str, str, str]:
    """(before, section, after): the section runs from the line `heading` to the next `## ` heading.
    A missing section is empty, with `before` the whole text."""
    start = text.find(heading + "\n")
    if start < 0:
        return text.rstrip("\n") + "\n\n", "", ""
    nxt = text.find("\n## ", start + len(heading))
    end = len(text) if nxt < 0 else nxt + 1
    return text[:start], text[start:end], text[end:]


def write_heading_section(docs: Path, markdown: str) -> Path:
    """Replace (or append) the `## ` section whose heading is `markdown`'s first line; nothing else changes."""
    docs = Path(docs)
    text = docs.read_text(encoding="utf-8") if docs.is_file() else "# Benchmarks\n"
    before, _, after = split_heading_section(text, markdown.splitlines()[0])
    new = markdown.rstrip("\n") + "\n" + ("\n" if after else "")
    with atomic_output(docs) as tmp:
        tmp.write_text(before + new + after, encoding="utf-8")
    return docs
