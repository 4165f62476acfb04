"""Robust accuracy against the attack size (Meta-Dropout Figure 5, MetaPerturb Figure 6(a-c)), for
episodic runs (each episode's query images attacked against the model adapted to its support set)
and transfer runs (the test images attacked against the trained network; against a network that
samples its perturbation at test time the attack uses EoT: each step's gradient averaged over M
noise draws, and the attacked images are scored with the run's Monte-Carlo predictions).

Results are cached per run in ``robustness.json`` (keyed by the attack and epsilon), so a plot of
several runs, or with one more epsilon, computes only what is missing. The cache records which
checkpoint it measured (its SHA-256 and step): once the run has trained further it is measured
again, and a damaged cache is measured again too (it only ever holds what can be recomputed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..build import IMAGE_CHANNELS, resolve_device
from ..checkpoint import CHECKPOINT, read_checkpoint_meta, write_json_atomic
from ..data.augment import normalize, to_channels
from ..errors import ConfigError, MetaregError
from ..evaluate.adversarial import QueryAttack, make_attack
from ..fewshot import load_transfer_model
from ..files import read_json
from ..meta.ordinary import predict
from ..nets.modes import eval_mode, set_training_progress
from ..runfolder import read_run
from ..runlock import run_lock
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
    if kind not in ("bilevel", "transfer"):
        raise ConfigError(f"{run} is a {kind} run: robustness is measured on episodic and transfer runs")
    key = f"{make_attack(attack, epsilon, steps=steps, draws=draws).describe()}; " + (
        f"{episodes} episodes" if kind == "bilevel" else f"{mc_samples or config.perturb.mc_samples} MC samples"
    )
    with run_lock(run):  # the cache is this command's to write
        _, meta = read_checkpoint_meta(run, CHECKPOINT)
        measured = {"sha256": meta.get("sha256"), "step": meta["step"]}
        cache_path = run / "robustness.json"
        cache = _cache(cache_path, measured)
        if key not in cache["results"]:
            cache["results"][key] = _measure(
                run, kind, attack, epsilon, episodes, steps, draws, mc_samples, batch_size, progress
            )
            write_json_atomic(cache_path, cache)
        return cache["results"][key]


def _cache(path: Path, measured: dict[str, Any]) -> dict[str, Any]:
    """The run's cache of robust accuracies of the checkpoint ``measured`` (empty if there is none,
    if it measured another checkpoint, or if it is damaged)."""
    fresh: dict[str, Any] = {"checkpoint": measured, "results": {}}
    if not path.is_file():
        return fresh
    try:
        cache = read_json(path, "cache of robust accuracies")
    except MetaregError:
        return fresh
    results = cache.get("results")
    if cache.get("checkpoint") != measured or not isinstance(results, dict):
        return fresh
    return {
        "checkpoint": measured,
        "results": {
            k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
        },
    }


def _measure(
    run: Path,
    kind: str,
    attack: str,
    epsilon: float,
    episodes: int,
    steps: int,
    draws: int,
    mc_samples: int | None,
    batch_size: int,
    progress: bool,
) -> float:
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
        return result.estimate.mean
    return _transfer_robust_accuracy(run, attack, epsilon, steps, draws, mc_samples, batch_size)


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
