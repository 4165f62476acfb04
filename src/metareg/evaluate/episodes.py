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
    """Per-episode scores on a described protocol; two results compare only when measured on the
    same episodes under the same test conditions (see ``metareg.runs.episodic.compare``).
    ``calibration`` (classification): ``nll`` (mean over episodes of the query predictions' mean
    negative log-likelihood), ``episode_nll`` (per episode), ``ece`` and ``reliability`` (15 bins,
    over all query predictions)."""

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
    done, pending, first = 0, [], None
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
    """Adapt to each episode's support set and score its query set. Perturbation noise is drawn
    from torch's global generator seeded by (``seed``, the episode's index) inside a forked RNG scope,
    so evaluation is reproducible, an episode's score does not depend on the others, and the
    caller's random state is untouched. Under torchrun (``world``) each process scores its block of
    episodes and the scores are gathered: the same per-episode scores as one process. A model whose
    outputs are not finite (diverged weights) is refused with a
    :class:`~metareg.errors.DivergenceError` rather than scored."""
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
