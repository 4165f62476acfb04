"""MetaPerturb with the shipped phi on a ResNet of your own, trained on your own image folder.

Your images: one sub-folder per class, ``IMAGES/<class>/*.png`` (or .jpg, any size: they are
resized). Each class is split into training and test images (``--test-fraction``, fixed by
``--seed``). The ResNet below is ordinary PyTorch; ``metareg.attach_metaperturb`` puts MetaPerturb's
82-parameter perturbation (meta-learned on miniImageNet, frozen) after the second batch norm of
every residual block, and the network trains as usual (the paper's Algorithm 2: the strength
annealed over the first 40% of the steps, Adam 1e-3 with weight decay 5e-4, the learning rate x0.3
at 40/70/90%, test predictions averaged over Monte-Carlo noise samples). With ``--against-base``
the same ResNet is also trained without the perturbation, on the same data order, and the two are
compared on the same test images (a paired difference with its 95% CI).

    python examples/metaperturb_own_resnet.py --images my-images --against-base   # the released code's schedule
    python examples/metaperturb_own_resnet.py --images my-images --steps 500 --mc-samples 10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import metareg

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


# ------------------------------------------------------------------------------------ your network
class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class MyResNet(nn.Module):
    """A small ResNet (three stages of ``blocks`` residual blocks, widths w, 2w, 4w)."""

    def __init__(self, classes: int, blocks: int = 3, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            first = Block(c_in, c_out, stride=1 if i == 0 else 2)
            stages.append(nn.Sequential(first, *[Block(c_out, c_out, stride=1) for _ in range(blocks - 1)]))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


# ------------------------------------------------------------------------------------- your images
def read_image(path: Path, size: int) -> torch.Tensor:
    """An image file as uint8 [3, size, size]."""
    image = Image.open(path).convert("RGB").resize((size, size))
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def load_folder(root: Path, size: int, test_fraction: float, seed: int):
    """(train_x, train_y, test_x, test_y, class names): uint8 images [N, 3, size, size]."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise SystemExit(f"{root}: expected one sub-folder per class (at least 2), found {len(classes)}")
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in SUFFIXES)
        if len(files) < 2:
            raise SystemExit(f"{root / name}: needs at least 2 images (one to train on, one to test)")
        images = [read_image(f, size) for f in files]
        order = torch.randperm(len(images), generator=g).tolist()
        n_test = min(len(images) - 1, max(1, round(test_fraction * len(images))))
        for split, indices in (("test", order[:n_test]), ("train", order[n_test:])):
            parts[f"{split}_x"] += [images[i] for i in indices]
            parts[f"{split}_y"] += [label] * len(indices)
    stack = {k: torch.stack(v) if k.endswith("x") else torch.tensor(v) for k, v in parts.items()}
    return stack["train_x"], stack["train_y"], stack["test_x"], stack["test_y"], classes


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crops (padding 4 pixels at 32x32, 8 above) and horizontal flips."""
    pad = 4 if x.shape[-1] <= 32 else 8
    padded = F.pad(x, (pad, pad, pad, pad))
    i, j = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    x = padded[..., i : i + x.shape[-2], j : j + x.shape[-1]]
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ---------------------------------------------------------------------------------------- training
def train_and_test(net: nn.Module, phi, data, args, device: str) -> torch.Tensor:
    """Train ``net`` (its parameters that require gradients), return per-test-image correctness."""
    train_x, train_y, test_x, test_y = data
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, [int(f * args.steps) for f in (0.4, 0.7, 0.9)], gamma=0.3
    )
    g = torch.Generator().manual_seed(args.seed)  # the same batches for every network
    net.to(device).train()
    start = time.time()
    for step in range(args.steps):
        if phi is not None:
            metareg.set_strength(phi, min(1.0, step / (0.4 * args.steps)))
        index = torch.randint(0, len(train_x), (args.batch_size,), generator=g)
        x = augment(train_x[index].float() / 255, g).to(device)
        loss = F.cross_entropy(net(x), train_y[index].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, args.steps // 10) == 0:
            print(f"  step {step + 1}/{args.steps}: loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    net.eval()  # batch norm and MetaPerturb's scale s on their running statistics
    samples = args.mc_samples if phi is not None else 1  # MetaPerturb samples at test time too
    with torch.no_grad():
        x = test_x.float().to(device) / 255
        probabilities = torch.stack([net(x).softmax(1) for _ in range(samples)]).mean(0)
    return (probabilities.argmax(1).cpu() == test_y).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="your image folder: one sub-folder per class")
    parser.add_argument("--size", type=int, default=32, help="image side after resizing")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--blocks", type=int, default=3, help="residual blocks per stage (3: ResNet20)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10000, help="training steps (the released code: 10000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mc-samples", type=int, default=100, help="noise samples of the test predictions")
    parser.add_argument("--phi", default="builtin", help="'builtin' or a `metareg perturb meta-train` run folder")
    parser.add_argument("--against-base", action="store_true", help="also train the network without MetaPerturb")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    *data, classes = load_folder(Path(args.images), args.size, args.test_fraction, args.seed)
    print(f"{len(classes)} classes, {len(data[0])} training and {len(data[2])} test images")

    torch.manual_seed(args.seed)
    net = MyResNet(len(classes), args.blocks, args.width)
    phi = metareg.load_phi(args.phi)  # frozen: only your network's weights train
    perturbed = metareg.attach_metaperturb(net, phi, at=["layer*.*.bn2"], input_shape=(3, args.size, args.size))
    print("MetaPerturb:")
    correct = train_and_test(perturbed, phi, data, args, args.device)
    print(f"MetaPerturb: {metareg.mean_ci(correct).format(100)} % (mean +- 95% CI over {len(correct)} test images)")
    if args.against_base:
        torch.manual_seed(args.seed)  # the same initial weights
        print("Base (no perturbation):")
        base = train_and_test(MyResNet(len(classes), args.blocks, args.width), None, data, args, args.device)
        print(f"Base: {metareg.mean_ci(base).format(100)} %")
        difference = metareg.paired_difference(correct, base)
        print(f"MetaPerturb - Base (paired over the same test images): {difference.format(100)} points")


if __name__ == "__main__":
    main()
