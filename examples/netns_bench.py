"""Run a ``moe-mpi`` command with every rank on its own "host", over TCP.

On one Linux machine this stands in for several Macs on a network: each rank
runs in a network namespace of its own (its own hostname, address and network
stack, joined by a bridge; tests/netns_hosts.py), ``mpirun`` reaches it
through an ssh-like agent from a generated hostfile, and MPI traffic goes
over TCP (``--mca pml ob1 --mca btl tcp,self``), never shared memory.
``--rate`` limits every host's outgoing link with ``tc tbf``, so that each
packet waits its serialisation time as on a real link of that speed::

    sudo .venv/bin/python examples/netns_bench.py [--hosts 2] [--rate 1gbit] -- \\
        bench decode --synthetic dbrx-like --modes ep,sliced,mlx-lm-tp --tp-cpu-path --batch 1,8

Everything after ``--`` is a ``moe-mpi`` command line, run on every rank.
With ``--driver`` it is instead run once, here in the root namespace, with
``--cluster FILE`` added: a JSON file saying how to start ranks on the fake
hosts (the mpirun options and rank prefix used here) and rank 0's address.
That is for commands that start their own jobs and talk to them over the
network, as ``moe-mpi bench serve`` does::

    sudo .venv/bin/python examples/netns_bench.py --rate 10mbit --driver -- bench serve --synthetic dbrx-like

The compute is this machine's either way: only the link differs from a
shared-memory run, which is what makes the comparison of one all-reduce per
MoE layer (``ep``, ``sliced``) against tensor parallelism's two useful.

Each fake host's Open MPI daemon sees the whole machine and would bind its
one rank to core 0, so every rank would share one core. The ranks are
therefore started unbound (``--bind-to none``) and pinned with ``taskset``:
rank r on CPU r mod the CPU count, as ``mpirun -n 2`` binds them on one host.

If the command writes ``--json FILE``, the file gets a ``link`` entry
(hosts, transport, rate) once the job has succeeded, so that
``examples/link_sweep.py`` can tell the runs of a sweep apart.

Needs root (network namespaces) on Linux. Everything made is removed again
when the command ends, fails or is interrupted.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import netns_hosts  # noqa: E402  (tests/netns_hosts.py: the fake hosts)

from moe_mpi import hostfile  # noqa: E402
from moe_mpi.launch import mpirun_command, remove_stale_session_dirs  # noqa: E402

# Pins rank r to CPU r mod ncpu, then runs the command ($@).
PIN = 'exec taskset -c $(( OMPI_COMM_WORLD_RANK % $(nproc) )) "$@"'


def parse_args(argv=None):
    """Options, and the moe-mpi command line after ``--`` (usage errors exit 2)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [--hosts N] [--rate RATE] [--timeout S] [--driver] -- MOE_MPI_ARGS...",
    )
    parser.add_argument("--hosts", type=int, default=2, help="fake hosts, one rank each (default 2)")
    parser.add_argument("--rate", help="tc rate of every host's outgoing link, e.g. 1gbit, 100mbit (default: none, veth speed)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the job is killed (default 3600)")
    parser.add_argument("--driver", action="store_true", help="run the command once in the root namespace, with --cluster FILE (see above)")
    parser.add_argument("--script", help="run this Python script on every rank instead of moe-mpi (its arguments after --)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the moe-mpi command line, after --")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the moe-mpi command after --, e.g. -- bench collectives -m 4:64K")
    if not 1 <= args.hosts <= 26:  # hosts are lettered moe-a .. moe-z
        parser.error(f"--hosts must be 1..26, got {args.hosts}")
    return args


def link_description(rate, hosts: int) -> str:
    """The ``# link:`` line printed above the command's own output."""
    link = f"each host's outgoing link limited to {rate} (tc tbf, burst 1540 B)" if rate else "no rate limit (veth)"
    return f"# link: {hosts} fake hosts (network namespaces on one machine), MPI over TCP (ob1/tcp); {link}"


def json_outputs(command) -> list:
    """The ``--json FILE`` paths of a moe-mpi command line."""
    paths = [b for a, b in zip(command, command[1:]) if a == "--json"]
    return paths + [a.split("=", 1)[1] for a in command if a.startswith("--json=")]


def record_link(path, rate, hosts: int) -> None:
    """Adds the link of this run to a bench result file."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["link"] = {"hosts": hosts, "transport": "tcp (network namespaces, one machine)", "rate": rate}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = netns_hosts.unavailable_reason()
    if reason:
        print(f"netns_bench: cannot make fake hosts: {reason}", file=sys.stderr)
        return 2
    if shutil.which("taskset") is None:
        print("netns_bench: the 'taskset' command is missing (apt-get install -y util-linux)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="moe-netns-") as tmp:
        try:
            cluster = netns_hosts.create_cluster(args.hosts, Path(tmp), rate=args.rate)
        except netns_hosts.NetnsError as e:
            print(f"netns_bench: {e}", file=sys.stderr)
            return 2
        try:
            path = Path(tmp) / "hosts.openmpi"
            entries = [hostfile.HostEntry(h.ip, slots=1) for h in cluster.hosts]
            hostfile.write(hostfile.Hostfile(entries, "openmpi"), path, "openmpi")
            prefix = ["sh", "-c", PIN, "sh"]
            extra = ["--hostfile", str(path), *cluster.mpirun_flags(), "--bind-to", "none"]
            if args.driver:
                cluster_file = Path(tmp) / "cluster.json"
                cluster_file.write_text(json.dumps({
                    "hosts": [h.ip for h in cluster.hosts],
                    "address": cluster.hosts[0].ip,
                    "mpirun_extra": extra,
                    "rank_prefix": prefix,
                    "link": link_description(args.rate, args.hosts)[len("# link: "):],
                    "rate": args.rate,
                }))
                cmd = [sys.executable, "-m", "moe_mpi", *args.command, "--cluster", str(cluster_file)]
            else:
                # No --oversubscribe: with it, Open MPI 5 packs every rank onto
                # the hostfile's first host whatever its slots say.
                program = [args.script] if args.script else ["-m", "moe_mpi"]
                cmd = mpirun_command(args.hosts, [*prefix, sys.executable, *program, *args.command],
                                     oversubscribe=False, extra=extra)
            print(link_description(args.rate, args.hosts), flush=True)
            print("# hosts: " + ", ".join(f"{h.hostname} {h.ip}" for h in cluster.hosts), flush=True)
            print(f"# ranks pinned: rank r on CPU r mod {os.cpu_count()} (taskset)", flush=True)
            print(("# driver: " if args.driver else "# mpirun: ") + shlex.join(cmd), flush=True)
            # Its output goes straight to the terminal, so a launch that fails is
            # not retried as run_mpirun does; the cause of such failures goes first.
            remove_stale_session_dirs()
            proc = subprocess.Popen(cmd, start_new_session=True)
            try:
                rc = proc.wait(timeout=args.timeout)
                if rc == 0:
                    for path in json_outputs(args.command):
                        record_link(path, args.rate, args.hosts)
                return rc
            except subprocess.TimeoutExpired:
                print(f"netns_bench: no end after {args.timeout:.0f} s; killing the job", file=sys.stderr)
                proc.terminate()
                proc.wait(timeout=30)
                return 124
            finally:
                if proc.poll() is None:  # interrupted: mpirun forwards SIGTERM to the ranks
                    proc.terminate()
                    proc.wait(timeout=30)
        finally:
            # Also kills whatever is left inside the namespaces (a hung rank).
            problems = netns_hosts.destroy_cluster(cluster)
            if problems:
                print(f"netns_bench: cleanup problems: {problems}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
