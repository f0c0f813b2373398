"""sha256 digests, written once: of bytes, of a file, and of JSON-able data in one canonical form.

Content hashes of schedules and manifests, file checksums in a manifest, keys of checkpointed
measurements and of shared weights all come from here, so two places can never disagree on how a
thing is hashed.

Example::

    from tokprune.hashing import canonical_json, json_sha256, sha256_bytes
    canonical_json({"b": 1, "a": [1, 2]})   # '{"a":[1,2],"b":1}'
    json_sha256({"a": 1}) == sha256_bytes('{"a":1}')   # True
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

__all__ = ["canonical_json", "json_sha256", "sha256_bytes", "sha256_file"]


def sha256_bytes(data: bytes | str) -> str:
    """Hex sha256 of ``data`` (text is hashed as its UTF-8 bytes)."""
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read ``chunk`` bytes at a time (any size, little memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any, *, default: Callable[[Any], Any] | None = None, allow_nan: bool = False) -> str:
    """The one serialisation content hashes are computed over: sorted keys, no spaces, ASCII only,
    and (unless ``allow_nan``) no NaN or infinity. ``default`` converts values JSON cannot hold."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=allow_nan,
                      default=default)


def json_sha256(obj: Any, *, default: Callable[[Any], Any] | None = None, allow_nan: bool = False) -> str:
    """Hex sha256 of :func:`canonical_json` of ``obj``."""
    return sha256_bytes(canonical_json(obj, default=default, allow_nan=allow_nan))
