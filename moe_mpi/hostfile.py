"""``moe-mpi hostfile``: check and convert MPI hostfiles.

Three formats, detected automatically on input:

* **Open MPI** (PRRTE): one host per line, ``host [slots=N] [max_slots=M]
  [username=U]``; ``#`` and ``//`` start comments. Without ``slots=`` Open
  MPI gives a host as many slots as it has cores.
* **MPICH** (Hydra): ``host[:N] [user=U] [binding=B]``; ``#`` starts a
  comment. Without ``:N`` a host gets one process.
* **mlx.launch JSON**: a list of ``{"ssh": host, "ips": [...]}`` objects, one
  per rank, or an object ``{"backend": ..., "envs": [...], "hosts": [...]}``.
  A host listed twice runs two ranks. Written in the object form with
  ``"backend": "mpi"``: moe_mpi communicates through MPI, and
  ``mlx.launch --hostfile FILE`` then starts it with ``mpirun``.

Usage::

    moe-mpi hostfile check hostfiles/2-macs.openmpi
    moe-mpi hostfile convert hostfiles/2-macs.openmpi 2-macs.json
    moe-mpi hostfile convert hosts.json - --to mpich
"""

import argparse
import ipaddress
import json
import json.scanner
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .runner import fail, parse_args

FORMATS = ("openmpi", "mpich", "json")
FORMAT_NAMES = {"openmpi": "Open MPI hostfile", "mpich": "MPICH hostfile", "json": "mlx.launch JSON hostfile"}
SUFFIXES = {".json": "json", ".mpich": "mpich", ".hydra": "mpich", ".openmpi": "openmpi", ".ompi": "openmpi"}

# Open MPI (PRRTE hostfile_lex.l) keywords and what they mean here.
_OMPI_SLOTS = {"slots", "count", "cpu"}
_OMPI_MAX_SLOTS = {
    "max_slots", "max-slots", "slots_max", "slots-max", "cpu_max", "cpu-max",
    "max_cpu", "max-cpu", "count_max", "count-max", "max_count", "max-count",
}
_OMPI_USER = {"username", "user-name", "user_name"}
_OMPI_OTHER = {
    "port", "boards", "sockets", "sockets_per_board", "sockets-per-board",
    "cores", "cores_per_socket", "cores-per-socket",
}
_MPICH_KEYS = {"user", "binding"}

_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.]*\Z")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-.]*\Z")


class HostfileError(ValueError):
    """A hostfile that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class HostEntry:
    """One host and how many ranks it runs.

    Attributes:
        host: Name or address that mpirun (or mlx.launch) reaches it by.
        slots: Ranks it runs; None where the file does not say.
        max_slots: Open MPI's hard limit, if given.
        user: Login name, if given (``user@host`` or ``username=``/``user=``).
        ips: mlx.launch's addresses for its own ring backend.
        options: Other settings kept verbatim, e.g. ``("binding", "rr")``.
        line: Line of the file it came from (1-based), or None.
        comments: Comment lines just above it, kept when writing text formats.
    """

    host: str
    slots: Optional[int] = None
    max_slots: Optional[int] = None
    user: Optional[str] = None
    ips: Tuple[str, ...] = ()
    options: Tuple[Tuple[str, str], ...] = ()
    line: Optional[int] = None
    comments: Tuple[str, ...] = ()

    @property
    def login(self) -> str:
        """``user@host`` or ``host``, as ssh takes it."""
        return f"{self.user}@{self.host}" if self.user else self.host


@dataclass
class Hostfile:
    """A parsed hostfile in any of the formats."""

    entries: List[HostEntry]
    format: str
    source: str = "<string>"
    header: Tuple[str, ...] = ()
    backend: Optional[str] = None
    envs: Tuple[str, ...] = ()
    warnings: List[str] = field(default_factory=list)

    @property
    def total_slots(self) -> int:
        """Ranks the file describes (a host without a slot count counts as one)."""
        return sum(e.slots or 1 for e in self.entries)

    def ranks(self) -> List[str]:
        """The host of each rank, in order, for a by-slot mapping of ``total_slots`` ranks."""
        return [e.host for e in self.entries for _ in range(e.slots or 1)]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _split_user(token: str, where: str) -> Tuple[Optional[str], str]:
    if "@" not in token:
        return None, token
    user, _, host = token.rpartition("@")
    if not _USER.match(user):
        raise HostfileError(f"{where}: invalid user name {user!r} in {token!r}")
    return user, host


def _check_host(host: str, where: str, allow_ipv6: bool = True) -> None:
    if _is_ip(host):
        if not allow_ipv6 and ":" in host:
            raise HostfileError(f"{where}: MPICH hostfiles cannot hold IPv6 addresses ({host!r})")
        return
    if not _HOSTNAME.match(host):
        raise HostfileError(f"{where}: invalid host name {host!r}")


def _positive(value: str, key: str, where: str) -> int:
    if not re.fullmatch(r"\+?\d+", value.strip()):
        raise HostfileError(f"{where}: {key} must be a positive integer, got {value!r}")
    n = int(value)
    if n < 1:
        raise HostfileError(f"{where}: {key} must be a positive integer, got {n}")
    return n


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _strip_comment(line: str, fmt: str) -> Tuple[str, Optional[str]]:
    """Splits a line into its content and its comment (without the marker)."""
    cut = len(line)
    markers = ("#", "//") if fmt == "openmpi" else ("#",)
    for m in markers:
        i = line.find(m)
        if i != -1:
            cut = min(cut, i)
    comment = None
    if cut < len(line):
        # Drop the marker and one space; keep the rest (indented examples).
        comment = line[cut + (2 if line.startswith("//", cut) else 1):].rstrip()
        comment = comment[1:] if comment.startswith(" ") else comment
    return line[:cut].strip(), comment


def detect_format(text: str) -> str:
    """Guesses the format of a hostfile's text: ``openmpi``, ``mpich`` or ``json``.

    A file of bare host names, valid in both text formats, is read as Open MPI.

    Raises:
        HostfileError: The text mixes Open MPI and MPICH syntax.
    """
    if text.lstrip().startswith(("[", "{")):
        return "json"
    ompi = mpich = None
    for n, line in enumerate(text.splitlines(), 1):
        content, _ = _strip_comment(line, "openmpi")
        if not content:
            continue
        tokens = re.sub(r"\s*=\s*", "=", content).split()
        first = tokens[0].rpartition("@")[2]
        if any(t.split("=", 1)[0] in _MPICH_KEYS for t in tokens[1:] if "=" in t):
            mpich = mpich or n
        if re.fullmatch(r"[^:\s]+:\d*", first) and not _is_ip(first):
            mpich = mpich or n
        keys = {t.split("=", 1)[0] for t in tokens[1:] if "=" in t}
        if keys & (_OMPI_SLOTS | _OMPI_MAX_SLOTS | _OMPI_USER | _OMPI_OTHER):
            ompi = ompi or n
    if ompi and mpich:
        raise HostfileError(
            f"line {mpich} uses MPICH syntax (host:N or user=) but line {ompi} uses "
            "Open MPI syntax (slots=); use one format per file"
        )
    return "mpich" if mpich else "openmpi"


def _parse_text(text: str, fmt: str, source: str) -> Hostfile:
    entries: List[HostEntry] = []
    header: List[str] = []
    pending: List[str] = []
    seen: Dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{source}:{n}"
        content, comment = _strip_comment(line, fmt)
        if fmt == "openmpi" and "/*" in content:
            raise HostfileError(f"{where}: /* block comments */ are not supported; use # comments")
        if not content:
            if comment is not None:
                pending.append(comment)
            elif line.strip() == "" and not entries and pending:
                # A blank line ends the file's header comment.
                header.extend(pending)
                pending = []
            continue
        if fmt == "openmpi":
            entry = _parse_ompi_line(content, where)
        else:
            entry = _parse_mpich_line(content, where)
        key = entry.host.lower()
        if key in seen:
            raise HostfileError(
                f"{where}: duplicate host {entry.host!r} (first on line {seen[key]}); "
                "list each host once and give it more slots instead"
            )
        seen[key] = n
        if comment:
            pending.append(comment)
        entries.append(replace(entry, line=n, comments=tuple(pending)))
        pending = []
    if not entries:
        raise HostfileError(f"{source}: no hosts (the file is empty or only has comments)")
    return Hostfile(entries, fmt, source, header=tuple(header))


def _parse_ompi_line(content: str, where: str) -> HostEntry:
    tokens = re.sub(r"\s*=\s*", "=", content).split()
    first = tokens[0]
    if first.startswith(("^", "+")):
        raise HostfileError(f"{where}: relative (+n0) and excluded (^host) nodes are not supported")
    if "=" in first:
        raise HostfileError(f"{where}: line starts with {first!r}; expected a host name first")
    user, host = _split_user(first, where)
    if re.fullmatch(r"[^:\s]+:\d*", host) and not _is_ip(host):
        raise HostfileError(
            f"{where}: {first!r} is MPICH syntax; in an Open MPI hostfile write "
            f"'{host.split(':')[0]} slots={host.split(':')[1] or 1}'"
        )
    _check_host(host, where)
    slots = max_slots = None
    options: List[Tuple[str, str]] = []
    given = set()
    for token in tokens[1:]:
        if "=" not in token:
            raise HostfileError(f"{where}: unexpected {token!r}; expected key=value such as slots=2")
        key, value = token.split("=", 1)
        kind = (
            "slots" if key in _OMPI_SLOTS
            else "max_slots" if key in _OMPI_MAX_SLOTS
            else "user" if key in _OMPI_USER
            else key if key in _OMPI_OTHER
            else None
        )
        if kind is None:
            raise HostfileError(
                f"{where}: unknown key {key!r}; Open MPI hostfiles take slots=N, max_slots=N, "
                "username=NAME (and port, boards, sockets, cores)"
            )
        if kind in given:
            raise HostfileError(f"{where}: {key} is given twice")
        given.add(kind)
        if not value:
            raise HostfileError(f"{where}: {key}= has no value")
        if kind == "slots":
            slots = _positive(value, key, where)
        elif kind == "max_slots":
            max_slots = _positive(value, key, where)
        elif kind == "user":
            if user:
                raise HostfileError(f"{where}: user given twice ({user}@ and {key}=)")
            if not _USER.match(value):
                raise HostfileError(f"{where}: invalid user name {value!r}")
            user = value
        else:
            options.append((key, str(_positive(value, key, where))))
    if slots is not None and max_slots is not None and max_slots < slots:
        raise HostfileError(f"{where}: max_slots={max_slots} is less than slots={slots}")
    return HostEntry(host, slots, max_slots, user, options=tuple(options))


def _parse_mpich_line(content: str, where: str) -> HostEntry:
    tokens = content.split()
    first = tokens[0]
    user, hostpart = _split_user(first, where)
    host, sep, count = hostpart.partition(":")
    if sep and ":" in count:
        raise HostfileError(f"{where}: {first!r}: MPICH hostfiles cannot hold IPv6 addresses")
    _check_host(host, where, allow_ipv6=False)
    slots = _positive(count, "the process count after ':'", where) if sep else None
    options: List[Tuple[str, str]] = []
    for token in tokens[1:]:
        key, eq, value = token.partition("=")
        if not eq or key not in _MPICH_KEYS:
            if "slots" in token:
                raise HostfileError(f"{where}: {token!r} is Open MPI syntax; in an MPICH hostfile write '{host}:N'")
            raise HostfileError(f"{where}: unexpected {token!r}; MPICH hostfiles take host:N [user=NAME] [binding=...]")
        if not value:
            raise HostfileError(f"{where}: {key}= has no value")
        if key == "user":
            if user:
                raise HostfileError(f"{where}: user given twice")
            user = value
        else:
            options.append((key, value))
    return HostEntry(host, slots, None, user, options=tuple(options))


def _json_with_positions(text: str, source: str):
    """``json.loads`` that also returns where each JSON object starts."""
    decoder = json.JSONDecoder()
    starts: Dict[int, int] = {}
    parse_object = decoder.parse_object

    def recording(s_and_end, *args):
        obj, end = parse_object(s_and_end, *args)
        starts[id(obj)] = s_and_end[1] - 1  # the offset of its "{"
        return obj, end

    decoder.parse_object = recording
    # The C scanner ignores decoder.parse_object; the Python one calls it.
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    try:
        return decoder.decode(text), starts
    except json.JSONDecodeError as e:
        raise HostfileError(f"{source}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def _parse_json(text: str, source: str) -> Hostfile:
    data, starts = _json_with_positions(text, source)

    def line_of(obj) -> Optional[int]:
        start = starts.get(id(obj))
        return None if start is None else text.count("\n", 0, start) + 1

    backend, envs = None, ()
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"backend", "envs", "hosts"})
        if unknown:
            raise HostfileError(f"{source}:{line_of(data)}: unknown keys {unknown}; expected backend, envs, hosts")
        if "hosts" not in data:
            raise HostfileError(f"{source}:{line_of(data)}: the JSON object has no \"hosts\" list")
        backend = data.get("backend")
        if backend is not None and not isinstance(backend, str):
            raise HostfileError(f"{source}: \"backend\" must be a string")
        envs = data.get("envs", [])
        if not isinstance(envs, list) or not all(isinstance(e, str) and "=" in e for e in envs):
            raise HostfileError(f"{source}: \"envs\" must be a list of \"NAME=value\" strings")
        hosts = data["hosts"]
    elif isinstance(data, list):
        hosts = data
    else:
        raise HostfileError(f"{source}:1: expected a JSON list of hosts or an object with \"hosts\"")
    if not isinstance(hosts, list):
        raise HostfileError(f"{source}: \"hosts\" must be a list")
    if not hosts:
        raise HostfileError(f"{source}: no hosts (the hosts list is empty)")

    entries: List[HostEntry] = []
    warnings: List[str] = []
    rdma = False
    for i, h in enumerate(hosts):
        n = line_of(h)
        where = f"{source}:{n}" if n else f"{source}: hosts[{i}]"
        if not isinstance(h, dict):
            raise HostfileError(f"{where}: hosts[{i}] must be an object like {{\"ssh\": \"host\", \"ips\": [...]}}")
        unknown = sorted(set(h) - {"ssh", "ips", "rdma"})
        if unknown:
            raise HostfileError(f"{where}: hosts[{i}] has unknown keys {unknown}; expected ssh, ips, rdma")
        ssh = h.get("ssh")
        if not isinstance(ssh, str) or not ssh.strip():
            raise HostfileError(f"{where}: hosts[{i}] needs an \"ssh\" host name")
        user, host = _split_user(ssh.strip(), where)
        _check_host(host, where)
        ips = h.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise HostfileError(f"{where}: hosts[{i}] \"ips\" must be a list of strings")
        for ip in ips:
            if not _is_ip(ip):
                raise HostfileError(f"{where}: hosts[{i}] \"ips\" holds {ip!r}, which is not an IP address")
        rdma = rdma or bool(h.get("rdma"))
        entries.append(HostEntry(host, 1, None, user, tuple(ips), line=n))

    # One entry per rank; group them into hosts with slot counts, in order of
    # first appearance (as mlx.launch's MPI backend does).
    merged: Dict[Tuple[Optional[str], str], HostEntry] = {}
    order = []
    for e in entries:
        key = (e.user, e.host.lower())
        if key in merged:
            prev = merged[key]
            if order[-1] != key:
                warnings.append(
                    f"{source}:{e.line}: {e.host} also appears earlier (line {prev.line}); MPI "
                    "places a host's ranks together, so rank order differs from the file"
                )
            if e.ips and prev.ips and set(e.ips) != set(prev.ips):
                warnings.append(f"{source}:{e.line}: {e.host} is listed with different ips than on line {prev.line}")
            merged[key] = replace(prev, slots=prev.slots + 1, ips=prev.ips or e.ips)
        else:
            merged[key] = e
            order.append(key)
    if rdma:
        warnings.append(f"{source}: \"rdma\" devices are used by mlx's jaccl backend only, not by MPI")
    return Hostfile([merged[k] for k in order], "json", source, backend=backend, envs=tuple(envs), warnings=warnings)


def parse(text: str, fmt: Optional[str] = None, source: str = "<string>") -> Hostfile:
    """Parses hostfile text.

    Args:
        text: The file's contents.
        fmt: ``"openmpi"``, ``"mpich"``, ``"json"``, or None to detect it.
        source: Name used in error messages (the path).

    Raises:
        HostfileError: Syntax errors, non-positive slot counts, duplicate
            hosts, or no hosts at all; the message names the file and line.
    """
    if fmt is None:
        try:
            fmt = detect_format(text)
        except HostfileError as e:
            raise HostfileError(f"{source}: {e}") from None
    if fmt not in FORMATS:
        raise HostfileError(f"unknown hostfile format {fmt!r}; expected one of {', '.join(FORMATS)}")
    hf = _parse_json(text, source) if fmt == "json" else _parse_text(text, fmt, source)
    if fmt == "openmpi":
        for e in hf.entries:
            if e.slots is None:
                hf.warnings.append(
                    f"{source}:{e.line}: {e.host} has no slots=; Open MPI then gives it one slot "
                    "per CPU core. Write slots=1 to run one rank per Mac"
                )
    return hf


def read(path, fmt: Optional[str] = None) -> Hostfile:
    """Reads and parses a hostfile (see :func:`parse`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HostfileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise HostfileError(f"{path}: is a directory, not a hostfile") from None
    except UnicodeDecodeError:
        raise HostfileError(f"{path}: not a text file (not UTF-8)") from None
    return parse(text, fmt, str(path))


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def dumps(hf: Hostfile, fmt: str, warnings: Optional[List[str]] = None) -> str:
    """Formats a hostfile.

    Args:
        hf: The hostfile.
        fmt: Output format.
        warnings: If given, what the output format cannot hold is appended here.
    """
    warnings = [] if warnings is None else warnings
    if fmt not in FORMATS:
        raise HostfileError(f"unknown hostfile format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "json":
        return _dumps_json(hf, warnings)
    out = [f"# {line}" if line else "#" for line in hf.header]
    if hf.header:
        out.append("")
    if hf.format == "json" and hf.envs:
        warnings.append(f"the JSON \"envs\" {list(hf.envs)} are not kept; pass them to mpirun with -x NAME=value")
    for e in hf.entries:
        out.extend(f"# {c}" if c else "#" for c in e.comments)
        if fmt == "openmpi":
            parts = [e.login]
            if e.slots is not None:
                parts.append(f"slots={e.slots}")
            if e.max_slots is not None:
                parts.append(f"max_slots={e.max_slots}")
            for key, value in e.options:
                if key in _MPICH_KEYS:
                    warnings.append(f"{e.host}: MPICH's {key}={value} has no Open MPI equivalent; dropped")
                else:
                    parts.append(f"{key}={value}")
        else:
            if ":" in e.host:
                raise HostfileError(f"{e.host}: MPICH hostfiles cannot hold IPv6 addresses")
            parts = [e.host if e.slots is None else f"{e.host}:{e.slots}"]
            if e.slots is None and hf.format == "openmpi":
                warnings.append(f"{e.host} has no slots=: MPICH runs 1 process there, Open MPI one per core")
            if e.user:
                parts.append(f"user={e.user}")
            if e.max_slots is not None:
                warnings.append(f"{e.host}: max_slots={e.max_slots} has no MPICH equivalent; dropped")
            for key, value in e.options:
                if key in _MPICH_KEYS:
                    parts.append(f"{key}={value}")
                else:
                    warnings.append(f"{e.host}: Open MPI's {key}={value} has no MPICH equivalent; dropped")
        out.append(" ".join(parts))
    return "\n".join(out) + "\n"


def _dumps_json(hf: Hostfile, warnings: List[str]) -> str:
    hosts = []
    for e in hf.entries:
        if e.slots is None:
            warnings.append(f"{e.host} has no slot count; written as one rank")
        if e.max_slots is not None or e.options:
            warnings.append(f"{e.host}: max_slots and other MPI settings have no mlx.launch equivalent; dropped")
        ips = list(e.ips) or ([e.host] if _is_ip(e.host) else [])
        hosts.extend({"ssh": e.login, "ips": ips} for _ in range(e.slots or 1))
    data = {"backend": hf.backend or "mpi", "envs": list(hf.envs), "hosts": hosts}
    # One host per line: readable, and diffs stay small.
    lines = ",\n".join("    " + json.dumps(h) for h in hosts)
    return (
        "{\n"
        f'  "backend": {json.dumps(data["backend"])},\n'
        f'  "envs": {json.dumps(data["envs"])},\n'
        f'  "hosts": [\n{lines}\n  ]\n'
        "}\n"
    )


def write(hf: Hostfile, path, fmt: str) -> List[str]:
    """Writes ``hf`` to ``path`` in format ``fmt``; returns the conversion warnings."""
    warnings: List[str] = []
    text = dumps(hf, fmt, warnings)
    Path(path).write_text(text, encoding="utf-8")
    return warnings


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def summary(hf: Hostfile) -> str:
    """What ``check`` prints: format, hosts, slots and the rank -> host map."""
    n = len(hf.entries)
    lines = [
        f"{hf.source}: {FORMAT_NAMES[hf.format]}, {n} host{'s' if n != 1 else ''}, "
        f"{hf.total_slots} slot{'s' if hf.total_slots != 1 else ''} (ranks)"
    ]
    if hf.format == "json":
        lines[0] += f", backend {hf.backend!r}" if hf.backend else ", no backend (mlx.launch default: ring)"
    width = max(len(e.login) for e in hf.entries)
    first = 0
    for e in hf.entries:
        count = e.slots or 1
        ranks = f"rank {first}" if count == 1 else f"ranks {first}-{first + count - 1}"
        slots = "slots not given" if e.slots is None else f"slots={e.slots}"
        extra = f"  ips={','.join(e.ips)}" if e.ips else ""
        where = f"  (line {e.line})" if e.line else ""
        lines.append(f"  {e.login:<{width}}  {slots:<9}  {ranks}{extra}{where}")
        first += count
    return "\n".join(lines)


def setup_arg_parser() -> argparse.ArgumentParser:
    """The ``moe-mpi hostfile`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="moe-mpi hostfile",
        description="Check and convert Open MPI, MPICH and mlx.launch JSON hostfiles.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="Validate a hostfile and print its hosts and slots.")
    check.add_argument("file", help="The hostfile.")
    check.add_argument("--format", choices=FORMATS, default=None, help="Input format (default: detect).")
    convert = sub.add_parser("convert", help="Convert a hostfile to another format.")
    convert.add_argument("input", help="The hostfile to read (format detected).")
    convert.add_argument("output", help="The file to write, or - for stdout.")
    convert.add_argument(
        "--to", choices=FORMATS, default=None, help="Output format (default: from OUT's suffix: .openmpi, .mpich, .json)."
    )
    convert.add_argument("--from", dest="from_", choices=FORMATS, default=None, help="Input format (default: detect).")
    return parser


def _warn(messages: Sequence[str]) -> None:
    for m in messages:
        print(f"warning: {m}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Runs ``moe-mpi hostfile``."""
    args = parse_args(setup_arg_parser(), argv)
    try:
        if args.command == "check":
            hf = read(args.file, args.format)
            print(summary(hf))
            warnings = list(hf.warnings)
            if hf.format == "json" and hf.backend != "mpi":
                # mlx.launch's default (ring) starts processes that are not one MPI job.
                warnings.append(
                    f"{hf.source}: backend {hf.backend or 'not set (mlx.launch default: ring)'}: moe_mpi "
                    "needs MPI; set \"backend\": \"mpi\" or run mlx.launch --backend mpi"
                )
            _warn(warnings)
            print("OK")
            return
        fmt = args.to
        if fmt is None:
            fmt = SUFFIXES.get(Path(args.output).suffix.lower())
            if fmt is None:
                fail(f"cannot tell the output format from {args.output!r}; pass --to openmpi|mpich|json")
        if args.output != "-" and Path(args.output).resolve() == Path(args.input).resolve():
            fail(f"{args.output}: output is the input file; write to another file")
        hf = read(args.input, args.from_)
        warnings = list(hf.warnings)
        text = dumps(hf, fmt, warnings)
        if args.output == "-":
            sys.stdout.write(text)
        else:
            Path(args.output).write_text(text, encoding="utf-8")
            print(f"wrote {args.output}: {FORMAT_NAMES[fmt]}, {len(hf.entries)} hosts, {hf.total_slots} slots")
        _warn(warnings)
    except (HostfileError, OSError) as e:
        fail(e)


if __name__ == "__main__":
    main()
