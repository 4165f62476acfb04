"""The joint scheme (axis 3): MetaPerturb's meta-training (Ryu et al. 2020, Algorithm 1, Eq. 3).

T task networks theta_1..theta_T (one per class-disjoint source task) and one perturbation phi
shared by all of them, trained jointly with stop-gradients instead of a bilevel optimization.
phi is whatever fills the networks' perturbation slots (MetaPerturb's 82-parameter function, or
any registered perturbation with parameters, such as Meta-Dropout's noise generators): the
parameters with the perturbation role (``metareg.nets.slots``), tied across the T networks so that
they are one set, while each network keeps its own buffers (MetaPerturb's per-layer running
statistics).

    phi*, theta* = argmax  sum_t  log p(y_t^te | X_t^te; StopGrad(theta_t), phi)
                                + log p(y_t^tr | X_t^tr; theta_t, StopGrad(phi))          (Eq. 3)

One step (Algorithm 1, lines 6-12):

* :meth:`JointLearner.theta_backward`: for every task a batch of its train split D_t^tr, the loss
  with the perturbation, and theta_t's gradient of it (``backward(inputs=theta_t)``: phi gets
  none); the caller then steps every theta_t (line 9);
* :meth:`JointLearner.phi_backward`: for every task a batch of its test split D_t^te, the loss with
  the perturbation, and phi's gradient of (1/T) sum_t loss_t (``backward(inputs=phi)``: no
  theta_t gets any); the caller all-reduces it across processes and steps phi (line 12).

Following the released code, the test pass runs batch norm on its running statistics (the held-out
split does not move them), while the perturbation's scale s uses the batch's statistics, the path
through which the scale parameters learn.

Execution strategies, the same numbers (tests check it with deterministic noise):
``loop``: the tasks one after the other, each followed by its backward pass (one task's graph in
memory at a time; the faster on CPU, where ``vmap`` measured 0.8x); ``vmap``: ``torch.func.vmap``
over the task networks' stacked parameters, one batched forward and backward (expected to pay on
GPUs). Noise differs per task and is reproducible: before each task (loop) or each batch of tasks
(vmap) torch's generator is seeded from the run seed, the step, the pass and the task, so a task's
noise does not depend on which process trains it (loop).

Across processes (``torch.distributed``, launched by torchrun), every process holds a share of the
tasks (``task_ids``) and the same phi; the trainer all-reduces phi's gradient. The loss of every
task is divided by the total T, so the all-reduced sum is the mean of Eq. 3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..errors import ConfigError
from ..nets.modes import eval_mode
from ..nets.slots import perturbation_parameter_names, perturbed_loss, recording
from ..perturb.attach import probe
from ..seeds import derive_seed

TRAIN_PASS, TEST_PASS = 0, 1
JointStrategy = Literal["loop", "vmap"]


@contextmanager
def norm_in_eval_mode(networks: Iterable[nn.Module]):
    """Batch norm layers use (and keep) their running statistics inside the block."""
    norms = [
        m for net in networks for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def tie_parameters(network: nn.Module, reference: nn.Module, names: Sequence[str]) -> None:
    """Make ``network``'s parameters ``names`` the very parameters of ``reference`` (shared)."""
    for name in names:
        module_name, _, attribute = name.rpartition(".")
        setattr(network.get_submodule(module_name), attribute, reference.get_parameter(name))


class JointLearner(nn.Module):
    """MetaPerturb's joint scheme (Algorithm 1, Eq. 3): the task networks of ``task_ids`` (out of
    ``num_tasks``) and the perturbation phi they share.

    The perturbation parameters of networks 2..T are tied to those of the first, so phi is one set
    of parameters that every task trains. Batches are ``x [T_local, B, C, H, W]`` and
    ``y [T_local, B]``, task-major in the order of ``task_ids``. Tasks may have different numbers of
    classes (64 classes in 10 tasks): every network then outputs the largest number, and
    ``classes[i]`` (task ``task_ids[i]``'s count) masks the others to -inf, which is exactly a
    ``classes[i]``-way softmax, and lets ``vmap`` stack the networks.

    Args:
        build: ``build(t)`` returns task t's network, freshly initialized with its perturbation
            slots (the caller seeds it by t, so every process builds the same theta_t).
        task_ids: the tasks this process trains (all of them in one process).
        num_tasks: T, the number of source tasks.
        input_shape: the shape of one image.
        strategy: ``loop`` (tasks one after the other) or ``vmap`` (batched).
        classes: each local task's number of classes (default: all the same).
        sample: draw the perturbation's noise (``False``: its deterministic mean, for gradient
            checks).

    Raises:
        metareg.errors.ConfigError: a perturbation without parameters, or bad task ids (one line).

    Examples:
        ```python
        import torch
        import metareg

        def build(t):
            torch.manual_seed(t)
            phi = metareg.build_perturbation("metaperturb", {"phi": "learned"})
            return metareg.create_model("conv4", 5, in_channels=3, image_size=16, channels=8, standard=True,
                                        perturbation=phi)

        joint = metareg.JointLearner(build, task_ids=[0, 1], num_tasks=2, input_shape=(3, 16, 16))
        x, y = torch.rand(2, 8, 3, 16, 16), torch.randint(0, 5, (2, 8))
        joint.theta_backward(x, y, seed=0, step=0)      # Eq. 3, second term: theta_t's gradients
        joint.phi_backward(x, y, seed=0, step=0)        # first term: phi's gradient (pass test-split images)
        print(sum(p.numel() for p in joint.phi_parameters()))   # 82, shared by both networks
        ```
    """

    absent: Tensor  # a buffer: [tasks, outputs], True where a task has no such class

    def __init__(
        self,
        build: Callable[[int], nn.Module],
        task_ids: Sequence[int],
        num_tasks: int,
        *,
        input_shape: Sequence[int],
        strategy: JointStrategy = "loop",
        classes: Sequence[int] | None = None,
        sample: bool = True,
    ):
        super().__init__()
        if strategy not in ("loop", "vmap"):
            raise ConfigError(f"unknown execution strategy {strategy!r}; choose loop or vmap")
        if not task_ids or len(set(task_ids)) != len(task_ids) or not all(0 <= t < num_tasks for t in task_ids):
            raise ConfigError(f"task_ids must be distinct tasks in 0..{num_tasks - 1}, got {list(task_ids)}")
        self.task_ids = list(task_ids)
        self.num_tasks = num_tasks
        self.strategy = strategy
        self.sample = sample  # draw the perturbation's noise (False: its deterministic mean, for gradient checks)
        self.networks = nn.ModuleList(build(t) for t in self.task_ids)
        self.phi_names = perturbation_parameter_names(self.networks[0])
        if not self.phi_names:
            raise ConfigError(
                "the joint scheme meta-learns a perturbation's parameters, and this perturbation has none "
                "(use metaperturb with phi: learned, or another perturbation with parameters)"
            )
        for net in self.networks[1:]:
            tie_parameters(net, self.networks[0], self.phi_names)
        outputs = probe(self.networks[0], input_shape).shape[-1] if classes is not None else 1
        if classes is not None and (len(classes) != len(self.task_ids) or not all(1 <= c <= outputs for c in classes)):
            raise ConfigError(
                f"classes must give each of the {len(self.task_ids)} tasks a count in 1..{outputs}, got {list(classes)}"
            )
        absent = torch.zeros(len(self.task_ids), outputs, dtype=torch.bool)
        for i, c in enumerate(classes or []):
            absent[i, c:] = True
        self.register_buffer("absent", absent, persistent=False)

    def theta_parameters(self) -> list[nn.Parameter]:
        """Every task network's own parameters (phi is not among them), network by network."""
        return [p for net in self.networks for _, p in self.task_parameters(net)]

    def task_parameters(self, net: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """One network's own (theta) parameters by name."""
        shared = set(self.phi_names)
        return [(n, p) for n, p in net.named_parameters() if n not in shared]

    def phi_parameters(self) -> list[nn.Parameter]:
        return [self.networks[0].get_parameter(n) for n in self.phi_names]

    def phi_state(self) -> dict[str, Tensor]:
        """phi by parameter name (the first network's names)."""
        return {n: self.networks[0].get_parameter(n) for n in self.phi_names}

    def task_state(self, net: nn.Module) -> dict[str, Tensor]:
        """One network's state without phi (its own parameters and buffers)."""
        shared = set(self.phi_names)
        return {k: v for k, v in net.state_dict().items() if k not in shared}

    # ------------------------------------------------------------------------------- the passes
    def theta_backward(self, x: Tensor, y: Tensor, *, seed: int, step: int) -> dict[str, Tensor]:
        """Train-split losses; accumulate each theta_t's gradient (phi: none). Per-task metrics."""
        return self._backward(x, y, TRAIN_PASS, seed, step)

    def phi_backward(self, x: Tensor, y: Tensor, *, seed: int, step: int) -> dict[str, Tensor]:
        """Test-split losses with batch norm on running statistics; accumulate phi's gradient of
        (1/T) sum_t loss_t (theta: none). Per-task metrics."""
        with norm_in_eval_mode(self.networks):
            return self._backward(x, y, TEST_PASS, seed, step)

    @torch.no_grad()
    def probe_losses(self, x: Tensor, y: Tensor) -> Tensor:
        """Every local task's loss on ``x`` with its network in eval mode (running statistics used,
        none moved), no gradients: ``[T_local]``."""
        losses = []
        for i, net in enumerate(self.networks):
            with eval_mode(net):
                out = net(x[i], sample=self.sample).masked_fill(self.absent[i], float("-inf"))
            losses.append(F.cross_entropy(out, y[i]))
        return torch.stack(losses)

    def _backward(self, x: Tensor, y: Tensor, which: int, seed: int, step: int) -> dict[str, Tensor]:
        if x.shape[0] != len(self.networks) or y.shape[:1] != x.shape[:1]:
            raise ConfigError(
                f"expected a batch for each of the {len(self.networks)} tasks, got x {tuple(x.shape)}, y "
                f"{tuple(y.shape)}"
            )
        if self.strategy == "vmap":
            torch.manual_seed(derive_seed(seed, step, which, self.task_ids[0]))
            losses, correct = self._vmap_losses(x, y)
            self._accumulate(losses.sum(), which)
            return {"loss": losses.detach(), "accuracy": correct}
        task_losses, accuracies = [], []
        for i, (net, task) in enumerate(zip(self.networks, self.task_ids)):
            torch.manual_seed(derive_seed(seed, step, which, task))
            with recording() as record:
                out = net(x[i], sample=self.sample).masked_fill(self.absent[i], float("-inf"))
            loss = perturbed_loss(F.cross_entropy, out, y[i], record)
            self._accumulate(loss, which, net)
            task_losses.append(loss.detach())
            accuracies.append((out.argmax(-1) == y[i]).float().mean())
        return {"loss": torch.stack(task_losses), "accuracy": torch.stack(accuracies)}

    def _accumulate(self, loss: Tensor, which: int, net: nn.Module | None = None) -> None:
        if which == TRAIN_PASS:
            inputs = [p for _, p in self.task_parameters(net)] if net is not None else self.theta_parameters()
            loss.backward(inputs=inputs)
        else:
            (loss / self.num_tasks).backward(inputs=self.phi_parameters())

    def _vmap_losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Every local task's loss and accuracy in one ``vmap`` over the stacked task networks."""
        template = self.networks[0]
        params = {n: torch.stack(ps) for n, ps in _by_name(self.networks, "named_parameters").items()}
        originals = _by_name(self.networks, "named_buffers")
        buffers = {n: torch.stack(bs) for n, bs in originals.items()}

        def task_loss(
            p: dict[str, Tensor], b: dict[str, Tensor], xt: Tensor, yt: Tensor, absent: Tensor
        ) -> tuple[Tensor, Tensor]:
            with recording() as record:
                out = functional_call(template, (p, b), (xt,), {"sample": self.sample}).masked_fill(
                    absent, float("-inf")
                )
            return perturbed_loss(F.cross_entropy, out, yt, record), (out.argmax(-1) == yt).float().mean()

        losses, accuracy = vmap(task_loss, randomness="different")(params, buffers, x, y, self.absent)
        with torch.no_grad():  # running statistics were updated in the stacked copies
            for name, tensors in originals.items():
                for i, original in enumerate(tensors):
                    original.copy_(buffers[name][i])
        return losses, accuracy.detach()


def _by_name(networks: Iterable[nn.Module], what: str) -> dict[str, list[Tensor]]:
    out: dict[str, list[Tensor]] = {}
    for net in networks:
        for name, tensor in getattr(net, what)():
            out.setdefault(name, []).append(tensor)
    return out
