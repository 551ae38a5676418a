"""Plain aligned text tables, for the tools' reports (``tools/plan.py``, ``tools/bench_step.py``)."""

from __future__ import annotations


def aligned_table(header: list, rows: list, left: int = 1, indent: str = "  ") -> list[str]:
    """Plain aligned text: the first ``left`` columns (text) left-aligned, the rest (numbers)
    right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        cells = [
            str(c).ljust(widths[i]) if i < left else str(c).rjust(widths[i])
            for i, c in enumerate(r)
        ]
        return (indent + "  ".join(cells)).rstrip()

    return [line(header), indent + "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
