"""MetaPerturb's Table 3 ablations as options that change exactly what they name (s = 1, z = 1, slots
only where the location says, the source split across instances), and Figure 8's loss surface
(filter-normalized directions; `metareg plot loss-surface` from a tiny transfer run)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import cli_subprocess
from metareg.config import TransferConfig, parse_assignment
from metareg.data import class_tasks, instance_tasks, load_labeled
from metareg.errors import ConfigError, DataError
from metareg.evaluate.surface import filter_normalized_direction, loss_surface
from metareg.nets import create_model
from metareg.nets.slots import recording
from metareg.perturb import MetaPerturb, build_perturbation
from metareg.runs.common import resolve
from metareg.runs.metaperturb import source_tasks
from metareg.runs.transfer import transfer


def _network(options: dict, backbone: str = "resnet20", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    factory = build_perturbation("metaperturb", {"phi": "learned"} | options)
    return create_model(backbone, 5, in_channels=3, image_size=16, standard=True, perturbation=factory, **kw)


def _slots(net: torch.nn.Module) -> list[int]:
    return [m.index for m in net.modules() if isinstance(m, MetaPerturb)]


def test_without_scale_s_is_one_and_without_noise_z_is_one():
    """Same phi, same input, same noise draws: without the scale the block's output is h * z (s = 1),
    without the noise h * s (z = 1). Catches an ablation that changes the other factor too, or none."""
    x = torch.randn(6, 3, 16, 16)
    outputs, metrics = {}, {}
    for name, options in (("full", {}), ("noscale", {"scale": False}), ("nonoise", {"noise": False})):
        net = _network(options, blocks=(1, 1, 1)).train()
        slot = net.blocks[0].perturb
        seen = {}
        slot.register_forward_hook(lambda _m, args, out, seen=seen: seen.update(h=args[0], out=out))
        torch.manual_seed(1)
        with recording() as record:
            net(x, sample=True)
        outputs[name], metrics[name] = seen, {k: v.item() for k, v in record.metrics.items()}
        if name == "full":
            phi, h = slot.function, seen["h"]
            torch.manual_seed(1)
            z = phi.noise(h, True)
            s = slot.scales(h)
    h = outputs["full"]["h"]
    torch.testing.assert_close(outputs["full"]["out"], (h * s.view(1, -1, 1, 1) * z).clamp(max=100.0))
    assert metrics["noscale"]["s0"] == 1.0 and metrics["nonoise"]["z0"] == 1.0
    assert metrics["full"]["s0"] != 1.0 and metrics["full"]["z0"] != 1.0
    # s = 1 leaves the noise: the first block sees the same input and noise in both networks
    torch.testing.assert_close(outputs["noscale"]["out"], (h * z).clamp(max=100.0))
    torch.testing.assert_close(outputs["nonoise"]["out"], (h * s.view(1, -1, 1, 1)).clamp(max=100.0))


def test_location_puts_slots_only_where_it_says():
    """ResNet20 (3 stages of 3 blocks): before pooling = the last block of each stage, top = the last
    stage, bottom = the first; Conv4's every block max-pools; a strided Conv4's last block is only
    flattened. Catches a wrong third, an inverted top/bottom, a slot left at an excluded layer."""
    assert _slots(_network({})) == list(range(9))
    assert _slots(_network({"location": "before-pooling"})) == [2, 5, 8]
    assert _slots(_network({"location": "top"})) == [6, 7, 8]
    assert _slots(_network({"location": "bottom"})) == [0, 1, 2]
    assert _slots(_network({"location": "top"}, "conv4", channels=4)) == [2, 3]
    assert _slots(_network({"location": "before-pooling"}, "conv4", channels=4)) == [0, 1, 2, 3]
    assert _slots(_network({"location": "before-pooling"}, "conv4", channels=4, strided=True)) == [0, 1, 2]
    with pytest.raises(ConfigError, match="location must be one of"):
        build_perturbation("metaperturb", {"location": "middle"})
    with pytest.raises(ConfigError, match="true or false"):
        build_perturbation("metaperturb", {"scale": "no"})


def test_homogeneous_tasks_split_instances_not_classes():
    """task_split=instances: every task has every class, the tasks' images are disjoint and cover each
    class; class-wise tasks have disjoint classes. Catches a class split under the instance name."""
    data = load_labeled("glyphs", "train", image_size=8, num_classes=6)
    tasks = instance_tasks(data, 3, seed=0)
    seen = []
    for train, test in tasks:
        assert train.num_classes == 6 and set(train.labels.tolist()) == set(range(6)) == set(test.labels.tolist())
        seen += [img for part in (train, test) for img in part.images.flatten(1).tolist()]
    assert len(seen) == len(data) and len({tuple(v) for v in seen}) == len(
        {tuple(v) for v in data.images.flatten(1).tolist()}
    )
    classwise = class_tasks(data, 3, seed=0)
    assert [t.num_classes for t, _ in classwise] == [2, 2, 2]
    with pytest.raises(DataError, match="needs 2000"):
        instance_tasks(data, 1000)
    config = resolve("perturb-quickstart", None, [parse_assignment("task_split=instances")], schema=_meta_schema())
    assert all(t.num_classes == 50 for t, _ in source_tasks(config))
    with pytest.raises(ConfigError, match="task_split"):
        resolve("perturb-quickstart", None, [parse_assignment("task_split=random")], schema=_meta_schema())


def _meta_schema():
    from metareg.config import MetaTrainConfig

    return MetaTrainConfig


# ------------------------------------------------------------------------------- loss surface
def test_directions_are_filter_normalized():
    """Every filter of a direction has the norm of the weights' filter; 1-D parameters get none."""
    torch.manual_seed(0)
    net = create_model("conv4", 3, in_channels=1, image_size=16, channels=4)
    params = {n: p.detach() for n, p in net.named_parameters()}
    d = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    for name, p in params.items():
        if p.dim() == 1:
            assert torch.equal(d[name], torch.zeros_like(p))
        else:
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), p.flatten(1).norm(dim=1))
    coords, grid = loss_surface(lambda q: float(sum(v.sum() for v in q.values())), params, (d, d), points=3)
    assert coords.tolist() == [-1.0, 0.0, 1.0] and grid.shape == (3, 3)
    base = float(sum(v.sum() for v in params.values()))
    assert grid[1, 1].item() == pytest.approx(base)


def test_loss_surface_plot_from_tiny_transfer_runs(tmp_path):
    overrides = [
        "data.image_size=16",
        "train.batch_size=8",
        "train.steps=3",
        "train.log_every=1",
        "model.options.channels=4",
        "perturb.mc_samples=2",
        "against_base=false",
    ]
    runs = []
    for name, extra in (("base", ["perturb.name=none"]), ("mp", [])):
        config = resolve(
            "transfer-quickstart", None, [parse_assignment(o) for o in overrides + extra], schema=TransferConfig
        )
        transfer(config, tmp_path / name, progress=False)
        runs.append(str(tmp_path / name))
    out = tmp_path / "surface.png"
    done = cli_subprocess("plot", "loss-surface", *runs, "--grid", "3", "--images", "8", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.is_file() and out.stat().st_size > 1000
    stored = json.loads((tmp_path / "mp" / "loss-surface.json").read_text())
    assert len(stored["loss"]) == 3 and stored["settings"]["points"] == 3 and "(metaperturb)" in stored["label"]
    assert "mean loss increase over the grid" in done.stdout
