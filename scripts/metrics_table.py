"""The README's metric table, written from the contract (tfowatch/core/metrics.py) and the event
table (the values of bounded labels). tests/unit/test_contract.py fails when the README differs.

    python scripts/metrics_table.py    rewrite the table in README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfowatch.core import metrics as m  # noqa: E402
from tfowatch.core.events import RECONCILIATIONS, label_values  # noqa: E402

README = ROOT / "README.md"
BEGIN, END = "<!-- metrics table: scripts/metrics_table.py -->", "<!-- end of metrics table -->"


def _labels(metric: m.Metric) -> str:
    values = label_values(metric) if metric.source == m.PROBES else {}
    names = [f"{name} = " + " \\| ".join(f"`{v}`" for v in values[name]) if name in values else name
             for name in metric.labels]
    return (", ".join(names) or "—") + (f" ({metric.note})" if metric.note else "")


def _tiers(metric: m.Metric) -> str:
    return "all" if metric.tiers == m.ALL else ", ".join(metric.tiers)


def table() -> str:
    rows = ["| metric | type | labels | tiers |", "|---|---|---|---|"]
    rows += [f"| `{f.name}` | {f.kind} | {_labels(f)} | {_tiers(f)} |" for f in m.FAMILIES]
    rows.append(f"| `{m.PROCESS_PREFIX}*` | | the daemon's own process (prometheus_client) | all |")
    pairs = ", ".join(f"`{r.label}`↔{r.counter}" for r in RECONCILIATIONS)
    return "\n".join(rows) + f"\n\n`{m.RECONCILE_DRIFT.name}{{metric}}` pairs {pairs}."


def section(text: str) -> str:
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main() -> int:
    """Rewrite what lies between the markers, and nothing else."""
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
