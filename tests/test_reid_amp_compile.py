"""Recipe options for GPU training: the autocast dtype (``amp_dtype``) and ``compile``."""

import pytest
import torch

from metabin_layers.reid.config import TrainConfig, load_config, parse_overrides
from metabin_layers.reid.train import Trainer, seed_everything


def _tiny(tmp_path, **overrides):
    overrides = {"output": str(tmp_path / "run"), "syn_train_ids": 20, "syn_test_ids": 4, **overrides}
    return load_config(overrides=overrides, quick=True)


def test_amp_dtype_and_compile_keys_parse_and_validate():
    assert parse_overrides(["amp_dtype=bfloat16", "compile=inductor"]) == {"amp_dtype": "bfloat16", "compile": "inductor"}
    assert parse_overrides(["compile=none"]) == {"compile": None}
    assert TrainConfig().amp_dtype == "float16" and TrainConfig().compile is None  # the defaults keep eager fp16 AMP
    with pytest.raises(ValueError, match="amp_dtype must be 'float16' or 'bfloat16'"):
        TrainConfig(amp_dtype="float8")


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
    meta = compiled.meta_step()  # the meta step runs the eager model (rho overrides)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in meta.values())


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
