"""Shared data helpers for the tasks: checksummed downloads, safe archive extraction, strategy checks.

Nothing here reaches the network unless a caller passes ``download=True``; every task has an embedded offline
default, so a fresh machine without network trains out of the box.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["download_and_verify", "extract_tar", "file_md5"]


def file_md5(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex MD5 digest of a file (the checksum the CIFAR-10 and IMDb archives are published with)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def download_and_verify(url: str, destination: str | Path, md5: str | None, *, owner: str) -> Path:
    """Download ``url`` to ``destination`` (a file path) through a temporary file, then check its MD5.

    An existing file with the right checksum is reused. Plain ``urllib``: ``http(s)://`` and ``file://`` URLs.

    Args:
        url: where to fetch the archive from.
        destination: the file to create; its parent folder is created.
        md5: the expected hex digest; ``None`` skips the check (only for URLs you control).
        owner: the class name used in error messages.

    Returns:
        ``destination`` as a ``Path``.

    Raises:
        ValueError: the downloaded file's checksum differs (the file is deleted).
        OSError: the download failed (no network: pass a local ``root`` instead of ``download=True``).
    """
    destination = Path(destination)
    if destination.is_file() and (md5 is None or file_md5(destination) == md5):
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=destination.parent, delete=False, suffix=".part") as tmp:
        part = Path(tmp.name)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (http(s)/file URLs by design)
                shutil.copyfileobj(response, tmp)
        except OSError as err:
            part.unlink(missing_ok=True)
            raise OSError(
                f"{owner}: could not download {url!r} ({err}). Without network, download the archive elsewhere and "
                "pass its folder as `root` (download=False)."
            ) from err
    if md5 is not None and (actual := file_md5(part)) != md5:
        part.unlink(missing_ok=True)
        raise ValueError(f"{owner}: {url!r} has MD5 {actual}, expected {md5}; the download is corrupt or altered.")
    part.replace(destination)
    return destination


def extract_tar(archive: str | Path, destination: str | Path, *, owner: str) -> None:
    """Extract a ``.tar``/``.tar.gz`` archive, refusing members that would land outside ``destination``.

    Raises:
        ValueError: a member is an absolute path, escapes with ``..``, or is a link or device file.
    """
    destination = Path(destination).resolve()
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            target = (destination / member.name).resolve()
            if not target.is_relative_to(destination) or not (member.isfile() or member.isdir()):
                raise ValueError(
                    f"{owner}: archive {str(archive)!r} has an unsafe member {member.name!r} (outside the target "
                    "folder, or a link/device); refusing to extract it."
                )
        # the "data" filter (Python >= 3.10.12 / 3.11.4) also drops unsafe permission bits; members are checked above
        safe: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(destination, members=members, **safe)  # noqa: S202 (members validated above)
