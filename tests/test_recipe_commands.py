"""Every ``metabin-reid`` command of docs/recipe.md runs, on generated fake dataset folders.

Each command runs as written, plus a few overrides that keep it small (2 iterations, 64x32
images, ResNet-18 unless the command picks a backbone (the synthetic commands: the recipe's
two-block test ResNet), 2 test splits). The real-data commands
use fake folders in the real layouts (made with the generators of test_reid_datasets.py).
"""

import re
import shlex
from pathlib import Path

import pytest
import torch
from test_authors_checkpoint import to_authors_layout
from test_reid_datasets import make_cuhk02, make_grid, make_ilids, make_prid, make_viper, touch

from metabin_layers.reid.cli import _config, build_parser, main
from metabin_layers.reid.mobilenetv2 import MobileNetV2x14
from metabin_layers.reid.model import ReIDModel, build_backbone

RECIPE = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"
SMALL = ["max_iters=2", "first_inner_loop=1", "height=64", "width=32", "workers=0", "eval_batch_size=64", "num_splits=2"]
SYNTHETIC = ["syn_train_ids=16", "syn_test_ids=6", "syn_images_per_id=4", "syn_distractor_ids=0"]
# eval takes only evaluation keys (the checkpoint fixes the rest); an authors' release also the image size
EVAL_SMALL = ["workers=0", "eval_batch_size=64", "num_splits=2"]


def recipe_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", RECIPE.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("metabin-reid"):
                commands.append(" ".join(shlex.split(line, comments=True)))
    return commands


def with_small_settings(command: str) -> list[str]:
    args = shlex.split(command)[1:]
    if args[0] == "compare" and "--seeds" in args:  # two seeds show the aggregation as well as three
        i = args.index("--seeds") + 1
        while i < len(args) and not args[i].startswith("--"):
            i += 1
        args = args[: args.index("--seeds") + 1] + ["0", "1"] + args[i:]
    real = "--data-root" in args
    if args[0] == "eval":
        extra = EVAL_SMALL + (["height=64", "width=32"] if real else [])
    else:
        extra = list(SMALL) + ([] if real else SYNTHETIC)
        if not any(a.startswith("backbone=") for a in args):
            extra.append("backbone=resnet18" if real else "backbone=test_resnet")
        if not real:
            args.append("--quick")
    if "--set" not in args:
        return args + ["--set", *extra]
    i = args.index("--set") + 1
    while i < len(args) and not args[i].startswith("--"):
        i += 1
    return args[:i] + extra + args[i:]  # after the command's own values: these win


def make_reid_root(root: Path) -> None:
    """Market (6 cameras), Duke (8 cameras), CUHK02/03/SYSU and the four small test sets, enough ids for the samplers."""
    market = root / "Market-1501-v15.09.15"
    touch(market / "bounding_box_train", [f"{p:04d}_c{c}s1_{100 * p + c:06d}_01.jpg" for p in range(1, 25) for c in range(1, 7)])
    touch(market / "query", [f"{p:04d}_c1s1_{100 * p:06d}_00.jpg" for p in range(101, 105)])
    touch(market / "bounding_box_test", [f"{p:04d}_c{c}s1_{100 * p + c:06d}_01.jpg" for p in range(101, 105) for c in (2, 3)])
    duke = root / "DukeMTMC-reID"
    touch(duke / "bounding_box_train", [f"{p:04d}_c{c}_f{100 * p + c:07d}.jpg" for p in range(1, 25) for c in range(1, 9)])
    touch(duke / "query", [f"{p:04d}_c1_f{100 * p:07d}.jpg" for p in range(201, 205)])
    touch(duke / "bounding_box_test", [f"{p:04d}_c{c}_f{100 * p + c:07d}.jpg" for p in range(201, 205) for c in (2, 3)])
    make_cuhk02(root / "cuhk02")
    touch(
        root / "cuhk03" / "images_detected",
        [f"{pair}_{p:03d}_{v}_{n:02d}.png" for pair in (1, 2) for p in (1, 2) for v, n in ((1, 1), (2, 6))],
    )
    touch(root / "cuhksysu" / "cropped_images", [f"p{p:05d}_s{p * 10 + k}_{k}.jpg" for p in range(1, 7) for k in (1, 2)])
    make_grid(root / "grid" / "underground_reid", small=True)
    make_viper(root / "viper" / "VIPeR", small=True)
    make_prid(root / "prid2011" / "prid_2011" / "single_shot", small=True)
    make_ilids(root / "ilids" / "i-LIDS_Pedestrian" / "Persons", small=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    make_reid_root(root / "datasets")
    (root / "weights").mkdir()
    # ImageNet stand-ins: the commands run on ResNet-18 here, so the "resnet50" file holds ResNet-18 tensors
    torch.save(build_backbone("resnet18")[0].state_dict(), root / "weights" / "resnet50_imagenet.pth")
    torch.save(MobileNetV2x14().state_dict(), root / "weights" / "mobilenetv2_1.4.pth")
    release = ReIDModel("mobilenetv2_x1_4", num_classes=9, norm="metabin").eval()
    torch.save(to_authors_layout(release), root / "weights" / "metabin_dg_mobilenet.pth")
    return root


COMMANDS = recipe_commands()
FAST = {"metabin-reid train", "metabin-reid train --quick", "metabin-reid train --norm bn"}


def test_the_recipe_lists_its_commands():
    assert len(COMMANDS) >= 12 and any("--preset market-to-duke" in c for c in COMMANDS)


@pytest.mark.parametrize(
    "command", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in COMMANDS], ids=lambda c: c[13:60]
)
def test_recipe_command_runs(command, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    args = with_small_settings(command)
    if args[0] in ("train", "compare") and "--resume" not in args and "--output" not in args:
        # the folder the command as written uses (--quick, added for speed, has a folder of its own)
        written = build_parser().parse_args(shlex.split(command)[1:])
        args += ["--output", _config(written).output]
    if any(a.startswith("runs/synthetic/metabin") for a in args):  # the main job's MetaBIN run
        if not (workdir / "runs" / "synthetic" / "metabin" / "checkpoint.pt").exists():  # made by an earlier command
            assert main(with_small_settings("metabin-reid train") + ["--output", "runs/synthetic"]) == 0
    assert main(args) == 0
