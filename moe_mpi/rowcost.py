"""What rows cost: the work of computing one whole expert for ``m`` rows.

Both the balancing search (:mod:`moe_mpi.balance`) and the rule that sends
a replicated expert's rows to its holders (:func:`moe_mpi.layout.assign_slots`)
compare ranks' work, and a rank's work is the sum, over the experts it
computes, of what an expert costs for its rows. A :class:`RowCost` says
what that is, as a table of points ``(rows, work)``, linear between them,
``work(0) = 0``, and linear beyond the last point with the last segment's
slope.

* :meth:`RowCost.default`: reading the expert's weights once plus ``1/16``
  of a read per row (``1 + m/16``), the price moe_mpi has always used.
* :meth:`RowCost.from_profile`: measured by ``moe-mpi calibrate`` on the
  machine (the ``float32/expert`` or ``q4/expert`` kernel table): the time
  of one expert at ``m`` rows over its time at one row.

The table travels inside each :class:`moe_mpi.layout.Layout` (and its
layouts file), not in a global, so every rank prices rows the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import numpy as np

__all__ = ["DEFAULT_ROWS_PER_READ", "RowCost", "WEIGHT_FORMATS", "read_row_cost"]

#: Rows of an expert whose arithmetic costs as much as reading its weights once (the default price).
DEFAULT_ROWS_PER_READ = 16.0
#: Weight formats with an expert kernel table in a calibrate profile.
WEIGHT_FORMATS = ("float32", "q4")


@dataclass(frozen=True)
class RowCost:
    """Work of computing one whole expert for ``rows`` rows, from a table.

    Args:
        rows: Measured row counts, rising, from 1.
        work: The work at each, in any one unit (only ratios matter),
            positive; made non-decreasing (more rows never cost less: a
            dip is noise).
        source: Where the table came from (shown by ``moe-mpi info``).

    Raises:
        ValueError: Empty, unequal lengths, rows not rising from 1, or work
            not positive and finite (the message gives the numbers).
    """

    rows: Tuple[float, ...]
    work: Tuple[float, ...]
    source: str = "default"
    curve: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        rows = tuple(float(r) for r in self.rows)
        work = tuple(float(w) for w in self.work)
        if not rows or len(rows) != len(work):
            raise ValueError(f"row cost: {len(rows)} row counts but {len(work)} work figures; need as many, at least one")
        if rows[0] < 1 or any(b <= a for a, b in zip(rows, rows[1:])):
            raise ValueError(f"row cost: row counts must rise from 1 or more, got {list(rows)}")
        if not all(np.isfinite(w) and w > 0 for w in work):
            raise ValueError(f"row cost: work must be positive and finite, got {list(work)}")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "work", tuple(float(w) for w in np.maximum.accumulate(work)))
        # The curve with its (0, 0) point, and the tail's slope: assign_slots prices every call with it.
        xs = np.concatenate(([0.0], self.rows))  # [P+1]
        ys = np.concatenate(([0.0], self.work))
        object.__setattr__(self, "curve", (xs, ys, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])))

    # -------------------------------------------------------- constructors

    @classmethod
    def default(cls) -> "RowCost":
        """``1 + m/16`` for ``m >= 1`` rows: one read of the weights, a sixteenth of one per row.

        Two points and the linear tail give exactly that, in exact binary
        fractions, so costs and ties are the same as they always were.
        """
        r0 = DEFAULT_ROWS_PER_READ
        return cls((1.0, 2.0), (1.0 + 1.0 / r0, 1.0 + 2.0 / r0), "default")

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any], weight_format: str, where: str = "profile") -> "RowCost":
        """The row price a ``moe-mpi calibrate`` profile measured for ``weight_format``.

        The table ``machine.kernels["<format>/expert"]`` gives seconds per
        weight byte of one expert at each row count; the expert's bytes do
        not change with the rows, so its ratio to the one-row figure is the
        ratio of times.

        Args:
            profile: The profile's JSON object.
            weight_format: ``"float32"`` or ``"q4"`` (:data:`WEIGHT_FORMATS`).
            where: What to call the profile in errors (e.g. its file). It is
                not kept: ranks on other hosts may read it from other paths,
                and the table must compare equal on every rank.

        Raises:
            ValueError: An unknown format, or a profile without that table
                or with a malformed one (the message names what is missing).
        """
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight format {weight_format!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
        key = f"{weight_format}/expert"
        machine = profile.get("machine") if isinstance(profile, Mapping) else None
        kernels = machine.get("kernels") if isinstance(machine, Mapping) else None
        table = kernels.get(key) if isinstance(kernels, Mapping) else None
        if not isinstance(table, Mapping) or "rows" not in table or "seconds_per_byte" not in table:
            raise ValueError(
                f"{where}: no machine.kernels[{key!r}] table (rows, seconds_per_byte); "
                "make the profile with this moe_mpi's `moe-mpi calibrate`"
            )
        try:
            rows = [float(r) for r in table["rows"]]
            seconds = [float(s) for s in table["seconds_per_byte"]]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: machine.kernels[{key!r}] is not two lists of numbers ({e})") from None
        if not rows or rows[0] != 1:
            raise ValueError(f"{where}: machine.kernels[{key!r}] must start at 1 row, got rows {rows}")
        try:
            return cls(tuple(rows), tuple(s / seconds[0] for s in seconds), f"calibrate {key}")
        except (ValueError, ZeroDivisionError) as e:
            raise ValueError(f"{where}: machine.kernels[{key!r}]: {e}") from None

    # ----------------------------------------------------------- queries

    @property
    def is_default(self) -> bool:
        d = RowCost.default()
        return (self.rows, self.work) == (d.rows, d.work)

    def work_of(self, rows) -> np.ndarray:
        """Work of one whole expert at ``rows`` rows (a number or array, any shape), in the table's unit.

        ``0`` at no rows; linear between the table's points and beyond the
        last with the last segment's slope (from ``(0, 0)`` if there is one point).
        """
        m = np.asarray(rows, dtype=np.float64)
        xs, ys, slope = self.curve
        tail = ys[-1] + (m - xs[-1]) * slope
        return np.where(m > xs[-1], tail, np.interp(m, xs, ys))

    def cost(self, rows) -> np.ndarray:
        """Work at ``rows`` rows in units of one single-row call: ``cost(0) = 0``, ``cost(1) = 1``."""
        return self.work_of(rows) / self.work_of(1.0)

    def describe(self) -> str:
        """One line: where the price comes from and what 2, 16 and 128 rows cost against one."""
        c = self.cost(np.array([2.0, 16.0, 128.0]))
        return f"row price {self.source}: 2 / 16 / 128 rows cost {c[0]:.2f} / {c[1]:.2f} / {c[2]:.1f}x one row"

    # ------------------------------------------------------- persistence

    def to_dict(self) -> Dict[str, Any]:
        return {"rows": list(self.rows), "work": list(self.work), "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RowCost":
        """Raises ValueError naming what is wrong with ``data``."""
        try:
            return cls(tuple(data["rows"]), tuple(data["work"]), str(data.get("source", "layouts file")))
        except (KeyError, TypeError) as e:
            raise ValueError(f"a row cost needs 'rows' and 'work', two lists of numbers: {e!r}") from None


def read_row_cost(path, weight_format: str) -> RowCost:
    """The row price of the calibrate profile at ``path`` for ``weight_format``.

    Raises:
        ValueError: Missing or unreadable file, not JSON, or no usable table
            (one line naming the file and what is wrong).
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--profile {path}: cannot read it ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--profile {path}: not JSON ({e.msg} at line {e.lineno})") from None
    return RowCost.from_profile(data, weight_format, where=f"--profile {path}")
