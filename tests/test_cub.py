"""The episodic CUB-200-2011 (Chen et al.'s 100/50/50 class split) on a small generated tree in the
official layout; a broken tree is refused with one line; cross-domain meta-testing reads its test
split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_one_line, cli_subprocess, write_tiny_mini
from metareg.build import build_source
from metareg.config import parse_assignment
from metareg.data import build_task_source
from metareg.data.cub import chen_split, load_cub
from metareg.errors import ConfigError, DataError
from metareg.runs.common import resolve


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAREG_CACHE", str(tmp_path / "cache"))


def write_tiny_cub(root: Path, images: int = 2, size: int = 10) -> Path:
    """CUB_200_2011/classes.txt and images/<NNN.Name>/*.jpg for the 200 classes, ``images`` each
    (class i's pixels are all i, so a loaded image tells its class). Listed in id order, written shuffled."""
    base = root / "CUB_200_2011"
    names = [f"{i + 1:03d}.Bird_{i + 1}" for i in range(200)]
    lines = [f"{i + 1} {name}" for i, name in enumerate(names)]
    (base / "images").mkdir(parents=True)
    (base / "classes.txt").write_text("\n".join(lines) + "\n")
    for i in np.random.default_rng(0).permutation(200):
        folder = base / "images" / names[i]
        folder.mkdir()
        for k in range(images):
            Image.fromarray(np.full((size, size + k, 3), i, dtype=np.uint8)).save(folder / f"Bird_{k}.jpg", quality=95)
    return root


def test_chen_split_sizes_and_classes(tmp_path):
    """100 / 50 / 50 classes: even indices train, 1 mod 4 val, 3 mod 4 test (Chen et al.'s
    write_CUB_filelist.py). Catches another rule or an unsorted class order."""
    root = write_tiny_cub(tmp_path)
    splits = {s: load_cub(root, s, image_size=8) for s in ("train", "val", "test")}
    assert [splits[s].num_classes for s in ("train", "val", "test")] == [100, 50, 50]
    assert splits["train"].class_names[:2] == ["001.Bird_1", "003.Bird_3"]
    assert splits["val"].class_names[:2] == ["002.Bird_2", "006.Bird_6"]
    assert splits["test"].class_names[:2] == ["004.Bird_4", "008.Bird_8"]
    assert [chen_split(i) for i in range(8)] == ["train", "val", "train", "test"] * 2
    test = splits["test"]
    assert test.images.shape == (100, 3, 8, 8) and test.images.dtype == torch.uint8
    for c, members in enumerate(test.class_indices):  # every image in its own class's folder
        index = int(test.class_names[c][:3]) - 1
        assert torch.all((test.images[members].float() - index).abs() <= 2)
    # the root may be the CUB_200_2011 folder itself; the episodes come out as the sampler makes them
    same = load_cub(root / "CUB_200_2011", "test", image_size=8)
    assert torch.equal(same.images, test.images)
    source = build_task_source("cub", "test", way=5, shot=1, query=1, root=root, image_size=8)
    batch = source.sample(2, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (2, 5, 3, 8, 8)


def _break(root: Path, how: str) -> None:
    base = root / "CUB_200_2011"
    if how == "no classes.txt":
        (base / "classes.txt").unlink()
    elif how == "no images folder":
        shutil.rmtree(base / "images")
    elif how == "missing class folder":
        shutil.rmtree(base / "images" / "004.Bird_4")
    elif how == "empty class folder":
        for f in (base / "images" / "004.Bird_4").iterdir():
            f.unlink()
    elif how == "199 classes":
        lines = (base / "classes.txt").read_text().splitlines()
        (base / "classes.txt").write_text("\n".join(lines[:-1]) + "\n")
    elif how == "bad line":
        (base / "classes.txt").write_text("1\n" + (base / "classes.txt").read_text())
    elif how == "corrupt image":
        (base / "images" / "004.Bird_4" / "Bird_0.jpg").write_bytes(b"not a jpeg")


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_cub(tmp_path_factory.mktemp("cub"), images=2, size=4)


BREAKAGES = [
    ("no classes.txt", "classes.txt"),
    ("no images folder", "images/"),
    ("missing class folder", "004.Bird_4"),
    ("empty class folder", "holds no images"),
    ("199 classes", "199 distinct classes"),
    ("bad line", "line 1"),
    ("corrupt image", "Bird_0.jpg"),
]


@pytest.mark.parametrize(("how", "fragment"), BREAKAGES)
def test_a_broken_tree_is_refused_with_one_line(tiny_tree, tmp_path, how, fragment):
    root = Path(shutil.copytree(tiny_tree, tmp_path / "cub"))
    _break(root, how)
    with pytest.raises(DataError, match=fragment.replace(".", r"\.")) as caught:
        load_cub(root, "test", image_size=4)
    assert "\n" not in str(caught.value)
    if how in ("no classes.txt", "missing class folder", "corrupt image"):  # and on the command line
        done = cli_subprocess(
            "train",
            "--set",
            "data.name=cub",
            "--set",
            "data.train_split=test",
            "--set",
            "data.val_split=null",
            "--set",
            "data.query=1",
            "--data-root",
            str(root),
            "--steps",
            "1",
            "--out",
            str(tmp_path / "run"),
        )
        assert_one_line(done.returncode, done.stderr, fragment)


def test_cross_domain_runs_meta_test_on_cub(tmp_path):
    """data.test_name: the test split's episodes come from CUB (its own root), training and
    validation from miniImageNet; a test set of other channels is refused at once."""
    cub = write_tiny_cub(tmp_path / "cub", images=2, size=6)
    mini = write_tiny_mini(tmp_path / "mini", {f"n{i:02d}": 3 for i in range(6)}, size=(6, 6))
    config = resolve(
        None,
        None,
        [
            parse_assignment(o)
            for o in (
                "data.name=miniimagenet",
                f"data.root={mini}",
                "data.test_name=cub",
                f"data.test_root={cub}",
                "data.image_size=16",
                "data.shot=1",
                "data.query=1",
            )
        ],
    )
    test = build_source(config, "test")
    assert test.classes.dataset == "cub" and test.classes.num_classes == 50
    assert build_source(config, "train").classes.dataset == "miniimagenet"
    assert build_source(config, "val").classes.dataset == "miniimagenet"
    with pytest.raises(ConfigError, match="1 vs 3 channels"):
        resolve(None, None, [parse_assignment("data.test_name=glyphs"), parse_assignment("data.name=cub")])
