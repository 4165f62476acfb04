"""MetaPerturb runs: class-wise source tasks, meta-training (exact resume; torchrun with 2 processes
equals 1 process), transfer (Base, MetaPerturb, fine-tuning; paired comparison; Figure 7's plot)
and the command line's errors. Everything runs on the built-in glyphs at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    META_TRAIN_KEYS,
    TINY_META,
    TINY_TRANSFER,
    TRANSFER_KEYS,
    assert_one_line,
    assert_same_tensors,
    cli_subprocess,
    flags,
    meta_config,
    tensors_of,
)
from metareg.config import TransferConfig, parse_assignment
from metareg.data import class_tasks, load_labeled, split_per_class
from metareg.errors import ConfigError, DataError
from metareg.meta.distributed import World
from metareg.meta.joint_trainer import JointTrainer
from metareg.meta.ordinary import TransferTrainer, predict
from metareg.perturb.pretrained import save_phi
from metareg.runs.common import resolve
from metareg.runs.metaperturb import meta_train
from metareg.runs.transfer import transfer


def assert_exact_resume(
    tmp_path: Path, monkeypatch, trainer: type, start, config, stop: int, prefixes: tuple[str, ...]
) -> None:
    """``start(config, folder, resume=...)`` run whole, and interrupted at step ``stop`` (after a
    checkpoint) then resumed, ends with bit-identical checkpoints (holding ``prefixes``)."""
    start(config, tmp_path / "whole", progress=False)
    original = trainer.train_step

    def interrupted(self, step):
        if step == stop:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        start(config, tmp_path / "cut", progress=False)
    monkeypatch.setattr(trainer, "train_step", original)
    start(config, tmp_path / "cut", resume=True, progress=False)
    assert_same_tensors(tensors_of(tmp_path / "whole"), tensors_of(tmp_path / "cut"), prefixes)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory) -> Path:
    """A stored phi with non-trivial parameters (so transfer perturbs for real)."""
    from metareg.perturb import MetaPerturbFunction

    folder = tmp_path_factory.mktemp("phi")
    torch.manual_seed(0)
    phi = MetaPerturbFunction()
    for p in phi.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save_phi(
        folder,
        phi,
        {"source": {"data": "unit-test"}, "backbone": "none", "command": "metareg perturb meta-train (test)"},
    )
    return folder


# ------------------------------------------------------------------------------------- data
def test_class_tasks_are_class_disjoint_with_fixed_halves():
    data = load_labeled("glyphs", "train", image_size=12, num_classes=23, instances_per_class=6)
    tasks = class_tasks(data, 5, seed=3)
    names = [set(train.class_names) for train, _ in tasks]
    assert sum(len(n) for n in names) == 23 and set().union(*names) == set(data.class_names)  # a partition
    assert sorted(len(n) for n in names) == [4, 4, 5, 5, 5]
    for train, test in tasks:
        assert train.class_names == test.class_names and train.class_counts().tolist() == [3] * train.num_classes
        # the halves are disjoint images of the same classes
        rows = {tuple(x.flatten().tolist()) for x in train.images} & {tuple(x.flatten().tolist()) for x in test.images}
        assert not rows
    again = class_tasks(data, 5, seed=3)
    assert all(torch.equal(a[0].images, b[0].images) for a, b in zip(tasks, again))
    with pytest.raises(DataError, match="class-wise into 24 tasks"):
        class_tasks(data, 24)


def test_split_per_class_is_fixed_and_checks_sizes():
    data = load_labeled("glyphs", "test", image_size=12, num_classes=4, instances_per_class=5)
    train, test = split_per_class(data, 3, seed=1)
    assert train.class_counts().tolist() == [3] * 4 and test.class_counts().tolist() == [2] * 4
    assert torch.equal(split_per_class(data, 3, seed=1)[0].images, train.images)
    assert not torch.equal(split_per_class(data, 3, seed=2)[0].images, train.images)
    with pytest.raises(DataError, match="has 5 images; taking 5 per class"):
        split_per_class(data, 5)


def test_tasks_are_shared_equally_between_processes():
    assert list(World(rank=1, size=2).share(10)) == [5, 6, 7, 8, 9]
    with pytest.raises(ConfigError, match="cannot be shared equally"):
        World(rank=0, size=3).share(10)


# ---------------------------------------------------------------------------- meta-training
def test_meta_training_resumes_exactly_after_an_interruption(tmp_path, monkeypatch):
    assert_exact_resume(
        tmp_path, monkeypatch, JointTrainer, meta_train, meta_config(), stop=3, prefixes=META_TRAIN_KEYS
    )
    phi = json.loads((tmp_path / "cut" / "phi.json").read_text())
    assert phi["parameters"] == 82 and phi["steps"] == 4 and phi["source"]["tasks"] == 4
    log = (tmp_path / "cut" / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2", "3", "4"]


@pytest.mark.slow
def test_two_processes_with_torchrun_give_the_same_phi_as_one(tmp_path):
    """Algorithm 1 across processes (gloo): each of 2 processes trains 2 of the 4 tasks and phi's
    gradient is all-reduced; float64, so the only difference is the order of the sums."""
    args = [
        "--no-progress",
        "perturb",
        "meta-train",
        "--preset",
        "perturb-quickstart",
        *flags(TINY_META),
        "--set",
        "dtype=float64",
        "--set",
        "train.steps=3",
        "--set",
        "train.checkpoint_every=3",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "metareg.cli", *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "metareg.cli",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "checkpoint.json").read_text())["processes"] == 2
    a, b = tensors_of(tmp_path / "one"), tensors_of(tmp_path / "two")
    # phi, its Adam state, and every task network gathered from both processes
    assert_same_tensors(a, b, META_TRAIN_KEYS, rtol=1e-9, atol=1e-12)


INTERRUPTED = """
import os
import sys

import torch.distributed as dist

from metareg.cli import main
from metareg.meta.joint_trainer import JointTrainer


class Stop(Exception):
    pass


original = JointTrainer.train_step
stop = int(os.environ.get("STOP_AT_STEP", -1))


def train_step(self, step):
    if step == stop:  # after the checkpoint of step `stop`, written by rank 0
        if dist.is_initialized():
            dist.barrier()  # every process stops here: none is killed while rank 0 writes
        raise Stop
    with open(os.environ["STEPS_RAN"], "a") as f:
        f.write(f"{self.world.rank}:{step}\\n")
    return original(self, step)


JointTrainer.train_step = train_step
try:
    main(sys.argv[1:])
except Stop:
    sys.exit(0)
sys.exit(0 if stop < 0 else 1)  # a run told to stop must have stopped
"""


@pytest.mark.slow
def test_two_process_run_resumed_in_one_process_ends_like_an_uninterrupted_one(tmp_path):
    """joint_trainer's claim: rank 0 gathers every task into the checkpoint, so a run started by
    torchrun with 2 processes, interrupted after its step-2 checkpoint and resumed in 1 process, ends
    with the tensors of an uninterrupted 1-process run (float64: up to the order of the sums)."""
    args = [
        "--no-progress",
        "perturb",
        "meta-train",
        "--preset",
        "perturb-quickstart",
        *flags(TINY_META),
        "--set",
        "dtype=float64",
        "--set",
        "train.steps=4",
        "--set",
        "train.checkpoint_every=2",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "metareg.cli"]
    one = subprocess.run([*cli, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    ran = {"cut": tmp_path / "ran-cut.txt", "resumed": tmp_path / "ran-resumed.txt"}
    cut = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            *args,
            "--out",
            str(tmp_path / "cut"),
        ],
        capture_output=True,
        text=True,
        env=env | {"STOP_AT_STEP": "2", "STEPS_RAN": str(ran["cut"])},
    )
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert sorted(ran["cut"].read_text().split()) == ["0:0", "0:1", "1:0", "1:1"]  # two processes, steps 0 and 1
    meta = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())
    assert (meta["step"], meta["processes"]) == (2, 2) and not (tmp_path / "cut" / "phi.json").exists()
    resumed = subprocess.run(
        [
            sys.executable,
            str(script),
            "--no-progress",
            "perturb",
            "meta-train",
            "--out",
            str(tmp_path / "cut"),
            "--resume",
        ],
        capture_output=True,
        text=True,
        env=env | {"STEPS_RAN": str(ran["resumed"])},
    )
    assert resumed.returncode == 0, resumed.stderr
    assert ran["resumed"].read_text().split() == ["0:2", "0:3"]  # one process, from the checkpoint on
    meta = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())
    assert (meta["step"], meta["processes"]) == (4, 1)
    a, b = tensors_of(tmp_path / "one"), tensors_of(tmp_path / "cut")
    # phi, its Adam state, every task network and its Adam state
    assert_same_tensors(a, b, META_TRAIN_KEYS, rtol=1e-9, atol=1e-12)
    assert json.loads((tmp_path / "cut" / "phi.json").read_text())["steps"] == 4


# --------------------------------------------------------------------------------- transfer
def transfer_config(phi_dir: Path, *extra: str) -> TransferConfig:
    return resolve(
        "transfer-quickstart",
        overrides=[parse_assignment(s) for s in (*TINY_TRANSFER, f"perturb.phi={phi_dir}", *extra)],
        schema=TransferConfig,
    )


@pytest.mark.slow
def test_transfer_baselines_and_metaperturb_end_to_end(tmp_path, phi_dir):
    base = transfer(transfer_config(phi_dir, "perturb.name=none"), tmp_path / "base", progress=False)
    perturbed = transfer(transfer_config(phi_dir), tmp_path / "mp", progress=False)
    assert base["protocol"] == {k: v for k, v in perturbed["protocol"].items() if k != "mc_samples"} | {"mc_samples": 1}
    assert (
        perturbed["protocol"]["mc_samples"] == 3
        and len(perturbed["scores"]) == perturbed["protocol"]["test_images"] == 200
    )
    assert 0 <= perturbed["ece"] <= 1 and perturbed["nll"] > 0 and perturbed["phi"]["source"] == {"data": "unit-test"}
    # Fine-tuning: the convolutions start from the Base run's trained ones, batch norm and head do not.
    # (One step at a negligible learning rate: the weights are still the ones they started from.)
    tuned_config = transfer_config(
        phi_dir, "perturb.name=none", f"init_from={tmp_path / 'base'}", "train.steps=1", "train.lr=1e-12"
    )
    transfer(tuned_config, tmp_path / "ft", progress=False)
    source, tuned = tensors_of(tmp_path / "base"), tensors_of(tmp_path / "ft")
    conv = [k for k in source if k.endswith("conv.weight")]
    assert len(conv) == 4
    for key in conv:
        torch.testing.assert_close(tuned[key], source[key], rtol=0, atol=1e-8)
    assert not torch.equal(source["model.head.weight"], tuned["model.head.weight"])
    # The paired comparison over the same test images, and Figure 7's plot.
    done = cli_subprocess("compare", str(tmp_path / "mp"), str(tmp_path / "base"))
    assert done.returncode == 0 and "paired over the same 200 test images" in done.stdout, done.stderr
    done = cli_subprocess("plot", "scales", str(tmp_path / "mp"), "--out", str(tmp_path / "scales.png"))
    assert done.returncode == 0 and (tmp_path / "scales.png").stat().st_size > 1000, done.stderr
    done = cli_subprocess("plot", "scales", str(tmp_path / "base"))
    assert_one_line(done.returncode, done.stderr, "without MetaPerturb")
    done = cli_subprocess(
        "plot", "reliability", str(tmp_path / "mp"), str(tmp_path / "base"), "--out", str(tmp_path / "rel.png")
    )
    assert done.returncode == 0 and (tmp_path / "rel.png").stat().st_size > 1000, done.stderr


@pytest.mark.slow
def test_monte_carlo_test_predictions_are_reproducible_and_average_the_noise(tmp_path, phi_dir):
    from metareg.data.augment import normalize, to_channels
    from metareg.fewshot import load_transfer_model

    transfer(transfer_config(phi_dir), tmp_path / "mp", progress=False)
    _, model = load_transfer_model(tmp_path / "mp")

    data = load_labeled("glyphs", "test", image_size=16, num_classes=20).images[:16]
    kw = {"channels": 3, "device": torch.device("cpu"), "dtype": torch.float32}
    one = predict(model, data, samples=1, seed=5, **kw)
    assert torch.equal(one, predict(model, data, samples=1, seed=5, **kw))  # same seed, same noise
    assert not torch.equal(one, predict(model, data, samples=1, seed=6, **kw))  # noise is sampled at test time
    many = predict(model, data, samples=8, seed=5, **kw)
    torch.testing.assert_close(many.sum(1), torch.ones(16, dtype=torch.float64))
    # S = 8 is the mean of 8 single-sample softmaxes drawn in the same order from the same seed, in
    # eval mode (running statistics, none moved), whatever mode the model was in.
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again = predict(model, data, samples=8, seed=5, **kw)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.eval()
    x = normalize(to_channels(data, 3), torch.float32)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(5)
        draws = torch.stack([F.softmax(model(x, sample=True), dim=1) for _ in range(8)]).double()
    assert torch.equal(draws[0], one)
    torch.testing.assert_close(many, draws.mean(0), rtol=1e-6, atol=1e-7)
    assert torch.equal(again, many)
    assert (draws.std(0).max(1).values > 1e-3).all()  # every image's prediction varies with the noise ...
    assert (many - one).abs().max() > 1e-3  # ... so the average is not one draw
    assert (many - draws[-1]).abs().max() > 1e-3


@pytest.mark.slow
def test_transfer_resumes_exactly_after_an_interruption(tmp_path, phi_dir, monkeypatch):
    assert_exact_resume(
        tmp_path, monkeypatch, TransferTrainer, transfer, transfer_config(phi_dir), stop=4, prefixes=TRANSFER_KEYS
    )
    whole, cut = (json.loads((tmp_path / r / "test.json").read_text()) for r in ("whole", "cut"))
    assert whole["scores"] == cut["scores"] and whole["nll"] == cut["nll"]
    assert whole["final_train_accuracy"] is not None and whole["final_train_accuracy"] == cut["final_train_accuracy"]
    (
        tmp_path / "whole" / "test.json"
    ).unlink()  # testing a finished run again (resume at its last step) keeps its training record
    again = transfer(transfer_config(phi_dir), tmp_path / "whole", resume=True, progress=False)
    assert again["scores"] == whole["scores"] and again["final_train_accuracy"] == whole["final_train_accuracy"]


# ----------------------------------------------------------------------------- command line
@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["perturb", "transfer", "--arch", "resnet9000"], ["unknown backbone"]),
        (["perturb", "transfer", "--preset", "quickstart"], ["bilevel preset", "metareg train"]),
        (["perturb", "meta-train", "--preset", "transfer-quickstart"], ["transfer preset"]),
        (
            ["perturb", "transfer", "--preset", "transfer-miniimagenet", "--data-root", "/nonexistent"],
            ["miniImageNet root"],
        ),
        (["perturb", "transfer", "--set", "data.train_per_class=25"], ["has 20 images", "taking 25"]),
        (["perturb", "transfer", "--phi", "/nonexistent/phi"], ["no meta-trained perturbation"]),
        (["perturb", "transfer", "--set", "train.bogus=1"], ["unknown config key 'train.bogus'"]),
        (["perturb", "meta-train", "--tasks", "500"], ["cannot be divided class-wise into 500 tasks"]),
        (["perturb", "transfer", "--resume"], ["--resume needs --out"]),
        (["perturb", "transfer", "--set", "data.image_size=8", "--arch", "vgg9"], ["too small"]),
        (["perturb", "info", "/nonexistent"], ["no meta-trained perturbation"]),
    ],
)
def test_bad_perturb_input_gets_one_line(tmp_path, args, fragments):
    extra = ["--out", str(tmp_path / "run")] if args[1] != "info" and "--resume" not in args else []
    done = cli_subprocess(*args, *extra)
    assert_one_line(done.returncode, done.stderr, *fragments)


# ------------------------------------------------------------------------- batches and crops
def test_epochs_visit_every_example_once_and_crops_are_windows_of_the_padded_image():
    from metareg.data.augment import epoch_batch, normalize, random_crop_flip

    seen = torch.cat([epoch_batch(10, 3, step, seed=4) for step in range(3)])  # one epoch: 3 full batches
    assert len(set(seen.tolist())) == 9 and torch.equal(epoch_batch(10, 3, 1, seed=4), seen[3:6])
    assert not torch.equal(epoch_batch(10, 3, 3, seed=4), seen[:3])  # a new order each epoch
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float64).view(2, 3, 6, 6) + 1
    crops = random_crop_flip(images, 2, True, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, y : y + 6, x : x + 6] for y in range(5) for x in range(5)]
        assert any(torch.equal(crops[i], w) or torch.equal(crops[i], w.flip(-1)) for w in windows)
    flips = [random_crop_flip(images, 0, True, torch.Generator().manual_seed(s))[0] for s in range(40)]
    assert any(torch.equal(f, images[0]) for f in flips) and any(torch.equal(f, images[0].flip(-1)) for f in flips)
    assert normalize(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
