"""Trained models at work on new data: ``metareg.load(RUN | "builtin:NAME")``.

A meta-trained (bilevel) run loads as a :class:`FewShotModel`: ``adapt(support_x, support_y)`` runs
its meta-test inner loop (the steps and noise samples it was meta-tested with) and returns a
:class:`Predictor`, whose ``predict(query_x)`` gives class probabilities. A transfer run (a network
trained ordinarily with a perturbation, MetaPerturb's Algorithm 2) loads as a :class:`Classifier`
whose ``predict(images)`` averages the softmax over the perturbation's noise where it samples at
test time. Both run on the CPU or a GPU (``device=``).

Images are what the run was trained on: ``[N, C, H, W]``, floats in [0, 1] or ``uint8``, at the
run's image size (Omniglot: 28 x 28, ink bright on a dark background, as the loader makes them).

Example::

    model = metareg.load("builtin:omniglot-20w1s-cpu")
    predictor = model.adapt(support_x, support_y)        # 20 images, labels 0..19
    probabilities = predictor.predict(query_x)            # [queries, 20]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .build import build_learner, build_network, dtype_of, perturbation_factory, resolve_device
from .builtin import resolve as resolve_builtin
from .checkpoint import CHECKPOINT, load_checkpoint
from .config import Config, TransferConfig
from .data import get_episodic
from .errors import CheckpointError, ConfigError, one_line
from .meta.bilevel import BilevelLearner, Params
from .meta.ordinary import predict as predict_images
from .nets.modes import eval_mode
from .runfolder import config_of_run, read_run
from .seeds import seeded


def load_learner(path: str | Path, config: Config | None = None) -> tuple[Config, BilevelLearner]:
    """Rebuild the learner of a checkpoint (a run folder or its ``checkpoint.json``)."""
    config = config or config_of_run(path, "bilevel")
    tensors, _ = load_checkpoint(path)
    learner = build_learner(config)
    params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    try:
        learner.load_state_dict(params)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit its model: {one_line(err)}") from None
    return config, learner.to(device=resolve_device(config.device), dtype=dtype_of(config))


def load_transfer_model(run: str | Path) -> tuple[TransferConfig, nn.Module]:
    """The trained network of a transfer run (with its perturbation slots), on the CPU, in eval mode."""
    config = config_of_run(run, "transfer")
    tensors, meta = load_checkpoint(run, CHECKPOINT)
    size = config.data.image_size
    net = build_network(
        config.model.backbone,
        int(meta.get("num_classes", 0)) or 1,
        size,
        config.model.options,
        perturbation_factory(config.perturb),
    )
    try:
        net.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint in {run} does not fit its network: {one_line(err)}") from None
    return config, net.eval()


# ------------------------------------------------------------------------------------ inputs
def _images(x: Tensor, shape: tuple[int, ...], what: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``x`` as model input: ``[N, *shape]`` floats in [0, 1] (``uint8`` is divided by 255)."""
    if not isinstance(x, Tensor):
        raise ConfigError(f"{what} must be a tensor, got {type(x).__name__}")
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
        raise ConfigError(f"{what} must have shape [N, {', '.join(map(str, shape))}], got {list(x.shape)}")
    if x.shape[0] == 0:
        raise ConfigError(f"{what} is empty")
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif not x.is_floating_point():
        raise ConfigError(f"{what} must hold floats in [0, 1] or uint8 pixels, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ConfigError(f"{what} holds NaN or infinite values")
    return x.to(device=device, dtype=dtype)


class Predictor:
    """A model adapted to one task, as :meth:`FewShotModel.adapt` returns it:
    ``predict(query_x)`` -> class probabilities ``[N, way]`` (or, for regression, the outputs).

    Args:
        learner: the meta-trained learner.
        params: the adapted parameters.
        input_shape: the shape of one input.
        seed: fixes the noise of ``predict(..., samples=S)``.
    """

    def __init__(self, learner: BilevelLearner, params: Params, input_shape: tuple[int, ...], seed: int):
        self.learner, self.params, self.input_shape, self.seed = learner, params, input_shape, seed

    @torch.no_grad()
    def predict(self, query_x: Tensor, *, samples: int | None = None) -> Tensor:
        """Class probabilities (or regression outputs) of the adapted model.

        Args:
            query_x: ``[N, C, H, W]`` images, floats in [0, 1] or ``uint8`` (regression: ``[N, 1]``).
            samples: average S passes with the perturbation's noise drawn (default: one
                deterministic pass, the papers' query pass).

        Returns:
            ``[N, way]`` probabilities (rows sum to 1), or ``[N, 1]`` regression outputs.

        Raises:
            metareg.errors.ConfigError: inputs of the wrong shape, type or range (one line).
        """
        device, dtype = self.learner_device()
        x = _images(query_x, self.input_shape, "query_x", device, dtype)
        if samples is not None and samples < 1:
            raise ConfigError(f"samples must be >= 1, got {samples}")
        classification = self.learner.task == "classification"

        def output(sample: bool) -> Tensor:
            out = self.learner.forward_with(self.params, x, sample=sample)
            return out.softmax(-1) if classification else out

        with seeded(self.seed, device), eval_mode(self.learner):
            if samples is None:
                return output(False)
            return torch.stack([output(True) for _ in range(samples)]).mean(0)

    __call__ = predict

    def learner_device(self) -> tuple[torch.device, torch.dtype]:
        reference = next(iter(self.params.values()))
        return reference.device, reference.dtype


class FewShotModel:
    """A meta-trained learner and its config, as :func:`metareg.load` returns it for a
    meta-training run: ``adapt(support_x, support_y)`` -> :class:`Predictor`.

    Args:
        learner: the meta-trained learner.
        config: the config it was trained with (its data set fixes ``way`` and ``input_shape``).

    Examples:
        ```python
        import torch
        import metareg

        model = metareg.load("builtin:omniglot-20w1s-cpu", device="cpu")
        print(model, model.way, model.input_shape)
        ```
    """

    def __init__(self, learner: BilevelLearner, config: Config):
        self.learner, self.config = learner.eval(), config
        dataset = get_episodic(config.data.name)
        self.regression = dataset.regression
        self.way = None if dataset.regression else config.data.way
        size = config.data.image_size or dataset.image_size
        if size is None and not dataset.regression:
            raise ConfigError(f"data set {config.data.name!r} has no default image size: set data.image_size")
        self.input_shape: tuple[int, ...] = (
            (1,) if dataset.regression or size is None else (dataset.channels, size, size)
        )

    def to(self, device: str | torch.device) -> FewShotModel:
        self.learner.to(resolve_device(str(device)))
        return self

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        *,
        steps: int | None = None,
        samples: int | None = None,
        seed: int = 0,
    ) -> Predictor:
        """Adapt to a support set with the meta-test inner loop.

        Args:
            support_x: ``[N, C, H, W]`` images (floats in [0, 1] or ``uint8``) at the model's
                ``input_shape``, or regression inputs ``[N, 1]``.
            support_y: labels ``0..way-1`` (``[N]``), or regression targets ``[N, 1]``.
            steps: inner steps (default: the run's ``inner.eval_steps``).
            samples: noise samples per inner step (default: the run's ``inner.eval_mc_samples``).
            seed: fixes the noise.

        Returns:
            The adapted model; its ``predict(query_x)`` gives probabilities.

        Raises:
            metareg.errors.ConfigError: inputs of the wrong shape, type or range, or labels
                outside ``0..way-1`` (one line).
        """
        reference = next(self.learner.parameters())
        device, dtype = reference.device, reference.dtype
        x = _images(support_x, self.input_shape, "support_x", device, dtype)
        if not isinstance(support_y, Tensor) or support_y.shape[:1] != x.shape[:1]:
            raise ConfigError(f"support_y must be a tensor with one entry per support example ({len(x)})")
        if self.way is None:  # regression
            y = support_y.to(device=device, dtype=dtype).reshape(len(x), 1)
        else:
            if support_y.dtype.is_floating_point or support_y.dim() != 1:
                raise ConfigError("support_y must be a 1-D tensor of integer class labels")
            if support_y.min() < 0 or support_y.max() >= self.way:
                raise ConfigError(f"support_y must hold labels 0..{self.way - 1} (this model is {self.way}-way)")
            y = support_y.to(device=device, dtype=torch.long)
        for value, name in ((steps, "steps"), (samples, "samples")):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        with seeded(seed, device), eval_mode(self.learner):
            params = self.learner.adapt_for_test(self.learner.detached_params(), x, y, steps=steps, samples=samples)
        return Predictor(self.learner, {n: p.detach() for n, p in params.items()}, self.input_shape, seed)

    def __repr__(self) -> str:
        d = self.config.data
        task = "regression" if self.regression else f"{d.way}-way"
        name = self.config.preset or self.config.model.backbone
        return f"FewShotModel({name}, {d.name} {task}, input {self.input_shape})"


class Classifier:
    """A network trained ordinarily on a target data set, as :func:`metareg.load` returns it for a
    transfer run (``metareg perturb transfer``, MetaPerturb's Algorithm 2): ``predict(images)`` ->
    class probabilities, averaged over noise draws where its perturbation samples at test time
    (MetaPerturb), with batch norm on its running statistics.

    Args:
        model: the trained network with its perturbation slots.
        config: the run's config.
        device: where to predict.
    """

    def __init__(self, model: nn.Module, config: TransferConfig, device: torch.device):
        self.model, self.config, self.device = model.to(device), config, device
        self.sample_at_test = bool(getattr(perturbation_factory(config.perturb), "sample_at_test", False))
        size = config.data.image_size
        self.input_shape = (3, size, size)

    def predict(self, images: Tensor, *, samples: int | None = None, seed: int = 0) -> Tensor:
        """Class probabilities of ``images``.

        Args:
            images: ``[N, 1 or 3, H, W]`` at the run's image size, floats in [0, 1].
            samples: Monte-Carlo samples where the perturbation samples at test time (default:
                the run's ``perturb.mc_samples``).
            seed: fixes the noise.

        Returns:
            ``[N, classes]`` probabilities.
        """
        samples = samples or (self.config.perturb.mc_samples if self.sample_at_test else 1)
        if images.dim() != 4 or images.shape[2:] != self.input_shape[1:] or images.shape[1] not in (1, 3):
            raise ConfigError(f"images must have shape [N, 1 or 3, {self.input_shape[1]}, {self.input_shape[2]}]")
        return predict_images(
            self.model,
            images,
            samples=samples if self.sample_at_test else 1,
            channels=3,
            device=self.device,
            dtype=dtype_of(self.config),
            seed=seed,
            sample=self.sample_at_test,
        )

    __call__ = predict


def load(spec: str | Path, *, device: str | torch.device | None = None) -> FewShotModel | Classifier:
    """A trained model from a run folder (or its ``checkpoint.json``) or a built-in checkpoint.

    Args:
        spec: a run folder of ``metareg train`` or ``metareg perturb transfer``, its
            ``checkpoint.json``, or ``"builtin:NAME"`` (see ``metareg checkpoints``).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (default: a GPU if there is one).

    Returns:
        A :class:`FewShotModel` for a meta-training run, a :class:`Classifier` for a transfer run.

    Raises:
        metareg.errors.ConfigError: a run of another kind (a meta-trained perturbation: load it
            with :func:`metareg.load_phi`), or no run at ``spec``.
        metareg.errors.CheckpointError: a corrupt, foreign or tampered checkpoint.

    Examples:
        ```python
        import torch
        import metareg

        model = metareg.load("builtin:omniglot-20w1s-cpu", device="cpu")   # 20-way 1-shot Omniglot
        support_x = torch.rand(20, 1, 28, 28)            # one image of each of 20 new characters
        predictor = model.adapt(support_x, torch.arange(20))
        probabilities = predictor.predict(torch.rand(5, 1, 28, 28))
        print(probabilities.shape, probabilities.argmax(1))
        ```
    """
    path = resolve_builtin(spec)
    kind, config = read_run(path)
    target = resolve_device(str(device) if device is not None else "auto")
    if kind == "bilevel":
        config.device = str(target)
        _, learner = load_learner(path, config)
        return FewShotModel(learner, config)
    if kind == "transfer":
        _, model = load_transfer_model(path)
        return Classifier(model, config, target)
    raise ConfigError(
        f"{spec} is a {kind} run: it holds a meta-trained perturbation, not a model; load it with "
        "metareg.perturb.pretrained.load_phi"
    )


__all__ = ["Classifier", "FewShotModel", "Predictor", "load", "load_learner", "load_transfer_model"]
