"""Repository contracts: CI runs the README's test command; the public API is documented."""

import re
from pathlib import Path

import metabin_layers

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_cmd = [b for b in blocks if "pytest" in b]
    assert len(test_cmd) == 1, "README.md must give exactly one test command"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd[0] in ci_lines


def test_ci_runs_inside_a_fresh_virtual_environment():
    """Users install into a venv; CI does the same so that a venv-only breakage cannot hide."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    create, activate = lines.index("python3 -m venv .venv"), lines.index("source .venv/bin/activate")
    first_install = next(i for i, line in enumerate(lines) if line.startswith("pip install"))
    assert create < activate < first_install


def test_readme_gives_exactly_two_setup_commands():
    assert len(_bash_blocks((ROOT / "README.md").read_text())) == 2


def test_every_public_name_has_a_docstring_and_an_api_entry():
    api = (ROOT / "docs" / "api.md").read_text()
    for name in metabin_layers.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(metabin_layers, name)
        if not isinstance(obj, (str, tuple)):
            assert obj.__doc__, f"{name} has no docstring"
        assert f"`{name}" in api, f"{name} is missing from docs/api.md"


def test_the_repository_speaks_of_the_library_only():
    """No references to files outside the repository, and no words about how the work was organised."""
    pattern = re.compile(
        r"METABIN_SPEC|DESIGN\.md|ECOSYSTEM\.md|PARITY\.md|REFERENCE_CODE\.md|\bwas lent\b|\blent to\b|\bthis task\b|\bissue \d+\b"
        r"|\bthe issue\b|\bthe issue's\b|\bno GPU was\b|\bwork items?\b|\bcoordinator\b",
        re.I,
    )
    roots = [ROOT / d for d in ("metabin_layers", "tests", "benchmarks", "docs")] + [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    suffixes = {".py", ".md", ".yml", ".yaml", ".toml", ".sh", ".json", ".txt"}
    offenders = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.suffix not in suffixes or "assets" in path.parts or path.name == "test_repository.py":
                continue
            for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)
