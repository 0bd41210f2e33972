"""README.md is also the PyPI page: every link must work there, away from the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOME = "https://github.com/metabin-layers/metabin-layers"
DOCS = "https://metabin-layers.github.io/metabin-layers"


def _link_targets(text: str) -> list[str]:
    """Targets of inline links and images, reference definitions, autolinks and HTML attributes."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    inline = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)", text)
    definitions = re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, flags=re.M)
    autolinks = re.findall(r"<([a-z][a-z0-9+.-]*:[^>\s]*)>", text)
    html = re.findall(r"""(?:href|src)\s*=\s*["']([^"']+)["']""", text)
    return inline + definitions + autolinks + html


def test_link_parser_finds_every_kind_of_link():
    sample = '[a](docs/a.md) ![b](img.png "t")\n[c]: ../c.md\n<https://x.org> <a href="d.html">d</a>\n```\n[e](e.md)\n```'
    assert _link_targets(sample) == ["docs/a.md", "img.png", "../c.md", "https://x.org", "d.html"]


def test_every_readme_link_is_absolute_or_an_anchor():
    readme = (ROOT / "README.md").read_text()
    targets = _link_targets(readme)
    relative = [t for t in targets if not (t.startswith("https://") or t.startswith("#"))]
    assert targets and not relative, f"README.md links that break on PyPI: {relative}"
    # Files point at the repository, pages at the documentation site (see [project.urls]).
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'Homepage = "{HOME}"' in pyproject and f'Documentation = "{DOCS}"' in pyproject
    ours = [t for t in targets if t.startswith((HOME, DOCS))]
    assert any(t.startswith(DOCS) for t in ours) and any(t.startswith(f"{HOME}/blob/main/") for t in ours)
    for target in ours:
        if target.startswith(f"{HOME}/blob/main/"):
            assert (ROOT / target.removeprefix(f"{HOME}/blob/main/")).is_file(), target
        elif target.startswith(DOCS + "/") and target != DOCS + "/":
            page = target.removeprefix(DOCS + "/").split("#")[0].strip("/")
            assert (ROOT / "docs" / f"{page}.md").is_file(), target
    # in-page anchors name a heading of the README
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", readme, re.M)}
    assert all(t[1:] in headings for t in targets if t.startswith("#"))


def test_readme_tells_pypi_users_how_to_install():
    readme = (ROOT / "README.md").read_text()
    assert "`pip install metabin-layers`" in readme
    assert '`pip install "metabin-layers[reid]"`' in readme
    extras = re.search(r"\[project\.optional-dependencies\](.*?)\n\[", (ROOT / "pyproject.toml").read_text(), re.S)
    assert extras and re.search(r"^reid = ", extras.group(1), re.M), "the [reid] extra the README names must exist"
