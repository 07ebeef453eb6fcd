"""What a run and an experiment produce, and the progress file that lets them resume."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esans_eval.budget import Budget


@dataclass
class EpochStats:
    valid: dict[int, float]
    user_item_share: float  # visible real negatives that are the row's user's training items
    coverage: float  # distinct items used as negatives / catalogue
    popularity_percentile: float  # mean popularity percentile of the negatives (uniform 0.5)
    steps: int
    seconds: float


@dataclass
class RunResult:
    method: str
    seed: int
    epochs: list[EpochStats]
    best_epoch: int  # 1-based
    valid: dict[int, float]
    test: dict[int, float]
    test_cold: dict[int, float]
    hard_fill: float
    seconds: float
    steps: int
    protocol: str = "shared"

    @property
    def best(self) -> EpochStats:
        return self.epochs[self.best_epoch - 1]


def _by_k(values: dict[Any, Any]) -> dict[int, float]:
    return {int(k): (math.nan if v is None else float(v)) for k, v in values.items()}


def run_from_dict(raw: dict[str, Any]) -> RunResult:
    """A :class:`RunResult` back from ``dataclasses.asdict`` after a JSON round trip."""
    epochs = [EpochStats(**{**e, "valid": _by_k(e["valid"])}) for e in raw["epochs"]]
    return RunResult(
        **{
            **raw,
            "epochs": epochs,
            "valid": _by_k(raw["valid"]),
            "test": _by_k(raw["test"]),
            "test_cold": _by_k(raw["test_cold"]),
            "hard_fill": math.nan if raw["hard_fill"] is None else raw["hard_fill"],
        }
    )


def jsonable(value: Any) -> Any:
    """``value`` with NaN / inf as None and tuples as lists: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return jsonable(value.item())
    return value


class ProgressMismatch(RuntimeError):
    """A progress file written with another budget."""


class Progress:
    """Finished trials and runs, one JSON line each, so that an interrupted evaluation
    resumes where it stopped (same budget: the first line records it; a file of another
    budget is refused, never overwritten). ``path`` None: nothing is kept.

    ``features`` is the digest of the prepared features; each line records it, and a line
    recorded on other features is not reused (it is retrained), so that one table never mixes
    runs trained on different inputs. Lines from before digests were recorded are reused."""

    def __init__(
        self, path: str | Path | None, budget: Budget, features: str | None = None
    ) -> None:
        self.path = None if path is None else Path(path)
        self.features = features
        self.done: dict[str, dict[str, Any]] = {}
        self.stale = 0
        """Lines of the file recorded on other features (not reused)."""
        if self.path is None:
            return
        lines = self.check(self.path, budget)
        if lines:
            for line in lines[1:]:
                recorded = line.get("features")
                if recorded is None or features is None or recorded == features:
                    self.done[line["key"]] = line["value"]
                else:
                    self.stale += 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"budget": jsonable(asdict(budget))}) + "\n")

    @staticmethod
    def check(path: str | Path, budget: Budget) -> list[dict[str, Any]]:
        """The lines of the progress file at ``path`` ([] when there is none yet). Raises
        :class:`ProgressMismatch` when it was written with another budget: its runs cannot be
        reused, and starting over would throw hours of them away."""
        path = Path(path)
        if not path.is_file():
            return []
        try:
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        except ValueError as exc:
            raise ProgressMismatch(f"{path} is not a progress file: {exc}") from exc
        stamp = jsonable(asdict(budget))
        recorded = lines[0].get("budget") if lines else stamp
        if recorded != stamp:
            differ = sorted(
                k
                for k in set(stamp) | set(recorded or {})
                if (recorded or {}).get(k) != stamp.get(k)
            )
            raise ProgressMismatch(
                f"{path} holds runs of another budget (differs in: {', '.join(differ)}); "
                "give this evaluation its own --progress (or --out), or delete that file"
            )
        return lines

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.done[key] = value
        if self.path is not None:
            line: dict[str, Any] = {"key": key, "value": jsonable(value)}
            if self.features is not None:
                line["features"] = self.features
            with self.path.open("a") as handle:
                handle.write(json.dumps(line) + "\n")


@dataclass
class ExperimentResult:
    dataset: dict[str, Any]
    budget: dict[str, Any]
    split: dict[str, Any]
    tuning: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, str] = field(default_factory=dict)
    kp_ks: tuple[int, int] = (0, 0)
    codebooks: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    methods: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, dict[Any, float]] = field(default_factory=dict)
    """Rankers without training, e.g. by training popularity: a floor for every model."""
