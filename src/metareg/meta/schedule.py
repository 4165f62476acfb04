"""MAML++'s epoch-based schedules (Antoniou et al. 2019), as the released code computes them.

An *epoch* is ``epoch_steps`` meta-iterations (the code's ``total_iter_per_epoch``, 500 in every
released config); iteration ``i`` (0-based) belongs to epoch ``i // epoch_steps``. Three things
follow the epoch:

* the multi-step loss (MSL): the query loss after every inner step, weighted by
  :func:`multi_step_weights`, while ``epoch < multi_step_epochs`` (the code's
  ``multi_step_loss_num_epochs``); after that, the query loss after the last step only;
* derivative-order annealing (DA): first-order meta-gradients while ``epoch < first_order_epochs``,
  second order after. The code's ``first_order_to_second_order_epoch = E`` (second order once
  ``epoch > E``) is ``first_order_epochs = E + 1`` here (E = -1: second order throughout);
* cosine annealing of the meta learning rate (CA): :func:`cosine_learning_rate`, the closed form of
  PyTorch's ``CosineAnnealingLR(T_max=total_epochs, eta_min=min_lr)`` stepped with the epoch.
  Deviation: the released code steps the scheduler after each iteration with the epoch index, so the
  first iteration of an epoch still uses the previous epoch's rate; here every iteration of epoch e
  uses the rate of epoch e.
"""

from __future__ import annotations

import math


def epoch_of(step: int, epoch_steps: int) -> int:
    """The epoch of meta-iteration ``step`` (0-based)."""
    return step // epoch_steps


def epochs_in(steps: int, epoch_steps: int) -> int:
    """How many epochs ``steps`` meta-iterations make (a last partial epoch counts)."""
    return max(1, math.ceil(steps / epoch_steps))


def multi_step_weights(steps: int, epoch: int, anneal_epochs: int, min_contribution: float = 0.03) -> list[float]:
    """The importance of each inner step's query loss at ``epoch`` (MAML++'s
    ``get_per_step_loss_importance_vector``): all ``1/N`` at epoch 0; every step but the last loses
    ``epoch / (N * anneal_epochs)``, floored at ``min_contribution / N``; the last gains what they
    lose, capped at ``1 - (N - 1) * min_contribution / N``. (The sum is 1 until the floor is reached;
    the code keeps these values, which then sum to a little less or more than 1.)"""
    n = steps
    decay = 1.0 / n / anneal_epochs
    floor = min_contribution / n
    weights = [max(1.0 / n - epoch * decay, floor) for _ in range(n - 1)]
    weights.append(min(1.0 / n + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor))
    return weights


def cosine_learning_rate(base: float, minimum: float, epoch: int, epochs: int) -> float:
    """``minimum + (base - minimum) (1 + cos(pi epoch / epochs)) / 2``: ``base`` at epoch 0, falling to
    ``minimum`` at epoch ``epochs`` (the last epoch, ``epochs - 1``, is just above it)."""
    return minimum + (base - minimum) * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0
