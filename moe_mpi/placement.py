"""Expert placement: which rank owns which expert.

In expert-parallel inference every rank holds the weights of a subset of the
experts of each MoE layer. :class:`ExpertPlacement` is the map from each
expert ``0..num_experts-1`` to its owner rank ``0..num_ranks-1``. It is
validated on construction, so code that receives one can rely on:

* every expert has exactly one owner, and that owner is a valid rank;
* every rank owns at least one expert.

The same placement is used for every MoE layer of a model.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]


def _as_int(value: Any, what: str) -> int:
    """Converts ``value`` to an ``int``, rejecting bools, floats and strings."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _key_as_int(key: Any, what: str) -> int:
    """Converts a mapping key to an ``int``; accepts JSON-style ``"3"``."""
    if isinstance(key, str):
        if re.fullmatch(r"\s*[+-]?\d+\s*", key) is None:
            raise ValueError(f"{what} key {key!r} is not an integer")
        return int(key)
    return _as_int(key, f"{what} key")


def _check_sizes(num_experts: Any, num_ranks: Any) -> Tuple[int, int]:
    """Validates the number of experts and ranks and returns them as ints."""
    num_experts = _as_int(num_experts, "num_experts")
    num_ranks = _as_int(num_ranks, "num_ranks")
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be at least 1")
    if num_ranks < 1:
        raise ValueError(f"num_ranks={num_ranks} must be at least 1")
    if num_experts < num_ranks:
        raise ValueError(
            f"num_experts={num_experts} is less than num_ranks={num_ranks}: "
            "every rank must own at least one expert"
        )
    return num_experts, num_ranks


def _format_runs(values: Sequence[int]) -> str:
    """Formats sorted integers compactly, e.g. ``[0, 1, 2, 3, 8]`` -> ``"0-3, 8"``."""
    parts = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(parts)


def _is_sequence(value: Any) -> bool:
    """True for lists, tuples, numpy arrays etc., but not strings or mappings."""
    if isinstance(value, (str, bytes, Mapping)):
        return False
    return isinstance(value, Sequence) or hasattr(value, "__array__")


@dataclass(frozen=True)
class ExpertPlacement:
    """Assignment of experts to ranks.

    Prefer the constructors :meth:`contiguous`, :meth:`round_robin`,
    :meth:`weighted`, :meth:`from_map`, :meth:`from_json` or :meth:`create`.

    Args:
        owners (Sequence[int]): ``owners[e]`` is the rank that owns expert
            ``e``. Its length is the number of experts.
        num_ranks (int): The number of ranks. Every rank must own at least one
            expert.

    Raises:
        ValueError: If an owner is not in ``range(num_ranks)``, a rank owns no
            expert, or there are more ranks than experts.
    """

    owners: Tuple[int, ...]
    num_ranks: int
    _local: Tuple[Tuple[int, ...], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self):
        if not _is_sequence(self.owners):
            raise ValueError(
                f"owners must be a sequence of ranks, got {type(self.owners).__name__}"
            )
        owners = tuple(
            _as_int(o, f"owner of expert {e}") for e, o in enumerate(self.owners)
        )
        num_experts, num_ranks = _check_sizes(len(owners), self.num_ranks)
        local = [[] for _ in range(num_ranks)]
        for expert, rank in enumerate(owners):
            if not 0 <= rank < num_ranks:
                raise ValueError(
                    f"expert {expert} has owner rank {rank}, which is out of range "
                    f"for num_ranks={num_ranks} (valid ranks are 0..{num_ranks - 1})"
                )
            local[rank].append(expert)
        for rank, experts in enumerate(local):
            if not experts:
                raise ValueError(
                    f"rank {rank} owns no experts (num_experts={num_experts}, "
                    f"num_ranks={num_ranks}): every rank must own at least one expert"
                )
        object.__setattr__(self, "owners", owners)
        object.__setattr__(self, "num_ranks", num_ranks)
        object.__setattr__(self, "_local", tuple(tuple(x) for x in local))

    # ------------------------------------------------------------------
    # Strategies
    # ------------------------------------------------------------------

    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int) -> "ExpertPlacement":
        """Contiguous blocks of experts, the default placement.

        Block sizes differ by at most one; the first ``num_experts % num_ranks``
        ranks get one extra expert. For example 10 experts on 4 ranks gives
        ``[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]``.

        Args:
            num_experts (int): The number of experts per MoE layer.
            num_ranks (int): The number of ranks.
        """
        num_experts, num_ranks = _check_sizes(num_experts, num_ranks)
        base, extra = divmod(num_experts, num_ranks)
        counts = [base + (r < extra) for r in range(num_ranks)]
        return cls._from_counts(counts)

    @classmethod
    def round_robin(cls, num_experts: int, num_ranks: int) -> "ExpertPlacement":
        """Expert ``e`` is owned by rank ``e % num_ranks``.

        Args:
            num_experts (int): The number of experts per MoE layer.
            num_ranks (int): The number of ranks.
        """
        num_experts, num_ranks = _check_sizes(num_experts, num_ranks)
        return cls(tuple(e % num_ranks for e in range(num_experts)), num_ranks)

    @classmethod
    def weighted(
        cls, num_experts: int, weights: Sequence[float]
    ) -> "ExpertPlacement":
        """Contiguous blocks with sizes proportional to ``weights``.

        Rank ``r`` gets about ``num_experts * weights[r] / sum(weights)``
        experts. The counts are apportioned with the largest-remainder
        (Hamilton) method so they sum exactly to ``num_experts`` and each is
        within one of its exact share; ties go to the lower rank. Equal weights
        give the same placement as :meth:`contiguous`.

        For example ``weights=[2, 1, 1]`` gives rank 0 (say a Mac with twice
        the memory) half of the experts.

        Args:
            num_experts (int): The number of experts per MoE layer.
            weights (Sequence[float]): One positive, finite weight per rank;
                ``len(weights)`` is the number of ranks.

        Raises:
            ValueError: If a weight is not a positive finite number, or a
                rank's share is so small that it would get no expert.
        """
        if not _is_sequence(weights):
            raise ValueError(
                f"weights must be a sequence of numbers, got {type(weights).__name__}"
            )
        weights = list(weights)
        if not weights:
            raise ValueError("weights is empty: need one weight per rank")
        num_experts, num_ranks = _check_sizes(num_experts, len(weights))
        exact = []
        for r, w in enumerate(weights):
            if (
                isinstance(w, bool)
                or not isinstance(w, numbers.Real)
                or not math.isfinite(w)
                or w <= 0
            ):
                raise ValueError(
                    f"weights[{r}]={w!r} must be a positive finite number "
                    f"(weights={weights})"
                )
            exact.append(
                Fraction(int(w)) if isinstance(w, numbers.Integral) else Fraction(float(w))
            )
        shown = [int(w) if isinstance(w, numbers.Integral) else float(w) for w in weights]

        total = sum(exact)
        quotas = [num_experts * w / total for w in exact]
        counts = [math.floor(q) for q in quotas]
        leftover = num_experts - sum(counts)
        by_remainder = sorted(range(num_ranks), key=lambda r: (-(quotas[r] - counts[r]), r))
        for r in by_remainder[:leftover]:
            counts[r] += 1
        for r, c in enumerate(counts):
            if c == 0:
                raise ValueError(
                    f"weights={shown} give rank {r} no experts: its share of "
                    f"num_experts={num_experts} is {float(quotas[r]):.3g} "
                    f"(weight {shown[r]:g} of total {float(total):g}); every rank "
                    "must own at least one expert, so raise its weight or use "
                    "fewer ranks"
                )
        return cls._from_counts(counts)

    @classmethod
    def from_map(
        cls, mapping: Any, num_experts: int, num_ranks: int
    ) -> "ExpertPlacement":
        """An explicit placement.

        ``mapping`` can be any of:

        * a sequence of owners, ``owners[e]`` being the rank of expert ``e``;
        * a dict ``{rank: [experts]}``;
        * a dict ``{expert: rank}``.

        Dict keys may be strings such as ``"0"`` (as JSON produces).

        Args:
            mapping: The placement in one of the forms above.
            num_experts (int): The number of experts; every expert must be
                placed exactly once.
            num_ranks (int): The number of ranks.

        Raises:
            ValueError: If an expert is missing, placed twice or unknown, a
                rank is out of range or owns no expert.
        """
        num_experts, num_ranks = _check_sizes(num_experts, num_ranks)

        if isinstance(mapping, ExpertPlacement):
            mapping = mapping.owners

        if _is_sequence(mapping):
            owners = list(mapping)
            if len(owners) != num_experts:
                if len(owners) < num_experts:
                    problem = (
                        f"experts {_format_runs(range(len(owners), num_experts))} "
                        "have no owner"
                    )
                else:
                    problem = (
                        f"experts {_format_runs(range(num_experts, len(owners)))} "
                        "are unknown"
                    )
                raise ValueError(
                    f"owners lists {len(owners)} experts but "
                    f"num_experts={num_experts}: {problem}"
                )
            return cls(owners, num_ranks)

        if not isinstance(mapping, Mapping):
            raise ValueError(
                "placement must be a list of owners, a {rank: [experts]} dict or "
                f"an {{expert: rank}} dict, got {type(mapping).__name__}"
            )
        if not mapping:
            raise ValueError("placement mapping is empty")

        values = list(mapping.values())
        if all(_is_sequence(v) for v in values):
            pairs = []
            seen_ranks = set()
            for key, experts in mapping.items():
                rank = _key_as_int(key, "rank")
                if not 0 <= rank < num_ranks:
                    raise ValueError(
                        f"rank {rank} is out of range for num_ranks={num_ranks} "
                        f"(valid ranks are 0..{num_ranks - 1})"
                    )
                if rank in seen_ranks:
                    raise ValueError(f"rank {rank} appears more than once")
                seen_ranks.add(rank)
                for e in experts:
                    pairs.append((_as_int(e, f"expert of rank {rank}"), rank))
        elif not any(_is_sequence(v) or isinstance(v, Mapping) for v in values):
            pairs = [
                (_key_as_int(k, "expert"), _as_int(v, f"owner of expert {k!r}"))
                for k, v in mapping.items()
            ]
        else:
            raise ValueError(
                "placement mapping values must be all lists of experts "
                "({rank: [experts]}) or all ranks ({expert: rank})"
            )

        owners = [None] * num_experts
        for expert, rank in pairs:
            if not 0 <= expert < num_experts:
                raise ValueError(
                    f"expert {expert} is out of range for num_experts={num_experts} "
                    f"(valid experts are 0..{num_experts - 1})"
                )
            if owners[expert] is not None:
                where = (
                    f"rank {rank} twice"
                    if owners[expert] == rank
                    else f"ranks {owners[expert]} and {rank}"
                )
                raise ValueError(
                    f"expert {expert} is placed more than once (on {where})"
                )
            owners[expert] = rank
        missing = [e for e, r in enumerate(owners) if r is None]
        if missing:
            noun = "expert" if len(missing) == 1 else "experts"
            verb = "is" if len(missing) == 1 else "are"
            raise ValueError(
                f"{noun} {_format_runs(missing)} {verb} not placed on any rank "
                f"(num_experts={num_experts}): every expert needs exactly one owner"
            )
        return cls(owners, num_ranks)

    @classmethod
    def from_json(
        cls,
        path_or_obj: Union[PathLike, Mapping[str, Any]],
        num_experts: int,
        num_ranks: int,
    ) -> "ExpertPlacement":
        """Reads a placement from a JSON file or an already parsed object.

        The JSON object has exactly one of the keys

        * ``"experts_per_rank"``: a list with one list of experts per rank,
          e.g. ``{"experts_per_rank": [[0, 1, 2], [3, 4], [5, 6, 7]]}``;
        * ``"owners"``: the owner rank of each expert,
          e.g. ``{"owners": [0, 0, 0, 1, 1, 2, 2, 2]}``;

        and optionally ``"num_experts"`` and ``"num_ranks"``, which must then
        match the arguments.

        Args:
            path_or_obj: A path to a JSON file, a JSON string (starting with
                ``{``, e.g. the output of :meth:`to_json`) or a parsed dict.
            num_experts (int): The number of experts of the model.
            num_ranks (int): The number of ranks.

        Raises:
            ValueError: If the file cannot be read, is not valid JSON or does
                not describe a valid placement. The message names the file.
        """
        if isinstance(path_or_obj, Mapping):
            source, obj = "placement", path_or_obj
        elif isinstance(path_or_obj, str) and path_or_obj.lstrip().startswith("{"):
            source = "placement JSON"
            try:
                obj = json.loads(path_or_obj)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}: invalid JSON: {e}") from None
        elif isinstance(path_or_obj, (str, os.PathLike)):
            path = os.fspath(path_or_obj)
            source = f"placement file {path!r}"
            try:
                with open(path, "r", encoding="utf-8") as f:
                    text = f.read()
            except FileNotFoundError:
                raise ValueError(f"{source}: file not found") from None
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{source}: cannot be read: {e}") from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}: invalid JSON: {e}") from None
        else:
            raise ValueError(
                "placement must be a path to a JSON file or a dict, got "
                f"{type(path_or_obj).__name__}"
            )

        try:
            return cls._from_json_obj(obj, num_experts, num_ranks)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def _from_json_obj(
        cls, obj: Any, num_experts: int, num_ranks: int
    ) -> "ExpertPlacement":
        if not isinstance(obj, Mapping):
            raise ValueError(
                "expected a JSON object with key 'experts_per_rank' or 'owners', "
                f"got {type(obj).__name__}"
            )
        allowed = {"experts_per_rank", "owners", "num_experts", "num_ranks"}
        unknown = sorted(str(k) for k in obj if k not in allowed)
        if unknown:
            raise ValueError(
                f"unknown keys {unknown}; allowed keys are {sorted(allowed)}"
            )
        for key, expected in (("num_experts", num_experts), ("num_ranks", num_ranks)):
            if key in obj and obj[key] != expected:
                raise ValueError(
                    f"the file is for {key}={obj[key]!r} but {key}={expected}"
                )
        has_lists = "experts_per_rank" in obj
        if has_lists == ("owners" in obj):
            raise ValueError(
                "expected exactly one of the keys 'experts_per_rank' and 'owners'"
            )
        if "owners" in obj:
            if not isinstance(obj["owners"], list):
                raise ValueError(
                    "'owners' must be a list of ranks, one per expert, got "
                    f"{type(obj['owners']).__name__}"
                )
            return cls.from_map(obj["owners"], num_experts, num_ranks)

        lists = obj["experts_per_rank"]
        if isinstance(lists, Mapping):
            return cls.from_map(lists, num_experts, num_ranks)
        if not isinstance(lists, list) or not all(isinstance(x, list) for x in lists):
            raise ValueError(
                "'experts_per_rank' must be a list with one list of experts per rank"
            )
        if len(lists) != num_ranks:
            raise ValueError(
                f"'experts_per_rank' lists {len(lists)} ranks but num_ranks={num_ranks}"
            )
        return cls.from_map(dict(enumerate(lists)), num_experts, num_ranks)

    @classmethod
    def create(
        cls,
        num_experts: int,
        num_ranks: int,
        strategy: Union[str, "os.PathLike[str]"] = "contiguous",
        weights: Optional[Sequence[float]] = None,
    ) -> "ExpertPlacement":
        """Builds a placement from command-line style options.

        Args:
            num_experts (int): The number of experts per MoE layer.
            num_ranks (int): The number of ranks.
            strategy (str): ``"contiguous"`` (default), ``"round-robin"`` or a
                path to a JSON placement file (see :meth:`from_json`).
            weights (Sequence[float], optional): Per-rank weights for uneven
                contiguous blocks (see :meth:`weighted`). Must have
                ``num_ranks`` entries. Only valid with ``"contiguous"``.
        """
        num_experts, num_ranks = _check_sizes(num_experts, num_ranks)
        name = strategy if isinstance(strategy, str) else None
        if name is not None:
            name = name.strip()
        if name is not None and name.lower().replace("_", "-") in (
            "contiguous",
            "round-robin",
        ):
            name = name.lower().replace("_", "-")
        else:
            path = os.fspath(strategy)
            looks_like_path = (
                os.path.exists(path)
                or path.lower().endswith(".json")
                or os.sep in path
                or (os.altsep is not None and os.altsep in path)
            )
            if not looks_like_path:
                raise ValueError(
                    f"unknown placement strategy {strategy!r}: expected "
                    "'contiguous', 'round-robin' or a path to a JSON placement file"
                )
            name = None

        if weights is not None:
            if name != "contiguous":
                raise ValueError(
                    "weights can only be used with strategy='contiguous', "
                    f"got strategy={strategy!r}"
                )
            if not _is_sequence(weights):
                raise ValueError(
                    f"weights must be a sequence of numbers, got {type(weights).__name__}"
                )
            if len(weights) != num_ranks:
                raise ValueError(
                    f"got {len(weights)} weights for num_ranks={num_ranks}: "
                    "need exactly one weight per rank"
                )
            return cls.weighted(num_experts, weights)
        if name == "contiguous":
            return cls.contiguous(num_experts, num_ranks)
        if name == "round-robin":
            return cls.round_robin(num_experts, num_ranks)
        return cls.from_json(strategy, num_experts, num_ranks)

    @classmethod
    def _from_counts(cls, counts: Sequence[int]) -> "ExpertPlacement":
        """Contiguous blocks of the given sizes, in rank order."""
        owners = []
        for rank, count in enumerate(counts):
            owners.extend([rank] * count)
        return cls(owners, len(counts))

    # ------------------------------------------------------------------
    # Queries
    # ------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        """The number of experts."""
        return len(self.owners)

    @property
    def counts(self) -> Tuple[int, ...]:
        """The number of experts owned by each rank."""
        return tuple(len(x) for x in self._local)

    def _check_rank(self, rank: int) -> int:
        rank = _as_int(rank, "rank")
        if not 0 <= rank < self.num_ranks:
            raise ValueError(
                f"rank {rank} is out of range for num_ranks={self.num_ranks} "
                f"(valid ranks are 0..{self.num_ranks - 1})"
            )
        return rank

    def _check_expert(self, expert: int) -> int:
        expert = _as_int(expert, "expert")
        if not 0 <= expert < self.num_experts:
            raise ValueError(
                f"expert {expert} is out of range for num_experts={self.num_experts} "
                f"(valid experts are 0..{self.num_experts - 1})"
            )
        return expert

    def local_experts(self, rank: int) -> Tuple[int, ...]:
        """The experts owned by ``rank``, in ascending order."""
        return self._local[self._check_rank(rank)]

    def owner(self, expert: int) -> int:
        """The rank that owns ``expert``."""
        return self.owners[self._check_expert(expert)]

    def local_index(self, expert: int) -> int:
        """The position of ``expert`` in ``local_experts(owner(expert))``.

        This is the index of the expert's weights in the stacked expert
        weights of its owner rank.
        """
        expert = self._check_expert(expert)
        return self._local[self.owners[expert]].index(expert)

    def table(self) -> str:
        """A human-readable description, one line per rank.

        Example::

            10 experts on 3 ranks
              rank 0: 4 experts: 0-3
              rank 1: 3 experts: 4-6
              rank 2: 3 experts: 7-9
        """
        width = len(str(self.num_ranks - 1))
        lines = [
            f"{self.num_experts} expert{'s' if self.num_experts != 1 else ''} on "
            f"{self.num_ranks} rank{'s' if self.num_ranks != 1 else ''}"
        ]
        for rank, experts in enumerate(self._local):
            n = len(experts)
            lines.append(
                f"  rank {rank:>{width}}: {n} expert{'s' if n != 1 else ''}: "
                f"{_format_runs(experts)}"
            )
        return "\n".join(lines)

    def to_json(self, path: Optional[PathLike] = None) -> str:
        """The placement as JSON, one line per rank.

        The output uses the ``{"experts_per_rank": [...]}`` format read by
        :meth:`from_json`.

        Args:
            path (str, optional): If given, also write the JSON to this file.

        Returns:
            str: The JSON text.
        """
        rows = ",\n".join(
            "    [" + ", ".join(map(str, experts)) + "]" for experts in self._local
        )
        text = '{\n  "experts_per_rank": [\n' + rows + "\n  ]\n}\n"
        if path is not None:
            with open(os.fspath(path), "w", encoding="utf-8") as f:
                f.write(text)
        return text
