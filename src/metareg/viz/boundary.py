"""``metareg plot boundary``: the task-specific decision boundary between two classes after the
last inner step (Meta-Dropout, Figure 4 and Appendix B).

With the weights adapted to one test episode and two of its classes c1, c2, the binary classifier
is the pair of rows (w_c1, b_c1), (w_c2, b_c2) of the last layer, whose hyperplane is
h^T (w_c1 - w_c2) + (b_c1 - b_c2) = 0 (Eq. 9). Every point is the last latent feature vector h of
an image (the classifier's input):
- x = h . n, n = (w_c1 - w_c2) / |w_c1 - w_c2|: the projection on the hyperplane's normal (Eq. 10);
- y = a one-dimensional t-SNE of the rest, h - x n^T (Eq. 11), computed on all points together;
- the hyperplane is the vertical line x = -(b_c1 - b_c2) / |w_c1 - w_c2| (Eq. 12).
Drawn: the support images (a = mu), their perturbed versions (sampled noise, as the inner loop
sees them; ``samples`` draws each) and the query images (a = mu), per class.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .backend import pyplot


def boundary_coordinates(
    features: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(x, y, x of the hyperplane) for ``features`` [n, D] and the two rows ``w`` [2, D], ``b`` [2]."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ConfigError("plot boundary needs scikit-learn: pip install 'metareg[plot]'") from None
    diff = w[0] - w[1]
    normal = diff / diff.norm()
    x = features @ normal
    rest = features - x[:, None] * normal[None, :]
    perplexity = min(30.0, max(2.0, (features.shape[0] - 1) / 3))
    y = TSNE(n_components=1, perplexity=perplexity, init="random", random_state=seed).fit_transform(
        rest.double().cpu().numpy()
    )
    return x, torch.from_numpy(y[:, 0]), float(-(b[0] - b[1]) / diff.norm())


def plot_boundary(view, out: str | Path, *, classes: tuple[int, int] = (0, 1), samples: int = 10) -> Path:
    """``view``: one test episode of a trained run, adapted (:func:`metareg.runs.task_view.adapted_task`)."""
    plt = pyplot()
    model = view.learner.model
    if not hasattr(model, "head") or getattr(model, "head_transform", None) is not None:
        raise ConfigError(
            "plot boundary needs a classifier whose last layer is one linear map (a conv backbone without T-net)"
        )
    way = view.config.data.way
    if len(set(classes)) != 2 or not all(0 <= c < way for c in classes):
        raise ConfigError(f"--classes must be two different labels in 0..{way - 1}")
    task = view.task
    groups: list[tuple[str, int, torch.Tensor]] = []  # (kind, class, features)
    torch.manual_seed(1)
    for kind, x, y, sample, draws in (
        ("support", task.support_x[0], task.support_y[0], False, 1),
        ("perturbed support", task.support_x[0], task.support_y[0], True, samples),
        ("query", task.query_x[0], task.query_y[0], False, 1),
    ):
        for _ in range(draws):
            h = view.capture(x, "head", sample=sample, inputs=True)  # h^(L), the classifier's input
            for c in classes:
                groups.append((kind, c, h[y == c]))
    features = torch.cat([g[2] for g in groups])
    w = view.params["head.weight"][list(classes)]
    b = view.params["head.bias"][list(classes)]
    x_coords, y_coords, x_db = boundary_coordinates(features.double(), w.double(), b.double())
    xs, ys = x_coords.cpu().numpy(), y_coords.numpy()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    colors = {classes[0]: "tab:blue", classes[1]: "tab:red"}
    styles = {
        "support": {"marker": "o", "s": 90, "edgecolors": "k", "zorder": 3},
        "perturbed support": {"marker": "o", "s": 14, "alpha": 0.35, "zorder": 1},
        "query": {"marker": "^", "s": 30, "alpha": 0.8, "zorder": 2},
    }
    start, seen = 0, set()
    for kind, c, h in groups:
        n = h.shape[0]
        label = f"{kind}, class {c}" if (kind, c) not in seen else None
        seen.add((kind, c))
        ax.scatter(xs[start : start + n], ys[start : start + n], color=colors[c], label=label, **styles[kind])
        start += n
    ax.axvline(x_db, color="k", linestyle="--", linewidth=1, label="decision boundary")
    ax.set_xlabel("projection on the boundary's normal (w_c1 - w_c2)")
    ax.set_ylabel("t-SNE of the remaining directions")
    ax.set_title(f"{view.name}: episode {view.episode}, classes {classes[0]} vs {classes[1]}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
