"""Which policies this operator replica runs: its shard.

Policies are split between releases or replicas with Kubernetes' own means
(docs/scale-out.md): the namespaces a release watches, a label selector on
the InferencePolicy objects (`policy_selector`, kubectl's syntax), and a hash
split (`shard_count` / `shard_index`) for one release of N shards. A policy
belongs to exactly one shard of a split: CRC-32 of `<namespace>/<name>`
modulo the shard count, stable across restarts and the same in every
replica, so a follower taking over a shard takes over exactly its policies.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from batchpilot.operator.spec import LabelSelector, Requirement

# A label key (optional DNS-subdomain prefix, then a name) and a label value,
# as the API server accepts them.
_KEY = r"(?:[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET_RE = re.compile(rf"\s*({_KEY})\s+(in|notin)\s+\(([^()]*)\)\s*\Z")
_EQUALITY_RE = re.compile(rf"\s*({_KEY})\s*(==|=|!=)\s*({_VALUE})\s*\Z")
_EXISTS_RE = re.compile(rf"\s*(!?)\s*({_KEY})\s*\Z")
_VALUE_RE = re.compile(_VALUE)


def parse_label_selector(text: str) -> LabelSelector:
    """kubectl's `-l` syntax (`a=b,c!=d,e in (x,y),!f`) as a LabelSelector.

    An empty string selects everything. Raises ValueError naming the bad term.
    """
    labels: dict[str, str] = {}
    requirements: list[Requirement] = []
    for term in _terms(text):
        if (found := _SET_RE.match(term)) is not None:
            values = frozenset(v.strip() for v in found.group(3).split(","))
            if not all(values) or not all(_VALUE_RE.fullmatch(v) for v in values):
                raise ValueError(f"{term.strip()!r}: the values in (...) must be label values")
            operator = "In" if found.group(2) == "in" else "NotIn"
            requirements.append(Requirement(found.group(1), operator, values))
        elif (found := _EQUALITY_RE.match(term)) is not None:
            key, operator, value = found.group(1), found.group(2), found.group(3)
            if operator == "!=":
                requirements.append(Requirement(key, "NotIn", frozenset((value,))))
            else:
                labels[key] = value
        elif (found := _EXISTS_RE.match(term)) is not None:
            operator = "DoesNotExist" if found.group(1) else "Exists"
            requirements.append(Requirement(found.group(2), operator, frozenset()))
        else:
            raise ValueError(
                f"{term.strip()!r} is not a label requirement; write key=value, key!=value, "
                "key in (a,b), key notin (a,b), key or !key, separated by commas"
            )
    return LabelSelector(labels, tuple(requirements))


def _terms(text: str) -> list[str]:
    """Split on the commas that are not inside `( ... )`."""
    terms, depth, start = [], 0, 0
    for position, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(text[start:position])
            start = position + 1
    terms.append(text[start:])
    return [] if not text.strip() else terms


def shard_of(namespace: str, name: str, shard_count: int) -> int:
    return zlib.crc32(f"{namespace}/{name}".encode()) % shard_count


@dataclass(frozen=True, slots=True)
class Shard:
    """This replica's share of the policies."""

    index: int
    count: int
    selector: LabelSelector

    @classmethod
    def from_settings(cls, index: int, count: int, selector: str) -> Shard:
        return cls(index, count, parse_label_selector(selector))

    def owns(self, namespace: str, name: str, labels: Mapping[str, str]) -> bool:
        if self.count > 1 and shard_of(namespace, name, self.count) != self.index:
            return False
        return self.selector.matches(labels)
