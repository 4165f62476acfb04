"""Meta-testing over a fixed stream of episodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..data.tasks import TaskBatch, TaskSource, on_device
from ..errors import DivergenceError
from ..meta.distributed import World
from ..nets.modes import eval_mode
from ..progress import Progress
from ..seeds import derive_seed, seeded
from .calibration import BINS, bin_totals, ece_from_totals, reliability_from_totals
from .stats import Estimate, mean_ci

CALIBRATION = ("nll", "episode_nll", "ece", "reliability")

if TYPE_CHECKING:
    from ..meta.bilevel import BilevelLearner


@dataclass
class EvalResult:
    """Per-episode scores on a described protocol, as :func:`~metareg.evaluate` returns them; two
    results compare only when measured on the same episodes under the same test conditions.

    Args:
        scores: ``[episodes]``, accuracy in [0, 1] or MSE.
        protocol: how they were measured (data set, split, way, shot, episodes, seed, samples...).
        calibration: classification only: ``nll`` (mean over episodes of the query predictions'
            mean negative log-likelihood), ``episode_nll`` (per episode), ``ece`` and
            ``reliability`` (15 bins, over all query predictions).

    Examples:
        ```python
        import torch
        import metareg

        result = metareg.EvalResult(torch.tensor([0.8, 0.9, 1.0]), {"episodes": 3})
        print(result.estimate.format(100), result.to_dict()["mean"])
        ```
    """

    scores: Tensor  # [episodes], accuracy in [0, 1] or MSE
    protocol: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None

    @property
    def estimate(self) -> Estimate:
        return mean_ci(self.scores)

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "protocol": self.protocol,
            "mean": e.mean,
            "ci95": e.ci95,
            "episodes": e.n,
            "scores": self.scores.tolist(),
        } | (self.calibration or {})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvalResult:
        calibration = {k: values[k] for k in CALIBRATION if k in values} or None
        return cls(torch.tensor(values["scores"], dtype=torch.float64), values["protocol"], calibration)


def episode_stream(source: TaskSource, episodes: int, seed: int, tasks_per_batch: int, keep: range | None = None):
    """Yield ``(first, batch)``: batches of the episode stream fixed by ``seed`` and the index of
    their first episode. Episode i is the i-th single-task draw of a generator seeded with ``seed``,
    whatever the batch size, so that every model is tested on the same episodes. ``keep``: only
    these episodes are gathered (the others are still drawn, so the stream is the same)."""
    generator = torch.Generator().manual_seed(seed)
    keep = keep if keep is not None else range(episodes)
    pending: list[TaskBatch] = []
    done, first = 0, None
    while done < episodes:
        task = source.sample(1, generator)
        if done in keep:
            first = done if not pending else first
            pending.append(task)
        done += 1
        if pending and (len(pending) == tasks_per_batch or done == episodes or done not in keep):
            yield (
                first,
                TaskBatch(
                    *(
                        torch.cat(parts)
                        for parts in zip(*((t.support_x, t.support_y, t.query_x, t.query_y) for t in pending))
                    )
                ),
            )
            pending = []


def evaluate(
    learner: BilevelLearner,
    source: TaskSource,
    *,
    episodes: int,
    seed: int,
    tasks_per_batch: int = 4,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    steps: int | None = None,
    samples: int | None = None,
    progress: bool = True,
    desc: str = "test",
    protocol: dict[str, Any] | None = None,
    attack: Any = None,
    world: World | None = None,
) -> EvalResult:
    """Meta-test: adapt to each episode's support set and score its query set.

    Perturbation noise is drawn from torch's global generator seeded by (``seed``, the episode's
    index) inside a forked RNG scope, so evaluation is reproducible, an episode's score does not
    depend on the others, and the caller's random state is untouched. Under torchrun (``world``)
    each process scores its block of episodes and the scores are gathered: the same per-episode
    scores as one process.

    Args:
        learner: the meta-trained learner.
        source: the test task source (e.g. ``metareg.build_source(config, "test")``).
        episodes: how many episodes (the papers: 1000).
        seed: fixes the episode stream: episode i is the same for every model tested with it.
        tasks_per_batch: episodes adapted per batch (does not change the episodes).
        device: where to run.
        dtype: the floating-point type of the images.
        steps: inner steps (default: the learner's ``eval_inner_steps``).
        samples: noise samples per inner step (default: the learner's ``eval_mc_samples``).
        progress: show a progress bar.
        desc: the progress bar's label.
        protocol: extra entries for the result's protocol.
        attack: score attacked query images (``metareg.evaluate.adversarial``).
        world: the torchrun process group (default: one process).

    Returns:
        The per-episode scores with their protocol and, for classification, calibration.

    Raises:
        metareg.errors.DivergenceError: the model's outputs are not finite (diverged weights).

    Examples:
        ```python
        import torch
        import metareg

        config = metareg.Config.from_dict({"data": {"way": 5, "shot": 1, "query": 5}})   # built-in glyphs
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 5))
        learner = metareg.MAML(net, lr=0.4, steps=1)
        result = metareg.evaluate(learner, metareg.build_source(config, "test"), episodes=20, seed=1234, progress=False)
        print(result.estimate.format(100), "% (mean +- 95% CI over 20 episodes)")
        ```
    """
    source = on_device(source, device)  # on a GPU the images move there once
    world = world or World(device=torch.device(device))
    mine = world.block(episodes)
    scores, episode_nll = [], []
    classification = learner.task == "classification"
    # zeros, not 0: a process with no episode of its own (fewer episodes than processes) still
    # contributes its (empty) totals to the all-reduce as a tensor
    totals = torch.zeros(3, BINS, dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.long, device=device)
    bar = Progress(len(mine), desc=desc, unit="ep", enabled=progress and world.is_main, leave=False, every=0.25)
    with seeded(seed, device), eval_mode(learner), bar:
        for first, batch in episode_stream(source, episodes, seed, tasks_per_batch, keep=mine):
            batch = batch.to(device, dtype)
            seeds = [derive_seed(seed, first + i) for i in range(batch.num_tasks)]
            outputs = learner.query_outputs(batch, steps=steps, samples=samples, attack=attack, seeds=seeds)
            nonfinite += (~torch.isfinite(outputs)).sum()
            scores.append(torch.stack([learner.score(out, y) for out, y in zip(outputs, batch.query_y)]).double())
            if classification:
                log_p = torch.log_softmax(outputs.double(), dim=-1)
                episode_nll.append(-log_p.gather(-1, batch.query_y.unsqueeze(-1)).squeeze(-1).mean(-1))
                totals = totals + bin_totals(log_p.exp(), batch.query_y)
            bar.update(batch.num_tasks)
            if len(scores) % 10 == 0:
                bar.metrics({"score": mean_ci(torch.cat(scores).cpu()).format(100 if classification else 1)})
    nonfinite = world.all_reduce_sum(nonfinite)
    if nonfinite.item():
        raise DivergenceError(
            f"the model's outputs are not finite ({nonfinite.item()} NaN/Inf values on {episodes} test episodes): "
            "its weights have diverged; test an earlier checkpoint or train again with a lower learning rate"
        )
    info = {
        "episodes": episodes,
        "seed": seed,
        "steps": steps or learner.eval_inner_steps,
        "mc_samples": samples or learner.eval_mc_samples,
    }
    if attack is not None:
        info["attack"] = attack.describe()
    calibration = None
    if classification:
        nll = world.gather_blocks(_cat(episode_nll, device), episodes).cpu()
        totals = world.all_reduce_sum(totals)
        calibration = {
            "nll": nll.mean().item(),
            "episode_nll": nll.tolist(),
            "ece": ece_from_totals(totals),
            "reliability": reliability_from_totals(totals),
        }
    return EvalResult(world.gather_blocks(_cat(scores, device), episodes).cpu(), (protocol or {}) | info, calibration)


def _cat(parts: list[Tensor], device: torch.device | str) -> Tensor:
    """The concatenation, or an empty float64 tensor (a process with no episode of its own)."""
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
