"""Tests of metareg.data: episode sampling, regression families, glyphs, Omniglot, miniImageNet, download.

Tests on the real data sets look for them in $METAREG_SHARED_DATA or <repo>/../shared/data and skip
when absent. Every test runs with METAREG_CACHE pointing at one temporary folder shared by the whole
module, so Omniglot and miniImageNet are decoded once per session and the home cache is untouched.
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
try:
    import metareg.data  # noqa: F401
except ImportError:  # not installed: test the source tree
    sys.path.insert(0, str(REPO / "src"))

from helpers import SHARED, write_tiny_mini  # noqa: E402
from metareg.data import (  # noqa: E402
    ClassImages,
    EpisodeSampler,
    PolynomialTasks,
    SineTasks,
    TaskBatch,
    build_task_source,
    cache_dir,
    download_omniglot,
    episodic_datasets,
    load_glyphs,
    load_miniimagenet,
    load_omniglot,
)
from metareg.data import omniglot as omniglot_module  # noqa: E402
from metareg.data.download import expected_files  # noqa: E402
from metareg.errors import DataError  # noqa: E402

OMNIGLOT = SHARED / "omniglot"
MINI = SHARED / "miniimagenet-100"
OMNIGLOT_ZIPS = [OMNIGLOT / "images_background.zip", OMNIGLOT / "images_evaluation.zip"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("metareg-cache")


@pytest.fixture(autouse=True)
def _isolated_env(module_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAREG_CACHE", str(module_cache))
    monkeypatch.delenv("METAREG_DATA_ROOT", raising=False)


# --------------------------------------------------------------------------- sampler


def id_classes(sizes: list[int], rotations: list[int] | None = None) -> ClassImages:
    """Classes of constant 2-channel images whose pixel values encode the image's row (id = c0 + 256*c1)."""
    m = sum(sizes)
    ids = torch.arange(m)
    images = torch.stack([ids % 256, ids // 256], 1).to(torch.uint8)[:, :, None, None].expand(m, 2, 3, 3).clone()
    bounds = np.cumsum([0, *sizes])
    indices = [torch.arange(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    return ClassImages(images, indices, [f"c{i}" for i in range(len(sizes))], rotations, "toy", "train")


def decode_ids(x: torch.Tensor) -> torch.Tensor:
    v = (x[..., :, 0, 0] * 255).round().long()  # [..., 2]
    return v[..., 0] + 256 * v[..., 1]


SIZES = [9, 7, 12, 5, 8, 10, 6, 11, 5, 9, 7, 13]


def owner_of(sizes: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def test_sampler_shapes_dtypes_and_label_counts() -> None:
    sampler = EpisodeSampler(id_classes(SIZES), way=5, shot=2, query=3)
    assert sampler.is_classification is True
    b = sampler.sample(7, gen(0))
    assert isinstance(b, TaskBatch) and b.num_tasks == 7
    assert b.support_x.shape == (7, 10, 2, 3, 3) and b.query_x.shape == (7, 15, 2, 3, 3)
    assert b.support_x.dtype == torch.float32 and b.query_x.dtype == torch.float32
    assert b.support_y.shape == (7, 10) and b.query_y.shape == (7, 15)
    assert b.support_y.dtype == torch.int64 and b.query_y.dtype == torch.int64
    assert float(b.support_x.min()) >= 0.0 and float(b.support_x.max()) <= 1.0
    for y, per_label in ((b.support_y, 2), (b.query_y, 3)):
        for row in y:
            assert torch.equal(torch.bincount(row, minlength=5), torch.full((5,), per_label))
    # documented class-major order
    assert torch.equal(b.support_y[0], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]))


def test_sampler_distinct_instances_one_class_per_label() -> None:
    owner = owner_of(SIZES)
    way, shot, query = 4, 1, 4  # shot + query = smallest class size: every instance used
    b = EpisodeSampler(id_classes(SIZES), way, shot, query).sample(200, gen(1))
    sid, qid = decode_ids(b.support_x), decode_ids(b.query_x)
    for t in range(200):
        ids = torch.cat([sid[t], qid[t]])
        assert ids.unique().numel() == ids.numel(), "support and query must use distinct instances"
        classes = []
        for label in range(way):
            members = torch.cat([sid[t][b.support_y[t] == label], qid[t][b.query_y[t] == label]])
            cls = owner[members].unique()
            assert cls.numel() == 1, "one label must mean one class within a task"
            classes.append(int(cls))
        assert len(set(classes)) == way, "the classes of a task must be distinct"


def test_sampler_reproducible_from_generator_only() -> None:
    sampler = EpisodeSampler(id_classes(SIZES), way=3, shot=2, query=2)
    torch.manual_seed(123)
    a = sampler.sample(5, gen(42))
    torch.manual_seed(999)  # global RNG must not matter
    b = sampler.sample(5, gen(42))
    c = sampler.sample(5, gen(43))
    for x, y in zip((a.support_x, a.support_y, a.query_x, a.query_y), (b.support_x, b.support_y, b.query_x, b.query_y)):
        assert torch.equal(x, y)
    assert not torch.equal(a.support_x, c.support_x)


def test_labels_shuffled_across_episodes_and_all_classes_used() -> None:
    sizes = [4] * 5
    owner = owner_of(sizes)
    b = EpisodeSampler(id_classes(sizes), way=5, shot=1, query=1).sample(100, gen(3))
    perms = owner[decode_ids(b.support_x)]  # [B, 5]: class of label 0..4
    assert len({tuple(p.tolist()) for p in perms}) > 50
    assert set(perms[:, 0].tolist()) == set(range(5)), "label 0 must not always be the same class"
    many = EpisodeSampler(id_classes(SIZES), way=2, shot=1, query=1).sample(300, gen(4))
    assert set(owner_of(SIZES)[decode_ids(many.support_x)].flatten().tolist()) == set(range(len(SIZES)))


def test_sampler_rotates_rotated_classes() -> None:
    base = torch.randint(0, 256, (6, 1, 5, 5), generator=gen(0), dtype=torch.uint8)
    rows = torch.arange(6)
    classes = ClassImages(base, [rows, rows, rows], ["r0", "r1", "r3"], torch.tensor([0, 1, 3]), "toy", "train")
    b = EpisodeSampler(classes, way=3, shot=2, query=2).sample(20, gen(5))
    candidates = {k: torch.rot90(base, k, dims=(-2, -1)).float() / 255 for k in (0, 1, 3)}
    for t in range(20):
        ks = []
        for label in range(3):
            x = torch.cat([b.support_x[t][b.support_y[t] == label], b.query_x[t][b.query_y[t] == label]])
            found = {k for k, cand in candidates.items() if all(any(torch.equal(xi, c) for c in cand) for xi in x)}
            assert len(found) == 1
            ks.append(found.pop())
        assert sorted(ks) == [0, 1, 3]


@pytest.mark.parametrize(
    ("way", "shot", "query", "needles"),
    [
        (13, 1, 1, ["12 classes", "way=13"]),
        (5, 3, 3, ["5 images", "shot+query=3+3=6"]),
        (0, 1, 1, ["way"]),
        (5, -1, 1, ["shot"]),
        (5, 1, 0, ["query"]),
        (5, 1.5, 1, ["shot"]),
    ],
)
def test_impossible_settings_raise_data_error(way, shot, query, needles) -> None:
    with pytest.raises(DataError) as info:
        EpisodeSampler(id_classes(SIZES), way, shot, query)
    message = str(info.value)
    assert "toy train split" in message and "\n" not in message
    for needle in needles:
        assert needle in message


def test_sample_rejects_bad_num_tasks() -> None:
    with pytest.raises(DataError, match="num_tasks"):
        EpisodeSampler(id_classes(SIZES), 2, 1, 1).sample(0, gen(0))


def test_class_images_validation() -> None:
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(DataError, match="twice"):
        ClassImages(images, [torch.tensor([0, 0, 1])], ["a"])
    with pytest.raises(DataError, match="does not exist"):
        ClassImages(images, [torch.tensor([0, 4])], ["a"])
    with pytest.raises(DataError, match="uint8"):
        ClassImages(images.float(), [torch.tensor([0])], ["a"])
    with pytest.raises(DataError, match="no images"):
        ClassImages(images, [torch.tensor([0]), torch.tensor([], dtype=torch.long)], ["a", "b"])
    with pytest.raises(DataError, match="square"):
        ClassImages(torch.zeros(2, 1, 2, 3, dtype=torch.uint8), [torch.tensor([0, 1])], ["a"], torch.tensor([1]))


# --------------------------------------------------------------------------- regression


def test_sine_tasks_shapes_ranges_and_law() -> None:
    tasks = SineTasks(shot=10, query=7)
    assert tasks.is_classification is False
    batch, params = tasks.sample_with_params(64, gen(0))
    assert batch.support_x.shape == (64, 10, 1) and batch.query_y.shape == (64, 7, 1)
    assert all(t.dtype == torch.float32 for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y))
    a, w, p = params["amplitude"], params["frequency"], params["phase"]
    assert float(a.min()) >= 0.1 and float(a.max()) <= 5.0
    assert float(w.min()) >= 0.8 and float(w.max()) <= 1.2 and float(w.std()) > 0.05
    assert float(p.min()) >= 0.0 and float(p.max()) <= math.pi
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    assert float(x.min()) >= -5.0 and float(x.max()) <= 5.0
    expected = a[:, None, None] * torch.sin(w[:, None, None] * x + p[:, None, None])
    torch.testing.assert_close(y, expected)
    assert bool((y.abs() <= a[:, None, None] + 1e-6).all())
    # sample() is the same draw without the parameters
    again = tasks.sample(64, gen(0))
    assert torch.equal(again.query_y, batch.query_y)


def test_sine_fixed_frequency_variant_and_determinism() -> None:
    tasks = SineTasks(shot=5, query=5, frequency=(1.0, 1.0))
    _, params = tasks.sample_with_params(16, gen(1))
    assert torch.equal(params["frequency"], torch.ones(16))
    a, b, c = tasks.sample(4, gen(7)), tasks.sample(4, gen(7)), tasks.sample(4, gen(8))
    assert torch.equal(a.support_y, b.support_y) and not torch.equal(a.support_y, c.support_y)


def test_polynomial_order_zero_is_constant_per_task() -> None:
    batch = PolynomialTasks(shot=6, query=9, order=0).sample(32, gen(2))
    y = torch.cat([batch.support_y, batch.query_y], 1).squeeze(-1)  # [B, 15]
    assert torch.equal(y, y[:, :1].expand_as(y))
    assert float(y.min()) >= -1.0 and float(y.max()) <= 1.0
    assert float(y[:, 0].std()) > 0.1, "constants must vary across tasks"


def test_polynomial_matches_its_coefficients() -> None:
    tasks = PolynomialTasks(shot=4, query=4, order=3, x_range=(-2.0, 3.0))
    batch, params = tasks.sample_with_params(8, gen(3))
    c = params["coefficients"]
    assert c.shape == (8, 4) and float(c.abs().max()) <= 1.0
    x = torch.cat([batch.support_x, batch.query_x], 1).squeeze(-1).double()
    y = torch.cat([batch.support_y, batch.query_y], 1).squeeze(-1).double()
    assert float(x.min()) >= -2.0 and float(x.max()) <= 3.0
    for t in range(8):
        expected = np.polynomial.polynomial.polyval(x[t].numpy(), c[t].double().numpy())
        np.testing.assert_allclose(y[t].numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SineTasks(0, 5),
        lambda: SineTasks(5, 5, amplitude=(5.0, 0.1)),
        lambda: SineTasks(5, 5, amplitude=(-1.0, 1.0)),
        lambda: SineTasks(5, 5, x_range=(1.0, 1.0)),
        lambda: SineTasks(5, 5, phase=(0.0, float("nan"))),
        lambda: SineTasks(5, 5, frequency="fast"),
        lambda: PolynomialTasks(5, 5, order=-1),
        lambda: PolynomialTasks(5, 5, order=2, coefficients=(1.0, -1.0)),
        lambda: PolynomialTasks(5, 0, order=1),
    ],
)
def test_regression_validation(make) -> None:
    with pytest.raises(DataError):
        make()


# --------------------------------------------------------------------------- glyphs


def test_glyphs_deterministic_shapes_and_ink() -> None:
    a = load_glyphs("test", num_classes=40, instances_per_class=6)
    b = load_glyphs("test", num_classes=40, instances_per_class=6)
    c = load_glyphs("test", num_classes=40, instances_per_class=6, seed=1)
    assert a.num_classes == 40 and a.images.shape == (240, 1, 28, 28) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    ink = a.images.float() / 255
    assert 0.03 < float(ink.mean()) < 0.35, "mostly dark background with bright strokes"
    assert float(ink.amax(dim=(1, 2, 3)).min()) > 0.9, "every glyph has ink"
    assert load_glyphs("val", image_size=20, num_classes=3, instances_per_class=2).images.shape == (6, 1, 20, 20)


def test_glyph_instances_vary_and_splits_are_disjoint() -> None:
    splits = {s: load_glyphs(s, num_classes=60, instances_per_class=8) for s in ("train", "val", "test")}
    means = {s: c.images.float().div(255).reshape(60, 8, -1) for s, c in splits.items()}
    within = (means["test"] - means["test"].mean(1, keepdim=True)).norm(dim=-1).mean()
    assert float(within) > 1.0, "instances of a class must vary"
    protos = {s: m.mean(1) for s, m in means.items()}
    for s1, s2 in (("train", "val"), ("train", "test"), ("val", "test")):
        nearest = torch.cdist(protos[s1], protos[s2]).min()
        assert float(nearest) > 1.0, f"{s1} and {s2} share a glyph class"
    trainval = load_glyphs("trainval", num_classes=60, instances_per_class=8)
    assert trainval.num_classes == 60 + 200
    assert torch.equal(trainval.images[: 60 * 8], splits["train"].images)
    assert len(set(trainval.class_names)) == trainval.num_classes


def test_glyphs_nearest_neighbour_accuracy_is_moderate() -> None:
    t0 = time.perf_counter()
    val = load_glyphs("val")  # 200 classes x 20
    elapsed = time.perf_counter() - t0
    b = EpisodeSampler(val, way=5, shot=1, query=15).sample(200, gen(0))
    d = torch.cdist(b.query_x.flatten(2), b.support_x.flatten(2))
    acc = float((b.support_y.gather(1, d.argmin(-1)) == b.query_y).float().mean())
    print(f"glyphs val: generated in {elapsed:.2f}s; raw-pixel 1-NN 5-way 1-shot accuracy {acc:.3f}")
    assert 0.4 <= acc <= 0.85, f"1-NN accuracy {acc:.3f}: glyphs too {'hard' if acc < 0.4 else 'easy'}"


def test_glyphs_bad_arguments() -> None:
    with pytest.raises(DataError, match="split"):
        load_glyphs("validation")
    with pytest.raises(DataError, match="instances_per_class"):
        load_glyphs("test", instances_per_class=0)


# --------------------------------------------------------------------------- Omniglot on the shared zips


@pytest.fixture(scope="module")
def omniglot(module_cache: Path) -> dict:
    if not all(p.is_file() for p in OMNIGLOT_ZIPS):
        pytest.skip(f"Omniglot zips not found under {OMNIGLOT} (set METAREG_SHARED_DATA)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAREG_CACHE", str(module_cache))
        t0 = time.perf_counter()
        loaded = {"trainval": load_omniglot(OMNIGLOT, "trainval")}
        decode = time.perf_counter() - t0
        for split in ("train", "val", "test"):
            loaded[split] = load_omniglot(OMNIGLOT, split)
        for split in ("train", "test"):
            loaded[f"alphabets-{split}"] = load_omniglot(OMNIGLOT, split, class_split="alphabets")
    print(f"omniglot: first load (decoding both zips) {decode:.1f}s")
    return loaded


def characters(classes: ClassImages) -> set[str]:
    return {name.rsplit("/", 1)[0] for name in classes.class_names}


@pytest.mark.slow
def test_omniglot_vinyals_splits(omniglot: dict) -> None:
    counts = {s: omniglot[s].num_classes for s in ("train", "val", "trainval", "test")}
    assert counts == {"train": 4112, "val": 688, "trainval": 4800, "test": 1692}
    tv = omniglot["trainval"]
    assert tv.image_shape == (1, 28, 28) and tv.images.shape[0] == 1200 * 20  # rotations share images
    assert set(tv.rotations.tolist()) == {0, 1, 2, 3}
    assert characters(omniglot["train"]).isdisjoint(characters(omniglot["val"]))
    assert characters(omniglot["trainval"]).isdisjoint(characters(omniglot["test"]))
    assert characters(omniglot["train"]) | characters(omniglot["val"]) == characters(tv)
    assert float(tv.images.float().mean()) / 255 < 0.25, "ink must be bright on a dark background"
    b = EpisodeSampler(omniglot["test"], way=20, shot=5, query=15).sample(2, gen(0))
    assert b.support_x.shape == (2, 100, 1, 28, 28) and b.query_x.shape == (2, 300, 1, 28, 28)
    with pytest.raises(DataError, match=r"1692 classes; way=2000"):
        EpisodeSampler(omniglot["test"], way=2000, shot=1, query=1)
    with pytest.raises(DataError, match="20 images"):
        EpisodeSampler(omniglot["test"], way=5, shot=10, query=11)


@pytest.mark.slow
def test_omniglot_alphabet_split(omniglot: dict) -> None:
    train, test = omniglot["alphabets-train"], omniglot["alphabets-test"]
    assert len(characters(train)) == 964 and len(characters(test)) == 659
    assert train.num_classes == 964 * 4 and test.num_classes == 659 * 4
    assert characters(train).isdisjoint(characters(test))
    assert torch.equal(torch.bincount(train.class_sizes), torch.bincount(torch.full((3856,), 20)))


@pytest.mark.slow
def test_omniglot_second_load_uses_cache(omniglot: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = sorted(p.name for p in cache_dir().glob("omniglot-*"))
    assert len(entries) == 4, entries  # two archives x (safetensors + json)

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(omniglot_module, "_decode", no_decoding)
    t0 = time.perf_counter()
    again = load_omniglot(OMNIGLOT, "trainval")
    elapsed = time.perf_counter() - t0
    print(f"omniglot: cached load of trainval {elapsed:.2f}s")
    assert elapsed < 10.0
    assert torch.equal(again.images, omniglot["trainval"].images)
    assert again.class_names == omniglot["trainval"].class_names


@pytest.mark.slow
def test_packaged_vinyals_splits_match_shared_and_are_used_as_fallback(omniglot: dict, tmp_path: Path) -> None:
    shared_splits = OMNIGLOT / "splits" / "vinyals"
    if not shared_splits.is_dir():
        pytest.skip(f"{shared_splits} not found")
    packaged = REPO / "src" / "metareg" / "data" / "splits" / "vinyals"
    for split in ("train", "val", "trainval", "test"):
        ours = gzip.decompress((packaged / f"{split}.txt.gz").read_bytes()).decode()
        assert ours == (shared_splits / f"{split}.txt").read_text()
    for z in OMNIGLOT_ZIPS:  # a root with the archives only: the packaged split is used
        (tmp_path / z.name).symlink_to(z)
    fallback = load_omniglot(tmp_path, "test")
    assert fallback.class_names == omniglot["test"].class_names


# --------------------------------------------------------------------------- Omniglot on tiny generated trees

TINY_TREE = {
    "images_background": {"Alpha": ["character01", "character02"], "Beta": ["character01"]},
    "images_evaluation": {"Gamma": ["character01", "character02"]},
}


def write_tiny_omniglot(root: Path, drawings: int = 4) -> Path:
    """An official-layout tree of 105x105 1-bit PNGs: black strokes on white, distinct per image."""
    rng = np.random.default_rng(0)
    for archive, alphabets in TINY_TREE.items():
        for alphabet, chars in alphabets.items():
            for char in chars:
                folder = root / archive / alphabet / char
                folder.mkdir(parents=True)
                for d in range(1, drawings + 1):
                    im = Image.new("1", (105, 105), 1)
                    draw = ImageDraw.Draw(im)
                    for _ in range(3):
                        draw.line([tuple(rng.integers(10, 95, 2).tolist()) for _ in range(3)], fill=0, width=6)
                    im.save(folder / f"{len(chars):02d}{chars.index(char):02d}_{d:02d}.png")
    return root


def zip_tree(tree_root: Path, zip_root: Path) -> Path:
    zip_root.mkdir(parents=True, exist_ok=True)
    for archive in TINY_TREE:
        with zipfile.ZipFile(zip_root / f"{archive}.zip", "w") as zf:
            for path in sorted((tree_root / archive).rglob("*")):
                zf.write(path, path.relative_to(tree_root).as_posix())
    return zip_root


def test_tiny_omniglot_tree_alphabets_and_ink(tmp_path: Path) -> None:
    root = write_tiny_omniglot(tmp_path / "tree")
    train = load_omniglot(root, "train", class_split="alphabets")
    test = load_omniglot(root, "evaluation", class_split="alphabets")
    assert train.num_classes == 3 * 4 and test.num_classes == 2 * 4
    assert train.class_names[:2] == ["Alpha/character01/rot000", "Alpha/character01/rot090"]
    assert train.images.shape == (3 * 4, 1, 28, 28)
    ink = train.images.float() / 255
    assert float(ink.mean()) < 0.5 < float(ink.max()), "strokes must be bright, background dark"
    b = EpisodeSampler(train, way=12, shot=2, query=2).sample(3, gen(0))
    assert b.support_x.shape == (3, 24, 1, 28, 28)
    with pytest.raises(DataError, match=r"4 images; shot\+query=3\+2=5"):
        EpisodeSampler(train, way=2, shot=3, query=2)


def test_tiny_omniglot_zip_equals_tree_and_custom_vinyals_split(tmp_path: Path) -> None:
    tree = write_tiny_omniglot(tmp_path / "tree")
    zips = zip_tree(tree, tmp_path / "zips")
    for root in (tree, zips):
        split_dir = root / "splits" / "vinyals"
        split_dir.mkdir(parents=True)
        (split_dir / "train.txt").write_text(
            "Alpha/character02/rot000\nGamma/character01/rot180\nAlpha/character02/rot270\n"
        )
    a = load_omniglot(tree, "train", image_size=16)
    b = load_omniglot(zips, "train", image_size=16)
    assert a.class_names == ["Alpha/character02/rot000", "Gamma/character01/rot180", "Alpha/character02/rot270"]
    assert b.class_names == a.class_names and torch.equal(a.images, b.images)
    assert a.images.shape == (8, 1, 16, 16), "two characters, rotations share their images"
    assert a.rotations.tolist() == [0, 2, 3]
    x = a.class_images(1)
    assert torch.equal(x, torch.rot90(a.images[a.class_indices[1]], 2, dims=(-2, -1)))


def test_omniglot_missing_and_corrupt_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="metareg download omniglot --to"):
        load_omniglot(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"images_background\.zip"):
        load_omniglot(tmp_path / "empty", "train", class_split="alphabets")
    with pytest.raises(DataError, match="split"):
        load_omniglot(tmp_path / "empty", "validation")
    with pytest.raises(DataError, match="class_split"):
        load_omniglot(tmp_path / "empty", "train", class_split="lake")

    bad_zip = tmp_path / "badzip"
    bad_zip.mkdir()
    (bad_zip / "images_background.zip").write_bytes(b"PK\x03\x04 this is not a zip" * 10)
    with pytest.raises(DataError, match=r"images_background\.zip"):
        load_omniglot(bad_zip, "train", class_split="alphabets")

    tree = write_tiny_omniglot(tmp_path / "tree")
    victim = sorted((tree / "images_evaluation" / "Gamma" / "character02").glob("*.png"))[1]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=victim.name):
        load_omniglot(tree, "test", class_split="alphabets", cache=False)


def test_omniglot_bad_split_files(tmp_path: Path) -> None:
    root = write_tiny_omniglot(tmp_path / "tree")
    split_dir = root / "splits" / "vinyals"
    split_dir.mkdir(parents=True)
    (split_dir / "val.txt").write_text("Alpha/character01/rot000\nAlpha/character01/sideways\n")
    with pytest.raises(DataError, match="line 2"):
        load_omniglot(root, "val")
    (split_dir / "val.txt").write_text("Alpha/character09/rot000\n")
    with pytest.raises(DataError, match="character09"):
        load_omniglot(root, "val")


def test_cache_reused_and_invalidated_when_source_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAREG_CACHE", str(tmp_path / "cache"))
    root = write_tiny_omniglot(tmp_path / "tree")
    first = load_omniglot(root, "train", class_split="alphabets")
    files = sorted(p.suffix for p in (tmp_path / "cache" / "data").iterdir())
    assert files == [".json", ".safetensors"]
    real_decode = omniglot_module._decode
    calls = []
    monkeypatch.setattr(omniglot_module, "_decode", lambda *a: calls.append(1) or real_decode(*a))
    again = load_omniglot(root, "train", class_split="alphabets")
    assert calls == [] and torch.equal(again.images, first.images)
    target = sorted((root / "images_background" / "Alpha" / "character01").glob("*.png"))[0]
    Image.new("1", (105, 105), 1).save(target)  # now blank
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = load_omniglot(root, "train", class_split="alphabets")
    assert calls, "a changed source must be decoded again"
    assert int(changed.images[0].max()) == 0 and int(first.images[0].max()) > 0


# --------------------------------------------------------------------------- miniImageNet


@pytest.fixture(scope="module")
def mini(module_cache: Path) -> dict:
    if not (MINI / "train.csv").is_file():
        pytest.skip(f"miniImageNet not found under {MINI} (set METAREG_SHARED_DATA)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAREG_CACHE", str(module_cache))
        t0 = time.perf_counter()
        loaded = {s: load_miniimagenet(MINI, s) for s in ("train", "val", "test")}
    print(f"miniimagenet-100: first load (decoding 10,000 JPEGs) {time.perf_counter() - t0:.1f}s")
    return loaded


@pytest.mark.slow
def test_miniimagenet_shared(mini: dict) -> None:
    assert {s: c.num_classes for s, c in mini.items()} == {"train": 64, "val": 16, "test": 20}
    for c in mini.values():
        assert c.image_shape == (3, 84, 84) and c.images.dtype == torch.uint8
    names = {s: set(c.class_names) for s, c in mini.items()}
    assert names["train"].isdisjoint(names["val"]) and names["train"].isdisjoint(names["test"])
    assert names["val"].isdisjoint(names["test"])
    b = EpisodeSampler(mini["test"], way=5, shot=5, query=15).sample(2, gen(0))
    assert b.support_x.shape == (2, 25, 3, 84, 84) and b.query_x.shape == (2, 75, 3, 84, 84)
    t0 = time.perf_counter()
    assert load_miniimagenet(MINI, "test").num_classes == 20
    assert time.perf_counter() - t0 < 10.0


def test_tiny_miniimagenet_unequal_600_per_class_counts(tmp_path: Path) -> None:
    counts = {"n01": 600, "n02": 599, "n03": 600}
    root = write_tiny_mini(tmp_path / "mini", counts, size=(8, 8))
    classes = load_miniimagenet(root, "train", image_size=8)
    assert classes.class_names == ["n01", "n02", "n03"]
    assert classes.class_sizes.tolist() == [600, 599, 600] and classes.images.shape == (1799, 3, 8, 8)
    sampler = EpisodeSampler(classes, way=3, shot=99, query=500)
    b = sampler.sample(2, gen(0))
    assert b.query_x.shape == (2, 1500, 3, 8, 8)
    with pytest.raises(DataError, match=r"'n02' has 599 images; shot\+query=100\+500=600"):
        EpisodeSampler(classes, way=3, shot=100, query=500)


def test_tiny_miniimagenet_resizes_other_sizes(tmp_path: Path) -> None:
    root = write_tiny_mini(tmp_path / "mini", {"a": 3, "b": 4}, size=(40, 30))
    classes = load_miniimagenet(root, "val", image_size=32)
    assert classes.images.shape == (7, 3, 32, 32) and classes.class_sizes.tolist() == [3, 4]


def test_tiny_miniimagenet_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_miniimagenet(tmp_path / "nowhere", "train")
    root = write_tiny_mini(tmp_path / "mini", {"a": 3, "b": 3}, size=(8, 8))
    with pytest.raises(DataError, match="split"):
        load_miniimagenet(root, "trainval")
    (root / "test.csv").unlink()
    with pytest.raises(DataError, match=r"test\.csv"):
        load_miniimagenet(root, "test")
    (root / "val.csv").write_text("file,class\na00000001.jpg,a\n")
    with pytest.raises(DataError, match=r"val\.csv: header"):
        load_miniimagenet(root, "val")
    (root / "images" / "b00000002.jpg").unlink()
    with pytest.raises(DataError, match=r"train.csv line 6: image .*b00000002.jpg is missing"):
        load_miniimagenet(root, "train")
    (root / "images" / "b00000002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"b00000002\.jpg"):
        load_miniimagenet(root, "train", cache=False)
    shutil.rmtree(root / "images")
    with pytest.raises(DataError, match="images"):
        load_miniimagenet(root, "train")


# --------------------------------------------------------------------------- download (file:// URLs only)


def test_download_from_file_mirror_and_skip_when_present(tmp_path: Path) -> None:
    if not all(p.is_file() for p in OMNIGLOT_ZIPS):
        pytest.skip(f"Omniglot zips not found under {OMNIGLOT}")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for z in OMNIGLOT_ZIPS:
        (mirror / z.name).symlink_to(z)
    dest = tmp_path / "dest"
    paths = download_omniglot(dest, base_url=mirror.as_uri() + "/", progress=False)
    assert [p.name for p in paths] == ["images_background.zip", "images_evaluation.zip"]
    for p in paths:
        assert p.is_file() and not p.is_symlink() and p.stat().st_size == expected_files()[p.name]["size"]
    assert sorted(x.name for x in dest.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    # present and valid: nothing is fetched, so an unreachable mirror does not matter
    again = download_omniglot(dest, base_url=(tmp_path / "gone").as_uri(), progress=False)
    assert again == paths
    # a damaged file is fetched again
    paths[1].write_bytes(b"damaged")
    download_omniglot(dest, base_url=mirror.as_uri(), progress=False)
    assert paths[1].stat().st_size == expected_files()["images_evaluation.zip"]["size"]


def test_download_checksum_mismatch_removes_file(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, info in expected_files().items():
        (mirror / name).write_bytes(b"\0" * info["size"])  # right size, wrong content
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=r"checksum mismatch for .*images_background\.zip"):
        download_omniglot(dest, base_url=mirror.as_uri(), progress=False)
    assert list(dest.iterdir()) == [], "neither the bad file nor a partial download may remain"


def test_download_network_failure_names_url(tmp_path: Path) -> None:
    url = (tmp_path / "no-such-mirror").as_uri()
    with pytest.raises(DataError, match=f"could not download {url}/images_background.zip"):
        download_omniglot(tmp_path / "dest", base_url=url, progress=False)
    assert list((tmp_path / "dest").iterdir()) == []


def test_checksums_record_sizes_and_match_shared_zips() -> None:
    table = expected_files("omniglot")
    assert set(table) == {"images_background.zip", "images_evaluation.zip"}
    for info in table.values():
        assert len(info["sha256"]) == 64 and info["size"] > 1_000_000
    for z in OMNIGLOT_ZIPS:
        if z.is_file():
            assert z.stat().st_size == table[z.name]["size"]


# --------------------------------------------------------------------------- registry


def test_build_task_source_names_and_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert episodic_datasets() == ["cub", "glyphs", "miniimagenet", "omniglot", "polynomial", "sine"]
    glyphs = build_task_source("glyphs", "test", way=5, shot=1, query=2, num_classes=10, instances_per_class=4)
    assert glyphs.is_classification and glyphs.sample(2, gen(0)).support_x.shape == (2, 5, 1, 28, 28)
    sine = build_task_source("sine", "train", way=99, shot=3, query=4, frequency=(1.0, 1.0))
    assert not sine.is_classification and sine.sample(2, gen(0)).query_x.shape == (2, 4, 1)
    poly = build_task_source("polynomial", "train", way=5, shot=3, query=4, order=2)
    assert poly.sample(2, gen(0)).support_y.shape == (2, 3, 1)
    with pytest.raises(DataError, match="glyphs, miniimagenet, omniglot, polynomial, sine"):
        build_task_source("cifar", "train", way=5, shot=1, query=1)
    with pytest.raises(DataError, match=r"unknown option.*colour"):
        build_task_source("glyphs", "train", way=5, shot=1, query=1, colour="red")
    with pytest.raises(DataError, match="order"):
        build_task_source("polynomial", "train", way=5, shot=1, query=1)
    with pytest.raises(DataError, match="METAREG_DATA_ROOT"):
        build_task_source("omniglot", "train", way=5, shot=1, query=1)

    write_tiny_omniglot(tmp_path / "omniglot")
    write_tiny_mini(tmp_path / "miniimagenet-100", {"a": 4, "b": 4, "c": 4}, size=(8, 8))
    monkeypatch.setenv("METAREG_DATA_ROOT", str(tmp_path))
    omni = build_task_source("omniglot", "test", way=3, shot=1, query=2, image_size=14, class_split="alphabets")
    assert omni.sample(1, gen(0)).support_x.shape == (1, 3, 1, 14, 14)
    mini = build_task_source("miniimagenet", "val", way=3, shot=2, query=2, image_size=8)
    assert mini.sample(1, gen(0)).query_x.shape == (1, 6, 3, 8, 8)
    with pytest.raises(DataError, match="way=4"):
        build_task_source("miniimagenet", "val", way=4, shot=1, query=1, image_size=8)
