"""Meta-trained MetaPerturb functions on disk: ``phi.safetensors`` (the 82 parameters) and
``phi.json`` beside it (the file's SHA-256 and its provenance: source data, backbone, steps, the
command that made it). The package ships one, loaded with ``load_phi("builtin")``.

The registered perturbation ``metaperturb`` is defined here too: a fresh phi to meta-learn, or a
stored one, frozen, in :func:`~metareg.perturb.metaperturb.metaperturb_slots`.

``load_phi`` accepts ``"builtin"``, a meta-training run folder (holding ``phi.json``), or a
``phi.json`` path; it checks the format, the checksum, the tensor names and shapes and that every
value is finite, and never unpickles anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    read_record,
    verified_tensors,
    write_json_atomic,
    write_safetensors_atomic,
)
from ..errors import CheckpointError, ConfigError, one_line
from ..nets.slots import PerturbationFactory
from .metaperturb import MetaPerturbFunction, metaperturb_slots
from .registry import register

FORMAT = "metareg-metaperturb-phi"
BUILTIN = Path(__file__).with_name("pretrained") / "phi.json"


def save_phi(folder: str | Path, phi: MetaPerturbFunction, provenance: dict[str, Any]) -> Path:
    """Write ``phi.safetensors`` and ``phi.json`` into ``folder`` (each atomically); returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = folder / "phi.safetensors"
    digest = write_safetensors_atomic(tensors, {k: v.float() for k, v in phi.state_dict().items()})
    record = {
        "format": FORMAT,
        "tensors": tensors.name,
        "sha256": digest,
        "parameters": sum(p.numel() for p in phi.parameters()),
    } | provenance
    write_json_atomic(folder / "phi.json", record)
    return folder / "phi.json"


def resolve_phi(spec: str | Path) -> Path:
    if str(spec) == "builtin":
        return BUILTIN
    path = Path(spec)
    if path.is_dir():
        path = path / "phi.json"
    if not path.is_file():
        raise CheckpointError(
            f"no meta-trained perturbation at {spec} (expected 'builtin', a meta-train run folder or its phi.json)"
        )
    return path


def phi_info(spec: str | Path) -> dict[str, Any]:
    """The provenance record of a stored phi."""
    path = resolve_phi(spec)
    return read_record(path, FORMAT, "MetaPerturb phi record") | {"path": str(path)}


def load_phi(spec: str | Path = "builtin", *, clip: float | None = 100.0) -> MetaPerturbFunction:
    """A stored MetaPerturb phi, frozen (``requires_grad=False``), verified against its checksums.

    Args:
        spec: ``"builtin"`` (the phi that ships with metareg), a ``metareg perturb meta-train``
            run folder, or its ``phi.json``.
        clip: the upper bound k on the perturbed features (the paper's k = 100; ``None``: none).

    Returns:
        phi, a ``MetaPerturbFunction`` (82 parameters) for :func:`metareg.attach_metaperturb` or
        ``build_perturbation("metaperturb", {"phi": spec})``.

    Raises:
        metareg.errors.CheckpointError: a missing, corrupt or tampered phi.

    Examples:
        ```python
        import metareg

        phi = metareg.load_phi("builtin")
        print(sum(p.numel() for p in phi.parameters()))   # 82
        ```
    """
    record = phi_info(spec)
    json_path = Path(record["path"])
    state = verified_tensors(json_path, record)
    phi = MetaPerturbFunction(clip=clip)
    try:
        phi.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{json_path} does not describe a MetaPerturb phi: {one_line(err)}") from None
    if not all(torch.isfinite(p).all() for p in phi.parameters()):
        raise CheckpointError(f"{json_path}'s tensors hold non-finite values")
    return phi.requires_grad_(False)


@register("metaperturb")
def metaperturb(
    phi: str = "learned",
    clip: float | None = 100.0,
    anneal: float = 0.0,
    scale: bool = True,
    noise: bool = True,
    location: str = "all",
) -> PerturbationFactory:
    """``phi="learned"``: a fresh phi (N(0, 0.01) init) that the scheme meta-learns; ``"builtin"``, a
    meta-train run folder or a ``phi.json``: that stored phi, frozen. The Table 3 ablations:
    ``scale=False`` (s = 1), ``noise=False`` (z = 1), ``location`` (``all``, ``before-pooling``,
    ``top``, ``bottom``): give a meta-train run and the transfer runs of its phi the same ones."""
    if not isinstance(scale, bool) or not isinstance(noise, bool):
        raise ConfigError(f"MetaPerturb options scale and noise must be true or false, got {scale!r}, {noise!r}")
    if phi == "learned":
        function = MetaPerturbFunction(clip=clip, anneal=anneal, scale=scale, noise=noise)
    else:
        function = load_phi(phi, clip=clip)
        function.anneal, function.use_scale, function.use_noise = anneal, scale, noise
    return metaperturb_slots(function, location)
