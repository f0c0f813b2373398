"""The frozen calibration result: per-step keep counts drawn from a few static-shape buckets.

A :class:`Schedule` is what calibration writes and what export and the runtime read. It says,
for one model, resolution and step count, which :class:`Bucket` (image keep K, text keep
K_txt) every denoising step runs, or ``"reuse"`` (no transformer call: reuse the previous
prediction). Each bucket becomes one static-shape engine; ``Bucket.key`` names its files.

The JSON file is canonical (sorted keys) and carries a sha256 of its own content, so a
hand-edited or truncated file is refused. :meth:`Schedule.load` also refuses a schedule made
for another model, resolution or step count, with a message that says what differs and the
command that recalibrates.

Example::

    from tokprune.calibrate.schedule import Schedule

    sched = Schedule.load("schedule.json", expect_height=1024, expect_width=1024, expect_steps=28)
    plan = sched.to_plan()                       # a tokprune.pruning.PrunePlan
    for bucket in sched.buckets:                 # descending; one engine each
        print(bucket.key, bucket.image_keep, bucket.text_keep)
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from tokprune.errors import ScheduleError
from tokprune.fsutil import atomic_write_text
from tokprune.hashing import canonical_json, json_sha256  # noqa: F401 - canonical_json: re-exported
from tokprune.pruning.geometry import REUSE_MODES
from tokprune.pruning.plan import ALL, PrunePlan

SCHEMA_VERSION = 1
REUSE = "reuse"  # plan entry of a step that makes no transformer call
CACHED_SUFFIX = "-cached"  # key suffix of a step-caching (DeepCache) bucket: a separate engine
_KEY_RE = re.compile(r"^k(\d{4,})-t(\d{4,})(-cached)?$")


@dataclass(frozen=True, order=True)
class Bucket:
    """One static shape: ``image_keep`` image tokens and ``text_keep`` text tokens per call.

    Both are concrete counts (the dense bucket is ``Bucket(N, T)``), so a bucket alone fixes every
    tensor shape of its engine. ``key`` (e.g. ``"k0128-t0333"``) names its files. ``cached``: a
    step-caching step (DeepCache on U-Nets: only the outer blocks run, the deep feature of the last
    full step is reused), a separate engine whose key ends in ``-cached``.
    """

    image_keep: int
    text_keep: int
    cached: bool = False

    def __post_init__(self) -> None:
        for name in ("image_keep", "text_keep"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ScheduleError(f"Bucket.{name} = {v!r}; expected a positive int")
        if not isinstance(self.cached, bool):
            raise ScheduleError(f"Bucket.cached = {self.cached!r}; expected a bool")

    @property
    def key(self) -> str:
        return f"k{self.image_keep:04d}-t{self.text_keep:04d}" + (CACHED_SUFFIX if self.cached else "")

    @property
    def order(self) -> tuple[int, int, bool]:
        """Sort key of a schedule's buckets (descending): larger K first, a full step before its cached one."""
        return (self.image_keep, self.text_keep, not self.cached)

    @classmethod
    def from_key(cls, key: str) -> "Bucket":
        m = _KEY_RE.match(key)
        if m is None:
            raise ScheduleError(f"bucket key {key!r} is not of the form 'k0128-t0333' (or 'k0128-t0333-cached')")
        return cls(int(m.group(1)), int(m.group(2)), cached=m.group(3) is not None)


def _recalibrate_hint(model: str, height: int, width: int, steps: int, budget: float) -> str:
    return (
        f"tokprune-calibrate --model {model} --height {height} --width {width} --steps {steps} "
        f"--budget {budget:g} --out schedule.json"
    )


def _jsonable(value: Any, where: str) -> Any:
    """A JSON-native deep copy (tuples -> lists); refuses NaN/inf in fields that are numbers and
    non-JSON types. A scheduler's configuration may hold infinities (diffusers' DPM-Solver has
    ``lambda_min_clipped = -inf`` by default): they are kept as the strings ``"inf"`` / ``"-inf"``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isinf(value) and where.startswith("scheduler_config"):
            return "inf" if value > 0 else "-inf"  # JSON has no infinity; the config is recorded, never computed on
        if not math.isfinite(value):
            raise ScheduleError(f"{where} holds a non-finite number {value!r}; schedules store finite numbers only")
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item(), where)
    raise ScheduleError(f"{where} holds a {type(value).__name__}, which a schedule file cannot store")


# field name -> (JSON types accepted, description) for load-time type checks
_INT = (int,)
_NUM = (int, float)
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "schema_version": (_INT, "int"),
    "model": ((str,), "str"),
    "model_fingerprint": ((str,), "str"),
    "height": (_INT, "int"),
    "width": (_INT, "int"),
    "vae_scale_factor": (_INT, "int"),
    "num_tokens": (_INT, "int"),
    "text_tokens": (_INT, "int"),
    "steps": (_INT, "int"),
    "scheduler": ((str,), "str"),
    "scheduler_config": ((dict,), "object"),
    "guidance": (_NUM, "number"),
    "budget": (_NUM, "number"),
    "mac_fraction": (_NUM, "number"),
    "policy": ((str,), "str"),
    "reuse": ((str,), "str"),
    "align": (_INT, "int"),
    "buckets": ((list,), "list of bucket keys"),
    "plan": ((list,), "list of bucket keys / 'reuse'"),
    "stats": ((dict,), "object"),
}


@dataclass(frozen=True)
class Schedule:
    """A calibrated per-step keep schedule for one model, resolution and step count.

    Fields that matter to consumers: ``buckets`` (descending, one static shape each; the dense
    bucket ``Bucket(num_tokens, text_tokens)`` is included when any step is dense) and ``plan``
    (per step a bucket key or ``"reuse"``). ``to_plan()`` turns it into a :class:`PrunePlan`.
    """

    model: str  # what the user passed to --model (name, hub id or path)
    model_fingerprint: str  # tokprune.models.fingerprint(transformer)
    height: int  # image pixels
    width: int
    vae_scale_factor: int  # latent_hw = (height // vae_scale_factor, width // vae_scale_factor)
    num_tokens: int  # N image tokens at this resolution
    text_tokens: int  # T text rows (CLIP 77 + T5 max_sequence_length)
    steps: int
    scheduler: str  # scheduler class name
    scheduler_config: dict  # its config, JSON-native
    guidance: float
    budget: float  # requested fraction of dense transformer MACs over the run
    mac_fraction: float  # achieved fraction (tokprune.pruning.macs.mac_fraction)
    policy: str  # selection policy name (tokprune.pruning.policies.make_policy)
    buckets: tuple[Bucket, ...]
    plan: tuple[str, ...]  # per step: a bucket key or "reuse"
    reuse: str = "noise"  # pruned_forward reuse mode the errors were measured with
    align: int = 1  # keep counts are multiples of this (or N / T)
    stats: dict = field(default_factory=dict)  # calibration statistics (JSON-native)
    schema_version: int = SCHEMA_VERSION
    family: str = "sd3"  # model family (tokprune.pruning.family); written only when not "sd3" (old files stay valid)

    def __post_init__(self) -> None:
        # diffusers' private bookkeeping (_class_name, _diffusers_version, _use_default_values in varying
        # order) is dropped: identical runs must give identical content hashes.
        public = {k: v for k, v in dict(self.scheduler_config).items() if not str(k).startswith("_")}
        object.__setattr__(self, "scheduler_config", _jsonable(public, "scheduler_config"))
        object.__setattr__(self, "stats", _jsonable(dict(self.stats), "stats"))
        object.__setattr__(self, "buckets", tuple(self.buckets))
        object.__setattr__(self, "plan", tuple(self.plan))
        object.__setattr__(self, "guidance", float(self.guidance))
        object.__setattr__(self, "budget", float(self.budget))
        object.__setattr__(self, "mac_fraction", float(self.mac_fraction))
        self._validate()

    # ---- invariants ------------------------------------------------------------------
    def _validate(self) -> None:
        def bad(msg: str) -> ScheduleError:
            return ScheduleError(f"invalid schedule: {msg}")

        if self.schema_version != SCHEMA_VERSION:
            raise bad(f"schema_version {self.schema_version}, expected {SCHEMA_VERSION}")
        for name in ("height", "width", "vae_scale_factor", "num_tokens", "text_tokens", "align"):
            if getattr(self, name) < 1:
                raise bad(f"{name} = {getattr(self, name)}; expected >= 1")
        if self.steps < 1:
            raise bad(f"steps = {self.steps}; expected >= 1")
        if not 0.0 < self.budget <= 1.0:
            raise bad(f"budget = {self.budget}; expected 0 < budget <= 1")
        if not 0.0 <= self.mac_fraction <= 1.0 + 1e-9:
            raise bad(f"mac_fraction = {self.mac_fraction}; expected within [0, 1]")
        if self.reuse not in REUSE_MODES:
            raise bad(f"reuse = {self.reuse!r}; expected one of {REUSE_MODES}")
        if not self.buckets:
            raise bad("no buckets")
        for b in self.buckets:
            if not isinstance(b, Bucket):
                raise bad(f"bucket {b!r} is not a Bucket")
            if b.image_keep > self.num_tokens or b.text_keep > self.text_tokens:
                raise bad(f"bucket {b.key} exceeds N={self.num_tokens} image / T={self.text_tokens} text tokens")
        if list(self.buckets) != sorted(set(self.buckets), key=lambda b: b.order, reverse=True):
            raise bad(f"buckets {[b.key for b in self.buckets]} are not unique and sorted descending")
        if len(self.plan) != self.steps:
            raise bad(f"plan has {len(self.plan)} entries for {self.steps} steps")
        keys = {b.key for b in self.buckets}
        for s, entry in enumerate(self.plan):
            if entry != REUSE and entry not in keys:
                raise bad(f"plan step {s} = {entry!r} is neither 'reuse' nor one of the buckets {sorted(keys)}")
        used = set(self.plan) - {REUSE}
        if used != keys:
            raise bad(f"buckets {sorted(keys - used)} are never used by the plan")
        if self.plan[0] != self.dense_bucket.key:
            raise bad(f"step 0 runs {self.plan[0]!r}; it must run the dense bucket {self.dense_bucket.key}")
        if self.dense_bucket in self.buckets and self.buckets[0] != self.dense_bucket:
            raise bad("the dense bucket must come first")  # implied by sorting; kept for clarity

    # ---- views -----------------------------------------------------------------------
    @property
    def dense_bucket(self) -> Bucket:
        return Bucket(self.num_tokens, self.text_tokens)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return (self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)

    def bucket_at(self, step: int) -> Bucket | None:
        """The bucket step ``step`` runs, or None for a reuse step."""
        entry = self.plan[step]
        return None if entry == REUSE else Bucket.from_key(entry)

    def to_plan(self) -> PrunePlan:
        """The :class:`PrunePlan` the eager sampler / runtime walks (dense -> ALL, reuse -> 0)."""
        image: list[int] = []
        text: list[int] = []
        cached: list[bool] = []
        for s in range(self.steps):
            b = self.bucket_at(s)
            if b is None:
                image.append(0)
                text.append(ALL)
                cached.append(False)
                continue
            image.append(ALL if b.image_keep >= self.num_tokens else b.image_keep)
            text.append(ALL if b.text_keep >= self.text_tokens else b.text_keep)
            cached.append(b.cached)
        prunes_text = any(t != ALL for t in text)
        return PrunePlan(image_keep=tuple(image), text_keep=tuple(text) if prunes_text else None,
                         step_cache=tuple(cached) if any(cached) else None)

    def geometry(self, transformer_config: Any, batch: int) -> Any:
        """The family's geometry of one call under this schedule (``batch`` includes both CFG halves).

        Raises :class:`ScheduleError` if the transformer gives a different token count than the
        schedule was calibrated for.
        """
        from tokprune.pruning.family import get_family

        g = get_family(self.family).geometry(
            transformer_config, batch=batch, latent_hw=self.latent_hw, text_tokens=self.text_tokens
        )
        if g.num_tokens != self.num_tokens:
            raise ScheduleError(
                f"the transformer gives N={g.num_tokens} image tokens at {self.height}x{self.width}, the schedule "
                f"expects N={self.num_tokens}; recalibrate: "
                + _recalibrate_hint(self.model, self.height, self.width, self.steps, self.budget)
            )
        return g

    @property
    def key(self) -> str:
        """Short stable name: ``{height}x{width}-s{steps}-b{budget%}-{hash8}``."""
        return f"{self.height}x{self.width}-s{self.steps}-b{round(self.budget * 100):03d}-{self.content_hash[:8]}"

    # ---- serialisation ---------------------------------------------------------------
    def to_dict(self, *, include_hash: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "buckets":
                v = [b.key for b in v]
            elif f.name == "plan":
                v = list(v)
            elif f.name == "family" and v == "sd3":
                continue  # the default family is implied, so SD3 schedules hash as before families existed
            d[f.name] = v
        if include_hash:
            d["content_hash"] = self.content_hash
        return d

    @property
    def content_hash(self) -> str:
        """sha256 of the canonical JSON of every field (the hash itself excluded)."""
        return json_sha256(self.to_dict(include_hash=False))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file in the same folder, then ``os.replace``). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, self.to_json(), encoding="ascii")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> "Schedule":
        """Build from a parsed schedule file, checking schema version, hash and types."""
        if not isinstance(data, Mapping):
            raise ScheduleError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ScheduleError(
                f"{source}: schema_version {version!r}, this tokprune reads version {SCHEMA_VERSION}; "
                "recalibrate with tokprune-calibrate"
            )
        body = dict(data)
        stored_hash = body.pop("content_hash", None)
        if not isinstance(stored_hash, str):
            raise ScheduleError(f"{source}: content_hash is missing; the file was not written by Schedule.save")
        expected_keys = {f.name for f in fields(cls)}
        missing, extra = expected_keys - body.keys() - {"family"}, body.keys() - expected_keys
        if missing or extra:
            raise ScheduleError(f"{source}: fields missing {sorted(missing)}, unexpected {sorted(extra)}")
        actual_hash = json_sha256(body)
        if actual_hash != stored_hash:
            raise ScheduleError(
                f"{source}: content hash mismatch (stored {stored_hash[:12]}…, content {actual_hash[:12]}…); "
                "the file was edited or corrupted; recalibrate with tokprune-calibrate"
            )
        for name, (types, desc) in _FIELD_TYPES.items():
            v = body[name]
            if isinstance(v, bool) or not isinstance(v, types):
                raise ScheduleError(f"{source}: field {name!r} is {type(v).__name__} {v!r}, expected {desc}")
        for name in ("buckets", "plan"):
            if not all(isinstance(x, str) for x in body[name]):
                raise ScheduleError(f"{source}: field {name!r} must be a list of strings")
        body["buckets"] = tuple(Bucket.from_key(k) for k in body["buckets"])
        body["plan"] = tuple(body["plan"])
        try:
            sched = cls(**body)
        except ScheduleError as e:
            raise ScheduleError(f"{source}: {e}") from None
        legacy = any(str(k).startswith("_") for k in body["scheduler_config"])  # written before private keys were dropped
        if sched.content_hash != stored_hash and not legacy:  # normalisation changed something: not canonical
            raise ScheduleError(f"{source}: content is not in canonical form (hash differs after parsing)")
        return sched

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        expect_fingerprint: str | None = None,
        expect_height: int | None = None,
        expect_width: int | None = None,
        expect_steps: int | None = None,
    ) -> "Schedule":
        """Read and validate a schedule file; refuse one made for another model / resolution / steps.

        Raises :class:`ScheduleError` naming what differs (got vs expected) and the command that
        recalibrates.
        """
        path = Path(path)
        if not path.is_file():
            raise ScheduleError(
                f"schedule file {str(path)!r} does not exist; create it with tokprune-calibrate --out {path}"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ScheduleError(f"{path}: not valid JSON ({e}); recalibrate with tokprune-calibrate") from None
        sched = cls.from_dict(data, source=str(path))
        sched.check_matches(
            expect_fingerprint=expect_fingerprint,
            expect_height=expect_height,
            expect_width=expect_width,
            expect_steps=expect_steps,
            source=str(path),
        )
        return sched

    def check_matches(
        self,
        *,
        expect_fingerprint: str | None = None,
        expect_height: int | None = None,
        expect_width: int | None = None,
        expect_steps: int | None = None,
        source: str = "schedule",
    ) -> None:
        """Raise :class:`ScheduleError` listing every field that differs from what the caller runs."""
        diffs = []
        if expect_fingerprint is not None and expect_fingerprint != self.model_fingerprint:
            diffs.append(
                f"model fingerprint: schedule has {self.model_fingerprint[:16]} (model {self.model!r}), "
                f"expected {expect_fingerprint[:16]}"
            )
        if expect_height is not None and int(expect_height) != self.height:
            diffs.append(f"height: schedule has {self.height}, expected {expect_height}")
        if expect_width is not None and int(expect_width) != self.width:
            diffs.append(f"width: schedule has {self.width}, expected {expect_width}")
        if expect_steps is not None and int(expect_steps) != self.steps:
            diffs.append(f"steps: schedule has {self.steps}, expected {expect_steps}")
        if diffs:
            model = self.model if expect_fingerprint is None else "<your model>"
            hint = _recalibrate_hint(
                model,
                int(expect_height if expect_height is not None else self.height),
                int(expect_width if expect_width is not None else self.width),
                int(expect_steps if expect_steps is not None else self.steps),
                self.budget,
            )
            raise ScheduleError(f"{source} does not match: " + "; ".join(diffs) + f". Recalibrate: {hint}")
