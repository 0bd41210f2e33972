"""The benchmark entry points as a user runs them, at tiny sizes (timings themselves are not asserted):
one set of defaults, output to a scratch folder, failed candidates kept in the tables, and table
ratios that are the ratios of the times in the JSON."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_iteration  # noqa: E402
import bench_layer  # noqa: E402
import common  # noqa: E402
import run_all  # noqa: E402

# one thread: on a busy machine an OpenMP team waits for descheduled threads (seconds per tiny step)
TINY_LAYER = ["--shapes", "tiny", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--threads", "1"]
TINY_ITERATION = ["--batch", "20", "--height", "32", "--width", "16", "--ids-per-domain", "2", "--device", "cpu"]
TINY_ITERATION += ["--threads", "1"]
TINY_ITERATION += ["--repeats", "1", "--warmup", "0", "--no-memory"]


def _run(module, *args):
    """``main`` of a benchmark script, in this process (as ``python benchmarks/<script>.py args``)."""
    return module.main([str(a) for a in args])[0]


@pytest.fixture(autouse=True)
def _restore_threads():
    """The benchmarks run in this process and set torch's thread count: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def committed_results_unchanged():
    """Fails the test if anything under benchmarks/results/ was added, removed or changed."""
    before = _snapshot(Path(common.RESULTS_DIR))
    yield
    assert _snapshot(Path(common.RESULTS_DIR)) == before


def _layer_table_rows(md: str) -> list[dict[str, str]]:
    """Every candidate row of the per-shape layer tables, with its dtype, batch and shape."""
    rows, header, group, shape = [], None, None, None
    for line in md.splitlines():
        m = re.match(r"#### (\w+), batch (\d+)$", line)
        if m:
            group, header = (m.group(1), int(m.group(2))), None
            continue
        if not line.startswith("| ") or group is None:
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "shape (C@HxW)":
            header = cells
        elif cells[0] == "candidate":  # the summary table under it
            header = None
        elif header is not None and not cells[0].startswith(":--"):
            shape = cells[0] or shape
            rows.append(dict(zip(header, cells), dtype=group[0], batch=group[1], shape=shape))
    return rows


def _json_row(payload, row):
    for r in payload["results"]:
        if (r["dtype"], r["batch"], r["shape"], r["candidate"]) == (row["dtype"], row["batch"], row["shape"], row["candidate"]):
            return r
    raise AssertionError(f"no JSON row for {row}")


def _ratio(t: float, base: float) -> str:
    return f"{t / base:.2f}x"


def test_every_entry_point_has_the_same_defaults():
    layer = vars(bench_layer.finish_args(bench_layer.parser().parse_args([])))
    layer_argv, iteration_argv = run_all.sub_arguments(run_all.parse([]))
    assert vars(bench_layer.finish_args(bench_layer.parser().parse_args(layer_argv))) == layer
    iteration = vars(bench_iteration.finish_args(bench_iteration.parser().parse_args([])))
    via_run_all = vars(bench_iteration.finish_args(bench_iteration.parser().parse_args(iteration_argv)))
    assert {k: v for k, v in via_run_all.items() if k != "autocast"} == {k: v for k, v in iteration.items() if k != "autocast"}
    assert layer["batch"] == [8, 32, 64] and layer["shapes"] == "resnet50" and layer["dtypes"] == ["float32"]
    assert layer["compile_naive"] == "static" and layer["compile_layer"] == "on" and "triton" in layer["backends"]
    for entry in (layer, iteration, vars(run_all.parse([]))):
        assert entry["output"] == str(BENCH / "out") and entry["threads"] is None and entry["stat"] == "median"
    assert "benchmarks/out/" in (ROOT / ".gitignore").read_text().splitlines()
    for parser in (bench_layer.parser(), run_all.parser()):
        text = parser.format_help()
        assert "8,32,64" in text and "15 on CPU" in text and "resnet50" in text
    text = bench_iteration.parser().format_help()
    assert "7 on CPU" in text and "resnet18 on CPU" in text and "torch's own choice" in text


def test_int_list_rejects_bad_batches():
    assert common.int_list("8,32, 64") == [8, 32, 64]
    for bad in ("", "8,x", "0,8"):
        with pytest.raises(Exception, match="comma-separated positive integers"):
            common.int_list(bad)


def test_layer_benchmark_tiny_run(tmp_path, committed_results_unchanged):
    """Two batches, a backend that cannot run here, one that fails, and a compile that fails: every
    one keeps its row; the ratio columns are the JSON times over the BatchNorm2d times."""
    out = tmp_path / "out"
    stdout = _run(
        bench_layer, *TINY_LAYER, "--batch", "2,4", "--backends", "fused,triton,no_such_backend",
        "--compile-backend", "no_such_compiler", "--output", out,
    )  # fmt: skip
    md = (out / "layer.md").read_text()
    assert md.strip() == stdout.strip()
    payload = json.loads((out / "layer.json").read_text())
    rows = _layer_table_rows(md)
    assert {(r["batch"], r["candidate"]) for r in rows} == {
        (b, c)
        for b in (2, 4)
        for c in ["MetaBIN2d[fused]", "MetaBIN2d[triton]", "MetaBIN2d[no_such_backend]", "MetaBIN2d (torch.compile)",
                  "BatchNorm2d", "InstanceNorm2d(affine)", "naive BN+IN mix", "naive BN+IN mix (torch.compile)", "copy (floor)"]
    }  # fmt: skip
    status = {r["candidate"]: r["fwd"] for r in rows if r["batch"] == 2}
    if not torch.cuda.is_available():
        assert status["MetaBIN2d[triton]"] == "unavailable: no CUDA"
    assert status["MetaBIN2d[no_such_backend]"].startswith("failed: ValueError: backend must be")
    assert status["naive BN+IN mix (torch.compile)"].startswith("failed: InvalidBackend")
    assert status["MetaBIN2d (torch.compile)"].startswith("failed: InvalidBackend")
    checked = 0
    for row in rows:
        r = _json_row(payload, row)
        assert (r["status"] == "ok") == (not row["fwd"].startswith(("failed", "unavailable")))
        if r["status"] != "ok" or row["candidate"] == "copy (floor)":
            continue
        bn = _json_row(payload, dict(row, candidate="BatchNorm2d"))
        assert row["xBN fwd+bwd"] == _ratio(r["fwd+bwd"]["median"], bn["fwd+bwd"]["median"])
        assert row["xBN fwd"] == _ratio(r["fwd"]["median"], bn["fwd"]["median"])
        assert row["xBN bwd"] == _ratio(r["bwd"]["median"], bn["bwd"]["median"])
        assert row["fwd+bwd"] == f"{r['fwd+bwd']['median'] * 1e3:.3f}"
        assert row["xcompiled fwd+bwd"] == "-"  # the compiled row failed: no ratio against it
        checked += 1
    assert checked == 2 * 4  # fused, BN, IN, naive at both batches


@pytest.mark.slow
def test_layer_benchmark_compiled_row(tmp_path, committed_results_unchanged):
    """torch.compile of the naive mix on a tiny shape: timed after its compilation, which the note reports."""
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler for inductor")
    out = tmp_path / "out"
    _run(bench_layer, *TINY_LAYER, "--batch", "2", "--backends", "fused", "--output", out)
    md, payload = (out / "layer.md").read_text(), json.loads((out / "layer.json").read_text())
    rows = {r["candidate"]: r for r in _layer_table_rows(md)}
    compiled = _json_row(payload, rows["naive BN+IN mix (torch.compile)"])
    assert compiled["status"] == "ok" and compiled["first_call_s"] > 0
    assert "its first calls (tracing, compilation, one run) took" in md
    layer = _json_row(payload, rows["MetaBIN2d (torch.compile)"])
    assert layer["status"] == "ok" and layer["first_call_s"] > 0
    assert "`MetaBIN2d (torch.compile)`: `torch.compile(MetaBIN2d)`" in md
    for name in ("MetaBIN2d[fused]", "MetaBIN2d (torch.compile)", "BatchNorm2d", "naive BN+IN mix"):
        r = _json_row(payload, rows[name])
        assert rows[name]["xcompiled fwd+bwd"] == _ratio(r["fwd+bwd"]["median"], compiled["fwd+bwd"]["median"])
    fused = payload["summary"]["float32"]["2"]["MetaBIN2d[fused]"]
    t_fused = _json_row(payload, rows["MetaBIN2d[fused]"])["fwd+bwd"]["median"]
    assert fused["worst_ratio_vs_compiled"] == pytest.approx(t_fused / compiled["fwd+bwd"]["median"])


def test_iteration_benchmark_tiny_run(tmp_path, committed_results_unchanged):
    """A configuration whose layer backend fails keeps its row; the others are timed."""
    pytest.importorskip("torchvision")
    out = tmp_path / "out"
    stdout = _run(
        bench_iteration, *TINY_ITERATION, "--configs", "a_plain,b_naive_split,c_ours_split",
        "--backend", "no_such_backend", "--output", out,
    )  # fmt: skip
    payload = json.loads((out / "iteration.json").read_text())
    assert (out / "iteration.md").read_text().strip() == stdout.strip()
    res = payload["results"]
    assert res["c_ours_split"]["status"].startswith("failed: ValueError")
    assert res["a_plain"]["status"] == res["b_naive_split"]["status"] == "ok"
    row = next(line for line in stdout.splitlines() if line.startswith("| (c) ours"))
    assert "failed: ValueError" in row
    row = next(line for line in stdout.splitlines() if line.startswith("| (b) naive")).split("|")
    a, b = (res[c]["timing"]["total"]["median"] for c in ("a_plain", "b_naive_split"))
    assert row[6].strip() == _ratio(b, a)  # the "/ (a)" column


def test_iteration_benchmark_modes(tmp_path, monkeypatch, committed_results_unchanged):
    """Each mode has its rows and its ratios against (a) of the same mode; a CUDA graph needs CUDA."""
    pytest.importorskip("torchvision")
    compiled = []  # the compile mode calls the model through torch.compile (recorded, run eagerly here)
    monkeypatch.setattr(bench_iteration.torch, "compile", lambda model, backend: compiled.append(backend) or model)
    out = tmp_path / "out"
    stdout = _run(
        bench_iteration, *TINY_ITERATION, "--configs", "a_plain,c_ours_split", "--modes", "eager,graph,compile",
        "--compile-backend", "aot_eager", "--output", out,
    )  # fmt: skip
    res = json.loads((out / "iteration.json").read_text())["results"]
    keys = ["a_plain", "c_ours_split", "a_plain:graph", "c_ours_split:graph", "a_plain:compile", "c_ours_split:compile"]
    assert list(res) == keys and compiled == ["aot_eager", "aot_eager"]
    if not torch.cuda.is_available():
        assert res["c_ours_split:graph"]["status"] == "failed: RuntimeError: CUDA graphs need a CUDA device"
    assert res["c_ours_split:compile"]["launches"] is None and res["c_ours_split"]["launches"]["total"] > 0
    row = next(
        line for line in stdout.splitlines() if line.startswith("| (c) ours: MetaBINOptimizer (split meta batch), torch.compile")
    )
    a, c = (res[k]["timing"]["total"]["median"] for k in ("a_plain:compile", "c_ours_split:compile"))
    assert row.split("|")[6].strip() == _ratio(c, a)  # against (a) compiled
    assert f"- split meta batch, compile: (c)/(a) = {c / a:.2f}x." in stdout


@pytest.mark.slow
def test_run_all_writes_to_the_output_folder_only(tmp_path, committed_results_unchanged):
    pytest.importorskip("torchvision")
    out = tmp_path / "out"
    _run(
        run_all, "--device", "cpu", "--threads", "1", "--shapes", "tiny", "--batch", "2", "--compile-naive", "off", "--layer-repeats", "1",
        "--layer-warmup", "0", "--iteration-repeats", "1", "--iteration-warmup", "0", "--configs", "a_plain", "--no-memory",
        "--output", out,
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["latest.json", "latest.md"]
    payload = json.loads((out / "latest.json").read_text())
    assert payload["layer"]["config"]["batch"] == [2] and set(payload["iteration"]["results"]) == {"a_plain"}
    assert "### Layer benchmark" in (out / "latest.md").read_text()


@pytest.mark.slow
def test_run_all_update_results_writes_the_results_folder(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    results, scratch = tmp_path / "results", tmp_path / "out"
    monkeypatch.setattr(common, "RESULTS_DIR", str(results))
    monkeypatch.setattr(common, "OUTPUT_DIR", str(scratch))
    argv = ["--device", "cpu", "--threads", "1", "--shapes", "tiny", "--batch", "2", "--compile-naive", "off"]
    argv += ["--backends", "fused"]
    argv += ["--layer-repeats", "1", "--layer-warmup", "0", "--iteration-repeats", "1", "--iteration-warmup", "0"]
    argv += ["--configs", "a_plain", "--no-memory", "--update-results"]
    text, payload = run_all.main(argv)
    assert (results / "latest.md").read_text().strip() == text.strip()
    assert json.loads((results / "latest.json").read_text())["command"] == ["benchmarks/run_all.py", *argv]
    assert not scratch.exists()
    with pytest.raises(SystemExit):
        run_all.parse(["--update-results", "--output", str(scratch)])


@pytest.mark.slow
def test_compiled_row_without_a_cxx_compiler_says_failed(tmp_path, committed_results_unchanged):
    """Inductor with no working C++ compiler (and an empty cache): the row stays, saying why."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CXX=str(tmp_path / "no-such-c++"))
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor-cache")
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        str(BENCH / "bench_layer.py"),
        *TINY_LAYER,
        "--batch",
        "2",
        "--backends",
        "fused",
        "--compile-layer",
        "off",
    ]
    run = subprocess.run([*cmd, "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads((tmp_path / "out" / "layer.json").read_text())
    compiled = next(r for r in payload["results"] if r["candidate"] == "naive BN+IN mix (torch.compile)")
    assert compiled["status"].startswith("failed: ") and "C++ compiler" in compiled["status"]
    assert not any(r["candidate"] == "MetaBIN2d (torch.compile)" for r in payload["results"])  # --compile-layer off
    fused = next(r for r in payload["results"] if r["candidate"] == "MetaBIN2d[fused]")
    assert fused["status"] == "ok"
    assert payload["summary"]["float32"]["2"]["MetaBIN2d[fused]"]["worst_ratio_vs_compiled"] is None
