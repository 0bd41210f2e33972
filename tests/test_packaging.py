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


def _venv_seeing_this_interpreters_packages(env_dir: Path) -> Path:
    """A fresh venv whose interpreter also sees the packages this interpreter sees (torch & co.).

    ``system_site_packages=True`` is not enough: run from inside a venv it points at the *base*
    interpreter's packages, not the active venv's. A ``.pth`` file listing this interpreter's
    site-packages directories works inside and outside a venv. They become plain path entries
    after the venv's own site-packages (their ``.pth`` files, such as an editable install of this
    project, are not run), so a wheel installed in the new venv wins.
    """
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True, text=True
    ).stdout.strip()
    seen = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (Path(purelib) / "_outer_site_packages.pth").write_text("\n".join(dict.fromkeys(seen)) + "\n")
    return py


@pytest.mark.slow
def test_venv_from_inside_a_venv_sees_the_outer_venvs_packages(tmp_path):
    """The README's test command run inside a user's venv: the wheel test's venv must see that venv's packages."""
    outer_py = _venv_seeing_this_interpreters_packages(tmp_path / "outer")
    outer_purelib = subprocess.run(
        [str(outer_py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # A package only the outer venv has (as torch is, for a user whose base interpreter has none).
    (Path(outer_purelib) / "only_in_outer_venv.py").write_text("VALUE = 42\n")
    code = (
        "import pathlib, subprocess, sys; sys.path.insert(0, sys.argv[1]); import test_packaging as t;"
        "py = t._venv_seeing_this_interpreters_packages(pathlib.Path(sys.argv[2]));"
        "probe = 'import sys, torch, only_in_outer_venv as m; print(sys.prefix, m.VALUE)';"
        "out = subprocess.run([str(py), '-c', probe], capture_output=True, text=True);"
        "print(out.stdout.strip() or out.stderr[-500:])"
    )
    inner = tmp_path / "inner"
    out = subprocess.run([str(outer_py), "-c", code, str(ROOT / "tests"), str(inner)], capture_output=True, text=True)
    assert out.stdout.split() == [str(inner), "42"], out.stdout + out.stderr


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
    py = _venv_seeing_this_interpreters_packages(env_dir)
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


@pytest.mark.slow
def test_sdist_carries_what_its_tests_read(tmp_path):
    """Every tracked file of the tests, docs, benchmarks and CI scripts is in the sdist, and tests run there."""
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(dist), str(ROOT)], check=True, capture_output=True)
    (sdist,) = dist.glob("metabin_layers-*.tar.gz")
    import tarfile

    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    git = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if git.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    wanted = [f for f in git.stdout.split() if f.startswith(("tests/", "docs/", "benchmarks/", ".ci/")) or "/" not in f]
    missing = sorted(set(wanted) - members - {".gitignore"})
    assert not missing, f"the sdist lacks {missing}"
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    env = dict(os.environ, PYTHONPATH=str(unpacked))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_readme.py", "tests/test_repository.py"],
        cwd=unpacked,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
