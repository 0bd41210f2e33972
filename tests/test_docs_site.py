"""The documentation site as users see it: strict build, no raw Sphinx roles, nothing loaded from
outside the site, every page in the navigation, and (in a headless browser) diagrams drawn as SVG
and class signatures shown in the Reference."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAW_ROLE = re.compile(r":(?:py:)?(?:meth|class|func|attr|mod|data|obj|exc|const|ref|term|doc):(?:<code>|`)")
EXTERNAL = re.compile(r"^(?:https?:)?//", re.I)
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if shutil.which("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run(["mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return out


def _pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


def _text(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def test_site_builds_strict_with_every_page_in_the_nav(site):
    # mkdocs.yml makes an omitted page a warning, and --strict makes a warning fatal.
    assert (site / "reference" / "index.html").exists()
    assert (site / "results" / "synthetic_compare" / "index.html").exists()


def test_no_raw_sphinx_roles_in_the_built_pages(site):
    found = {p.relative_to(site).as_posix(): RAW_ROLE.findall(p.read_text()) for p in _pages(site)}
    assert not {k: v for k, v in found.items() if v}


def test_no_external_script_stylesheet_or_font(site):
    offenders = []
    for page in _pages(site):
        markup = page.read_text()
        for tag in re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", markup, re.I):
            for url in re.findall(r"""\b(?:src|href)=["']?([^"'\s>]+)""", tag, re.I):
                is_link = tag.lower().startswith("<link")
                kind = re.search(r"""rel=["']?([^"'>]+)""", tag, re.I)
                if is_link and kind and kind.group(1).lower() in ("canonical", "alternate"):
                    continue  # metadata, not a resource the browser loads
                if EXTERNAL.match(url):
                    offenders.append((page.relative_to(site).as_posix(), url))
    for css in site.rglob("*.css"):
        for url in re.findall(r"url\(\s*['\"]?((?:https?:)?//[^'\")]+)", css.read_text()):
            offenders.append((css.relative_to(site).as_posix(), url))
    assert not offenders, offenders[:10]
    # The site serves the mermaid script itself.
    concepts = (site / "concepts" / "index.html").read_text()
    assert "assets/javascripts/mermaid.min.js" in concepts and concepts.count('<div class="diagram">') == 2


def test_site_url_gives_a_sitemap(site):
    sitemap = (site / "sitemap.xml").read_text()
    assert "https://metabin-layers.github.io/metabin-layers/reference/" in sitemap


def test_reference_shows_constructors_and_inherited_members(site):
    text = re.sub(r"\s+", "", _text((site / "reference" / "index.html").read_text()))
    assert "MetaBIN2d(num_features:int" in text
    assert "MetaBINOptimizer(model:" in text
    for name in ("rho_override", "stats_mode", "STATS_MODES", "BACKENDS"):
        assert name in text, name


def _dom(page: Path, tmp_path: Path) -> str:
    assert CHROMIUM is not None
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=15000",
        "--dump-dom",
    ]
    run = subprocess.run([CHROMIUM, *flags, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium)")
def test_in_a_browser_diagrams_render_as_svg_and_reference_shows_signatures(site, tmp_path):
    concepts = _dom(site / "concepts" / "index.html", tmp_path)
    diagrams = re.findall(r'<div class="diagram"[^>]*>\s*<svg\b', concepts)
    assert len(diagrams) == 2, "the two Concepts diagrams are not drawn as SVG"
    assert "flowchart LR" not in _text(concepts)
    architecture = _dom(site / "architecture" / "index.html", tmp_path)
    assert len(re.findall(r'<div class="diagram"[^>]*>\s*<svg\b', architecture)) == 1, "the module diagram is not drawn"
    assert "flowchart TD" not in _text(architecture) and "_bin_math" in _text(architecture)
    reference = re.sub(r"\s+", "", _text(_dom(site / "reference" / "index.html", tmp_path)))
    assert "MetaBIN2d(num_features" in reference


def _documented_modules() -> list[str]:
    return re.findall(r"^::: (\S+)", (ROOT / "docs" / "reference.md").read_text(), flags=re.M)


def test_every_public_name_in_the_reference_has_parameters_and_an_example():
    """The Reference renders a parameter table and an example for every public name."""
    import importlib
    import inspect

    missing = []
    for module_name in _documented_modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue  # constants and type aliases: a docstring suffices
            doc = inspect.getdoc(obj) or ""
            init = getattr(obj, "__init__", None)
            if inspect.isclass(obj) and getattr(init, "__module__", "").startswith("metabin_layers"):
                doc += inspect.getdoc(init) or ""  # merged into the class entry by the Reference
            try:
                params = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
            except (TypeError, ValueError):
                params = []
            if params and not re.search(r"^\s*(Args|Attributes):", doc, flags=re.M):
                missing.append(f"{module_name}.{name}: no Args")
            if ">>>" not in doc:
                missing.append(f"{module_name}.{name}: no example")
    assert not missing, "\n".join(missing)
