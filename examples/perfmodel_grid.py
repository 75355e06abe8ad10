"""Run one validation job of the performance model: calibrate, benchmark, calibrate.

For N ranks on this machine (or on fake hosts over TCP with ``--rate``, via
``examples/netns_bench.py``), in this order and into ``--out DIR``:

1. ``moe-mpi calibrate`` -> ``calib-before.json``
2. ``moe-mpi bench decode`` float32 (``--tp-cpu-path``: every mode on the
   same CPU kernels) and 4-bit, batch 1 and 8 -> ``decode-f32.json``,
   ``decode-q4.json``
3. ``moe-mpi bench prefill`` float32 (256 tokens) and 4-bit (128 tokens)
   -> ``prefill-f32.json``, ``prefill-q4.json``
4. ``moe-mpi calibrate`` -> ``calib-after.json``

then ``examples/perfmodel_validate.py --run DIR`` compares. Each step's
command and output go to ``DIR/log.txt``::

    python examples/perfmodel_grid.py --ranks 2 --out docs/results/perfmodel/n2
    sudo .venv/bin/python examples/perfmodel_grid.py --ranks 2 --rate 100mbit --only decode-f32 --out ...

The 4-bit model is mlx-lm's conversion of the synthetic one
(``--q4-model``, made once with ``python -m mlx_lm convert -q`` if missing).
"""

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

STEPS = {
    "decode-f32": ["bench", "decode", "--synthetic", "dbrx-like", "--tp-cpu-path", "--batch", "1,8",
                   "--steps", "16", "--warmup", "4", "--no-roofline"],
    "decode-q4": ["bench", "decode", "--model", "{q4}", "--batch", "1,8", "--steps", "6", "--warmup", "2", "--no-roofline"],
    "prefill-f32": ["bench", "prefill", "--synthetic", "dbrx-like", "--tp-cpu-path", "--lengths", "256", "--repeats", "2"],
    "prefill-q4": ["bench", "prefill", "--model", "{q4}", "--lengths", "128", "--repeats", "2"],
}


def modes_for(ranks: int, rate) -> str:
    if ranks == 1:
        return "ep,central,mlx-lm-tp"
    return "ep,sliced,auto,central,mlx-lm-tp"


def command(ranks: int, rate, argv):
    """The full command line: mpirun on this host, or netns_bench for fake hosts."""
    if rate:
        return [PY, str(REPO / "examples" / "netns_bench.py"), "--hosts", str(ranks), "--rate", rate, "--", *argv]
    mpirun = [str(Path(PY).parent / "mpirun"), "-n", str(ranks)]
    if os.geteuid() == 0:
        mpirun.append("--allow-run-as-root")
    if ranks > (os.cpu_count() or 1):
        mpirun.append("--oversubscribe")
    return mpirun + [PY, "-m", "moe_mpi", *argv]


def ensure_q4(path: Path) -> None:
    if (path / "config.json").exists():
        return
    sys.path.insert(0, str(REPO))
    from moe_mpi.bench.shapes import synthetic_dir

    source = synthetic_dir("dbrx-like")
    if not (source / "config.json").exists():
        sys.exit(f"{source} missing: run `moe-mpi bench decode --synthetic dbrx-like` once first")
    subprocess.run([PY, "-m", "mlx_lm", "convert", "--hf-path", str(source), "--mlx-path", str(path), "-q"], check=True)


def run(cmd, log) -> int:
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    start = time.time()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    log.write(f"# exit {proc.returncode} after {time.time() - start:.0f} s\n")
    log.flush()
    return proc.returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rate", help="fake hosts over TCP at this tc rate (root; examples/netns_bench.py)")
    parser.add_argument("--only", default=",".join(STEPS), help=f"bench steps, of {','.join(STEPS)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--q4-model", type=Path, default=Path("/tmp/dbrx-like-q4"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in args.only.split(",") if s]
    if any("q4" in s for s in steps):
        ensure_q4(args.q4_model)
    failures = 0
    with open(args.out / "log.txt", "a") as log:
        calib = ["calibrate", "--repeats", "3"]
        failures += run(command(args.ranks, args.rate, calib + ["--out", str(args.out.resolve() / "calib-before.json")]), log) != 0
        for step in steps:
            bench = [a.replace("{q4}", str(args.q4_model)) for a in STEPS[step]]
            bench += ["--modes", modes_for(args.ranks, args.rate), "--rounds", str(args.rounds),
                      "--json", str(args.out.resolve() / f"{step}.json")]
            failures += run(command(args.ranks, args.rate, bench), log) != 0
        failures += run(command(args.ranks, args.rate, calib + ["--out", str(args.out.resolve() / "calib-after.json")]), log) != 0
    print(f"{args.out}: {failures} failed step(s); see {args.out / 'log.txt'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
