"""The README's links lead somewhere: in-page links to one of its headings (GitHub's anchors) or `<a id>` anchors,
relative links to files of the repository. Headings carry numbers that change with results, and a link written for
an older heading breaks without a word."""

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped (hyphens and underscores kept),
    spaces turned into hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor_matches_githubs_rule_on_this_readmes_kinds_of_heading():
    assert github_anchor("Forward pass (`benchmarks/forward_cost.py`)") == "forward-pass-benchmarksforward_costpy"
    assert github_anchor("A run: FAM 86-99% at 1x, 2x") == "a-run-fam-86-99-at-1x-2x"


def test_readme_links_point_at_its_headings_and_files():
    text = (ROOT / "README.md").read_text()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # code blocks hold no links, but may hold '#' lines
    anchors = {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", prose, re.M)}
    anchors |= set(re.findall(r'<a id="([^"]+)"></a>', prose))  # anchors placed by hand
    links = re.findall(r"\]\(([^)\s]+)\)", prose)
    assert links, "no links found: the pattern no longer matches the README"
    broken = []
    for link in links:
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = link.partition("#")
        if path and not (ROOT / path).exists():
            broken.append(link)
        elif not path and anchor not in anchors:
            broken.append(link)
    assert not broken, f"README links that lead nowhere: {broken}"
