"""Compare two atlas folders file by file: which parquet files are identical, and for the others which columns
differ, in how many rows and by how much. The check that a change of speed left the tables as they were.

    python benchmarks/compare_atlases.py ATLAS_BEFORE ATLAS_AFTER

Exits 1 when a file is missing on one side or a table has other rows or columns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def column_difference(a: pd.Series, b: pd.Series) -> str | None:
    """None when equal, else how the column differs: rows that differ and, for numbers, the largest difference."""
    if a.equals(b):
        return None
    try:
        x, y = np.stack(a.to_numpy()).astype(np.float64), np.stack(b.to_numpy()).astype(np.float64)
    except (TypeError, ValueError):  # strings
        return f"{int((a.to_numpy() != b.to_numpy()).sum())} rows differ"
    differs = ~np.isclose(x, y, rtol=0, atol=0, equal_nan=True)
    rows = int(differs.reshape(len(x), -1).any(axis=1).sum())
    return f"{rows} rows differ, by at most {np.nanmax(np.abs(x - y)):.2e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    files = sorted({p.relative_to(root) for root in (args.before, args.after) for p in root.rglob("*.parquet")})
    failed = False
    for rel in files:
        if not (args.before / rel).exists() or not (args.after / rel).exists():
            print(f"MISSING   {rel} (only in {'after' if (args.after / rel).exists() else 'before'})")
            failed = True
            continue
        a, b = pd.read_parquet(args.before / rel), pd.read_parquet(args.after / rel)
        if list(a.columns) != list(b.columns) or len(a) != len(b):
            print(f"DIFFERENT {rel}: {len(a)} x {list(a.columns)} against {len(b)} x {list(b.columns)}")
            failed = True
            continue
        diffs = {c: d for c in a.columns if (d := column_difference(a[c], b[c])) is not None}
        if diffs:
            print(f"differs   {rel} ({len(a)} rows): " + "; ".join(f"{c}: {d}" for c, d in diffs.items()))
        else:
            print(f"identical {rel}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
