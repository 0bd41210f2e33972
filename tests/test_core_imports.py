"""The core needs only torch: importing and using it loads none of the recipe's dependencies."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE_ONLY = ("timm", "torchvision", "triton", "PIL", "yaml", "tqdm", "matplotlib", "scipy", "h5py", "metabin_layers.reid")

SCRIPT = f"""
import sys
import torch
already = set(sys.modules)  # what torch itself imports (some torch versions load tqdm)
import metabin_layers
from metabin_layers import convert, distributed, episode, export, factory, functional, kernels, layers, losses, optim
from torch import nn
model = metabin_layers.convert_bn_to_metabin(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), rho_init=0.5)
model(torch.randn(2, 3, 8, 8)).sum().backward()
metabin_layers.fold_metabin_for_inference(model.eval())
metabin_layers.get_norm_layer("metabin")
new = set(sys.modules) - already
loaded = sorted(m for m in new if m.split(".")[0] in {RECIPE_ONLY!r} or m.startswith("metabin_layers.reid"))
print("LOADED", loaded, "GLOBAL", sorted(m for m in ("timm", "torchvision", "triton") if m in sys.modules))
"""


def test_import_and_use_of_the_core_loads_no_recipe_dependency():
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "LOADED [] GLOBAL []", run.stdout


def test_recipe_cli_without_its_dependencies_says_what_to_install(tmp_path):
    blocked = "import sys\nfor name in ('timm', 'torchvision', 'PIL', 'yaml'):\n    sys.modules[name] = None\n"
    run_cli = (
        "from metabin_layers.reid.cli import main\nsys.exit(main(['train', '--quick', '--no-progress', '--output', 'run']))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", blocked + run_cli],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "install metabin-layers[reid]" in lines[0], run.stderr


def _top_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is loaded (not inside functions), as dotted names relative to the package."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.update(f"{base}.{alias.name}" if node.module is None else base for alias in node.names)
    return names


def test_module_roles():
    pkg = ROOT / "metabin_layers"
    core = [p for p in pkg.glob("*.py")] + list((pkg / "kernels").glob("*.py"))
    for path in core:
        imports = _top_level_imports(path)
        assert not any("reid" in name for name in imports), f"{path.name} imports the recipe"
        assert not any(name.split(".")[0] in ("timm", "torchvision") for name in imports), path.name
    # the converter reaches the synchronised layers only when a model needs them
    assert ".distributed" not in _top_level_imports(pkg / "convert.py")
    assert ".distributed" not in _top_level_imports(pkg / "factory.py")
    # the recipe uses the package's public names only
    for path in (pkg / "reid").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"from \.\.+\w*(\.\w+)* import [^\n]*\b_[a-z]", text), path.name
