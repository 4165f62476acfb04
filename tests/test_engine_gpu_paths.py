"""The GPU-first engine's logic, checked on the CPU (CI has no GPU): episodes gathered where the
images are give the same episodes, batched Monte-Carlo samples equal S sequential passes, the
capturable step equals the eager step, the warm-up state is restored exactly."""

from __future__ import annotations

import pytest
import torch

from helpers import learner_for, random_image_batch, tiny, tiny_conv
from metareg.config import parse_assignment
from metareg.data.classes import ClassImages, EpisodeSampler
from metareg.errors import ConfigError
from metareg.meta.graphs import capture_or_none, restore_state, save_state
from metareg.nets import create_model
from metareg.perturb import build_perturbation
from metareg.runs.common import resolve
from metareg.runs.episodic import train


# ------------------------------------------------------------------------------------ episodes
def rotated_classes() -> ClassImages:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 5, 5), generator=g, dtype=torch.uint8)
    members = [torch.arange(i * 3, i * 3 + 3) for i in range(4)]
    return ClassImages(
        images,
        members * 4,
        [f"c{i}/rot{r}" for r in range(4) for i in range(4)],
        rotations=torch.arange(4).repeat_interleave(4),
    )


def test_gathered_episodes_are_the_episodes_of_the_seed():
    """sample = gather(draw): the same images (each turned by its class's quarter turns) and labels
    as an independent per-image reference; a copy of the sampler with its images 'moved' gathers
    the same episodes."""
    sampler = EpisodeSampler(rotated_classes(), way=5, shot=1, query=2)
    batch = sampler.sample(3, torch.Generator().manual_seed(7))
    rows, turns = sampler.draw(3, torch.Generator().manual_seed(7))
    reference = torch.stack(
        [torch.rot90(sampler.classes.images[r], int(k), dims=(-2, -1)) for r, k in zip(rows.reshape(-1), turns)]
    )
    reference = reference.float().div(255).view(3, 5, 3, 1, 5, 5)
    torch.testing.assert_close(batch.support_x, reference[:, :, :1].reshape(3, 5, 1, 5, 5), rtol=0, atol=0)
    torch.testing.assert_close(batch.query_x, reference[:, :, 1:].reshape(3, 10, 1, 5, 5), rtol=0, atol=0)
    assert batch.support_y.tolist() == [[0, 1, 2, 3, 4]] * 3 and set(turns.tolist()) > {0}
    moved = sampler.to("cpu")
    again = moved.sample(3, torch.Generator().manual_seed(7))
    for a, b in zip(
        (batch.support_x, batch.query_x, batch.support_y), (again.support_x, again.query_x, again.support_y)
    ):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------- batched MC samples
class NoiseTape:
    """Records the noise of a batched pass (S stacked copies) and replays each copy's share in S
    sequential passes, so the two can be compared exactly."""

    def __init__(self, copies: int):
        self.copies, self.tape, self.replay, self.copy, self.index = copies, [], False, 0, 0
        self.real_like, self.real = torch.randn_like, torch.randn

    def _next(self, fresh):
        if not self.replay:
            self.tape.append(fresh())
            return self.tape[-1]
        out = self.tape[self.index]
        self.index += 1
        return out

    def randn_like(self, t, **kw):
        out = self._next(lambda: self.real_like(t, **kw))
        return out.view(self.copies, -1, *out.shape[1:])[self.copy] if self.replay else out

    def randn(self, *shape, **kw):
        out = self._next(lambda: self.real(*shape, **kw))
        return out[self.copy : self.copy + 1] if self.replay else out


@pytest.mark.parametrize(
    ("perturbation", "options"),
    [
        ("meta-dropout", {}),
        ("weight-gaussian", {}),
        ("metaperturb", {"phi": "learned"}),
        ("meta-dropout-learned-variance", {}),
    ],
)
@pytest.mark.parametrize("samples", [2, 3])
def test_batched_monte_carlo_samples_equal_the_mean_of_sequential_passes(monkeypatch, perturbation, options, samples):
    """One pass over S stacked copies of the support set (batch statistics per copy) gives the mean
    of S separate passes' losses, and the same gradient, in float64 (S = 2 too: a mutant that
    treated 2 copies as one survived mutmut)."""
    torch.manual_seed(0)
    model = create_model(
        "conv4",
        3,
        in_channels=1,
        image_size=8,
        channels=4,
        depth=2,
        perturbation=build_perturbation(perturbation, options),
    ).double()
    for p in model.parameters():  # phi large enough for every term to matter
        if p.dim() and p.numel() < 50:
            torch.nn.init.normal_(p, std=0.3)
    batch = random_image_batch(tasks=1, way=3, shot=2, query=1, size=8)
    x, y = batch.support_x[0], batch.support_y[0]
    tape = NoiseTape(samples)
    monkeypatch.setattr(torch, "randn_like", tape.randn_like)
    monkeypatch.setattr(torch, "randn", tape.randn)
    losses = {}
    for batched in (True, False):
        learner = learner_for(model, mc_batch=batched)
        params = learner.initial_params()
        if batched:
            loss = learner.inner_loss(params, x, y, samples)
        else:
            tape.replay = True
            parts = []
            for s in range(samples):
                tape.copy, tape.index = s, 0
                parts.append(learner.inner_loss(params, x, y, 1))
            loss = torch.stack(parts).mean()
        grads = torch.autograd.grad(loss, [p for p in params.values() if p.requires_grad])
        losses[batched] = (loss, grads)
    torch.testing.assert_close(losses[True][0], losses[False][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(losses[True][1], losses[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_batching_needs_the_episodic_batch_norm():
    model = create_model("resnet20", 3, in_channels=3, image_size=8, blocks=(1, 1, 1))
    with pytest.raises(ConfigError, match="mc_batch"):
        learner_for(model, mc_batch=True)
    with pytest.raises(ConfigError, match=r"inner\.mc_batch"):
        resolve("quickstart", None, [parse_assignment("inner.mc_batch=sometimes")])


# ------------------------------------------------------------------------ the captured step
@pytest.mark.slow
def test_the_capturable_step_is_the_eager_step(tmp_path):
    """MetaTrainer.update (what a GPU captures, with the gather) gives bit for bit the update of a
    plain meta-iteration written out here; on the CPU there is no capture."""
    trainer = train(tiny("train.steps=0"), tmp_path / "run", progress=False)
    reference = train(tiny("train.steps=0"), tmp_path / "ref", progress=False)
    rows, turns = trainer.source.draw(2, torch.Generator().manual_seed(3))
    batch = reference.source.gather(rows, turns)
    torch.manual_seed(5)
    trainer.gathered_update(rows, turns)
    torch.manual_seed(5)
    reference.optimizer.zero_grad()
    reference.learner.meta_backward(batch)
    torch.nn.utils.clip_grad_value_(reference.learner.parameters(), 3.0)
    reference.optimizer.step()
    a, b = trainer.learner.state_dict(), reference.learner.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        capture_or_none(
            trainer.gathered_update,
            (rows, turns),
            modules=[trainer.learner],
            optimizers=[trainer.optimizer],
            device=torch.device("cpu"),
        )
        is None
    )
    assert not trainer.cuda_graph  # CPU: eager


def test_the_warm_up_state_is_restored_exactly():
    """What a capture's warm-up runs change (weights, Adam's moments created on the fly, the
    generators) is put back: afterwards the step gives exactly what it gives without a warm-up."""

    def make():
        model = tiny_conv(perturbation=build_perturbation("meta-dropout"))
        learner = learner_for(model)
        return learner, torch.optim.Adam(learner.parameters(), lr=0.01)

    batch = random_image_batch()

    def step(learner, optimizer):
        optimizer.zero_grad()
        learner.meta_backward(batch)
        optimizer.step()

    torch.manual_seed(1)
    learner, optimizer = make()
    saved = save_state([learner], [optimizer])
    for _ in range(3):
        step(learner, optimizer)
    restore_state(saved, [learner], [optimizer])
    assert all(float(s["exp_avg"].abs().sum()) == 0 and float(s["step"]) == 0 for s in optimizer.state.values())
    step(learner, optimizer)
    torch.manual_seed(1)
    plain, plain_optimizer = make()
    step(plain, plain_optimizer)
    for (name, a), b in zip(learner.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
