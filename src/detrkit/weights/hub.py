"""Download, verify, convert and cache the released weights listed in the registry (``weights="coco"``).

Files go to ``$DETRKIT_CACHE`` (default ``~/.cache/detrkit``): the release as downloaded, and beside it the
same weights converted to a detrkit ``.safetensors`` checkpoint, which later loads read directly. Downloads
go through ``torch.hub.download_url_to_file`` (temporary file, sha256 check, atomic rename), so an
interrupted download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from detrkit.registry import model_info
from detrkit.weights.files import CheckpointError, save_weights
from detrkit.weights.formats import load_pretrained


def cache_dir() -> Path:
    return Path(os.environ.get("DETRKIT_CACHE", Path.home() / ".cache" / "detrkit"))


def is_url(s: str | Path) -> bool:
    return isinstance(s, str) and urlparse(s).scheme in ("http", "https", "file")


def sha256_of(file: str | Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, *, sha256: str | None = None, progress: bool = True) -> Path:
    """The cached copy of ``url``, downloaded first if needed.

    Args:
        sha256: the file's digest, or the prefix of it that a release names its file with (DETR's
            ``detr-r50-e632da11.pth``); a cached or downloaded file that does not match is an error.
    """
    name = unquote(Path(urlparse(url).path).name)
    if not name:
        raise CheckpointError(f"cannot tell a file name from {url}")
    # HF files share names (pytorch_model.bin): the URL's own digest keeps them apart
    file = cache_dir() / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:8]}-{name}"
    if file.is_file():
        if sha256 is None or sha256_of(file).startswith(sha256):
            return file
        file.unlink()  # a stale or corrupted copy: fetch it again
    file.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(file), hash_prefix=sha256, progress=progress)
    except RuntimeError as e:  # torch.hub's sha256 mismatch
        raise CheckpointError(f"{url}: {e}. The download was discarded; the release may have changed.") from None
    except OSError as e:
        raise CheckpointError(f"cannot download {url}: {e}. Download it yourself and pass the file path.") from None
    return file


def pretrained_file(name: str, tag: str = "coco", *, progress: bool = True, **overrides) -> Path:
    """The detrkit checkpoint of preset ``name``'s released weights ``tag``: downloaded, verified, converted, cached."""
    info = model_info(name)
    if tag not in info.weights:
        known = ", ".join(info.weights) or "none"
        raise CheckpointError(f"{name} has no released weights {tag!r} (known: {known}); `detrkit models` "
                              f"lists the presets that have them.")
    entry = info.weights[tag]
    converted = cache_dir() / "converted" / f"{name}-{tag}-{entry.file_name.rsplit('.', 1)[0]}.safetensors"
    if converted.is_file():
        return converted
    source = download(entry.url, sha256=entry.sha256, progress=progress)
    model, meta = load_pretrained(name, source, **overrides)
    converted.parent.mkdir(parents=True, exist_ok=True)
    save_weights(converted, model, {**meta, "weights": {"tag": tag, "url": entry.url, "coco_ap": entry.coco_ap}})
    return converted


def resolve_weights(name: str, weights: str | Path, **overrides) -> Path:
    """A local file for ``weights``: a path as it is, a URL downloaded, a tag (``"coco"``) fetched and converted."""
    if is_url(weights):
        return download(str(weights))
    if isinstance(weights, str) and not Path(weights).exists() and re.fullmatch(r"\w+", weights):
        return pretrained_file(name, weights, **overrides)  # a tag such as "coco"
    return Path(weights)
