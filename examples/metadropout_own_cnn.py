"""Meta-Dropout MAML on a CNN of your own, on Omniglot (or the built-in glyphs when you have none).

The network below is a plain ``nn.Sequential``: metareg attaches Meta-Dropout's noise generators
after its convolutions (the paper's Eq. 5-6, the noise before batch norm as in the reference code)
and meta-trains it with second-order MAML, optionally with DropGrad in the inner loop. The
defaults are the Meta-Dropout paper's Omniglot 20-way 1-shot setting (60000 meta-iterations: a
GPU's work); every number can be made small to try it out:

    python examples/metadropout_own_cnn.py --data-root DATA/omniglot            # the paper's schedule
    python examples/metadropout_own_cnn.py --steps 200 --episodes 100           # a few minutes on a CPU
    python examples/metadropout_own_cnn.py --way 5 --steps 300 --channels 32    # built-in glyphs, no files

It prints the meta-test accuracy (mean +- 95% CI over ``--episodes`` episodes, S = ``--mc-samples``
noise samples per inner step) and, with ``--save``, writes the learner's weights.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import metareg


def my_cnn(way: int, channels: int, image_size: int = 28) -> nn.Sequential:
    """Four conv blocks (conv, batch norm on the batch's statistics as MAML does, max-pool, ReLU)
    and a linear classifier: any network of yours works the same way."""
    layers: list[nn.Module] = []
    size, c_in = image_size, 1
    for _ in range(4):
        layers += [
            nn.Conv2d(c_in, channels, 3, padding=1),
            nn.BatchNorm2d(channels, track_running_stats=False),
            nn.MaxPool2d(2),
            nn.ReLU(),
        ]
        size, c_in = size // 2, channels
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * size * size, way))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="an Omniglot folder (the official zips); default: the built-in glyphs")
    parser.add_argument("--way", type=int, default=20)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60000, help="meta-iterations (the paper: 60000)")
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--meta-lr", type=float, default=3e-4)
    parser.add_argument("--dropgrad", type=float, default=0.0, help="DropGrad's rate p in the inner loop (0: off)")
    parser.add_argument("--episodes", type=int, default=1000, help="meta-test episodes")
    parser.add_argument("--mc-samples", type=int, default=30, help="noise samples per inner step at meta-test (S)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--save", help="write the meta-trained learner's weights here (torch.save of a state dict)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = {"name": "omniglot", "root": args.data_root} if args.data_root else {"name": "glyphs"}
    if args.data_root:  # the Vinyals split: meta-train on train + val, meta-test on test
        data |= {"train_split": "trainval", "val_split": None}
    config = metareg.Config.from_dict({"data": data | {"way": args.way, "shot": args.shot, "query": args.query}})
    train, test = metareg.build_source(config, config.data.train_split), metareg.build_source(config, "test")

    cnn = my_cnn(args.way, args.channels)
    convs = [name for name, module in cnn.named_modules() if isinstance(module, nn.Conv2d)]
    net = metareg.attach(
        cnn, metareg.build_perturbation("meta-dropout"), at=convs, input_shape=(1, 28, 28), running_stats=False
    )
    transforms = [{"name": "dropgrad", "kind": "gaussian", "p": args.dropgrad}] if args.dropgrad else []
    learner = metareg.MAML(
        net,
        lr=args.inner_lr,
        steps=args.inner_steps,
        fast=["model.*"],  # your network adapts in the inner loop; Meta-Dropout's phi is meta-only
        transforms=transforms,
        eval_mc_samples=args.mc_samples,
    ).to(args.device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=args.meta_lr)

    episodes = torch.Generator().manual_seed(args.seed)
    start, every = time.time(), max(1, args.steps // 20)
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        metrics = learner.meta_backward(train.sample(args.meta_batch, episodes).to(args.device))
        torch.nn.utils.clip_grad_value_(learner.parameters(), 3.0)
        optimizer.step()
        if step % every == 0 or step == args.steps:
            print(
                f"step {step}/{args.steps}: query loss {metrics['loss']:.3f}, accuracy {metrics['score']:.3f} "
                f"({time.time() - start:.0f} s)"
            )

    result = metareg.evaluate(learner, test, episodes=args.episodes, seed=1234, device=args.device, progress=False)
    print(
        f"test accuracy: {result.estimate.format(100)} % (mean +- 95% CI; {config.data.name} test split, "
        f"{args.way}-way {args.shot}-shot, {args.episodes} episodes, S = {args.mc_samples})"
    )
    if args.save:
        torch.save(learner.state_dict(), args.save)
        print(f"saved the learner's weights to {args.save}")


if __name__ == "__main__":
    main()
