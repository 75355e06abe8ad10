"""Fake "hosts" for multi-host MPI tests: Linux network namespaces on one machine.

Each host is a network namespace with one veth interface (``moe0``) on a
private /24. A further namespace acts as the switch: a bridge that every
host's veth is plugged into, plus one veth to the root namespace, which gets
the subnet's ``.1`` address so that ``mpirun`` (in the root namespace)
reaches the daemons it starts in the hosts::

    root ns:   mpirun ... mr-XXXXXX 10.a.b.1
                              |
    switch ns:            [bridge br0]  (moe-XXXXXX-sw)
                     /          |           \
    host ns:   moe-XXXXXX-a  moe-XXXXXX-b  moe-XXXXXX-c
                10.a.b.11     10.a.b.12     10.a.b.13
               hostname      hostname      hostname
                moe-a         moe-b         moe-c

The bridge lives in its own namespace, not the root one, so host-to-host
traffic never meets the machine's own firewall (e.g. Docker's FORWARD DROP
policy applied to bridged packets through br_netfilter).

``mpirun`` starts its daemons through an rsh agent script (``--mca
plm_rsh_agent``) that Open MPI calls like ssh, ``agent [options] host
command...``; the script enters the host's namespace, gives it its own
hostname with ``unshare --uts`` and runs the command there.

Every name carries a random suffix, so a crashed run never collides with the
next one, and :func:`destroy_cluster` removes everything it made (killing only
processes inside the cluster's own namespaces).

Run directly to try it by hand::

    sudo python tests/netns_hosts.py 2 [RATE]   # prints the hostfile and agent; Enter tears down

``RATE`` (a tc rate such as ``1gbit``) limits every host's outgoing link; see
:func:`create_cluster`. ``examples/netns_bench.py`` runs benchmarks this way.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

IFACE = "moe0"  # the interface name inside every namespace


class NetnsError(RuntimeError):
    """Namespaces, veths or the bridge could not be created."""


@dataclass
class FakeHost:
    """One namespace acting as a host."""

    hostname: str  # what socket.gethostname() returns inside
    netns: str
    ip: str
    veth: str  # switch end of its veth pair


@dataclass
class FakeCluster:
    """The namespaces, bridge and rsh agent of one test run."""

    suffix: str
    switch: str  # the namespace holding the bridge
    root_veth: str  # root-namespace end of the link to the switch
    subnet: ipaddress.IPv4Network
    gateway: str
    agent: Path
    hosts: List[FakeHost] = field(default_factory=list)
    rate: Optional[str] = None  # tc rate of every host's outgoing link, e.g. "1gbit"; None: veth speed

    def mpirun_flags(self) -> List[str]:
        """mpirun options: launch through the agent, MPI traffic over TCP on the subnet."""
        return [
            "--mca", "plm_rsh_agent", str(self.agent),
            # ob1 + tcp: no shared memory between "hosts", no UCX, only sockets.
            "--mca", "pml", "ob1",
            "--mca", "btl", "tcp,self",
            "--mca", "btl_tcp_if_include", str(self.subnet),
            # The runtime's own traffic (mpirun <-> daemons) too.
            "--mca", "oob_tcp_if_include", str(self.subnet),
        ]


def unavailable_reason() -> Optional[str]:
    """Why namespaces cannot be made here, or None if they (probably) can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    if shutil.which("ip") is None:
        return "the 'ip' command is missing (apt-get install -y iproute2)"
    if shutil.which("unshare") is None:
        return "the 'unshare' command is missing (apt-get install -y util-linux)"
    return None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"{shlex.join(args)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _used_networks() -> List[ipaddress.IPv4Network]:
    nets = []
    out = _run("ip", "-4", "-o", "addr", "show", check=False).stdout
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    for line in _run("ip", "-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest and dest[0].isdigit():
            try:
                nets.append(ipaddress.ip_network(dest, strict=False))
            except ValueError:
                pass
    return nets


def _pick_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps no address or route on this machine."""
    used = _used_networks()
    rng = random.Random(secrets.randbits(32))
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randint(200, 250)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise NetnsError("no free 10.x.y.0/24 subnet found for the test network")


AGENT = """#!/bin/sh
# rsh agent for mpirun: called like ssh, "agent [options] host command...".
# Enters the fake host's network namespace, gives it its own hostname and runs
# the command there through a shell, as sshd would.
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-p|-l|-i|-F|-J) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
host="$1"
shift
case "$host" in
{cases}
  *) echo "rsh agent: unknown host '$host'" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec sh -c "$1"' "$name" "$*"
"""


def _write_agent(path: Path, hosts: List[FakeHost]) -> None:
    cases = "\n".join(
        f"  {h.ip}|{h.hostname}) ns={h.netns}; name={h.hostname} ;;" for h in hosts
    )
    path.write_text(AGENT.format(cases=cases))
    path.chmod(0o755)


def create_cluster(n: int, workdir: Path, rate: Optional[str] = None) -> FakeCluster:
    """Creates ``n`` fake hosts (namespaces ``moe-<suffix>-a``, ``-b``, ...).

    Args:
        n: Number of hosts.
        workdir: Where the rsh agent script is written.
        rate: If given, a tc rate (``"1gbit"``, ``"100mbit"``) that every
            host's outgoing link is limited to, with a token bucket one
            packet deep (``tbf ... burst 1540``), so that every packet waits
            its serialisation time as on a real link of that speed. Without
            it the hosts talk at veth speed (memory copies).

    Raises:
        NetnsError: Something could not be created; whatever was made is
        removed again before raising.
    """
    if not 1 <= n <= 26:
        raise ValueError(f"n must be 1..26, got {n}")
    suffix = secrets.token_hex(3)
    subnet = _pick_subnet()
    addrs = list(subnet.hosts())
    cluster = FakeCluster(
        suffix=suffix,
        switch=f"moe-{suffix}-sw",
        root_veth=f"mr-{suffix}",
        subnet=subnet,
        gateway=str(addrs[0]),
        agent=Path(workdir) / f"rsh-agent-{suffix}.sh",
        rate=rate,
    )
    if rate is not None and shutil.which("tc") is None:
        raise NetnsError("limiting the link rate needs the 'tc' command (apt-get install -y iproute2)")
    sw = cluster.switch
    try:
        _run("ip", "netns", "add", sw)
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        # root <-> switch: mpirun's way to the daemons.
        _run("ip", "link", "add", cluster.root_veth, "type", "veth", "peer", "name", "up0", "netns", sw)
        _run("ip", "-n", sw, "link", "set", "up0", "master", "br0", "up")
        _run("ip", "addr", "add", f"{cluster.gateway}/{subnet.prefixlen}", "dev", cluster.root_veth)
        _run("ip", "link", "set", cluster.root_veth, "up")
        for i in range(n):
            letter = chr(ord("a") + i)
            host = FakeHost(
                hostname=f"moe-{letter}",
                netns=f"moe-{suffix}-{letter}",
                ip=str(addrs[10 + i]),
                veth=f"mv{suffix}{letter}",
            )
            cluster.hosts.append(host)
            _run("ip", "netns", "add", host.netns)
            _run("ip", "-n", sw, "link", "add", host.veth, "type", "veth", "peer", "name", IFACE, "netns", host.netns)
            _run("ip", "-n", sw, "link", "set", host.veth, "master", "br0", "up")
            _run("ip", "-n", host.netns, "addr", "add", f"{host.ip}/{subnet.prefixlen}", "dev", IFACE)
            _run("ip", "-n", host.netns, "link", "set", IFACE, "up")
            _run("ip", "-n", host.netns, "link", "set", "lo", "up")
            if rate is not None:
                # One packet of burst (MTU 1500 + Ethernet header): no message,
                # however small, skips the queue; the limit itself is the
                # serialisation delay (tbf's own latency bound only caps the queue).
                _run("tc", "-n", host.netns, "qdisc", "add", "dev", IFACE, "root",
                     "tbf", "rate", rate, "burst", "1540", "latency", "200ms")
        _write_agent(cluster.agent, cluster.hosts)
        # The hostname switch needs a UTS namespace; fail here, not in mpirun.
        _run("ip", "netns", "exec", cluster.hosts[0].netns, "unshare", "--uts", "hostname", "moe-probe")
    except BaseException:
        destroy_cluster(cluster)
        raise
    return cluster


def _namespaces(cluster: FakeCluster) -> List[str]:
    return [h.netns for h in cluster.hosts] + [cluster.switch]


def destroy_cluster(cluster: FakeCluster) -> List[str]:
    """Removes the namespaces, veths, bridge and agent; returns what failed.

    Deleting a namespace destroys the interfaces in it, and with them the
    other ends of their veth pairs, so the bridge and every veth go with the
    namespaces.
    """
    problems = []
    existing = _run("ip", "netns", "list", check=False).stdout.split()
    for ns in _namespaces(cluster):
        if ns not in existing:
            continue
        # Processes left in our own namespaces (a hung rank) keep them alive.
        for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        proc = _run("ip", "netns", "del", ns, check=False)
        if proc.returncode != 0:
            problems.append(proc.stderr.strip())
    # The root end would go with the switch; delete it directly in case the
    # switch namespace was never made.
    if _run("ip", "link", "show", cluster.root_veth, check=False).returncode == 0:
        _run("ip", "link", "del", cluster.root_veth, check=False)
    try:
        cluster.agent.unlink()
    except FileNotFoundError:
        pass
    return problems


def leftovers(cluster: FakeCluster) -> List[str]:
    """Anything of ``cluster`` that still exists (for tests of the cleanup)."""
    names = _run("ip", "netns", "list", check=False).stdout.split()
    left = [ns for ns in _namespaces(cluster) if ns in names]
    for _ in range(40):  # veth pairs vanish asynchronously
        if _run("ip", "link", "show", cluster.root_veth, check=False).returncode != 0:
            break
        time.sleep(0.05)
    else:
        left.append(cluster.root_veth)
    return left


if __name__ == "__main__":
    reason = unavailable_reason()
    if reason:
        sys.exit(f"cannot create fake hosts: {reason}")
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    c = create_cluster(count, Path.cwd(), rate=sys.argv[2] if len(sys.argv) > 2 else None)
    try:
        print("hosts:", ", ".join(f"{h.hostname} {h.ip} ({h.netns})" for h in c.hosts))
        print("hostfile lines:", *(f"  {h.ip} slots=1" for h in c.hosts), sep="\n")
        print("mpirun flags:", shlex.join(c.mpirun_flags()))
        input("Enter tears everything down... ")
    finally:
        print("problems:", destroy_cluster(c) or "none")
