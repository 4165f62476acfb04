"""Download Omniglot's official archives, verified against checksums shipped with metareg.

:func:`download_omniglot` fetches ``images_background.zip`` and ``images_evaluation.zip`` from the
data set's public home (Lake et al.'s GitHub repository) with :mod:`urllib`, streaming each to a
temporary file in the destination folder that is renamed into place only once its size and sha256
match ``checksums.json``. Files already present with the right checksum are not fetched again.

The Vinyals et al. split lists are not part of the official archives; metareg ships its own copy
(``metareg/data/splits/vinyals``), which :func:`~metareg.data.omniglot.load_omniglot` uses when the
data root has no ``splits/vinyals`` folder.

miniImageNet has no official public download; see :mod:`metareg.data.miniimagenet` for its layout.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import sys
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..files import atomic_open, sha256_file
from ..progress import Progress

__all__ = ["OMNIGLOT_URL", "download_omniglot", "expected_files", "sha256_file"]

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
_CHUNK = 1 << 20


def expected_files(dataset: str = "omniglot") -> dict[str, dict[str, Any]]:
    """``{file name: {"sha256": hex, "size": bytes}}`` for a data set, from ``checksums.json``."""
    table = json.loads(resources.files("metareg.data").joinpath("checksums.json").read_text(encoding="utf-8"))
    if dataset not in table:
        raise DataError(f"no checksums for data set {dataset!r}; known: {', '.join(sorted(table))}")
    return table[dataset]


def _is_valid(path: Path, info: dict[str, Any]) -> bool:
    return path.is_file() and path.stat().st_size == info["size"] and sha256_file(path) == info["sha256"]


def _say(progress: bool, text: str, end: str = "\n") -> None:
    if progress:
        print(text, end=end, file=sys.stderr, flush=True)


def _network_error(url: str, target: Path, exc: BaseException) -> DataError:
    reason = getattr(exc, "reason", None) or exc
    return DataError(
        f"could not download {url} ({reason}); check the network connection or "
        f"fetch the file by hand into {target.parent}"
    )


def _wrong_size(url: str, problem: str) -> DataError:
    return DataError(
        f"{url}: {problem}; the download was discarded (a wrong mirror or a changed file): try again or fetch it by "
        "hand"
    )


def _fetch(url: str, target: Path, info: dict[str, Any], progress: bool, timeout: float) -> None:
    """Stream ``url`` to a temporary file next to ``target``, verify it, then rename it to ``target``."""
    digest, done, total = hashlib.sha256(), 0, int(info["size"])
    try:
        with atomic_open(target, "wb", suffix=".part") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (file: mirrors are a feature: --base-url)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise _network_error(url, target, exc) from None
            with response:
                announced = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
                if announced is not None and announced.isdigit() and int(announced) > total:
                    raise _wrong_size(
                        url, f"the server announces {int(announced)} bytes, more than the official file's {total}"
                    )
                bar = Progress(total, desc=f"  {target.name}", unit="B", enabled=progress)
                while True:
                    try:  # never more than the expected size (plus one byte, to see that it is more)
                        block = response.read(min(_CHUNK, total - done + 1))
                    except (OSError, http.client.HTTPException) as exc:
                        raise _network_error(url, target, exc) from None
                    if not block:
                        break
                    if done + len(block) > total:  # refused at once: an endless or swapped stream is not read on
                        raise _wrong_size(url, f"the server sent more than the official file's {total} bytes")
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    bar.update(len(block))
            bar.close()
            if done != total or digest.hexdigest() != info["sha256"]:  # inside: the temporary file is discarded
                raise DataError(
                    f"checksum mismatch for {url}: got {done} bytes with sha256 {digest.hexdigest()[:16]}..., "
                    f"expected {total} bytes with sha256 {info['sha256'][:16]}...; the download was "
                    f"discarded, try again"
                )
    except OSError as exc:
        raise DataError(f"could not write {target} ({exc}); check that the folder is writable and has space") from None


def download_omniglot(
    dest: str | Path,
    base_url: str = OMNIGLOT_URL,
    progress: bool = True,
    *,
    timeout: float = 60.0,
) -> list[Path]:
    """Download ``images_background.zip`` and ``images_evaluation.zip`` into ``dest``.

    Args:
        dest: folder to put the archives in (created if needed); use it as ``load_omniglot``'s root.
        base_url: where the archives live (``base_url + file name``); any URL urllib opens, e.g.
            a ``file://`` mirror.
        progress: print progress to stderr.
        timeout: seconds to wait for the server.

    Returns:
        The paths of the two archives.

    Raises:
        DataError: network failure (naming the URL), checksum mismatch (the download is discarded),
            or an unwritable destination.
    """
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the download folder {dest} ({exc}); choose a writable folder") from None
    paths = []
    for name, info in expected_files("omniglot").items():
        target = dest / name
        paths.append(target)
        try:
            if _is_valid(target, info):
                _say(progress, f"{target} is already present and verified")
                continue
            if target.exists():
                _say(progress, f"{target} does not match the official checksum; downloading it again")
                target.unlink()
        except OSError as exc:
            raise DataError(f"cannot check or replace {target} ({exc}); fix its permissions or delete it") from None
        url = base_url.rstrip("/") + "/" + name
        _say(progress, f"downloading {url}")
        _fetch(url, target, info, progress, timeout)
    return paths
