"""A meta-trained model that ships with metareg, adapted to five images you pass in.

The built-in checkpoint ``builtin:omniglot-20w1s-cpu`` is MAML meta-trained on Omniglot
characters (see ``metareg checkpoints``). Give it one image of each of up to 20 new characters
(``--support``: each image is its own class, labelled by its file name), and it adapts to them in
its meta-test inner loop (5 gradient steps); then it tells, for each other image you pass, which
support character it is, with the probability:

    python examples/adapt_builtin.py --support a.png b.png c.png d.png e.png -- query1.png query2.png

Images of any size and colour are read as grayscale and resized to 28 x 28; drawings with dark ink
on a light background (as scanned, and as Omniglot's files are) are inverted to the bright ink on a
dark background the model was trained on (``--invert auto``, the default, decides per image from
its border).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

import metareg


def read(path: str, size: int, invert: str) -> torch.Tensor:
    """A drawing as floats in [0, 1], [1, size, size], bright ink on a dark background."""
    image = Image.open(path).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(1, size, size).float() / 255
    border = torch.cat([x[0, 0], x[0, -1], x[0, :, 0], x[0, :, -1]])
    if invert == "yes" or (invert == "auto" and border.mean() > 0.5):
        x = 1 - x
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--support", nargs="+", required=True, help="one image per class (its file name is its label)")
    parser.add_argument("queries", nargs="+", help="images to classify")
    parser.add_argument("--checkpoint", default="builtin:omniglot-20w1s-cpu", help="builtin:NAME or a run folder")
    parser.add_argument("--invert", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--steps", type=int, help="inner steps (default: the checkpoint's meta-test steps)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = metareg.load(args.checkpoint, device=args.device)
    if not isinstance(model, metareg.FewShotModel):
        raise SystemExit(f"{args.checkpoint} is not a meta-trained few-shot model")
    if len(args.support) > model.way:
        raise SystemExit(f"this model adapts to at most {model.way} classes, got {len(args.support)} support images")
    size = model.input_shape[-1]
    support_x = torch.stack([read(p, size, args.invert) for p in args.support])
    support_y = torch.arange(len(args.support))
    predictor = model.adapt(support_x, support_y, steps=args.steps)

    query_x = torch.stack([read(p, size, args.invert) for p in args.queries])
    # the model has `way` outputs; only the first len(support) are classes here
    probabilities = predictor.predict(query_x)[:, : len(args.support)]
    probabilities = probabilities / probabilities.sum(1, keepdim=True)
    names = [Path(p).stem for p in args.support]
    for path, p in zip(args.queries, probabilities):
        best = int(p.argmax())
        print(f"{path}: {names[best]} (p = {p[best]:.2f})")


if __name__ == "__main__":
    main()
