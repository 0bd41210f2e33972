"""The Python code samples of README.md and docs/*.md run (each page in order, one namespace).

A block preceded by the line ``<!-- skip-test -->`` is illustrative (it needs real data or a GPU)
and is not run; every other block must run as written.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- skip-test -->\s*\n)?```python\n(.*?)```", re.S)


def _runnable_blocks(page: Path) -> list[str]:
    return [code for skip, code in BLOCK.findall(page.read_text()) if not skip]


SLOW_PAGES = {"export.md"}  # ONNX and torch.export of a ResNet: ~25 s


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, marks=[pytest.mark.slow] if p.name in SLOW_PAGES else []) for p in PAGES if _runnable_blocks(p)],
    ids=lambda p: p.name,
)
def test_page_code_samples_run(page, tmp_path):
    script = "\n\n".join(_runnable_blocks(page))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{page.name}:\n{run.stderr[-3000:]}"


def test_skipped_samples_are_few():
    skipped = sum(len(re.findall(r"<!-- skip-test -->\s*\n```python", p.read_text())) for p in PAGES)
    total = sum(len(re.findall(r"```python", p.read_text())) for p in PAGES)
    assert total > 0 and skipped <= total // 3, f"{skipped} of {total} samples are not run"
