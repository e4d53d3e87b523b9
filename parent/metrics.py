"""Prometheus metrics of the parent, in the text exposition format, written by hand.

Only counts, sizes, durations and states: never content. Label values come from fixed sets chosen
by the code (route names, status codes, enclave states), never from a request (a path, a header, a
body), so a hostile client can neither inject text into the exposition nor grow it without bound.

Format: Prometheus text exposition 0.0.4 (``# HELP``, ``# TYPE``, one sample per line; histograms
as cumulative ``_bucket{le=…}`` series with ``+Inf``, ``_sum`` and ``_count``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Final

__all__ = [
    "CONTENT_TYPE",
    "LATENCY_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Labels = tuple[str, ...]
Sample = tuple[dict[str, str], float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _label_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"metric name {name!r} is not a Prometheus name")
        for label in labels:
            if not _LABEL.fullmatch(label) or label.startswith("__") or label == "le":
                raise ValueError(f"label name {label!r} is not allowed")
        self.name = name
        self.help = help_text
        self.labels = tuple(labels)

    def _key(self, labels: dict[str, str]) -> Labels:
        if labels.keys() != set(self.labels):
            raise ValueError(f"{self.name} takes labels {', '.join(self.labels) or '(none)'}")
        return tuple(str(labels[name]) for name in self.labels)

    def header(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A value that only goes up (requests, bytes)."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0)

    def lines(self) -> list[str]:
        return [
            f"{self.name}{_label_text(self.labels, key)} {_format_value(value)}"
            for key, value in sorted(self._values.items())
        ]


class Gauge(_Metric):
    """A value that goes up and down (requests in flight, enclave state)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[Labels, float] = {}

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = value

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0) + amount

    def dec(self, amount: float = 1, **labels: str) -> None:
        self.inc(-amount, **labels)

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0)

    def lines(self) -> list[str]:
        return [
            f"{self.name}{_label_text(self.labels, key)} {_format_value(value)}"
            for key, value in sorted(self._values.items())
        ]


class Histogram(_Metric):
    """Observations in cumulative buckets (latencies)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labels)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or len(set(bounds)) != len(bounds) or not all(map(math.isfinite, bounds)):
            raise ValueError("histogram buckets must be distinct finite numbers")
        self.buckets = tuple(bounds)
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                counts[index] += 1
                break
        else:
            counts[-1] += 1
        self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        return sum(self._counts.get(self._key(labels), ()))

    def lines(self) -> list[str]:
        out: list[str] = []
        for key, counts in sorted(self._counts.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += count
                le = f'le="{_format_value(bound)}"'
                out.append(f"{self.name}_bucket{_label_text(self.labels, key, le)} {cumulative}")
            labels = _label_text(self.labels, key)
            out.append(f"{self.name}_sum{labels} {_format_value(self._sums[key])}")
            out.append(f"{self.name}_count{labels} {cumulative}")
        return out


class _Callback(_Metric):
    """A family whose samples are read from elsewhere at render time (a relay's counters)."""

    def __init__(
        self,
        name: str,
        help_text: str,
        kind: str,
        labels: Sequence[str],
        read: Callable[[], Iterable[Sample]],
    ) -> None:
        super().__init__(name, help_text, labels)
        if kind not in ("counter", "gauge"):
            raise ValueError("a callback metric is a counter or a gauge")
        self.kind = kind
        self._read = read

    def lines(self) -> list[str]:
        return [
            f"{self.name}{_label_text(self.labels, self._key(labels))} {_format_value(value)}"
            for labels, value in self._read()
        ]


class Registry:
    """The metric families of one process, rendered together for ``GET /metrics``."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help_text, labels)
        self._add(metric)
        return metric

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        metric = Gauge(name, help_text, labels)
        self._add(metric)
        return metric

    def histogram(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        metric = Histogram(name, help_text, labels, buckets)
        self._add(metric)
        return metric

    def callback(
        self,
        name: str,
        help_text: str,
        kind: str,
        read: Callable[[], Iterable[Sample]],
        labels: Sequence[str] = (),
    ) -> None:
        """Register a family read at render time: ``read()`` yields ``(labels, value)`` pairs."""
        self._add(_Callback(name, help_text, kind, labels, read))

    def render(self) -> str:
        """The exposition text of every family, in registration order."""
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.header())
            lines.extend(metric.lines())
        return "\n".join(lines) + "\n"
