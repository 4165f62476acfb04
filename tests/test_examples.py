"""The scripts of ``examples/`` run as a user runs them (a subprocess, from another folder), on a
tiny budget given by their flags; each must finish and print what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import metareg

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SHARED = Path(os.environ.get("METAREG_SHARED_DATA", REPO.parent / "shared" / "data"))
pytestmark = pytest.mark.slow  # each starts a process
OMNIGLOT = SHARED / "omniglot"


def run(script: str, *args: str, cwd: Path) -> str:
    """Run an example with this interpreter (and this checkout's package), return its stdout."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def save_gray(x: torch.Tensor, path: Path) -> None:
    """A [1, H, W] image in [0, 1] as a PNG."""
    pixels = (x[0] * 255).round().to(torch.uint8)
    Image.frombytes("L", (pixels.shape[1], pixels.shape[0]), bytes(pixels.flatten().tolist())).save(path)


TINY_META_DROPOUT = ["--way", "5", "--channels", "8", "--steps", "2", "--meta-batch", "2", "--inner-steps", "1"]
TINY_META_DROPOUT += ["--episodes", "4", "--mc-samples", "2", "--dropgrad", "0.1"]


def test_metadropout_own_cnn_on_glyphs(tmp_path):
    """Meta-Dropout MAML on the script's own CNN, the built-in glyphs, two meta-iterations: it
    trains, tests (accuracy +- CI over the episodes) and saves a state dict that holds both the
    CNN's weights and Meta-Dropout's phi."""
    out = run("metadropout_own_cnn.py", *TINY_META_DROPOUT, "--save", "learner.pt", cwd=tmp_path)
    assert "step 2/2: query loss" in out
    assert re.search(r"test accuracy: \d+\.\d\d \+- \d+\.\d\d % .*glyphs test split, 5-way 1-shot, 4 episodes", out)
    state = torch.load(tmp_path / "learner.pt", weights_only=True)
    assert any(k.startswith("model.model.0.") for k in state) and any(".phi." in k for k in state)


@pytest.mark.skipif(not (OMNIGLOT / "images_evaluation.zip").exists(), reason=f"Omniglot not found under {OMNIGLOT}")
def test_metadropout_own_cnn_on_omniglot(tmp_path):
    """The same script on the real Omniglot zips (--data-root), meta-tested on the Vinyals test split."""
    out = run("metadropout_own_cnn.py", *TINY_META_DROPOUT, "--data-root", str(OMNIGLOT), cwd=tmp_path)
    assert re.search(r"test accuracy: .*omniglot test split, 5-way 1-shot", out)


def test_metaperturb_own_resnet_on_an_image_folder(tmp_path):
    """MetaPerturb (the shipped phi) on the script's own ResNet, trained on an image folder made
    here (3 classes of 5 colour images of different sizes), against Base on the same data: both
    report accuracy over the same test images and their paired difference."""
    g = torch.Generator().manual_seed(0)
    for c, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        folder = tmp_path / "images" / f"class-{c}"
        folder.mkdir(parents=True)
        for i in range(5):
            side = 20 + 4 * i
            noise = (torch.rand(side, side, 3, generator=g) * 50).to(torch.uint8)
            pixels = torch.tensor(color, dtype=torch.uint8) + noise
            Image.frombytes("RGB", (side, side), bytes(pixels.flatten().tolist())).save(folder / f"{i}.png")
    out = run(
        "metaperturb_own_resnet.py",
        *["--images", str(tmp_path / "images"), "--size", "16", "--blocks", "1", "--width", "8"],
        *["--steps", "3", "--batch-size", "8", "--mc-samples", "2", "--against-base"],
        cwd=tmp_path,
    )
    assert "3 classes, 12 training and 3 test images" in out
    assert re.search(r"MetaPerturb: \d+\.\d\d \+- \d+\.\d\d % \(mean \+- 95% CI over 3 test images\)", out)
    assert re.search(r"MetaPerturb - Base \(paired over the same test images\): -?\d+\.\d\d \+- ", out)


def test_adapt_builtin_to_five_images(tmp_path):
    """The shipped Omniglot checkpoint adapted to five glyph characters saved as dark ink on white
    PNGs (as a user scans them; the script inverts them), classifying four other drawings of each.
    It names every query and gets 18 of the 20 right here (chance: 4); mutation caught: never
    inverting (the model then sees the wrong polarity and gets 14)."""
    config = metareg.Config.from_dict({"data": {"name": "glyphs", "way": 5, "shot": 1, "query": 4}})
    task = metareg.build_source(config, "test").sample(1, torch.Generator().manual_seed(3))
    support, queries, truth = [], [], {}
    for x, y in zip(task.support_x[0], task.support_y[0].tolist()):
        path = tmp_path / f"char{y}.png"
        save_gray(1 - x, path)
        support.append(str(path))
    for i, (x, y) in enumerate(zip(task.query_x[0], task.query_y[0].tolist())):
        path = tmp_path / f"query{i}.png"
        save_gray(1 - x, path)
        queries.append(str(path))
        truth[str(path)] = f"char{y}"
    out = run("adapt_builtin.py", "--support", *support, "--", *queries, cwd=tmp_path)
    answers = dict(re.findall(r"^(\S+): (char\d) \(p = [01]\.\d\d\)$", out, re.MULTILINE))
    assert set(answers) == set(queries)
    right = sum(answers[q] == truth[q] for q in queries)
    assert right >= 16, f"{right} of 20 right:\n{out}"
