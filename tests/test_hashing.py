"""tokprune.hashing: one place for sha256 of bytes, files and canonical JSON (digests must never drift)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from tokprune.hashing import canonical_json, json_sha256, sha256_bytes, sha256_file


def test_bytes_text_and_file_digests_agree_with_hashlib(tmp_path):
    data = bytes(range(256)) * 5000  # > one 1 MiB chunk boundary is not needed: chunk=1000 below
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_bytes(data) == want and sha256_file(path) == want and sha256_file(path, chunk=1000) == want
    assert sha256_bytes("é") == hashlib.sha256("é".encode()).hexdigest()


def test_canonical_json_is_sorted_compact_ascii_and_refuses_nan_by_default():
    obj = {"b": [1, 2.5], "a": {"z": None, "é": True}}
    assert canonical_json(obj) == '{"a":{"z":null,"\\u00e9":true},"b":[1,2.5]}'
    # the form every stored content hash (schedules, manifests, checkpoints) was computed over
    legacy = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    assert json_sha256(obj) == hashlib.sha256(legacy.encode("ascii")).hexdigest()
    with pytest.raises(ValueError):
        canonical_json({"x": math.nan})
    assert canonical_json({"x": math.nan}, allow_nan=True) == '{"x":NaN}'
    assert canonical_json({"p": object}, default=lambda v: "obj") == '{"p":"obj"}'
