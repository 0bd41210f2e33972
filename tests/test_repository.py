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
