"""The bilevel scheme (axis 3): MAML-style episodes with second- or first-order meta-gradients.

For each task: K inner steps on the support set, each
``theta <- theta + rule(grad_theta L_support(theta))`` on the *fast* parameters only, with the
feature perturbation sampling (``sample=True``, averaged over S Monte-Carlo samples); then the query
loss of the adapted weights with the deterministic perturbation (``sample=False``). The mean query
loss over tasks is differentiated with respect to every meta-parameter: the model's initial weights
(fast or meta-only), and whatever the inner rule and the perturbations learn.

Second order (default): the inner gradients are built with ``create_graph=True`` so the
meta-gradient flows through them. First order: the inner gradients are treated as constants.

Execution strategies give the same numbers (tests check it):
- ``loop``: tasks one after the other, each followed by its own backward pass, so that the graph of
  only one task is alive at a time (lowest memory; the fastest on CPU, measured by ``metareg bench``).
- ``vmap``: ``torch.func.vmap`` over the tasks with ``torch.func.grad`` inner steps: one batched
  graph (expected to pay on GPUs, where small kernels are latency bound). Batch norm is switched to
  explicit mean/variance there: under ``vmap``, ``F.batch_norm`` gives wrong second-order gradients.
  Chunks of tasks bound its memory (``task_chunk``, ``memory_budget``: :mod:`metareg.meta.memory`).
- ``parallel`` (CPU): the loop's tasks shared among single-threaded processes, their gradient rows
  summed in task order (:mod:`metareg.meta.parallel`).

Memory and precision: ``recompute`` rebuilds each second-order inner step's graph in the
meta-backward instead of keeping it (:mod:`metareg.meta.recompute`; loop and parallel);
``precision="bf16"`` runs the meta-training passes under bf16 autocast with float32 master weights
(:mod:`metareg.meta.precision`).

MAML++ (Antoniou et al. 2019) as options, each on its own and composing with everything else:
the multi-step loss (``multi_step_epochs``: the meta-objective is the weighted sum of the query
losses after every inner step, weights from :func:`~metareg.meta.schedule.multi_step_weights`,
while the epoch is below ``multi_step_epochs``) and derivative-order annealing
(``first_order_epochs``: first-order meta-gradients during the first epochs). The trainer tells the
learner its epoch (:meth:`BilevelLearner.set_epoch`); the per-step learning rates are the inner rule
``per-step``; the per-step batch norm is the backbone's (its passes run inside
:func:`~metareg.nets.layers.inner_step`: the support pass of step k and the query pass after step k
use row k); cosine annealing is the trainer's. With the multi-step loss the logged ``loss`` is still
the query loss after the last step (the released code logs the weighted objective).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..data.tasks import TaskBatch
from ..errors import ConfigError
from ..inner.base import GradientTransform
from ..inner.registry import InnerRule
from ..nets.layers import inner_step, stacked_copies, tracks_running_statistics, use_vmap_safe_layers
from ..nets.modes import set_training_progress
from ..nets.slots import perturbation_parameter_names, perturbed_loss, recording
from ..selection import layer_groups, select
from .memory import chunk_size, cuda_peak_bytes, saved_tensor_bytes
from .parallel import TaskPool, accumulate, available_cores
from .precision import autocast, check_precision
from .recompute import recomputed_step
from .schedule import multi_step_weights

Params = dict[str, Tensor]
Loss = Callable[[Tensor, Tensor], Tensor]
Strategy = Literal["loop", "vmap", "parallel"]
Precision = Literal["float32", "bf16"]


def accepts_sample(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``sample=`` (the backbones and :func:`~metareg.perturb.attach`'s
    wrapper do; a plain ``nn.Sequential`` does not and is called without it)."""
    parameters = inspect.signature(model.forward).parameters
    return "sample" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def select_fast(model: nn.Module, spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """The names of ``model``'s fast weights: glob patterns or the backbone's layer groups
    (:mod:`metareg.selection`). Which weights are fast is configuration: the presets leave the
    perturbations' parameters (phi) out, as the papers do."""
    names = [n for n, _ in model.named_parameters()]
    return select(names, list(spec) if not isinstance(spec, str) else spec, layer_groups(model), role="fast-parameter")


def check_stackable(model: nn.Module) -> None:
    """Batched Monte-Carlo samples need every layer that mixes examples to know the copies apart:
    the episodic batch norm does, ``nn.BatchNorm2d`` (running statistics) does not."""
    foreign = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if foreign:
        raise ConfigError(
            f"batched Monte-Carlo samples (inner.mc_batch) need the episodic batch norm; {foreign[0]} keeps running "
            "statistics: use inner.mc_batch=sequential"
        )


def _check_first_order(model: nn.Module) -> None:
    """First-order meta-gradients drop the path through the inner steps, the one through which a
    feature perturbation's parameters learn from its sampled noise (Meta-Dropout, Section 3.1:
    "otherwise the gradient w.r.t. phi will always be zero"): refuse rather than learn nothing."""
    learned = [
        n for n, p in model.named_parameters() if n in set(perturbation_parameter_names(model)) and p.requires_grad
    ]
    if learned:
        raise ConfigError(
            f"first-order meta-gradients cannot train the perturbation's parameters ({', '.join(learned[:3])}"
            f"{', ...' if len(learned) > 3 else ''}): they learn through the inner-loop steps; "
            "use second order (inner.first_order=false) or a perturbation without parameters"
        )


class BilevelLearner(nn.Module):
    """MAML / Meta-SGD with pluggable feature perturbations and inner update rules, around any model.

    For each task of a :class:`~metareg.TaskBatch`: ``inner_steps`` steps of the inner rule on the
    support set (the perturbations sampling), then the query loss of the adapted weights (the
    perturbations at their mean), differentiated with respect to every meta-parameter.

    Args:
        model: any ``nn.Module``. ``sample=`` (draw the perturbations' noise, or use their mean) is
            passed only if its ``forward`` takes it: the built-in backbones and a model wrapped by
            :func:`metareg.attach` do.
        inner: the inner update rule: an :class:`~metareg.InnerRule` (built here for the fast
            weights this learner selects, with the backbone's layer groups), or an already built
            ``GradientTransform``, which must have been built for exactly those fast weights.
        loss: ``loss(outputs, targets)`` of the inner and outer loops (default: cross-entropy for
            ``task="classification"``, mean squared error for ``"regression"``).
        score: ``score(outputs, targets)`` reported per task (default: accuracy, or MSE).
        task: what the outputs are; also decides whether meta-tests report calibration.
        inner_steps: inner steps while meta-training.
        eval_inner_steps: inner steps at meta-test time (default: ``inner_steps``).
        first_order: drop the second-order terms (the inner gradients are constants).
        fast: which parameters adapt in the inner loop (glob patterns or the backbone's layer
            groups, :mod:`metareg.selection`); the others are meta-only.
        mc_samples: Monte-Carlo samples of the perturbations per inner step while meta-training.
        eval_mc_samples: the same at meta-test time (Meta-Dropout's S = 30).
        strategy: ``loop`` (tasks one after the other), ``vmap`` (batched over tasks) or
            ``parallel`` (the loop's tasks shared among CPU processes).
        mc_batch: run the S Monte-Carlo samples as one stacked pass.
        recompute: rebuild each second-order inner step's graph in the meta-backward instead of
            storing it (bounded memory; loop and parallel).
        precision: ``float32``, or ``bf16`` (autocast, float32 master weights).
        task_chunk: ``vmap``: tasks per chunk of the meta-batch (default: all at once).
        memory_budget: ``vmap``: MiB a chunk of tasks may take (the chunk size is derived from it).
        workers: processes of the ``parallel`` strategy (default: the CPU cores available).
        multi_step_epochs: MAML++'s multi-step loss during the first so many epochs (0: off): the
            meta-objective sums the query losses after every inner step, weighted as MAML++ does.
        multi_step_min: the floor of a non-final step's weight, times the number of steps (MAML++'s 0.03).
        first_order_epochs: MAML++'s derivative-order annealing: first-order meta-gradients while
            the epoch is below this (0: the order ``first_order`` says throughout).

    Raises:
        metareg.errors.ConfigError: an impossible setting (in one line), e.g. an inner rule built
            for other fast weights, or first order with a perturbation that has parameters.

    Examples:
        ```python
        import torch
        import metareg

        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        learner = metareg.BilevelLearner(net, metareg.InnerRule("sgd", lr=0.4), inner_steps=2)
        support, query = torch.rand(2, 6, 1, 2, 2), torch.rand(2, 9, 1, 2, 2)
        labels = torch.arange(3).repeat(2, 2)
        batch = metareg.TaskBatch(support, labels, query, labels.repeat(1, 3)[:, :9])
        metrics = learner.meta_backward(batch)  # second-order meta-gradient into .grad
        assert net[1].weight.grad is not None and set(metrics) == {"loss", "score"}
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        inner: GradientTransform | InnerRule,
        *,
        loss: Loss | None = None,
        score: Loss | None = None,
        task: Literal["classification", "regression"] = "classification",
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        fast: list[str] | tuple[str, ...] = ("*",),
        mc_samples: int = 1,
        eval_mc_samples: int = 1,
        strategy: Strategy = "loop",
        mc_batch: bool = False,
        recompute: bool = False,
        precision: Precision = "float32",
        task_chunk: int | None = None,
        memory_budget: float | None = None,
        workers: int | None = None,
        multi_step_epochs: int = 0,
        multi_step_min: float = 0.03,
        first_order_epochs: int = 0,
    ):
        super().__init__()
        if inner_steps < 1:
            raise ConfigError(f"inner_steps must be >= 1, got {inner_steps}")
        if mc_samples < 1 or eval_mc_samples < 1:
            raise ConfigError(f"mc_samples and eval_mc_samples must be >= 1, got {mc_samples} and {eval_mc_samples}")
        if strategy not in ("loop", "vmap", "parallel"):
            raise ConfigError(f"unknown execution strategy {strategy!r}; choose loop, vmap or parallel")
        if task not in ("classification", "regression"):
            raise ConfigError(f"task must be classification or regression, got {task!r}")
        if multi_step_epochs < 0 or first_order_epochs < 0 or not 0.0 <= multi_step_min <= 1.0:
            raise ConfigError(
                "multi_step_epochs and first_order_epochs must be >= 0 and multi_step_min in [0, 1], got "
                f"{multi_step_epochs}, {first_order_epochs}, {multi_step_min}"
            )
        self.model = model
        self.task = task
        self.loss_fn: Loss = loss or (F.cross_entropy if task == "classification" else F.mse_loss)
        self.score_fn: Loss = score or (_accuracy if task == "classification" else F.mse_loss)
        self.takes_sample = accepts_sample(model)
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps or inner_steps
        self.first_order = first_order
        self.multi_step_epochs, self.multi_step_min = multi_step_epochs, multi_step_min
        self.first_order_epochs = first_order_epochs
        self.epoch = 0  # the meta-training epoch, told by the trainer (MAML++'s schedules)
        self.fast_names = select_fast(model, fast)
        self.inner = self._inner_rule(inner)
        if first_order:
            _check_first_order(model)
        self.mc_samples = mc_samples
        self.eval_mc_samples = eval_mc_samples
        self.strategy = strategy
        if mc_batch:
            check_stackable(model)
        self.mc_batch = mc_batch
        if recompute and strategy == "vmap":
            raise ConfigError(
                "recomputed inner steps (train.recompute) need the loop or parallel strategy (train.strategy=loop)"
            )
        self.recompute = recompute
        check_precision(precision)
        self.precision = precision
        if (task_chunk is not None or memory_budget is not None) and strategy != "vmap":
            raise ConfigError(
                "train.task_chunk and train.memory_budget size the chunks of vmap's batched tasks; the loop strategy "
                "already holds one task at a time (bound its memory with train.recompute=true)"
            )
        if task_chunk is not None and memory_budget is not None:
            raise ConfigError("give train.task_chunk or train.memory_budget, not both")
        if (task_chunk is not None and task_chunk < 1) or (memory_budget is not None and memory_budget <= 0):
            raise ConfigError(
                f"train.task_chunk must be >= 1 and train.memory_budget positive (MiB), got "
                f"{task_chunk}, {memory_budget}"
            )
        self.task_chunk, self.memory_budget = task_chunk, memory_budget
        self.task_bytes: dict[tuple, int] = {}  # a task's measured cost per task shape (memory_budget)
        self.pool = None
        if strategy != "loop" and tracks_running_statistics(model):
            raise ConfigError(
                "per-step batch-norm running statistics (model.options.per_step_stats) are updated in place, "
                f"which the {strategy} strategy cannot do: use the loop strategy (train.strategy=loop)"
            )
        if strategy == "parallel":
            running = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if running:
                raise ConfigError(
                    f"the parallel strategy needs the episodic batch norm; {running[0]} keeps running statistics, "
                    "which the processes would update at once: use train.strategy=loop"
                )
            self.pool = TaskPool(self, workers or available_cores())
        if strategy == "vmap":
            if getattr(model, "support_attack", None) is not None:
                raise ConfigError(
                    "inner-loop adversarial training computes input gradients inside the inner steps: "
                    "use the loop strategy (train.strategy=loop)"
                )
            use_vmap_safe_layers(model)
        # The query pass is differentiated once (not twice like the inner steps); on CPU its large
        # activations are faster in channels-last layout (measured by `metareg bench`), which the
        # inner steps' double backward is not. Backbones opt in with a `memory_format` argument.
        self.query_options: dict = {}
        if strategy != "vmap" and "memory_format" in inspect.signature(model.forward).parameters:
            self.query_options = {"memory_format": torch.channels_last}

    def _inner_rule(self, inner: GradientTransform | InnerRule) -> GradientTransform:
        """The rule for this learner's fast weights: built here from a spec, or checked if built."""
        params = dict(self.model.named_parameters())
        if isinstance(inner, InnerRule):
            rule = inner.build({n: params[n] for n in self.fast_names}, self.inner_steps, layer_groups(self.model))
            reference = next(iter(params.values()), None)
            return rule.to(reference.dtype) if reference is not None and reference.is_floating_point() else rule
        if not isinstance(inner, GradientTransform):
            raise ConfigError(f"inner must be an InnerRule or a GradientTransform, got {type(inner).__name__}")
        built_for = inner.built_for()
        if built_for is not None and built_for != set(self.fast_names):
            extra, missing = sorted(built_for - set(self.fast_names)), sorted(set(self.fast_names) - built_for)
            raise ConfigError(
                "the inner rule was built for other fast weights than the learner adapts"
                + (f"; not fast here: {', '.join(extra[:3])}" if extra else "")
                + (f"; no rule for: {', '.join(missing[:3])}" if missing else "")
                + ": pass an InnerRule and let the learner build it for its fast weights"
            )
        return inner

    def forward_with(self, params: Params, x: Tensor, *, sample: bool, **options) -> Tensor:
        """The model with ``params`` on ``x``; ``sample`` reaches it only if its forward takes it."""
        kwargs = ({"sample": sample} if self.takes_sample else {}) | options
        return functional_call(self.model, params, (x,), kwargs)

    def set_training_progress(self, fraction: float) -> None:
        """Tell scheduled parts (DropGrad's linear schedule) how far meta-training is, in [0, 1]."""
        set_training_progress(self.model, fraction)
        set_training_progress(self.inner, fraction)
        if self.pool is not None:
            self.pool.progress = fraction

    # ------------------------------------------------------------------------- MAML++ schedules
    def set_epoch(self, epoch: int) -> None:
        """The meta-training epoch (MAML++'s multi-step loss and derivative-order annealing follow it)."""
        self.epoch = epoch
        if self.pool is not None:
            self.pool.epoch = epoch

    @property
    def scheduled(self) -> bool:
        """Whether the meta-objective changes with the epoch (a captured CUDA graph could not follow)."""
        return self.multi_step_epochs > 0 or self.first_order_epochs > 0

    @property
    def second_order(self) -> bool:
        """Whether this epoch's meta-gradients go through the inner gradients."""
        return not self.first_order and self.epoch >= self.first_order_epochs

    def step_weights(self) -> list[float] | None:
        """This epoch's weights of the query losses after each inner step (the multi-step loss), or
        None: the query loss after the last step alone."""
        if self.epoch >= self.multi_step_epochs:
            return None
        return multi_step_weights(self.inner_steps, self.epoch, self.multi_step_epochs, self.multi_step_min)

    # ----------------------------------------------------------------------------------- losses
    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(out, y)

    def score(self, out: Tensor, y: Tensor) -> Tensor:
        """The task's score (accuracy or mean squared error by default) of one task's outputs."""
        return self.score_fn(out, y)

    def initial_params(self) -> Params:
        return dict(self.model.named_parameters()) | dict(self.model.named_buffers())

    def query_forward(self, params: Params, x: Tensor, *, step: int | None = None) -> Tensor:
        """The adapted model on the query set, with the deterministic perturbation; ``step``: the
        inner step the weights come from (per-step batch norm; None: the last)."""
        with inner_step(step):
            return self.forward_with(params, x, sample=False, **self.query_options)

    def inner_loss(self, params: Params, x: Tensor, y: Tensor, samples: int) -> Tensor:
        """Support loss with sampled perturbations, averaged over ``samples`` Monte-Carlo draws: one
        pass over the S copies of the support set stacked on the batch dimension (``mc_batch``: batch
        statistics and noise per copy, see :func:`~metareg.nets.layers.stacked_copies`), or S passes.
        Perturbations that change the loss (KL terms, mixed labels) enter through the pass's record
        (:func:`~metareg.nets.slots.perturbed_loss`); inner-loop adversarial training replaces the
        support images by their attacked versions first."""
        attack = getattr(self.model, "support_attack", None)
        if attack is not None:
            x = attack(lambda images: self.loss(self.forward_with(params, images, sample=False), y), x)
        if self.mc_batch and samples > 1:
            repeat = (samples,) + (1,) * (x.dim() - 1)
            with stacked_copies(samples), recording() as record:
                out = self.forward_with(params, x.repeat(repeat), sample=True)
            return perturbed_loss(self.loss, out, y.repeat((samples,) + (1,) * (y.dim() - 1)), record)
        total: Tensor | float = 0.0
        for _ in range(samples):
            with recording() as record:
                out = self.forward_with(params, x, sample=True)
            total = total + perturbed_loss(self.loss, out, y, record)
        return cast(Tensor, total) / samples  # a tensor: samples >= 1

    # ------------------------------------------------------------------------------- inner loop
    def adaptation(
        self,
        params: Params,
        x: Tensor,
        y: Tensor,
        *,
        steps: int | None = None,
        create_graph: bool | None = None,
        samples: int | None = None,
    ) -> Iterator[Params]:
        """Run the inner loop on one task's support set, yielding the parameters after each step
        (step k's support pass runs inside ``inner_step(k)``)."""
        steps = self.inner_steps if steps is None else steps
        create_graph = self.second_order if create_graph is None else create_graph
        samples = self.mc_samples if samples is None else samples
        state = self.inner.init({n: params[n] for n in self.fast_names})
        fast = [params[n] for n in self.fast_names]
        recompute = self.recompute and create_graph and torch.is_grad_enabled()
        if recompute:  # what the steps read besides the fast weights and the state, and need a meta-gradient for
            fast_ids = {id(p) for p in fast}
            leaves = [p for n, p in params.items() if p.requires_grad and id(p) not in fast_ids]
            leaves += [p for p in self.inner.parameters() if p.requires_grad]
        for step in range(steps):

            def run(fast: list[Tensor], state, create_graph: bool, step: int = step) -> tuple[list[Tensor], object]:
                """One inner step: the support loss at ``fast``, its gradient, the rule's update."""
                with inner_step(step):
                    loss = self.inner_loss(params | dict(zip(self.fast_names, fast)), x, y, samples)
                grads = torch.autograd.grad(loss, fast, create_graph=create_graph)
                updates, state = self.inner.update(dict(zip(self.fast_names, grads)), state, step)
                return [p + updates[n] for n, p in zip(self.fast_names, fast)], state

            fast, state = recomputed_step(run, fast, state, leaves) if recompute else run(fast, state, create_graph)
            yield params | dict(zip(self.fast_names, fast))

    def adapt(
        self,
        params: Params,
        x: Tensor,
        y: Tensor,
        *,
        steps: int | None = None,
        create_graph: bool | None = None,
        samples: int | None = None,
    ) -> Params:
        """Run the inner loop on one task's support set and return the adapted parameters."""
        for adapted in self.adaptation(params, x, y, steps=steps, create_graph=create_graph, samples=samples):
            params = adapted
        return params

    def task_objective(
        self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One task's meta-objective, and its query loss and query outputs after the last inner step
        (in bf16 autocast when ``precision`` says so). The objective is that loss, or during MAML++'s
        multi-step-loss epochs the weighted sum of the query losses after every step (the query pass
        after step k runs inside ``inner_step(k)``)."""
        weights = self.step_weights()
        objective: Tensor | float = 0.0
        with self.autocast():
            for step, adapted in enumerate(self.adaptation(params, support_x, support_y)):
                if weights is None and step < self.inner_steps - 1:
                    continue
                out = self.query_forward(adapted, query_x, step=step)
                loss = self.loss(out, query_y)
                objective = objective + (loss if weights is None else weights[step] * loss)
        return objective, loss, out  # type: ignore[return-value]

    def task_loss(self, batch: TaskBatch, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`task_objective` of task ``i`` of ``batch``, from the meta-parameters."""
        return self.task_objective(
            self.initial_params(), batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i]
        )

    def _functional_adaptation(self, params: Params, x: Tensor, y: Tensor) -> Iterator[Params]:
        """:meth:`adaptation` written with ``torch.func.grad``, usable under ``vmap``."""
        state = self.inner.init({n: params[n] for n in self.fast_names})
        first_order = not self.second_order
        for step in range(self.inner_steps):
            fast = {n: params[n] for n in self.fast_names}

            def support_loss(fast_params: Params, params: Params = params, step: int = step) -> Tensor:
                with inner_step(step):
                    return self.inner_loss(params | fast_params, x, y, self.mc_samples)

            grads = torch.func.grad(support_loss)(fast)
            if first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            updates, state = self.inner.update(grads, state, step)
            params = params | {n: p + updates[n] for n, p in fast.items()}
            yield params

    # ------------------------------------------------------------------------------- outer loop
    def meta_backward(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Accumulate the meta-gradient of the mean query loss into ``.grad`` of the meta-parameters.

        Returns detached per-batch metrics: ``loss`` (mean query loss) and ``score`` (mean query
        accuracy or MSE). No host synchronization happens here.
        """
        if self.strategy == "vmap":
            return self._meta_backward_vmap(batch)
        if self.pool is not None and batch.num_tasks > 1:
            return self._meta_backward_parallel(self.pool, batch)
        num_tasks = batch.num_tasks
        losses, scores = [], []
        for i in range(num_tasks):
            objective, loss, out = self.task_loss(batch, i)
            (objective / num_tasks).backward()
            losses.append(loss.detach())
            scores.append(self.score(out.detach(), batch.query_y[i]))
        return {"loss": torch.stack(losses).mean(), "score": torch.stack(scores).mean()}

    def _meta_backward_parallel(self, pool: TaskPool, batch: TaskBatch) -> dict[str, Tensor]:
        """The tasks shared among the pool's processes (:mod:`metareg.meta.parallel`), each with its
        own seed drawn from torch's generator; the rows summed in task order into ``.grad``."""
        n = batch.num_tasks
        seeds = torch.randint(0, 2**62, (n,)).tolist()
        rows, used, metrics = pool.task_gradients(batch, n, seeds)
        accumulate([p for p in self.parameters() if p.requires_grad], rows, used)
        return {"loss": metrics["loss"].mean(), "score": metrics["score"].mean()}

    def task_gradients(
        self, batch: TaskBatch, total: int, seeds: list[int] | None = None
    ) -> tuple[Tensor, list[bool], dict[str, Tensor]]:
        """The meta-gradients of ``batch``'s tasks for a meta-batch of ``total`` tasks, for the
        distributed trainer: ``[rows, P]`` rows flattened over the trainable meta-parameters (zeros
        where a parameter gets none), which parameters got a gradient at all, and each task's
        ``loss`` and ``score``. ``loop``: one row per task, d(loss_i / total): summed in task order
        they are bit for bit what :meth:`meta_backward` accumulates into ``.grad`` over the whole
        meta-batch, whichever process computed them. ``vmap``: one row, the batch's summed gradient.
        ``seeds``: torch's generator is seeded before each task (loop), inside a fork of the global
        random state (the caller's stream is left as it was)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if self.strategy == "vmap":
            with self.autocast():
                objectives, losses, scores = self._vmap_losses(batch)
            grads = [torch.autograd.grad(objectives.sum() / total, params, allow_unused=True)]
        else:
            grads, task_losses, task_scores = [], [], []
            for i in range(batch.num_tasks):
                with torch.random.fork_rng(devices=[]) if seeds is not None else nullcontext():
                    if seeds is not None:
                        torch.manual_seed(seeds[i])
                    objective, loss, out = self.task_loss(batch, i)
                grads.append(torch.autograd.grad(objective / total, params, allow_unused=True))
                task_losses.append(loss.detach())
                task_scores.append(self.score(out.detach(), batch.query_y[i]))
            losses, scores = torch.stack(task_losses), torch.stack(task_scores)
        used = [any(g[j] is not None for g in grads) for j in range(len(params))]
        rows = torch.stack(
            [
                torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(row, params)])
                for row in grads
            ]
        )
        return rows, used, {"loss": losses.detach(), "score": scores.detach()}

    def _vmap_losses(self, batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Every task's meta-objective, final query loss and score in one ``vmap`` over the tasks."""
        meta_params = self.initial_params()
        weights = self.step_weights()

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            objective: Tensor | float = 0.0
            for step, params in enumerate(self._functional_adaptation(meta_params, sx, sy)):
                if weights is None and step < self.inner_steps - 1:
                    continue
                with inner_step(step):
                    out = self.forward_with(params, qx, sample=False)
                loss = self.loss(out, qy)
                objective = objective + (loss if weights is None else weights[step] * loss)
            return cast(Tensor, objective), loss, self.score(out, qy)  # a tensor: the last step always counts

        return torch.func.vmap(one_task, randomness="different")(
            batch.support_x, batch.support_y, batch.query_x, batch.query_y
        )

    def _meta_backward_vmap(self, batch: TaskBatch) -> dict[str, Tensor]:
        """The tasks ``vmap``-ed in chunks (:mod:`metareg.meta.memory`): ``task_chunk`` tasks at a
        time, or as many as fit ``memory_budget``; all of them at once by default."""
        n = batch.num_tasks
        parts: list[tuple[Tensor, Tensor]] = []

        def run(which: range) -> None:
            with self.autocast():
                objectives, losses, scores = self._vmap_losses(batch.tasks(which))
            (objectives.sum() / n).backward()
            parts.append((losses.detach(), scores.detach()))

        start, chunk = 0, self.task_chunk or n
        if self.memory_budget is not None:
            key = (tuple(batch.support_x.shape[1:]), tuple(batch.query_x.shape[1:]))
            if key not in self.task_bytes:
                device = batch.support_x.device
                if device.type == "cuda":  # the first task, alone, is the measurement
                    self.task_bytes[key] = cuda_peak_bytes(lambda: run(range(1)), device)[1]
                    start = 1
                else:
                    self.task_bytes[key] = self._probe_task_bytes(batch)
            chunk = chunk_size(self.memory_budget, self.task_bytes[key], n)
        for first in range(start, n, chunk):
            run(range(first, min(first + chunk, n)))
        losses, scores = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return {"loss": losses.mean(), "score": scores.mean()}

    def _probe_task_bytes(self, batch: TaskBatch) -> int:
        """The bytes one task's graph saves on the loop path (the CPU estimate of a task's cost),
        measured without touching ``.grad`` or the random stream."""
        with torch.random.fork_rng(devices=[]), self.autocast():
            _, found = saved_tensor_bytes(
                lambda: self.query_forward(
                    self.adapt(self.initial_params(), batch.support_x[0], batch.support_y[0]), batch.query_x[0]
                )
            )
        return found

    def autocast(self):
        """The context of the meta-training passes (:mod:`metareg.meta.precision`)."""
        return autocast(self.precision, next(self.model.parameters()).device.type)

    def meta_loss(self, batch: TaskBatch) -> Tensor:
        """The mean meta-objective over the batch, with its graph (for tests and custom loops)."""
        return torch.stack([self.task_loss(batch, i)[0] for i in range(batch.num_tasks)]).mean()

    # ------------------------------------------------------------------------------ evaluation
    def detached_params(self) -> Params:
        """The meta-learned parameters cut from the meta-graph, the fast ones ready for the inner loop."""
        return {n: p.detach().requires_grad_(n in self.fast_names) for n, p in self.initial_params().items()}

    def adapt_for_test(
        self, start: Params, x: Tensor, y: Tensor, *, steps: int | None = None, samples: int | None = None
    ) -> Params:
        """The meta-test inner loop (Algorithm 2): the meta-test step count and noise samples S, no
        meta-graph. ``start`` comes from :meth:`detached_params`."""
        steps = self.eval_inner_steps if steps is None else steps
        samples = self.eval_mc_samples if samples is None else samples
        with torch.enable_grad():
            return self.adapt(start, x, y, steps=steps, create_graph=False, samples=samples)

    def query_outputs(
        self,
        batch: TaskBatch,
        *,
        steps: int | None = None,
        samples: int | None = None,
        attack=None,
        seeds: list[int] | None = None,
    ) -> Tensor:
        """The adapted models' outputs on their query sets, ``[num_tasks, query, outputs]``, no
        meta-graph. ``attack(learner, params, x, y) -> x'`` replaces the query images
        (``metareg.evaluate.adversarial``). ``seeds``: torch's generator is seeded before each task
        (a task's noise then does not depend on the tasks before it)."""
        start = self.detached_params()
        outputs = []
        last = (self.eval_inner_steps if steps is None else steps) - 1
        for i in range(batch.num_tasks):
            if seeds is not None:
                torch.manual_seed(seeds[i])
            params = self.adapt_for_test(start, batch.support_x[i], batch.support_y[i], steps=steps, samples=samples)
            with inner_step(last):
                query_x = (
                    batch.query_x[i] if attack is None else attack(self, params, batch.query_x[i], batch.query_y[i])
                )
            with torch.no_grad():
                outputs.append(self.query_forward(params, query_x, step=last))
        return torch.stack(outputs)

    def evaluate(
        self, batch: TaskBatch, *, steps: int | None = None, samples: int | None = None, attack=None
    ) -> Tensor:
        """Per-task query score after adaptation (no meta-graph is built): ``[num_tasks]``."""
        outputs = self.query_outputs(batch, steps=steps, samples=samples, attack=attack)
        return torch.stack([self.score(out, y) for out, y in zip(outputs, batch.query_y)])

    def extra_repr(self) -> str:
        order = "first" if self.first_order else "second"
        extra = (f", multi_step_epochs={self.multi_step_epochs}" if self.multi_step_epochs else "") + (
            f", first_order_epochs={self.first_order_epochs}" if self.first_order_epochs else ""
        )
        return f"task={self.task}, inner_steps={self.inner_steps}, {order}-order, strategy={self.strategy}" + extra


def _accuracy(out: Tensor, y: Tensor) -> Tensor:
    return (out.argmax(-1) == y).float().mean()


class MAML(BilevelLearner):
    """MAML (Finn et al. 2017) around any model: ``steps`` inner SGD steps of size ``lr`` on the
    support set, the query loss differentiated through them (second order unless ``first_order``).

    Args:
        model: any ``nn.Module`` (see :class:`BilevelLearner`).
        lr: the inner step size alpha.
        steps: inner steps K while meta-training.
        transforms (list[dict]): gradient transforms applied before the step, each
            ``{"name": ..., **options}`` (e.g. DropGrad, the MT-net mask; see :class:`~metareg.InnerRule`).
        **options (Any): the keyword arguments of :class:`BilevelLearner` (``fast``, ``first_order``,
            ``loss``, ``mc_samples``, ...).

    Examples:
        ```python
        import torch
        import metareg

        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 5))   # any nn.Module
        learner = metareg.MAML(net, lr=0.4, steps=5, transforms=[{"name": "dropgrad", "p": 0.1}])
        optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
        tasks = metareg.build_source(metareg.Config(), "train")       # 5-way 1-shot built-in glyphs
        metrics = learner.meta_backward(tasks.sample(4, torch.Generator().manual_seed(0)))
        optimizer.step()
        print(f"query loss {metrics['loss']:.2f}, accuracy {metrics['score']:.2f}")
        ```
    """

    def __init__(self, model: nn.Module, lr: float = 0.4, steps: int = 5, *, transforms=(), **options) -> None:
        super().__init__(model, InnerRule("sgd", lr, tuple(transforms)), inner_steps=steps, **options)


class MetaSGD(BilevelLearner):
    """Meta-SGD (Li et al. 2017): MAML whose step size is a meta-learned tensor per fast weight,
    starting at ``lr`` everywhere (the step sizes are parameters of the learner).

    Args:
        model: any ``nn.Module`` (see :class:`BilevelLearner`).
        lr: the initial value of every step size.
        steps: inner steps K while meta-training.
        transforms (list[dict]): gradient transforms applied before the step (see :class:`MAML`).
        **options (Any): the keyword arguments of :class:`BilevelLearner`.

    Examples:
        ```python
        import torch
        import metareg

        net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
        learner = metareg.MetaSGD(net, lr=0.01, steps=1, task="regression")
        step_sizes = sum(p.numel() for p in learner.inner.parameters())   # meta-learned, one per weight
        assert step_sizes == sum(p.numel() for p in net.parameters())
        ```
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, steps: int = 1, *, transforms=(), **options) -> None:
        super().__init__(model, InnerRule("meta-sgd", lr, tuple(transforms)), inner_steps=steps, **options)
