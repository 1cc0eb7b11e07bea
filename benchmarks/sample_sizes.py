"""How many images (or test samples) each study metric needs for a given interval width.

Reads the per-item values a finished study keeps in its stage cache (``OUT/cache/<model>/
<experiment>.npz``, arrays named ``items__...``) and, for every metric, prints the per-item
standard deviation of one model's values and of the paired differences between two models, and
the items a 95% interval of half-width h needs: n ≈ (1.96 · sd / h)², the normal approximation
the bootstrap converges to. The medians over models (and pairs) go in docs/RESULTS.md.

    python benchmarks/sample_sizes.py demo/ [--widths 0.05 0.02 0.01]
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import numpy as np

Z = 1.959964


def _items(cache: Path) -> dict[str, dict[str, np.ndarray]]:
    """{experiment/metric: {model: per-item values}} from every cached stage."""
    found: dict[str, dict[str, np.ndarray]] = {}
    for npz in sorted(cache.glob("*/*.npz")):
        with np.load(npz, allow_pickle=False) as arrays:
            for key in arrays.files:
                if key.startswith("items__"):
                    metric = f"{npz.stem}/{key.removeprefix('items__')}"
                    found.setdefault(metric, {})[npz.parent.name] = arrays[key].astype(np.float64)
    return found


def needed(sd: float, half_width: float) -> int:
    return max(2, math.ceil((Z * sd / half_width) ** 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="a finished study's output folder")
    parser.add_argument("--widths", type=float, nargs="+", default=[0.05, 0.02, 0.01])
    args = parser.parse_args()
    metrics = _items(args.study / "cache")
    if not metrics:
        raise SystemExit(f"No per-item arrays under {args.study / 'cache'}: run a study there first.")
    header = ["metric", "items", "sd (one model)", "sd (paired diff)"]
    header += [f"n for ±{w:g}" for w in args.widths] + [f"n for ±{w:g} (diff)" for w in args.widths]
    print(" | ".join(header))
    for metric, per_model in metrics.items():
        values = {m: v[np.isfinite(v)] for m, v in per_model.items()}
        sds = [float(np.std(v, ddof=1)) for v in values.values() if len(v) > 1]
        diffs = []
        for a, b in itertools.combinations(per_model, 2):
            both = np.isfinite(per_model[a]) & np.isfinite(per_model[b])
            if both.sum() > 1 and per_model[a].shape == per_model[b].shape:
                diffs.append(float(np.std(per_model[a][both] - per_model[b][both], ddof=1)))
        sd, sd_diff = float(np.median(sds)), float(np.median(diffs)) if diffs else float("nan")
        size = int(np.median([len(v) for v in values.values()]))
        row = [metric, str(size), f"{sd:.3f}", f"{sd_diff:.3f}"]
        row += [str(needed(sd, w)) for w in args.widths]
        row += ["–" if math.isnan(sd_diff) else str(needed(sd_diff, w)) for w in args.widths]
        print(" | ".join(row))


if __name__ == "__main__":
    main()
