"""Move a model directory through channels with a per-file size cap (e.g. a device's $OUT: 16 MiB a file).

``pack`` writes ``<name>.tar.part-000, -001, ...`` (each at most ``part_mib``) plus
``<name>.tar.sha256``; ``unpack`` checks the digest and extracts. Equivalent shell:
``cat NAME.tar.part-* | tar -x -C DEST``.

    python -m tokprune.yardstick.pack pack runs/shapes/model OUTDIR
    python -m tokprune.yardstick.pack unpack OUTDIR models/shapes
"""

from __future__ import annotations

import argparse
import io
import logging
import tarfile
from pathlib import Path

from tokprune.errors import ManifestError
from tokprune.hashing import sha256_bytes

logger = logging.getLogger(__name__)


def pack(directory: str | Path, dest: str | Path, part_mib: float = 15.0, name: str = "model") -> list[Path]:
    """Tar ``directory`` (as ``<name>/``) into parts of at most ``part_mib`` MiB in ``dest``."""
    directory, dest = Path(directory), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=f"{name}/{path.relative_to(directory)}", recursive=False)
    data = buf.getvalue()
    size = int(part_mib * 2**20)
    parts = []
    for i in range(0, max(len(data), 1), size):
        part = dest / f"{name}.tar.part-{i // size:03d}"
        part.write_bytes(data[i : i + size])
        parts.append(part)
    (dest / f"{name}.tar.sha256").write_text(sha256_bytes(data) + "\n")
    logger.info("packed %s into %d part(s) in %s (%.1f MiB)", directory, len(parts), dest, len(data) / 2**20)
    return parts


def unpack(src: str | Path, dest: str | Path, name: str = "model") -> Path:
    """Reassemble ``<name>.tar.part-*`` from ``src``, verify the digest, extract the contents into ``dest``."""
    src, dest = Path(src), Path(dest)
    parts = sorted(src.glob(f"{name}.tar.part-*"))
    if not parts:
        raise ManifestError(f"no {name}.tar.part-* in {src}; expected the output of `pack`")
    data = b"".join(p.read_bytes() for p in parts)
    digest_file = src / f"{name}.tar.sha256"
    if digest_file.is_file():
        want, got = digest_file.read_text().strip(), sha256_bytes(data)
        if want != got:
            raise ManifestError(f"{name}.tar parts in {src} are corrupt or incomplete: sha256 {got}, expected {want}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            rel = Path(member.name).relative_to(name)
            if not member.isfile() or ".." in rel.parts:
                raise ManifestError(f"unexpected member {member.name!r} in {name}.tar")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m tokprune.yardstick.pack`` through the shared CLI runner (exit 0/1/2/130, one-line errors)."""
    from tokprune.console import add_common, run_cli

    ap = argparse.ArgumentParser(prog="python -m tokprune.yardstick.pack", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="DIRECTORY -> DEST/model.tar.part-*")
    p.add_argument("directory")
    p.add_argument("dest")
    p.add_argument("--part-mib", type=float, default=15.0)
    u = sub.add_parser("unpack", help="SRC/model.tar.part-* -> DEST/")
    u.add_argument("src")
    u.add_argument("dest")
    return run_cli(add_common(ap), argv, _main)


def _main(args: argparse.Namespace) -> int:
    if args.cmd == "pack":
        pack(args.directory, args.dest, args.part_mib)
    else:
        print(unpack(args.src, args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
