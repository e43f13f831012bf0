"""Every relative link in README.md and docs/ points at a file that exists, and every #anchor
into a Markdown page at one of its headings: the README is the way into docs/, and GitHub
renders it without mkdocs' own link checks (`mkdocs build --strict` covers docs/ alone)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked out."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def slug(heading: str) -> str:
    """Python-Markdown's toc slug, which mkdocs and these pages' anchors use."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for line in _prose(page.read_text()) if (m := HEADING.match(line))}


def broken_links(page: Path) -> list[str]:
    """'page: target (why)' for each relative link of `page` that does not resolve."""
    problems = []
    for line in _prose(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            if not resolved.exists():
                problems.append(f"{page.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{page.name}: {target} (no heading #{anchor})")
    return problems


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_relative_link_resolves() -> None:
    assert len(pages()) > 10
    problems = [problem for page in pages() for problem in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_readme_links_into_docs() -> None:
    lines = _prose((ROOT / "README.md").read_text())
    targets = {target.partition("#")[0] for line in lines for target in LINK.findall(line)}
    assert {"docs/quickstart.md", "docs/concepts/threat-model.md", "docs/reference.md"} <= targets


def test_the_check_catches_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    """Negative control: a link to a page that is not there, and an anchor to a heading that
    is not there, are reported; the same page's good links and code spans are not."""
    (tmp_path / "other.md").write_text("# Other page\n\n## 2. Privacy model\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#2-privacy-model) [ok](https://example.org/x)\n"
        "[gone](missing.md) [bad anchor](other.md#no-such-heading)\n"
        "`[in code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#no-such-heading (no heading #no-such-heading)",
    ]
