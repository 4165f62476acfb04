"""Robust accuracy against the attack size (Meta-Dropout Figure 5, MetaPerturb Figure 6(a-c)), for
episodic runs (each episode's query images attacked against the model adapted to its support set)
and transfer runs (the test images attacked against the trained network; against a network that
samples its perturbation at test time the attack uses EoT: each step's gradient averaged over M
noise draws, and the attacked images are scored with the run's Monte-Carlo predictions).

Results are cached per run in ``robustness.json`` (keyed by the attack and epsilon), so a plot of
several runs, or with one more epsilon, computes only what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..build import IMAGE_CHANNELS, resolve_device
from ..checkpoint import write_json_atomic
from ..data.augment import normalize, to_channels
from ..errors import ConfigError
from ..evaluate.adversarial import QueryAttack, make_attack
from ..fewshot import load_transfer_model
from ..meta.ordinary import predict
from ..nets.modes import eval_mode, set_training_progress
from ..runfolder import read_run
from ..seeds import derive_seed, seeded
from .transfer import samples_at_test, target_data


def robust_accuracy(
    run: str | Path,
    attack: str,
    epsilon: float,
    *,
    episodes: int = 200,
    steps: int = 10,
    draws: int = 1,
    mc_samples: int | None = None,
    batch_size: int = 250,
    progress: bool = False,
) -> float:
    """Accuracy of ``run`` on images attacked by ``attack`` of size ``epsilon`` (cached)."""
    run = Path(run)
    kind, config = read_run(run)
    key = f"{make_attack(attack, epsilon, steps=steps, draws=draws).describe()}; " + (
        f"{episodes} episodes" if kind == "bilevel" else f"{mc_samples or config.perturb.mc_samples} MC samples"
    )
    cache_path = run / "robustness.json"
    cache: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if key in cache:
        return cache[key]
    if kind == "bilevel":
        from ..fewshot import load_learner
        from .episodic import meta_test

        config, learner = load_learner(run)
        result = meta_test(
            config,
            learner,
            episodes=episodes,
            attack=QueryAttack(make_attack(attack, epsilon, steps=steps, draws=draws)),
            progress=progress,
        )
        value = result.estimate.mean
    elif kind == "transfer":
        value = _transfer_robust_accuracy(run, attack, epsilon, steps, draws, mc_samples, batch_size)
    else:
        raise ConfigError(f"{run} is a {kind} run: robustness is measured on episodic and transfer runs")
    cache[key] = value
    write_json_atomic(cache_path, cache)
    return value


def _transfer_robust_accuracy(
    run: Path, attack: str, epsilon: float, steps: int, draws: int, mc_samples: int | None, batch_size: int
) -> float:
    config, model = load_transfer_model(run)
    device = resolve_device(config.device)
    model = model.to(device)
    _, test = target_data(config.data)
    sample = samples_at_test(config)
    attacker = make_attack(attack, epsilon, steps=steps, draws=draws)
    set_training_progress(model, 1.0)
    attacked = []
    with seeded(derive_seed(config.seed, 4), device), eval_mode(model):
        for start in range(0, len(test), batch_size):
            images = to_channels(test.images[start : start + batch_size], IMAGE_CHANNELS).to(device).float().div(255)
            labels = test.labels[start : start + batch_size].to(device)

            def loss_of(x: torch.Tensor, labels: torch.Tensor = labels) -> torch.Tensor:
                return F.cross_entropy(model(normalize(x), sample=sample), labels)

            attacked.append(attacker(loss_of, images).cpu())
    samples = (mc_samples or config.perturb.mc_samples) if sample else 1
    probabilities = predict(
        model,
        torch.cat(attacked),
        samples=samples,
        channels=IMAGE_CHANNELS,
        device=device,
        dtype=torch.float32,
        seed=derive_seed(config.seed, 3),
        sample=sample,
    )
    return (probabilities.argmax(1) == test.labels).double().mean().item()
