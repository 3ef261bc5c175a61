"""Cohorts across a cluster: ``--shard i/N`` splits a run's inputs, ``merge`` joins the shards' outputs.

Shard ``i`` of ``N`` (0-based, ``0 <= i < N``, as a SLURM job array's ``$SLURM_ARRAY_TASK_ID``) takes
every ``N``-th input of the input list sorted by path, starting at the ``i``-th: deterministic,
balanced, and the same on every node. Each shard writes its table under ``OUT/shards/`` and, last, a
small JSON record saying how many inputs it had; a shard without its record did not finish.
``merge`` refuses a set with a shard missing, a shard twice, mixed shard counts, an unfinished shard
or an input in two shards, each with a one-line reason; otherwise it writes what one unsharded run
would have (``predictions.csv`` and the BIDS derivatives, or ``manifest.csv``, ``datalist.json`` and
the QC montage).

    python -m scripts.merge OUT            # after every shard of a run into OUT has finished (scripts/merge.py)
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import NamedTuple

from scripts.atomic import write_json
from scripts.cli import BundleError

SHARD_DIR = "shards"


class ShardError(BundleError, ValueError):
    """A bad shard spec or an incomplete set of shards, in one line."""


class Shard(NamedTuple):
    index: int
    count: int

    @property
    def tag(self) -> str:
        """File-name tag, zero-padded so that shards sort in order: ``shard-0003-of-0010``."""
        return f"shard-{self.index:04d}-of-{self.count:04d}"


def parse_shard(spec) -> Shard | None:
    """``"i/N"`` -> :class:`Shard`; ``None``, ``""`` or ``"0/1"`` -> ``None`` (no sharding)."""
    if spec is None or str(spec).strip() in ("", "None", "null"):
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not match:
        raise ShardError(f"shard {spec!r}: expected i/N, e.g. 0/10 for the first of 10 shards")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ShardError(f"shard {spec!r}: i must be 0 to N-1 (shards are numbered from 0, as SLURM array tasks)")
    return None if count == 1 else Shard(index, count)


def select(items: list[dict], shard: Shard | None, key: str = "image") -> list[dict]:
    """The items of ``shard`` (all when None): the distinct ``key`` values (input paths) sorted, every ``N``-th
    from the ``i``-th, so that an input listed twice stays in one shard. Item order is kept."""
    if shard is None:
        return list(items)
    mine = set(sorted({str(it[key]) for it in items})[shard.index :: shard.count])
    return [it for it in items if str(it[key]) in mine]


def record_path(output_dir: str | Path, shard: Shard) -> Path:
    return Path(output_dir) / SHARD_DIR / f"{shard.tag}.json"


def table_path(output_dir: str | Path, shard: Shard, name: str) -> Path:
    """Where a shard writes a table that an unsharded run writes as ``OUT/name``."""
    stem, dot, ext = name.partition(".")
    return Path(output_dir) / SHARD_DIR / f"{stem}.{shard.tag}{dot}{ext}"


def write_record(output_dir: str | Path, shard: Shard, kind: str, n_inputs: int, **extra) -> Path:
    """The shard's completion record, written last (atomically): ``kind`` is ``preprocess`` or ``inference``."""

    record = {"kind": kind, "shard": shard.index, "count": shard.count, "inputs": n_inputs, **extra}
    return write_json(record_path(output_dir, shard), record)


def finished_shards(output_dir: str | Path) -> list[dict]:
    """The shard records of ``output_dir``, checked to form one complete set; :class:`ShardError` if not."""
    folder = Path(output_dir) / SHARD_DIR
    paths = sorted(folder.glob("shard-*.json")) if folder.is_dir() else []
    if not paths:
        raise ShardError(f"{folder}: no finished shard (each shard writes shard-IIII-of-NNNN.json when it ends)")
    records = []
    for path in paths:
        try:
            records.append({**json.loads(path.read_text()), "path": str(path)})
        except (OSError, ValueError) as err:
            raise ShardError(f"{path}: unreadable shard record ({err})") from None
    kinds = {r.get("kind") for r in records}
    counts = {r.get("count") for r in records}
    if len(kinds) != 1:
        raise ShardError(f"{folder}: shards of different runs ({', '.join(sorted(map(str, kinds)))})")
    if len(counts) != 1:
        raise ShardError(f"{folder}: shards of different counts N ({', '.join(sorted(map(str, counts)))})")
    count = counts.pop()
    seen: dict[int, int] = {}
    for r in records:
        seen[r["shard"]] = seen.get(r["shard"], 0) + 1
    twice = sorted(i for i, n in seen.items() if n > 1)
    missing = sorted(set(range(count)) - set(seen))
    if twice:
        raise ShardError(f"{folder}: shard(s) {', '.join(map(str, twice))} of {count} appear more than once")
    if missing:
        raise ShardError(
            f"{folder}: shard(s) {', '.join(map(str, missing))} of {count} have not finished "
            f"(no shard-IIII-of-{count:04d}.json); rerun them, then merge"
        )
    return sorted(records, key=lambda r: r["shard"])


def read_tables(output_dir: str | Path, records: list[dict], name: str, key: str) -> list[dict]:
    """The rows of every shard's ``name`` table, checked: each shard's row count is its record's
    ``inputs`` and no ``key`` value (an input) appears in two shards."""
    rows, owner = [], {}
    for r in records:
        shard = Shard(r["shard"], r["count"])
        path = table_path(output_dir, shard, name)
        if not path.is_file():
            raise ShardError(f"{path}: missing, though shard {shard.index} of {shard.count} finished")
        with open(path, newline="") as fh:
            shard_rows = list(csv.DictReader(fh))
        if len(shard_rows) != r["inputs"]:
            raise ShardError(f"{path}: {len(shard_rows)} rows for the shard's {r['inputs']} inputs")
        for row in shard_rows:
            first = owner.setdefault(row[key], shard.index)
            if first != shard.index:
                raise ShardError(f"{row[key]}: in shards {first} and {shard.index} (duplicate input)")
        rows += shard_rows
    return rows
