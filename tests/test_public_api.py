"""The public API (``import metareg``) on a user's own network: any ``nn.Module`` (no ``sample=``
argument), any loss, one fast-weight selection; and ``metareg.load`` of a shipped checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metareg
from metareg.errors import ConfigError
from metareg.noise import dropout_noise

LR, STEPS, P = 0.3, 2, 0.2


def plain_cnn() -> nn.Sequential:
    """A user's CNN: no ``sample=`` argument, no perturbation slots of its own."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    ).double()


def batch(seed: int) -> metareg.TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.rand(2, n, 1, 8, 8, generator=g, dtype=torch.float64)

    labels = torch.arange(3).repeat(2, 2)
    return metareg.TaskBatch(images(6), labels, images(6), labels)


def hand_written_meta_gradient(model: nn.Module, fast: list[str], tasks: metareg.TaskBatch) -> dict[str, torch.Tensor]:
    """MAML's second-order meta-gradient written out: K steps of ``theta - lr * (g o n)`` with
    DropGrad's Gaussian noise n ~ N(1, p / (1 - p)) drawn per element in the order of the fast
    weights, Meta-Dropout sampling in the support passes and its mean in the query pass."""
    meta = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in meta]
    for i in range(tasks.num_tasks):
        params = dict(model.named_parameters())
        for _ in range(STEPS):
            loss = F.cross_entropy(
                functional_call(model, params, (tasks.support_x[i],), {"sample": True}), tasks.support_y[i]
            )
            grads = torch.autograd.grad(loss, [params[n] for n in fast], create_graph=True)
            noisy = [g * dropout_noise(g.shape, P, "gaussian", g) for g in grads]
            params = params | {n: params[n] - LR * g for n, g in zip(fast, noisy)}
        query = F.cross_entropy(
            functional_call(model, params, (tasks.query_x[i],), {"sample": False}), tasks.query_y[i]
        )
        for t, g in zip(total, torch.autograd.grad(query / tasks.num_tasks, meta, allow_unused=True)):
            if g is not None:
                t += g
    return dict(zip([n for n, p in model.named_parameters() if p.requires_grad], total))


def test_maml_on_a_plain_sequential_with_meta_dropout_and_dropgrad_equals_a_hand_written_loop():
    """3 meta-iterations of the public API (attach Meta-Dropout to a plain ``nn.Sequential``, MAML
    with DropGrad in the inner rule) give, at every iteration, the meta-gradient of a hand-written
    second-order loop, float64. Mutations caught: first-order inner gradients (create_graph
    dropped), DropGrad's noise not applied, Meta-Dropout's phi cut from the graph (no gradient for
    phi), the query pass sampling."""
    net = metareg.attach(
        plain_cnn(),
        metareg.build_perturbation("meta-dropout"),
        at=["0", "3"],
        input_shape=(1, 8, 8),
        running_stats=False,
    ).double()
    learner = metareg.MAML(
        net, lr=LR, steps=STEPS, fast=["model.*"], transforms=[{"name": "dropgrad", "kind": "gaussian", "p": P}]
    )
    assert learner.fast_names == [
        "model.0.weight",
        "model.0.bias",
        "model.3.weight",
        "model.3.bias",
        "model.7.weight",
        "model.7.bias",
    ]
    phi = [n for n, _ in learner.named_parameters() if ".slots." in n]
    assert phi, "Meta-Dropout's noise generators are meta-parameters of the learner"
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    for iteration in range(3):
        tasks = batch(iteration)
        torch.manual_seed(100 + iteration)
        expected = hand_written_meta_gradient(net, learner.fast_names, tasks)
        torch.manual_seed(100 + iteration)
        optimizer.zero_grad()
        learner.meta_backward(tasks)
        got = {n.removeprefix("model."): p.grad for n, p in learner.named_parameters() if p.grad is not None}
        assert set(got) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-12, msg=name)
        assert all(got[f"slots.{k}"].abs().sum() > 0 for k in ("0.phi.weight", "1.phi.weight"))
        optimizer.step()


def test_any_loss_and_a_model_without_sample_are_accepted():
    """A custom loss reaches both loops (here: a scaled cross-entropy doubles the meta-gradient of
    the first-order, one-step case); a plain model is called without ``sample=``."""
    tasks = batch(0)
    plain = metareg.MAML(plain_cnn(), lr=LR, steps=1, first_order=True)
    assert not plain.takes_sample
    scaled = metareg.MAML(
        plain_cnn(), lr=LR / 2, steps=1, first_order=True, loss=lambda o, y: 2 * F.cross_entropy(o, y)
    )
    plain.meta_backward(tasks)
    scaled.meta_backward(tasks)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(2 * a.grad, b.grad)


def test_the_inner_rule_is_built_for_the_learners_one_fast_selection():
    """An InnerRule is built for exactly the fast weights the learner selects (Meta-SGD gets a step
    size per fast weight, none for the others); a rule built for other weights is refused in one
    line instead of failing later with a missing key."""
    learner = metareg.MetaSGD(plain_cnn(), lr=0.01, steps=1, fast=["7.*"])
    assert sorted(learner.inner.transforms[-1].lr.keys()) == ["7__bias", "7__weight"]
    model = plain_cnn()
    built = metareg.InnerRule("meta-sgd", 0.01).build(dict(model.named_parameters()), steps=1)
    with pytest.raises(ConfigError, match="built for other fast weights"):
        metareg.BilevelLearner(model, built, fast=["7.*"])
    metareg.BilevelLearner(model, built)  # built for all of them: accepted


@pytest.mark.parametrize("counts", [{"inner_steps": 0}, {"mc_samples": 0}, {"eval_mc_samples": 0}])
def test_impossible_counts_are_refused_when_the_learner_is_built(counts):
    """Counts below 1 given through the Python API (the CLI's config ranges never reach it) fail at
    once in one line, not later inside autograd (0 samples made the inner loss the float 0.0)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="must be >= 1"):
        metareg.MAML(net, lr=0.1, steps=counts.pop("inner_steps", 1), **counts)


def test_the_public_names_are_documented_and_importable():
    for name in metareg.__all__:
        obj = getattr(metareg, name)
        if name != "__version__":
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name


def test_load_a_builtin_checkpoint_adapts_and_predicts_on_the_cpu():
    """``metareg.load("builtin:omniglot-20w1s-cpu")`` adapts to a 20-way 1-shot support set and
    predicts probabilities for the queries, reproducibly; bad inputs get one-line errors."""
    model = metareg.load("builtin:omniglot-20w1s-cpu", device="cpu")
    assert isinstance(model, metareg.FewShotModel) and model.way == 20 and model.input_shape == (1, 28, 28)
    g = torch.Generator().manual_seed(0)
    support = torch.randint(0, 256, (20, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randperm(20, generator=g)
    predictor = model.adapt(support, labels)
    probabilities = predictor.predict(support.float() / 255)
    assert probabilities.shape == (20, 20)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(20))
    # adapting to its own support set, the model classifies those images correctly
    assert (probabilities.argmax(1) == labels).float().mean() > 0.5
    torch.testing.assert_close(model.adapt(support, labels).predict(support), probabilities)
    with pytest.raises(ConfigError, match=r"shape \[N, 1, 28, 28\]"):
        model.adapt(support[:, :, :20], labels)
    with pytest.raises(ConfigError, match=r"labels 0\.\.19"):
        model.adapt(support, labels + 1)
