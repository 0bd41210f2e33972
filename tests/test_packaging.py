"""The wheel and sdist build, pass twine check, and the installed wheel works without the source tree."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import metabin_layers

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_single_sourced():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'attr = "metabin_layers.__version__"' in text
    assert metabin_layers.__version__ in (ROOT / "CHANGELOG.md").read_text()
    assert (ROOT / "metabin_layers" / "py.typed").exists()


@pytest.mark.slow
def test_wheel_builds_and_runs_in_a_fresh_venv(tmp_path):
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), str(ROOT)], check=True, capture_output=True
    )
    wheels = list(dist.glob("metabin_layers-*.whl"))
    assert len(wheels) == 1 and len(list(dist.glob("metabin_layers-*.tar.gz"))) == 1
    twine = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())], capture_output=True, text=True
    )
    assert twine.returncode == 0, twine.stdout + twine.stderr
    # A venv that sees torch & co. from this interpreter, but gets metabin_layers only from the wheel.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheels[0])], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import metabin_layers, torch, torchvision\n"
        "assert 'venv' in metabin_layers.__file__, metabin_layers.__file__\n"
        "m = metabin_layers.convert_bn_to_metabin(torchvision.models.resnet18(num_classes=4))\n"
        "base = torch.optim.SGD(metabin_layers.base_parameters(m), lr=0.01)\n"
        "opt = metabin_layers.MetaBINOptimizer(m, base)\n"
        "print('quickstart ok', len(metabin_layers.metabin_modules(m)))\n"
    )
    out = subprocess.run([str(py), "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "quickstart ok 20" in out.stdout, out.stderr
    cli = subprocess.run(
        [
            str(env_dir / "bin" / "metabin-reid"),
            "train",
            "--quick",
            "--no-progress",
            "--output",
            str(work / "run"),
            "--set",
            "max_iters=1",
            "syn_train_ids=16",
            "syn_test_ids=6",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert (work / "run" / "results.json").exists() and "style4" in cli.stdout
