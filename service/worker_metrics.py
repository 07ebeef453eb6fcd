"""One ``/metrics`` for all worker processes of a replica.

Each worker writes its own exposition to ``<dir>/worker-<i>.prom`` every second (and at exit);
whichever worker answers ``/metrics`` merges every file: counters, histograms and most gauges
are summed over the workers, while state gauges (stale, drift, the active codebook) take the
largest value, so Prometheus sees one replica whatever process it reached.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

# Gauges that describe the replica's state rather than add up over workers.
_MAX_FAMILIES = frozenset(
    {"esans_codebook_stale", "esans_catalogue_drift", "esans_active_codebook_info"}
)
_WRITE_INTERVAL_S = 1.0


def merge_expositions(texts: list[str]) -> bytes:
    """The Prometheus text exposition of several processes' expositions, merged."""
    order: list[str] = []
    headers: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created"):
                continue  # a timestamp per process: no single value for the replica
            if family.name not in headers:
                order.append(family.name)
                headers[family.name] = (family.documentation, family.type)
                values[family.name] = {}
            merged = values[family.name]
            largest = family.name in _MAX_FAMILIES
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in merged:
                    merged[key] = sample.value
                elif largest:
                    merged[key] = max(merged[key], sample.value)
                else:
                    merged[key] += sample.value
    lines: list[str] = []
    for name in order:
        documentation, kind = headers[name]
        escaped = documentation.replace("\\", "\\\\").replace("\n", "\\n")
        # As prometheus_client writes them: a counter's family is named after its samples.
        exposed = f"{name}_total" if kind == "counter" else name
        lines += [f"# HELP {exposed} {escaped}", f"# TYPE {exposed} {kind}"]
        for (sample_name, labels), value in values[name].items():
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{label_text}}} {value!r}" if labels
                         else f"{sample_name} {value!r}")  # fmt: skip
    return ("\n".join(lines) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def read_all(directory: Path) -> bytes:
    """The merged exposition of every worker file in ``directory``."""
    texts = []
    for path in sorted(directory.glob("worker-*.prom")):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except OSError:
            continue  # a worker replacing its file right now: its next write counts
    return merge_expositions(texts)


class ExpositionWriter:
    """Writes ``render()`` to ``path`` every second from a daemon thread, atomically."""

    def __init__(self, path: Path, render: Callable[[], bytes]) -> None:
        self._path, self._render = path, render
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="esans-metrics-file", daemon=True)

    def start(self) -> ExpositionWriter:
        self.write()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.write()

    def write(self) -> None:
        temporary = self._path.with_suffix(f".tmp-{os.getpid()}")
        try:
            temporary.write_bytes(self._render())
            os.replace(temporary, self._path)
        except OSError as exc:
            logger.warning("cannot write worker metrics to %s: %s", self._path, exc)

    def _run(self) -> None:
        while not self._stop.wait(_WRITE_INTERVAL_S):
            self.write()
