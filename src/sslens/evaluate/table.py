"""A plain-text table of downstream accuracies, one row per model, for ``sslens evaluate``.

>>> print(format_results_table({"simclr": {"knn_top1": 0.8125, "linear_top1": None}}))
model   kNN top-1  linear top-1
simclr      81.2%             -

With the ``intervals`` :func:`~sslens.evaluate.quality.evaluate_encoder` returns, each accuracy
is followed by its 95% interval: ``81.2% [77.6, 84.3]``.
"""

from __future__ import annotations

from sslens.checks import is_number

_COLUMNS = (("kNN top-1", "knn_top1"), ("linear top-1", "linear_top1"))


def _percent(model: str, key: str, value: object, interval: dict | None) -> str:
    if value is None:
        return "-"
    if not is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{model}: {key} must be a fraction in [0, 1] (as evaluate_encoder returns) or None; "
            f"got {value!r}"
        )
    text = f"{100.0 * value:.1f}%"
    if interval is not None and interval.get("ci_low") is not None:
        text += f" [{100.0 * interval['ci_low']:.1f}, {100.0 * interval['ci_high']:.1f}]"
    return text


def format_results_table(rows: dict[str, dict]) -> str:
    """Rows of ``{model name: evaluate_encoder(...) result}`` as an aligned table.

    Accuracies are shown as percentages with one decimal; a missing or None linear-probe
    accuracy (``linear=False``) shows as "-". Names are left-aligned, numbers right-aligned,
    in the order of ``rows``.
    """
    if not isinstance(rows, dict) or not rows:
        raise ValueError(
            "rows must be a non-empty dict {model name: evaluate_encoder(...) result}; "
            f"got {rows!r}"
        )
    table = [["model", *(title for title, _ in _COLUMNS)]]
    for model, result in rows.items():
        if not isinstance(result, dict) or "knn_top1" not in result:
            raise ValueError(
                f"The result for {model!r} must be a dict with 'knn_top1' (from evaluate_encoder); "
                f"got {result!r}"
            )
        intervals = result.get("intervals", {})
        table.append([str(model), *(_percent(model, key, result.get(key), intervals.get(key)) for _, key in _COLUMNS)])
    widths = [max(len(row[column]) for row in table) for column in range(len(table[0]))]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)

