"""One test episode of a trained run, adapted as at meta-test time: what the visualizations draw."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.func import functional_call

from ..build import build_source, is_regression, resolve_device
from ..config import Config
from ..data.tasks import TaskBatch
from ..errors import ConfigError
from ..evaluate.episodes import episode_stream
from ..fewshot import load_learner
from ..meta import BilevelLearner


@dataclass
class AdaptedTask:
    name: str  # the run's name, for titles
    episode: int
    config: Config
    learner: BilevelLearner
    task: TaskBatch  # a single task (leading dimension 1)
    params: dict[str, Tensor]  # the fast weights after the meta-test inner loop

    def capture(self, x: Tensor, module: str, *, sample: bool, inputs: bool = False) -> Tensor:
        """Run the adapted model on ``x`` and return what module ``module`` output (or, with
        ``inputs``, received as its first argument)."""
        model, captured = self.learner.model, []
        target = model.get_submodule(module)
        if inputs:
            handle = target.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        else:
            handle = target.register_forward_hook(lambda _m, _args, out: captured.append(out))
        try:
            with torch.no_grad():
                functional_call(model, self.params, (x,), {"sample": sample})
        finally:
            handle.remove()
        return captured[0]


def adapted_task(run: str | Path, episode: int = 0, seed: int | None = None, split: str | None = None) -> AdaptedTask:
    """Episode ``episode`` of the fixed test stream (``seed``: the config's eval seed), adapted with
    the meta-test inner loop (sampled noise, S Monte-Carlo samples, the meta-test step count)."""
    config, learner = load_learner(run)
    if is_regression(config):
        raise ConfigError("this plot draws image classifiers; the run is a regression run")
    source = build_source(config, split or config.data.test_split)
    stream = episode_stream(source, episode + 1, config.eval.seed if seed is None else seed, 1)
    task = [batch for _, batch in stream][-1].to(resolve_device(config.device), next(learner.parameters()).dtype)
    torch.manual_seed(0)
    params = learner.adapt_for_test(learner.detached_params(), task.support_x[0], task.support_y[0])
    return AdaptedTask(Path(run).name, episode, config, learner, task, {n: p.detach() for n, p in params.items()})
