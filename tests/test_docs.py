"""The Markdown docs' own links: docs/benchmarks.md points into itself some fifty times (footnotes to
dated sections, links between sections), and a heading reworded in a later session breaks them
silently on GitHub."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def slug(heading: str) -> str:
    # GitHub's anchors: lower case, punctuation other than '-' and '_' dropped, each space a '-'
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    counts: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M):
        base = slug(heading)
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(f"{base}-{n}" if n else base)  # a repeated heading's anchor gets -1, -2, ...
    return found


def problems(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    found = []
    here = anchors(text)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            found.append(f"link to a missing file: {target}")
        elif anchor and anchor not in (here if dest == path else anchors(dest.read_text())):
            found.append(f"link to no heading: {target}")
    defined = set(re.findall(r"^\[\^(\w+)\]:", text, re.M))
    used = set(re.findall(r"\[\^(\w+)\](?!:)", text))
    found += [f"footnote [^{n}] used, never defined" for n in sorted(used - defined)]
    # GitHub drops a footnote nobody cites, so its section would lose its way in from the top
    found += [f"footnote [^{n}] defined, never cited" for n in sorted(defined - used)]
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_footnote_resolves(path):
    assert problems(path) == []


def test_the_check_sees_a_broken_anchor_and_a_dangling_footnote(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Runs — 2026-12-06 (later)\n\nSee [it](#runs--2026-12-06-later) [^a] [^b]; "
                    "[gone](#runs-2026-12-06) [^c].\n\n```\n# not a heading\n```\n\n"
                    "## Runs — 2026-12-06 (later)\n\n[the second](#runs--2026-12-06-later-1)\n\n"
                    "[^a]: [x](#runs--2026-12-06-later)\n[^b]: [y](other.md)\n[^d]: [z](#not-a-heading)\n")
    assert problems(page) == ["link to no heading: #runs-2026-12-06", "link to a missing file: other.md",
                              "link to no heading: #not-a-heading", "footnote [^c] used, never defined",
                              "footnote [^d] defined, never cited"]
