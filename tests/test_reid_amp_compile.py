"""Recipe options for GPU training: the autocast dtype (``amp_dtype``), ``compile`` and ``cuda_graph``."""

import pytest
import torch

from metabin_layers.reid.config import TrainConfig, load_config, parse_overrides
from metabin_layers.reid.train import Trainer, cuda_graph_blocker, seed_everything


def _tiny(tmp_path, **overrides):
    overrides = {"output": str(tmp_path / "run"), "syn_train_ids": 20, "syn_test_ids": 4, **overrides}
    return load_config(overrides=overrides, quick=True)


def test_amp_dtype_and_compile_keys_parse_and_validate():
    assert parse_overrides(["amp_dtype=bfloat16", "compile=inductor"]) == {"amp_dtype": "bfloat16", "compile": "inductor"}
    assert parse_overrides(["compile=none"]) == {"compile": None}
    assert TrainConfig().amp_dtype == "float16" and TrainConfig().compile is None  # the defaults keep eager fp16 AMP
    with pytest.raises(ValueError, match="amp_dtype must be 'float16' or 'bfloat16'"):
        TrainConfig(amp_dtype="float8")


@pytest.mark.slow
def test_compiled_forward_trains_like_the_eager_one(tmp_path):
    eager = Trainer(_tiny(tmp_path, norm="metabin", seed=3))
    compiled = Trainer(_tiny(tmp_path, norm="metabin", seed=3, compile="eager"))
    assert isinstance(compiled.net, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.net._orig_mod is compiled.model and eager.net is eager.model
    seed_everything(0)  # the same augmentations for both steps
    logs_e = eager.base_step()
    seed_everything(0)
    logs_c = compiled.base_step()
    assert {k: float(v) for k, v in logs_c.items()} == pytest.approx({k: float(v) for k, v in logs_e.items()}, rel=1e-4)
    for (name, pe), (_, pc) in zip(eager.model.named_parameters(), compiled.model.named_parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-4, atol=1e-5, msg=name)
    assert isinstance(compiled.meta_net, torch._dynamo.eval_frame.OptimizedModule)  # meta steps compiled too
    assert compiled.meta_net._orig_mod is compiled.model and eager.meta_net is eager.model
    seed_everything(1)
    meta_e = eager.meta_step()
    seed_everything(1)
    meta_c = compiled.meta_step()
    assert {k: float(v) for k, v in meta_c.items()} == pytest.approx({k: float(v) for k, v in meta_e.items()}, rel=1e-4)
    for pe, pc in zip(eager.opt.rhos, compiled.opt.rhos):
        torch.testing.assert_close(pc, pe, rtol=1e-4, atol=1e-6)


def test_cuda_graph_says_why_a_run_cannot_be_captured(tmp_path, capsys):
    cuda = torch.device("cuda")
    cfg = _tiny(tmp_path, amp_dtype="bfloat16")
    assert cuda_graph_blocker(cfg, cuda, 1) is None
    assert "needs a CUDA device (the run trains on cpu)" in cuda_graph_blocker(cfg, torch.device("cpu"), 1)
    assert "for one process" in cuda_graph_blocker(cfg, cuda, 2)
    assert "first-order meta step only" in cuda_graph_blocker(_tiny(tmp_path, amp_dtype="bfloat16", second_order=True), cuda, 1)
    assert "use amp_dtype=bfloat16" in cuda_graph_blocker(_tiny(tmp_path, amp_dtype="float16"), cuda, 1)
    assert cuda_graph_blocker(_tiny(tmp_path, amp=False), cuda, 1) is None  # fp32: nothing to scale
    assert "not combined with compile" in cuda_graph_blocker(_tiny(tmp_path, amp_dtype="bfloat16", compile="eager"), cuda, 1)
    assert parse_overrides(["cuda_graph=true"]) == {"cuda_graph": True} and TrainConfig().cuda_graph is False
    if not torch.cuda.is_available():  # the CPU run: the note, then eager training
        trainer = Trainer(_tiny(tmp_path, cuda_graph=True))
        assert "cuda_graph: capture needs a CUDA device (the run trains on cpu); training eagerly" in capsys.readouterr().err
        assert not trainer.use_cuda_graph and all(torch.isfinite(v) for v in trainer.base_step().values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["metabin", "bn"])
def test_a_cuda_graph_run_trains_like_the_eager_one(tmp_path, norm):
    runs = {}
    for graph in (False, True):
        cfg = _tiny(
            tmp_path / str(graph), norm=norm, device="cuda", amp=True, amp_dtype="bfloat16", cuda_graph=graph, max_iters=6
        )
        trainer = Trainer(cfg)
        assert trainer.use_cuda_graph == graph
        (tmp_path / str(graph)).mkdir(exist_ok=True)
        trainer.run(tmp_path / str(graph), progress=False)
        assert (trainer._graph is not None) == graph
        runs[graph] = trainer
    eager, graph = runs[False], runs[True]
    for (name, a), (_, b) in zip(graph.model.state_dict().items(), eager.model.state_dict().items()):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-3, msg=lambda m, n=name: f"{n}: {m}")
    assert [h["it"] for h in graph.history] == [h["it"] for h in eager.history]
    if norm == "metabin":
        assert graph.opt.num_meta_steps == eager.opt.num_meta_steps == 6
        assert graph.history[-1]["inner_lr"] == pytest.approx(eager.history[-1]["inner_lr"], rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast and GradScaler act on CUDA only")
@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype,scaled", [("bfloat16", False), ("float16", True)])
def test_amp_dtype_on_cuda(tmp_path, amp_dtype, scaled):
    t = Trainer(_tiny(tmp_path, device="cuda", amp=True, amp_dtype=amp_dtype))
    assert (t.scaler is not None) == scaled
    with t.autocast():
        y = t.model.backbone(torch.randn(2, 3, 64, 32, device="cuda"))
    assert y.dtype == getattr(torch, amp_dtype)
    t.base_step()
    if t.meta_batches is not None:
        t.meta_step()
