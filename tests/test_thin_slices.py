"""``examples/thin_slices.py`` runs on a small grid, and its table says what the models guarantee.

Real code, no mocks: the script as a subprocess, and ``moe-mpi plan`` on a
config it writes. Two properties hold by construction, so they are asserted:

* performance model, built-in Macs (roofline, no fixed costs): an expert's
  time is linear in its bytes at given rows, so over a layer's draws the
  mean rank of any layout does exactly ``sliced``'s per-rank work, and the
  busiest rank (which sets the pace) does at least that; the all-reduce is
  the same in the three modes. So ``sliced`` is never predicted slower than
  ``ep`` or ``auto`` (rounding to 0.1 keeps the order);
* balance optimizer: ``auto``'s search costs both every expert whole
  (its placement with nothing split) and every expert split, on the same
  draws, and keeps the cheapest, so its cost is at most either.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WIDTHS, RANKS = (256, 2688), (2, 3)
ARGS = ["--base", "dbrx:q4", "--machines", "m2-ultra-192", "--link", "tb5-rdma", "--batch", "1",
        "--widths", ",".join(map(str, WIDTHS)), "--ranks", ",".join(map(str, RANKS))]


def _table(lines, title):
    """``{first cell: [other cells]}`` of the markdown table after the heading ``title``."""
    start = lines.index(title)
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("| I |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_thin_slices_table(tmp_path):
    configs = tmp_path / "configs"
    proc = subprocess.run([sys.executable, "examples/thin_slices.py", *ARGS, "--write-configs", str(configs)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# Where slices get thin (predicted): dbrx:q4") and "16 experts top-4" in lines[0]
    header = "| I | " + " | ".join(f"N={n}" for n in RANKS) + " |"
    assert lines.count(header) == 2, proc.stdout  # layout table and the one tokens/s table

    layouts = _table(lines, "## auto's layout (balance optimizer, uniform routing)")
    assert sorted(layouts) == sorted(map(str, WIDTHS)), proc.stdout
    for cells in layouts.values():
        assert len(cells) == len(RANKS)
        for cell in cells:
            m = re.fullmatch(r"([\d.]+) / ([\d.]+) / ([\d.]+): (whole|split|\d+/16 split)", cell)
            assert m, cell
            whole, split, auto = map(float, m.groups()[:3])
            assert auto <= min(whole, split), cell
    assert all(c.endswith(": split") for c in layouts["2688"]), layouts  # a wide expert is split

    speeds = _table(lines, "## m2-ultra-192 x N, tb5-rdma, batch 1: decode tok/s, ep / sliced / auto")
    assert sorted(speeds) == sorted(map(str, WIDTHS)), proc.stdout
    for cells in speeds.values():
        assert len(cells) == len(RANKS)
        for cell in cells:
            ep, sliced, auto = map(float, re.fullmatch(r"([\d.]+) / ([\d.]+) / ([\d.]+)", cell).groups())
            assert sliced >= ep and sliced >= auto, cell

    summary = _table(lines, "## Summary per width (all machines, links and batches above)")
    assert sorted(summary) == sorted(map(str, WIDTHS)) and all(len(c) == 7 for c in summary.values()), summary
    assert summary["2688"][4] == summary["2688"][5] == f"never (N <= {RANKS[-1]})", summary

    # moe-mpi plan on the config the script wrote gives the same tokens/s.
    plan = subprocess.run([str(Path(sys.executable).parent / "moe-mpi"), "plan", "--model", str(configs / "w256"),
                           "--machines", "m2-ultra-192:2", "--link", "tb5-rdma", "--modes", "ep,sliced,auto",
                           "--batch", "1", "--json", "-"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    rows = {r["mode"]: r for r in json.loads(plan.stdout)["rows"] if r["ranks"] == 2}
    assert speeds["256"][0] == " / ".join(f"{rows[m]['decode_tokens_per_s']:.1f}" for m in ("ep", "sliced", "auto"))
