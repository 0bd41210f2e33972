"""Fine-tune a torchvision model with MetaBIN on a folder of images grouped by domain.

Layout: ROOT/<domain>/<class>/<image>.jpg (e.g. ROOT/photo/dog/1.jpg, ROOT/sketch/dog/7.jpg). Each
domain folder is read with torchvision's ImageFolder; the domain label is the index of the domain
folder (sorted names) and classes are matched by name across domains. After training the model is
folded for inference (metabin_layers.export) and optionally saved as a torch.export program.

    python docs/examples/finetune_torchvision_folder.py --make-demo-data /tmp/demo --epochs 1 --iters 3
    python docs/examples/finetune_torchvision_folder.py --root ROOT --arch resnet50 --weights DEFAULT --epochs 20
"""

import argparse
import random
from functools import partial
from pathlib import Path

import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision import transforms as T

from metabin_layers import MetaBINOptimizer, base_parameters, convert_bn_to_metabin, rho_parameters
from metabin_layers.export import fold_metabin_for_inference
from metabin_layers.losses import cross_entropy_label_smooth, inter_domain_shuffle_loss, intra_domain_scatter_loss, triplet_loss
from metabin_layers.reid.sampler import DomainBalancedSampler, RandomIdentitySampler


def make_demo_data(root, per_class=8, size=48, seed=0):
    """Write ROOT/<domain>/<class>/*.jpg: 3 shapes drawn in 3 styles (colour, background, blur)."""
    rng = random.Random(seed)
    styles = {
        "photo": ((200, 60, 40), (235, 230, 220), 0),
        "sketch": ((30, 30, 30), (255, 255, 255), 1),
        "night": ((90, 200, 255), (20, 25, 60), 2),
    }
    for domain, (fg, bg, blur) in styles.items():
        for cls in ("circle", "square", "triangle"):
            folder = Path(root) / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.new("RGB", (size, size), tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in bg))
                d, r = ImageDraw.Draw(img), rng.randint(size // 5, size // 3)
                cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
                box = (cx - r, cy - r, cx + r, cy + r)
                if cls == "circle":
                    d.ellipse(box, fill=fg)
                elif cls == "square":
                    d.rectangle(box, fill=fg)
                else:
                    d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
                img.filter(ImageFilter.GaussianBlur(blur)).save(folder / f"{i}.jpg", quality=90)
    return root


class WithDomain(Dataset):
    """An ImageFolder of one domain whose samples carry the global class and the domain index."""

    def __init__(self, folder, domain, class_index):
        self.folder, self.domain = folder, domain
        self.remap = [class_index[c] for c in folder.classes]

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        img, target = self.folder[i]
        return {"img": img, "label": self.remap[target], "domain": self.domain}


def load_domains(root, size, train):
    aug = [T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2)] if train else []
    tf = T.Compose([T.Resize((size, size)), *aug, T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    domains = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    folders = [torchvision.datasets.ImageFolder(Path(root) / d, transform=tf) for d in domains]
    classes = sorted({c for f in folders for c in f.classes})
    parts = [WithDomain(f, i, {c: k for k, c in enumerate(classes)}) for i, f in enumerate(folders)]
    # (path, label, camera, domain) items in ConcatDataset order, for the P x K batch samplers
    items = [(path, p.remap[t], 0, p.domain) for p in parts for path, t in p.folder.samples]
    return ConcatDataset(parts), items, domains, classes


class Classifier(nn.Module):
    """A torchvision model split into features (for the metric losses) and its classification head."""

    def __init__(self, arch, weights, num_classes):
        super().__init__()
        net = torchvision.models.get_model(arch, weights=weights)
        name = "fc" if hasattr(net, "fc") else "classifier"
        old = getattr(net, name)
        last = old if isinstance(old, nn.Linear) else [m for m in old.modules() if isinstance(m, nn.Linear)][-1]
        setattr(net, name, nn.Identity())
        self.features = convert_bn_to_metabin(net)  # every BatchNorm -> MetaBIN, rho = 1 (= the original)
        self.head = nn.Linear(last.in_features, num_classes)

    def forward(self, x):
        feat = self.features(x)
        return feat, self.head(feat)


def meta_train_loss(model, batch, mask):  # L_mtr on the meta-train domains
    f, logit = model(batch["img"][mask])
    y, dom = batch["label"][mask], batch["domain"][mask]
    return cross_entropy_label_smooth(logit, y) + intra_domain_scatter_loss(f, dom) + inter_domain_shuffle_loss(f, y, dom)


def meta_test_loss(model, batch, mask):  # L_mte on the meta-test domains, through rho'
    f, logit = model(batch["img"][mask])
    y = batch["label"][mask]
    return cross_entropy_label_smooth(logit, y) + triplet_loss(f, y)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", help="ROOT/<domain>/<class>/*.jpg")
    p.add_argument("--make-demo-data", metavar="DIR", help="write a tiny generated dataset to DIR (and use it)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--iters", type=int, default=None, help="iterations per epoch (default: images / batch)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--weights", default=None, help="torchvision weights, e.g. DEFAULT (downloads)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--instances", type=int, default=4, help="K images per class and domain in a batch")
    p.add_argument("--classes-per-domain", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--save", help="write the folded model as a torch.export program (.pt2) to this file")
    args = p.parse_args()
    if args.make_demo_data:
        args.root = args.root or make_demo_data(args.make_demo_data)
        print(f"demo data written to {args.make_demo_data}")
    if not args.root:
        p.error("give --root (or --make-demo-data DIR)")
    torch.manual_seed(0)

    data, items, domains, classes = load_domains(args.root, args.size, train=True)
    print(f"{len(items)} images, domains {domains}, classes {classes}")
    batch = len(domains) * args.classes_per_domain * args.instances
    # Base batches: P x K over (class, domain) groups, so every batch holds several classes.
    groups = [(path, (label, dom), cam, dom) for path, label, cam, dom in items]
    base_loader = DataLoader(data, batch_sampler=RandomIdentitySampler(groups, batch, args.instances, seed=0))
    meta_loader = DataLoader(data, batch_sampler=DomainBalancedSampler(items, batch, args.instances, seed=1))
    iters = args.iters or max(1, len(items) // batch)

    model = Classifier(args.arch, args.weights, len(classes))
    base = torch.optim.SGD(base_parameters(model), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    opt = MetaBINOptimizer(model, base, rho_lr=10 * args.lr, inner_lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * iters)
    stream = zip(base_loader, meta_loader)  # both samplers are endless streams of batches
    model.train()
    for epoch in range(1, args.epochs + 1):
        for it in range(1, iters + 1):
            b, m = next(stream)
            opt.zero_grad()
            feat, logits = model(b["img"])
            loss = cross_entropy_label_smooth(logits, b["label"]) + triplet_loss(feat, b["label"])
            opt.backward(loss)
            opt.step()
            s = opt.split(m["domain"])  # meta-train / meta-test domains of this episode
            out = opt.meta_step(
                meta_train_loss=partial(meta_train_loss, model, m, s.train_index),
                meta_test_loss=partial(meta_test_loss, model, m, s.test_index),
            )
            sched.step()
            rho = torch.cat([r.detach().flatten() for r in rho_parameters(model)]).mean().item()
            print(
                f"epoch {epoch} iter {it}/{iters}: loss {loss.item():.4f}  meta-train "
                f"{out['meta_train_loss'].item():.4f}  meta-test {out['meta_test_loss'].item():.4f}  mean rho {rho:.4f}",
                flush=True,
            )

    model.eval()  # accuracy per domain (on the training folder here: keep a held-out domain for a real test)
    eval_data, *_ = load_domains(args.root, args.size, train=False)
    folded = fold_metabin_for_inference(model)  # one instance-norm pass + per-channel affine per layer
    correct, total, diff = [0] * len(domains), [0] * len(domains), 0.0
    with torch.no_grad():
        for e in DataLoader(eval_data, batch_size=64):
            logits = model(e["img"])[1]
            diff = max(diff, (folded(e["img"])[1] - logits).abs().max().item())
            for d, ok in zip(e["domain"].tolist(), (logits.argmax(1) == e["label"]).tolist()):
                correct[d] += ok
                total[d] += 1
    for d, name in enumerate(domains):
        print(f"accuracy {name}: {correct[d] / total[d]:.3f} ({total[d]} images)")
    print(f"folded model: max |difference| to the eval model {diff:.2e}")
    if args.save:  # torch.export, not TorchScript (deprecated): load with torch.export.load(path).module()
        program = torch.export.export(folded, (e["img"],), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
        torch.export.save(program, args.save)
        print(f"saved the folded model (torch.export program) to {args.save}")


if __name__ == "__main__":
    main()
