"""The documentation's links and paths resolve, and the README keeps the test command CI runs (issue #27).

Checks every relative Markdown link and image in README.md, benchmarks/README.md, benchmarks/RESULTS-LOG.md and
docs/*.md: the file exists (relative to the page) and, for ``page.md#anchor``, the anchor is one of the target
page's headings (GitHub's slugs). In README.md and docs/*.md a code span that names a repository path
(``bdscan/...``, ``docs/...``, ``sample_models/...``) must exist too. Links inside fenced code blocks and inline
code are not links; ``http(s):`` and ``mailto:`` targets are not checked (no network in tests).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "benchmarks" / "RESULTS-LOG.md",
                *(ROOT / "docs").glob("*.md")])
#: [text](target) and ![alt](target); the target ends at whitespace or ")" (titles are not used in these pages)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
#: a code span naming a repository path: a top-level folder of this repository, then path characters only
REPO_PATH = re.compile(r"^(?:bdscan|benchmarks|docs|sample_models|templates|tests|\.ci)/[\w.\-/]*$")
PLACEHOLDER = re.compile(r"NNN|<|\{|\*")


def _prose(text: str) -> str:
    """The page without fenced code blocks and inline code (whose brackets are not links)."""
    return CODE_SPAN.sub(" ", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a Markdown page offers (duplicates numbered as GitHub does)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def broken_links(page: Path) -> list[str]:
    """Each relative link of ``page`` that does not resolve, as ``target (why)``."""
    bad = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.\-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = page if not path_part else (page.parent / path_part).resolve()
        if not dest.exists():
            bad.append(f"{target} (no such file: {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
    return bad


def missing_paths(page: Path) -> list[str]:
    """Code spans of ``page`` that name a repository path that does not exist."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    spans = {m.group(2).strip() for m in CODE_SPAN.finditer(text)}
    return sorted(s for s in spans if REPO_PATH.match(s) and not PLACEHOLDER.search(s) and not (ROOT / s).exists())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", [p for p in PAGES if p.parent.name != "benchmarks"], ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(page: Path) -> None:
    assert missing_paths(page) == []


def test_readme_has_the_command_ci_runs_verbatim() -> None:
    """`.ci/run` runs the README's test command verbatim: the line must stay in the README, byte for byte."""
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    command = lines[-1]
    assert "pytest" in command
    assert command in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """A broken file link, a missing anchor and a missing path are each reported; code and URLs are not links."""
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: yes\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#a-code-heading-yes) [self](#page) [web](https://example.com/x)\n"
                    "[gone](missing.md) [bad anchor](other.md#nope) ![img](pic.png)\n"
                    "`[not a link](nowhere.md)` and `docs/no-such-page.md`\n\n```\n[in a fence](nowhere.md)\n```\n")
    assert sorted(b.split(" ")[0] for b in broken_links(page)) == ["missing.md", "other.md#nope", "pic.png"]
    assert missing_paths(page) == ["docs/no-such-page.md"]
    assert slug("End to end: `bdscan scan` on 2 threads") == "end-to-end-bdscan-scan-on-2-threads"
    assert slug("224×224 inputs (ViT-Tiny/16, issue #26)") == "224224-inputs-vit-tiny16-issue-26"
