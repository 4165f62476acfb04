"""From configs to objects: the one place a config (:mod:`metareg.config`) becomes a device, a
dtype, an execution strategy, a network, a perturbation factory, a task source or a learner. The
command line and the Python API build through these functions, so a run and a user's script given
the same config get the same objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch

from .checkpoint import CHECKPOINT, load_checkpoint
from .config import Config, MetaTrainConfig, PerturbConfig, TransferConfig
from .data import build_task_source, get_episodic
from .data.tasks import TaskSource
from .errors import ConfigError
from .inner import InnerRule
from .meta.bilevel import BilevelLearner, Precision, Strategy
from .meta.joint import JointLearner, JointStrategy
from .meta.ordinary import load_convolutions
from .nets import create_model
from .nets.layers import tracks_running_statistics
from .perturb import build_perturbation
from .seeds import derive_seed

# Ordinary training takes RGB; grayscale data is repeated over 3 channels (as MetaPerturb's reference does).
IMAGE_CHANNELS = 3
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ------------------------------------------------------------------------------- devices etc.
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA GPU is available to this torch")
    return device


def dtype_of(config: Any) -> torch.dtype:
    return DTYPES[config.dtype]


def resolve_strategy(
    strategy: str, device: torch.device, backbone: str, vmap_safe: bool = True, recompute: bool = False
) -> Strategy:
    """``auto``: ``vmap`` on CUDA and for the small MLP regressors (1.5x the loop's tasks/s on the
    sine preset on CPU, where per-task Python overhead dominates); the per-task loop for conv nets
    on CPU (``metareg bench``: the loop is 1.5x faster than ``vmap`` there, with 1/5 the memory),
    and for perturbations ``vmap`` cannot batch (``vmap_safe = False``: mixup's permutations,
    inner-loop attacks), and for recomputed inner steps (``recompute``: one task's graph at a time)."""
    if strategy != "auto":
        return cast(Strategy, strategy)  # a name the config's check accepted
    return "vmap" if (device.type == "cuda" or backbone == "mlp") and vmap_safe and not recompute else "loop"


def resolve_mc_batch(choice: str, device: torch.device, model: torch.nn.Module) -> bool:  # noqa: ARG001
    """Whether the inner loop's Monte-Carlo samples run as one batched pass. ``auto``: batched
    whenever the model can stack copies (its batch norms are the episodic ones). Measured with
    ``metareg bench --mc 30`` on 2 CPU cores, Meta-Dropout's meta-test: 1.10-1.17x faster batched
    for 20-way Conv4-64, 2.1x for 5-way Conv4-32 (at twice the memory); on a GPU, where S small
    passes are bound by kernel launches, one large pass is expected to win by more (unmeasured)."""
    if choice == "auto":
        return not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return choice == "batched"


def build_network(
    name: str, num_classes: int, image_size: int, options: dict[str, Any], perturbation: Any = None
) -> torch.nn.Module:
    """A backbone in its ordinary-training form (running batch-norm statistics, He init), RGB input."""
    extra = {} if perturbation is None else {"perturbation": perturbation}
    return create_model(
        name, num_classes, in_channels=IMAGE_CHANNELS, image_size=image_size, standard=True, **extra, **options
    )


def perturbation_factory(p: PerturbConfig, phi: str = "learned") -> Any:
    """The slot factory of a run's perturbation config (MetaPerturb with its phi, clip and annealing)."""
    if p.name == "metaperturb":
        return build_perturbation("metaperturb", {"phi": phi, "clip": p.clip, "anneal": p.anneal} | p.options)
    return build_perturbation(p.name, p.options)


def input_size(config: Config) -> int:
    """The number of values of one input of an episodic config (channels x image side^2; features)."""
    dataset = get_episodic(config.data.name)
    side = 1 if dataset.regression else config.data.image_size or dataset.image_size or 1
    return dataset.channels * side * side


def is_regression(config: Config) -> bool:
    return get_episodic(config.data.name).regression


def test_dataset(config: Config, split: str) -> str:
    """The data set ``split`` is drawn from: ``data.test_name`` for the test split of a cross-domain
    run (DropGrad Table 4: meta-train on miniImageNet, meta-test on CUB), else ``data.name``."""
    data = config.data
    return data.test_name if data.test_name and split == data.test_split else data.name


def build_source(config: Config, split: str, *, shot: int | None = None) -> TaskSource:
    """The episodes of one split of the config's data set (what ``metareg train`` samples from).

    Args:
        config: the run's config (its ``data`` section: name, way, shot, query, root, options).
        split: ``train``, ``val``, ``test`` (or another split the data set names, e.g. ``trainval``).
        shot: shots per class, overriding ``data.shot`` (meta-test at another K).

    Returns:
        A task source: ``sample(num_tasks, generator)`` returns a :class:`~metareg.TaskBatch`.

    Raises:
        metareg.errors.ConfigError: impossible way/shot/query for the split, or data not found (one line).

    Examples:
        ```python
        import torch
        import metareg

        config = metareg.Config.from_dict({"data": {"name": "glyphs", "way": 5, "shot": 1, "query": 15}})
        batch = metareg.build_source(config, "train").sample(4, torch.Generator().manual_seed(0))
        print(batch.support_x.shape, batch.query_x.shape)   # [4, 5, 1, 28, 28], [4, 75, 1, 28, 28]
        ```
    """
    data = config.data
    name = test_dataset(config, split)
    other = name != data.name
    return build_task_source(
        name,
        split,
        way=data.way,
        shot=shot or data.shot,
        query=data.query,
        root=data.test_root if other else data.root,
        image_size=data.image_size or (get_episodic(data.name).image_size if other else None),
        **({} if other else data.options),
    )


def model_options(config: Config) -> dict[str, Any]:
    """The backbone options of ``config``, with MAML++'s per-step batch norm sized to the inner
    steps (``norm_steps = inner.steps`` unless given)."""
    options = dict(config.model.options)
    if (options.get("per_step_weights") or options.get("per_step_stats")) and "norm_steps" not in options:
        options["norm_steps"] = config.inner.steps
    return options


def build_learner(config: Config, perturbation: Any = None) -> BilevelLearner:
    """The learner ``metareg train`` meta-trains: the backbone of ``config.model`` with the
    perturbation of ``config.perturb`` in its slots, the inner rule of ``config.inner``, in the
    bilevel scheme.

    Args:
        config: the run's config.
        perturbation: the slot factory of ``config.perturb``, if it is built already.

    Returns:
        The learner (an ``nn.Module``), on the CPU.

    Raises:
        metareg.errors.ConfigError: an unknown backbone, perturbation or transform, or options
            they do not take (one line).

    Examples:
        ```python
        import metareg

        config = metareg.Config.from_dict({"model": {"options": {"channels": 8}}, "perturb": {"name": "meta-dropout"}})
        learner = metareg.build_learner(config)
        print(learner)
        ```
    """
    dataset = get_episodic(config.data.name)
    perturbation = perturbation or build_perturbation(config.perturb.name, config.perturb.options)
    model = create_model(
        config.model.backbone,
        1 if dataset.regression else config.data.way,
        in_channels=dataset.channels,
        image_size=config.data.image_size or dataset.image_size or 1,
        perturbation=perturbation,
        **model_options(config),
    )
    device = resolve_device(config.device)
    # in-place running statistics (MAML++'s BNRS) cannot run under vmap: the loop then
    vmap_safe = getattr(perturbation, "vmap_safe", True) and not tracks_running_statistics(model)
    return BilevelLearner(
        model,
        InnerRule(config.inner.step, config.inner.lr, tuple(config.inner.transforms)),
        task="regression" if dataset.regression else "classification",
        inner_steps=config.inner.steps,
        eval_inner_steps=config.inner.eval_steps,
        first_order=config.inner.first_order,
        fast=config.inner.fast,
        mc_samples=config.inner.mc_samples,
        eval_mc_samples=config.inner.eval_mc_samples,
        strategy=resolve_strategy(
            config.train.strategy, device, config.model.backbone, vmap_safe, config.train.recompute
        ),
        mc_batch=resolve_mc_batch(config.inner.mc_batch, device, model),
        recompute=config.train.recompute,
        precision=cast(Precision, config.train.precision),  # checked with the config
        task_chunk=config.train.task_chunk,
        memory_budget=config.train.memory_budget,
        workers=config.train.workers,
        multi_step_epochs=config.inner.multi_step_epochs,
        multi_step_min=config.inner.multi_step_min,
        first_order_epochs=config.inner.first_order_epochs,
    )


def build_joint_learner(
    config: MetaTrainConfig, classes: list[int], share: range, device: torch.device, dtype: torch.dtype
) -> JointLearner:
    """MetaPerturb's joint scheme (Algorithm 1) of a meta-training config: this process's task
    networks (``share`` of the ``config.tasks``; ``classes[t]``: task t's number of classes; every
    network has the widest head) with the perturbation's slots, phi tied across them. Each
    theta_t's init depends on t only (not on the process), phi's on the run's seed."""
    widest, size = max(classes), config.data.image_size
    torch.manual_seed(derive_seed(config.seed, 12))  # phi's init (MetaPerturb's function is made with the factory)
    factory = perturbation_factory(config.perturb)

    def build(t: int) -> torch.nn.Module:
        torch.manual_seed(derive_seed(config.seed, t, 11))
        return build_network(config.model.backbone, widest, size, config.model.options, factory)

    # loop or vmap: the meta-train config's check accepts no other
    strategy = cast(JointStrategy, resolve_strategy(config.train.strategy, device, config.model.backbone))
    learner = JointLearner(
        build,
        share,
        config.tasks,
        input_shape=(IMAGE_CHANNELS, size, size),
        strategy=strategy,
        classes=[classes[t] for t in share],
    )
    return learner.to(device, dtype)


def build_transfer_network(config: TransferConfig, num_classes: int) -> tuple[torch.nn.Module, Any]:
    """The network of a transfer config (MetaPerturb's Algorithm 2) and its perturbation factory:
    the backbone with the perturbation (MetaPerturb with its stored, frozen phi; a baseline; or
    none) in its slots, its convolutions copied from ``config.init_from`` when fine-tuning."""
    factory = perturbation_factory(config.perturb, config.perturb.phi)
    torch.manual_seed(derive_seed(config.seed, 21))
    net = build_network(config.model.backbone, num_classes, config.data.image_size, config.model.options, factory)
    if config.init_from:
        load_convolutions(net, *source_state(config.init_from))
    return net, factory


def source_state(run: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """A transfer run's network state and the key prefix of its backbone's tensors."""
    tensors, _ = load_checkpoint(run, CHECKPOINT)
    # runs from before the slots kept the backbone under model.model.
    prefix = "model.model." if any(k.startswith("model.model.") for k in tensors) else "model."
    return tensors, prefix
