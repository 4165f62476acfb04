"""Measure what the seed tables' runs cost, for ``metareg.runs.costs.MEASURED``.

For every entry: the representative preset runs 3 training iterations through the real trainer
(``metareg train`` / ``perturb meta-train`` / ``perturb transfer`` code, one thread, as each job of
``metareg reproduce`` runs), with ``torch.utils.flop_counter.FlopCounterMode`` around iteration 2;
iteration 3 is timed (the log's training seconds). ``--iterations 2`` (for the slow entries):
FLOPs counted in iteration 1, iteration 2 timed. Data sets that are not on this machine are
replaced by the built-in glyphs at the preset's image size and class count (the cost of a step does
not depend on the pixels). Prints the ``MEASURED`` dict to paste into ``metareg/runs/costs.py``
with the load average during the measurement.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/seed_costs.py [KEY ...] [--data DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from metareg.config import SCHEMAS, parse_assignment
from metareg.meta.joint_trainer import JointTrainer
from metareg.meta.ordinary import TransferTrainer
from metareg.meta.trainer import MetaTrainer
from metareg.runs import KINDS
from metareg.runs.common import resolve
from metareg.runs.presets import PRESETS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FAST = ["data.val_split=null", "train.log_every=1", "train.checkpoint_every=1000"]


def _glyphs(classes: int, size: int, per_class: int | None = None) -> list[str]:
    """The glyphs in place of a data set that is not here: ``classes`` classes of ``size`` pixels
    (``per_class`` training images each and one test image, from one split)."""
    images = (per_class or 20) + 1
    out = ["data.name=glyphs", f"data.image_size={size}"]
    out.append(f"data.options={{num_classes: {classes}, instances_per_class: {images}}}")
    if per_class:
        out += [f"data.train_per_class={per_class}", "data.train_split=train", "data.test_split=train"]
    return out


def entries(data: Path) -> dict[str, tuple[str, list[str]]]:
    """key -> (preset, overrides): the representative run of each cost entry."""
    mini, omniglot = [f"data.root={data / 'miniimagenet-100'}"], [f"data.root={data / 'omniglot'}"]
    second_order = ["inner.first_order_epochs=0"]  # the dominant phase (from epoch 11 of 100)
    return {
        "mamlpp-omniglot-20w1s": ("omniglot-20w1s-mamlpp", omniglot + FAST),
        "mamlpp-miniimagenet-5w1s": ("miniimagenet-5w1s-mamlpp", mini + FAST + second_order),
        "mamlpp-miniimagenet-5w5s": ("miniimagenet-5w5s-mamlpp", mini + FAST + second_order),
        "resnet18-5w1s": ("dropgrad-maml-5w1s-dropgrad", mini + FAST),
        "resnet18-5w5s": ("dropgrad-maml-5w5s-dropgrad", mini + FAST),
        "resnet18-5w1s-metasgd": ("dropgrad-metasgd-5w1s-dropgrad", mini + FAST),
        "resnet18-5w5s-metasgd": ("dropgrad-metasgd-5w5s-dropgrad", mini + FAST),
        "resnet18-5w5s-3steps": ("dropgrad-maml-5w5s-n3-dropgrad", mini + FAST),
        "resnet18-5w5s-7steps": ("dropgrad-maml-5w5s-n7-dropgrad", mini + FAST),
        "resnet12-5w1s": ("miniimagenet-5w1s-resnet12", mini + FAST),
        "resnet12-5w5s": ("miniimagenet-5w5s-resnet12", mini + FAST),
        "resnet18-pretrain": (
            "dropgrad-pretrain-resnet18",
            [*mini, "data.train_per_class=90", "train.log_every=1", "perturb.mc_samples=1"],
        ),
        "metaperturb-meta-train-resnet20": (
            "perturb-tinyimagenet-resnet20",
            [*_glyphs(200, 32), "data.classes=200", "train.log_every=1"],
        ),
        "metaperturb-transfer-resnet20-32": (
            "transfer-scifar100",
            [*_glyphs(100, 32, 50), "train.log_every=1", "perturb.mc_samples=1"],
        ),
        "metaperturb-transfer-resnet20-84": (
            "transfer-cub",
            [*_glyphs(200, 84, 30), "train.log_every=1", "perturb.mc_samples=1"],
        ),
        "mtnet-omniglot-5w1s": ("mtnet-omniglot-5w1s-mtnet", omniglot + FAST),
        "mtnet-omniglot-20w1s": ("mtnet-omniglot-20w1s-mtnet", omniglot + FAST),
        "mtnet-miniimagenet-5w1s": ("mtnet-miniimagenet-5w1s-mtnet", mini + FAST),
    }


def measure(preset: str, overrides: list[str], iterations: int = 3) -> tuple[float, float]:
    """(seconds of the last iteration, GFLOP of the one before) of ``preset`` with ``overrides``."""
    counted: dict[str, float] = {}
    counted_step = iterations - 2
    originals = {cls: cls.train_step for cls in (MetaTrainer, JointTrainer, TransferTrainer)}

    def counting(original):
        def step(self, i):
            if i != counted_step:
                return original(self, i)
            with FlopCounterMode(display=False) as mode:
                out = original(self, i)
            counted["flops"] = mode.get_total_flops()
            return out

        return step

    kind = PRESETS[preset].kind
    assignments = [parse_assignment(o) for o in [*overrides, f"train.steps={iterations}"]]
    config = resolve(preset, None, assignments, SCHEMAS[kind])
    try:
        for cls, original in originals.items():
            cls.train_step = counting(original)
        with tempfile.TemporaryDirectory() as folder:
            KINDS[kind].run(config, Path(folder) / "run", progress=False)
            with (Path(folder) / "run" / "log.csv").open(newline="") as f:
                seconds = {int(r["step"]): float(r["seconds"]) for r in csv.DictReader(f)}
    finally:
        for cls, original in originals.items():
            cls.train_step = original
    return seconds[iterations] - seconds[iterations - 1], counted["flops"] / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("keys", nargs="*", help="entries to measure (default: all)")
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--iterations", type=int, default=3, choices=(2, 3), help="iterations per entry (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    table = entries(args.data)
    loads = []
    print("MEASURED = {")
    for key in args.keys or table:
        preset, overrides = table[key]
        loads.append(os.getloadavg()[0])
        start = time.perf_counter()
        seconds, gflop = measure(preset, overrides, args.iterations)
        loads.append(os.getloadavg()[0])
        what = f"{preset}, {args.iterations} iterations, {torch.get_num_threads()} thread(s)"
        print(
            f'    "{key}": Cost({seconds:.2f}, {gflop:.1f}, "{what}"),  # {time.perf_counter() - start:.0f} s',
            flush=True,
        )
    print("}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, 1-minute load average {min(loads):.1f} to {max(loads):.1f}")


if __name__ == "__main__":
    main()
