"""A custom MetaBIN training loop: a small timm CNN, synthetic multi-domain Re-ID data, CPU.

python docs/examples/custom_loop_timm.py --iters 5
"""

import argparse
from functools import partial

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from metabin_layers import MetaBINOptimizer, base_parameters, convert_bn_to_metabin, rho_parameters
from metabin_layers.losses import cross_entropy_label_smooth, inter_domain_shuffle_loss, intra_domain_scatter_loss, triplet_loss
from metabin_layers.reid.sampler import DomainBalancedSampler, RandomIdentitySampler
from metabin_layers.reid.synthetic import SyntheticReID

parser = argparse.ArgumentParser()
parser.add_argument("--iters", type=int, default=20)
parser.add_argument("--model", default="mobilenetv3_small_050")  # BatchNormAct2d -> MetaBINAct2d
args = parser.parse_args()
torch.manual_seed(0)

# 3 source domains (camera styles) with 8 identities each; style 3 is held out.
data = SyntheticReID(num_train_ids=24, num_test_ids=4, num_styles=4, held_out_styles=(3,), images_per_id_per_style=4)
base_loader = DataLoader(data.dataset("train"), batch_sampler=RandomIdentitySampler(data.train, 24, 4))
meta_loader = DataLoader(data.dataset("train"), batch_sampler=DomainBalancedSampler(data.train, 24, 4))


class ReIDNet(nn.Module):
    def __init__(self, num_ids):
        super().__init__()
        self.backbone = convert_bn_to_metabin(timm.create_model(args.model, num_classes=0))  # rho_init=1
        dim = getattr(self.backbone, "head_hidden_size", self.backbone.num_features)  # pooled feature size
        self.head = nn.Linear(dim, num_ids)

    def forward(self, img):
        feat = self.backbone((img.float() / 255 - 0.45) / 0.225)
        return feat, self.head(feat)


def meta_train_loss(batch, mask):  # L_mtr on the meta-train domains
    f, _ = model(batch["img"][mask])
    pid, dom = batch["pid"][mask], batch["domain"][mask]
    return inter_domain_shuffle_loss(f, pid, dom) + triplet_loss(f, pid) + intra_domain_scatter_loss(f, dom)


def meta_test_loss(batch, mask):  # L_mte on the meta-test domains, through rho'
    f, logit = model(batch["img"][mask])
    return triplet_loss(f, batch["pid"][mask]) + cross_entropy_label_smooth(logit, batch["pid"][mask])


model = ReIDNet(data.num_train_pids)
base = torch.optim.SGD(base_parameters(model), lr=0.01, momentum=0.9, weight_decay=5e-4)
opt = MetaBINOptimizer(model, base, rho_lr=0.1, inner_lr=0.01)

for it, (b, m) in enumerate(zip(base_loader, meta_loader), 1):
    opt.zero_grad()  # 1) base update of the weights (rho frozen)
    feat, logits = model(b["img"])
    base_loss = cross_entropy_label_smooth(logits, b["pid"]) + triplet_loss(feat, b["pid"])
    opt.backward(base_loss)
    opt.step()
    split = opt.split(m["domain"])  # 2) meta step on rho: meta-train / meta-test domains
    out = opt.meta_step(
        meta_train_loss=partial(meta_train_loss, m, split.train_index),
        meta_test_loss=partial(meta_test_loss, m, split.test_index),
    )
    rho = torch.cat([r.detach().flatten() for r in rho_parameters(model)])
    print(
        f"iter {it}: base {base_loss.item():.4f}  meta-train {out['meta_train_loss'].item():.4f}  "
        f"meta-test {out['meta_test_loss'].item():.4f}  mean rho {rho.mean().item():.4f}",
        flush=True,
    )
    if it == args.iters:
        break
print("done")
