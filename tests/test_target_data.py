"""Tests of metareg.data.targets: every transfer-target loader on a tiny copy of its layout.

Each builder writes a few small images and annotation files into ``tmp_path`` in the data set's own
layout (JPEG/PNG files with PIL, binary files with numpy, MATLAB files with scipy); no real data
is read. Images of class k are a solid colour COLOURS[k], so a loaded image's colour tells whether
its label and pixels belong together. METAREG_CACHE points at a temporary folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
try:
    import metareg.data  # noqa: F401
except ImportError:  # not installed: test the source tree
    sys.path.insert(0, str(REPO / "src"))

from metareg.data import labeled_datasets, load_labeled  # noqa: E402
from metareg.data.targets import TARGET_DATASETS  # noqa: E402
from metareg.errors import DataError  # noqa: E402

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 50, 210)]
WHITE = (255, 255, 255)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch, tmp_path):
    monkeypatch.setenv("METAREG_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save(path: Path, colour, size=(40, 30), fmt=None) -> Path:
    """A solid-colour image of ``size`` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(
        path, format=fmt or ("PNG" if path.suffix.lower() == ".png" else "JPEG"), quality=95
    )
    return path


def colours_match(data, tolerance=6, margin=0) -> bool:
    """Every image is (close to) the solid colour of its label (ignoring ``margin`` pixels at each edge)."""
    size = data.images.shape[-1]
    mean = data.images[:, :, margin : size - margin, margin : size - margin].float().mean(dim=(2, 3))
    want = torch.tensor(COLOURS, dtype=torch.float32)[data.labels]
    return bool((mean - want).abs().max() <= tolerance)


def check(data, n, size, labels, names, dataset, split):
    assert data.images.shape == (n, 3, size, size)
    assert data.images.dtype == torch.uint8
    assert data.labels.tolist() == labels
    assert data.class_names == names
    assert (data.dataset, data.split) == (dataset, split)


def error(name, split="train", **kw) -> str:
    with pytest.raises(DataError) as info:
        load_labeled(name, split, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def need_scipy():
    return pytest.importorskip("scipy.io")


def cell(strings) -> np.ndarray:
    """A MATLAB cell column of strings."""
    out = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        out[i, 0] = s
    return out


# ---------------------------------------------------------------------------------- builders
def make_tinyimagenet(tmp_path: Path) -> Path:
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n002", "n001"]
    base.mkdir()
    (base / "wnids.txt").write_text("n002\nn001\n\n")
    (base / "words.txt").write_text("n001\tgoldfish, Carassius auratus\nn002\tgreat white shark\nn999\tother\n")
    for k, wnid in enumerate(wnids):
        for i in range(2 + k):
            save(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", COLOURS[k], (64, 64))
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    rows = []
    for i, k in enumerate([1, 0, 1]):
        save(base / "val" / "images" / f"val_{i}.JPEG", COLOURS[k], (64, 64))
        rows.append(f"val_{i}.JPEG\t{wnids[k]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    return tmp_path


def cifar_image(k: int) -> np.ndarray:
    """[3, 32, 32]: class colour with a white bar over the top-left (rows 0-3, columns 0-15)."""
    img = np.empty((3, 32, 32), np.uint8)
    img[:] = np.array(COLOURS[k], np.uint8)[:, None, None]
    img[:, :4, :16] = 255
    return img


def make_cifar100(tmp_path: Path) -> Path:
    base = tmp_path / "cifar-100-binary"
    base.mkdir()
    (base / "fine_label_names.txt").write_text("apple\nbee\nbus\n\n")
    (base / "coarse_label_names.txt").write_text("fruit\nthing\n")
    for split, fine in (("train", [0, 1, 2, 1]), ("test", [2, 0])):
        records = [np.concatenate([[k // 2, k], cifar_image(k).reshape(-1)]).astype(np.uint8) for k in fine]
        np.stack(records).tofile(base / f"{split}.bin")
    return tmp_path


def stl_image(k: int) -> np.ndarray:
    img = np.empty((3, 96, 96), np.uint8)
    img[:] = np.array(COLOURS[k], np.uint8)[:, None, None]
    img[:, :8, :48] = 255  # a horizontal bar at the top left: a transposition would make it vertical
    return img


def make_stl10(tmp_path: Path) -> Path:
    base = tmp_path / "stl10_binary"
    base.mkdir()
    (base / "class_names.txt").write_text("airplane\nbird\ncar\n")
    for split, labels in (("train", [0, 2, 1]), ("test", [1, 1])):
        # Stored column-major: each channel written column by column.
        np.stack([stl_image(k).transpose(0, 2, 1) for k in labels]).tofile(base / f"{split}_X.bin")
        (np.array(labels, np.uint8) + 1).tofile(base / f"{split}_y.bin")
    return base


def make_svhn(tmp_path: Path) -> Path:
    sio = need_scipy()
    base = tmp_path / "svhn"
    base.mkdir()
    for split, digits in (("train", [1, 0, 2]), ("test", [0, 2]), ("extra", [2])):
        x = np.stack([cifar_image(k % 3).transpose(1, 2, 0) for k in digits], axis=3)  # [32, 32, 3, N]
        y = np.array([[10 if d == 0 else d] for d in digits], dtype=np.float64)
        sio.savemat(base / f"{split}_32x32.mat", {"X": x, "y": y})
    return tmp_path


DOG_FOLDERS = ["n001-Chihuahua", "n002-Japanese_spaniel", "n003-Maltese_dog"]


def make_stanford_dogs(tmp_path: Path) -> Path:
    sio = need_scipy()
    base = tmp_path / "stanford_dogs"
    for k, folder in enumerate(DOG_FOLDERS):
        for i in range(2):
            save(base / "Images" / folder / f"{folder[:4]}_{i}.jpg", COLOURS[k])
    train = [(0, 0), (1, 0), (2, 1)]
    test = [(1, 1), (0, 1)]
    (base / "lists").mkdir()
    for split, pairs, where in (("train", train, base / "lists"), ("test", test, base)):
        files = [f"{DOG_FOLDERS[k]}/{DOG_FOLDERS[k][:4]}_{i}.jpg" for k, i in pairs]
        labels = np.array([[k + 1] for k, _ in pairs], dtype=np.float64)
        sio.savemat(where / f"{split}_list.mat", {"file_list": cell(files), "labels": labels})
    return base


def car_records(rows) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    out = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, (box, label, name) in enumerate(rows):
        out[0, i] = (*(np.uint16(v) for v in box), np.uint8(label), name)
    return out


def make_stanford_cars(tmp_path: Path) -> Path:
    """Images 40x30: class colour inside the box (10..29, 5..24), white outside."""
    sio = need_scipy()
    base = tmp_path / "stanford_cars"
    box = (10, 5, 29, 24)
    for split, labels in (("train", [1, 2, 3, 1]), ("test", [2, 3])):
        rows = []
        for i, label in enumerate(labels):
            img = Image.new("RGB", (40, 30), WHITE)
            img.paste(COLOURS[label - 1], (box[0], box[1], box[2] + 1, box[3] + 1))
            (base / f"cars_{split}").mkdir(parents=True, exist_ok=True)
            img.save(base / f"cars_{split}" / f"{i + 1:05d}.jpg", quality=95)
            rows.append((box, label, f"{i + 1:05d}.jpg"))
        target = base / ("devkit/cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat")
        target.parent.mkdir(parents=True, exist_ok=True)
        sio.savemat(target, {"annotations": car_records(rows)})
    names = np.empty((1, 3), dtype=object)
    names[0, :] = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "BMW M3 Coupe 2012"]
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    return base


AIRCRAFT = {  # id: (variant, family, class index)
    "0034309": ("Boeing 707-320", "Boeing 707", 1),
    "0034958": ("A300B4", "A300", 0),
    "0037511": ("Boeing 707-320", "Boeing 707", 1),
    "0037512": ("DC-3", "DC-3", 2),
    "1000001": ("A300B4", "A300", 0),
}


def make_aircraft(tmp_path: Path) -> Path:
    """Images 40 wide, 50 high: class colour above a white 20-row banner."""
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    for image_id, (_, _, k) in AIRCRAFT.items():
        img = Image.new("RGB", (40, 50), WHITE)
        img.paste(COLOURS[k], (0, 0, 40, 30))
        (data / "images").mkdir(parents=True, exist_ok=True)
        img.save(data / "images" / f"{image_id}.jpg", quality=95)
    splits = {"train": ["0034309", "0034958", "0037512"], "test": ["0037511", "1000001"]}
    for split, ids in splits.items():
        for level, column in (("variant", 0), ("family", 1)):
            lines = [f"{i} {AIRCRAFT[i][column]}" for i in ids]
            (data / f"images_{level}_{split}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "fgvc-aircraft-2013b"


def make_cub(tmp_path: Path) -> Path:
    base = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    (base / "images").mkdir(parents=True)
    images, labels, splits = [], [], []
    image_id = 0
    for k, folder in enumerate(classes):
        for i in range(2):
            image_id += 1
            rel = f"{folder}/{folder[4:]}_{i}.jpg"
            save(base / "images" / rel, COLOURS[k])
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {k + 1}")
            splits.append(f"{image_id} {1 if i == 0 else 0}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(splits) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{k + 1} {c}" for k, c in enumerate(classes)) + "\n")
    (tmp_path / "attributes.txt").write_text("1 has_bill_shape::curved\n")
    return tmp_path


def make_imagefolder(tmp_path: Path) -> Path:
    root = tmp_path / "folders"
    save(root / "train" / "cat" / "a.png", COLOURS[0])
    save(root / "train" / "cat" / "b.JPG", COLOURS[0], fmt="JPEG")
    save(root / "train" / "dog" / "c.jpeg", COLOURS[1])
    save(root / "train" / "dog" / "d.bmp", COLOURS[1], fmt="BMP")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    save(root / "val" / "cat" / "e.webp", COLOURS[0], fmt="WEBP")
    save(root / "val" / "dog" / "f.gif", COLOURS[1], fmt="GIF")
    return root


def make_npz(tmp_path: Path) -> Path:
    root = tmp_path / "arrays"
    root.mkdir()
    y = np.array([0, 2, 1, 2])
    nchw = np.stack([cifar_image(k) for k in y])
    np.savez(root / "train.npz", x=nchw, y=y, class_names=np.array(["a", "b", "c"]))
    np.savez(root / "nhwc.npz", x=nchw.transpose(0, 2, 3, 1), y=y)
    np.savez(root / "gray.npz", x=np.full((2, 20, 20), 77, np.uint8), y=np.array([1, 0], np.uint8))
    return root


# name: (builder, a split, annotation/split file to remove, file to corrupt), paths relative to the root
CASES = {
    "tinyimagenet": (
        make_tinyimagenet,
        "val",
        "tiny-imagenet-200/val/val_annotations.txt",
        "tiny-imagenet-200/val/images/val_1.JPEG",
    ),
    "cifar100": (make_cifar100, "train", "cifar-100-binary/fine_label_names.txt", "cifar-100-binary/train.bin"),
    "stl10": (make_stl10, "test", "test_y.bin", "test_X.bin"),
    "svhn": (make_svhn, "test", "svhn/test_32x32.mat", "svhn/test_32x32.mat"),
    "stanford-dogs": (make_stanford_dogs, "test", "test_list.mat", "Images/n001-Chihuahua/n001_1.jpg"),
    "stanford-cars": (make_stanford_cars, "test", "cars_test_annos_withlabels.mat", "cars_test/00002.jpg"),
    "aircraft": (make_aircraft, "train", "data/images_variant_train.txt", "data/images/0034958.jpg"),
    "cub": (
        make_cub,
        "train",
        "CUB_200_2011/train_test_split.txt",
        "CUB_200_2011/images/002.Laysan_Albatross/Laysan_Albatross_0.jpg",
    ),
    "imagefolder": (make_imagefolder, "train", None, "train/dog/c.jpeg"),
    "npz": (make_npz, "train", None, "train.npz"),
}


def test_every_loader_registered_and_covered():
    assert set(TARGET_DATASETS) <= set(labeled_datasets())
    assert set(CASES) == set(TARGET_DATASETS)


# ------------------------------------------------------------------------- per-loader checks
def test_tinyimagenet(tmp_path):
    root = make_tinyimagenet(tmp_path)
    train = load_labeled("tinyimagenet", "train", root=root, image_size=16)
    check(train, 5, 16, [0, 0, 1, 1, 1], ["great white shark", "goldfish"], "tinyimagenet", "train")
    assert colours_match(train)
    val = load_labeled("tinyimagenet", "val", root=root / "tiny-imagenet-200", image_size=64)
    check(val, 3, 64, [1, 0, 1], ["great white shark", "goldfish"], "tinyimagenet", "val")
    assert colours_match(val)
    (root / "tiny-imagenet-200" / "words.txt").unlink()
    again = load_labeled("tinyimagenet", "val", root=root, image_size=8)
    assert again.class_names == ["n002", "n001"]
    assert "no labels" in error("tinyimagenet", "test", root=root)


def test_cifar100(tmp_path):
    root = make_cifar100(tmp_path)
    train = load_labeled("cifar100", "train", root=root, image_size=32)
    check(train, 4, 32, [0, 1, 2, 1], ["apple", "bee", "bus"], "cifar100", "train")
    assert torch.equal(train.images[2], torch.from_numpy(cifar_image(2)))  # byte order and orientation
    coarse = load_labeled("cifar100", "test", root=root / "cifar-100-binary", image_size=16, labels="coarse")
    check(coarse, 2, 16, [1, 0], ["fruit", "thing"], "cifar100", "test")
    assert "labels='medium'" in error("cifar100", root=root, labels="medium")


def test_cifar100_refuses_the_pickled_version(tmp_path):
    python = tmp_path / "cifar-100-python"
    python.mkdir()
    for name in ("meta", "train", "test"):
        (python / name).write_bytes(b"\x80\x04 not read")
    assert "binary version" in error("cifar100", root=tmp_path)


def test_stl10(tmp_path):
    root = make_stl10(tmp_path)
    train = load_labeled("stl10", "train", root=root, image_size=96)
    check(train, 3, 96, [0, 2, 1], ["airplane", "bird", "car"], "stl10", "train")
    for i, k in enumerate([0, 2, 1]):
        assert torch.equal(train.images[i], torch.from_numpy(stl_image(k)))
    small = load_labeled("stl10", "test", root=tmp_path, image_size=24)
    check(small, 2, 24, [1, 1], ["airplane", "bird", "car"], "stl10", "test")
    (np.array([1, 11], np.uint8)).tofile(root / "test_y.bin")
    assert "1..3" in error("stl10", "test", root=root)


def test_svhn(tmp_path):
    root = make_svhn(tmp_path)
    train = load_labeled("svhn", "train", root=root, image_size=32)
    check(train, 3, 32, [1, 0, 2], [str(d) for d in range(10)], "svhn", "train")
    assert torch.equal(train.images[0], torch.from_numpy(cifar_image(1)))
    assert len(load_labeled("svhn", "extra", root=root / "svhn", image_size=20)) == 1
    assert load_labeled("svhn", "test", root=root, image_size=20).images.shape == (2, 3, 20, 20)


def test_svhn_without_scipy(tmp_path, monkeypatch):
    root = make_svhn(tmp_path)
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    assert "pip install scipy" in error("svhn", root=root)


def test_stanford_dogs(tmp_path):
    base = make_stanford_dogs(tmp_path)
    train = load_labeled("stanford-dogs", "train", root=base, image_size=12)
    check(train, 3, 12, [0, 1, 2], ["Chihuahua", "Japanese_spaniel", "Maltese_dog"], "stanford-dogs", "train")
    assert colours_match(train)
    test = load_labeled("stanford-dogs", "test", root=tmp_path, image_size=12)  # the parent folder
    check(test, 2, 12, [1, 0], ["Chihuahua", "Japanese_spaniel", "Maltese_dog"], "stanford-dogs", "test")
    assert colours_match(test)
    sio = need_scipy()
    sio.savemat(base / "test_list.mat", {"file_list": cell(["n001-Chihuahua/n001_0.jpg"]), "labels": np.array([[2.0]])})
    assert "does not match" in error("stanford-dogs", "test", root=base)
    sio.savemat(base / "test_list.mat", {"file_list": cell(["n001-Chihuahua/n001_0.jpg"]), "labels": np.array([[7.0]])})
    assert "labels 1..3" in error("stanford-dogs", "test", root=base)
    sio.savemat(base / "test_list.mat", {"names": cell(["x"])})
    assert "no variable file_list" in error("stanford-dogs", "test", root=base)


def test_stanford_cars(tmp_path):
    base = make_stanford_cars(tmp_path)
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "BMW M3 Coupe 2012"]
    whole = load_labeled("stanford-cars", "train", root=base, image_size=16)
    check(whole, 4, 16, [0, 1, 2, 0], names, "stanford-cars", "train")
    assert (whole.images[:, :, 0, 0] > 240).all()  # the white margin is kept
    cropped = load_labeled("stanford-cars", "train", root=tmp_path, image_size=16, crop_to_box=True)
    check(cropped, 4, 16, [0, 1, 2, 0], names, "stanford-cars", "train")
    assert colours_match(cropped, tolerance=8, margin=3)  # JPEG blurs the colour into the white at the edges
    assert (cropped.images[:, :, 0, 0] < 200).any(dim=1).all()  # no white margin left
    test = load_labeled("stanford-cars", "test", root=base, image_size=16, crop_to_box=True)
    check(test, 2, 16, [1, 2], names, "stanford-cars", "test")
    assert "true or false" in error("stanford-cars", root=base, crop_to_box="yes")


def test_aircraft(tmp_path):
    root = make_aircraft(tmp_path)
    variants = ["A300B4", "Boeing 707-320", "DC-3"]  # sorted over every split's labels
    train = load_labeled("aircraft", "train", root=root, image_size=10)
    check(train, 3, 10, [1, 0, 2], variants, "aircraft", "train")
    assert colours_match(train, tolerance=8)  # the white banner is gone
    banner = load_labeled("aircraft", "train", root=tmp_path, image_size=10, crop_banner=False)
    assert (banner.images[:, :, -1] > 240).all()
    test = load_labeled("aircraft", "test", root=root, image_size=10)
    check(test, 2, 10, [1, 0], variants, "aircraft", "test")
    family = load_labeled("aircraft", "test", root=root, image_size=10, annotation="family")
    check(family, 2, 10, [1, 0], ["A300", "Boeing 707", "DC-3"], "aircraft", "test")
    (root / "data" / "variants.txt").write_text("DC-3\nBoeing 707-320\nA300B4\n")
    ordered = load_labeled("aircraft", "test", root=root, image_size=10)
    assert ordered.class_names == ["DC-3", "Boeing 707-320", "A300B4"] and ordered.labels.tolist() == [1, 2]
    (root / "data" / "images_variant_val.txt").write_text("0034309 Boeing 747\n")
    assert "'Boeing 747' is not listed" in error("aircraft", "val", root=root)
    assert "annotation='model'" in error("aircraft", root=root, annotation="model")


def test_cub(tmp_path):
    root = make_cub(tmp_path)
    names = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    train = load_labeled("cub", "train", root=root, image_size=16)
    check(train, 3, 16, [0, 1, 2], names, "cub", "train")
    assert colours_match(train)
    test = load_labeled("cub", "test", root=root / "CUB_200_2011", image_size=16)
    check(test, 3, 16, [0, 1, 2], names, "cub", "test")
    assert colours_match(test)
    with (root / "CUB_200_2011" / "image_class_labels.txt").open("a") as f:
        f.write("1 9\n")
    assert "listed twice" in error("cub", root=root)


def test_imagefolder(tmp_path):
    root = make_imagefolder(tmp_path)
    train = load_labeled("imagefolder", "train", root=root, image_size=16)
    check(train, 4, 16, [0, 0, 1, 1], ["cat", "dog"], "imagefolder", "train")
    assert colours_match(train, tolerance=12)  # GIF/WEBP/JPEG are lossy
    val = load_labeled("imagefolder", "val", root=root, image_size=16)
    check(val, 2, 16, [0, 1], ["cat", "dog"], "imagefolder", "val")
    assert colours_match(val, tolerance=12)
    assert "use one of train, val" in error("imagefolder", "test", root=root)


def test_npz(tmp_path):
    root = make_npz(tmp_path)
    train = load_labeled("npz", "train", root=root, image_size=32)
    check(train, 4, 32, [0, 2, 1, 2], ["a", "b", "c"], "npz", "train")
    assert torch.equal(train.images[1], torch.from_numpy(cifar_image(2)))
    nhwc = load_labeled("npz", "nhwc", root=root, image_size=32)
    assert torch.equal(nhwc.images, train.images) and nhwc.class_names == ["0", "1", "2"]
    assert load_labeled("npz", "nhwc", root=root, image_size=12).images.shape == (4, 3, 12, 12)
    gray = load_labeled("npz", "gray", root=root, image_size=8)
    assert gray.images.shape == (2, 1, 8, 8) and gray.labels.tolist() == [1, 0]
    assert (gray.images == 77).all()
    np.savez(root / "bad.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.array([0, 3]), class_names=np.array(["a", "b"]))
    assert "0..1" in error("npz", "bad", root=root)
    np.savez(root / "bad.npz", x=np.zeros((2, 5, 8, 8), np.uint8), y=np.array([0, 1]))
    assert "shape [2, 5, 8, 8]" in error("npz", "bad", root=root)
    np.savez(root / "bad.npz", x=np.zeros((2, 8, 8)), y=np.array([0, 1]))
    assert "uint8" in error("npz", "bad", root=root)
    np.savez(root / "bad.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.array([0, 1, 1]))
    assert "one per image" in error("npz", "bad", root=root)
    np.savez(
        root / "bad.npz",
        x=np.zeros((2, 8, 8), np.uint8),
        y=np.array([0, 1]),
        class_names=np.array(["a", None], dtype=object),
    )
    assert "cannot read" in error("npz", "bad", root=root)  # never unpickled
    np.savez(root / "bad.npz", images=np.zeros((2, 8, 8), np.uint8))
    assert "no array x, y" in error("npz", "bad", root=root)
    np.save(root / "bad.npy", np.zeros((2, 8, 8), np.uint8))
    (root / "bad.npy").rename(root / "bad.npz")
    assert "not an .npz archive" in error("npz", "bad", root=root)


def test_cache_is_used_and_can_be_skipped(tmp_path):
    root = make_cub(tmp_path)
    cache = tmp_path / "cache" / "data"
    load_labeled("cub", "train", root=root, image_size=8, cache=False)
    assert not cache.exists()
    first = load_labeled("cub", "train", root=root, image_size=8)
    assert len(list(cache.glob("cub-train-8px-*.safetensors"))) == 1
    again = load_labeled("cub", "train", root=root, image_size=8)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert again.class_names == first.class_names


# ------------------------------------------------------------------- errors, for every loader
@pytest.mark.parametrize("name", CASES)
def test_missing_root(name, tmp_path):
    message = error(name, CASES[name][1], root=tmp_path / "nowhere")
    assert "does not exist" in message and str(tmp_path / "nowhere") in message


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("imagefolder", "npz")])
def test_root_without_the_data_set(name, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "expected" in error(name, CASES[name][1], root=tmp_path / "empty")


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][2]])
def test_missing_annotation_file(name, tmp_path):
    build, split, annotation, _ = CASES[name]
    root = build(tmp_path)
    load_labeled(name, split, root=root, image_size=8)
    (root / annotation).unlink()
    assert Path(annotation).name in error(name, split, root=root, image_size=8)


@pytest.mark.parametrize("name", CASES)
def test_corrupt_file(name, tmp_path):
    build, split, _, victim = CASES[name]
    root = build(tmp_path)
    load_labeled(name, split, root=root, image_size=8)  # fills the cache: a changed file must not be read from it
    (root / victim).write_bytes(b"\x00garbage\xff" * 7)
    assert Path(victim).name in error(name, split, root=root, image_size=8)


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("imagefolder", "npz")])
def test_missing_image_or_split_file(name, tmp_path):
    build, split, _, victim = CASES[name]
    root = build(tmp_path)
    (root / victim).unlink()
    message = error(name, split, root=root, image_size=8)
    assert "is missing" in message and Path(victim).name in message


def test_imagefolder_without_images(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "readme.txt").write_text("no images here")
    assert "holds no images" in error("imagefolder", root=tmp_path)
    (tmp_path / "train" / "cat" / "readme.txt").unlink()
    (tmp_path / "train" / "cat").rmdir()
    assert "no class folders" in error("imagefolder", root=tmp_path)


@pytest.mark.parametrize("name", CASES)
def test_unknown_split(name, tmp_path):
    root = CASES[name][0](tmp_path)
    message = error(name, "nonsense", root=root)
    assert "unknown" in message and "'nonsense'" in message and CASES[name][1] in message


@pytest.mark.parametrize("name", CASES)
def test_unknown_option(name, tmp_path):
    message = error(name, CASES[name][1], root=tmp_path, colour_jitter=True)
    assert "colour_jitter" in message and "valid options" in message
