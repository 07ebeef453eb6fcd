"""What every method of the evaluation gets: steps, epochs, model and sampling settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """What every method gets. An epoch is one pass over the training examples, or
    ``max_steps`` steps when that is smaller; training stops after ``patience`` epochs
    without a better validation Recall@50, or at ``epochs``."""

    epochs: int = 20
    patience: int = 2
    batch_size: int = 512
    learning_rate: float = 1e-3
    history: int = 20
    max_steps: int | None = None
    seeds: int = 3
    temperature: float = 0.05
    dim: int = 64
    m_c: int = 2
    m_o: int = 5
    hard_lambda: float = 0.1
    eta: float = 0.6
    msac_epochs: int = 20
    msac_dim: int = 64
    sweep_kp: tuple[int, ...] = (16, 32, 64)
    sweep_ks: tuple[int, ...] = (4, 8)
    trial_epochs: int = 2
    max_users: int | None = None
    text_encoder: str = "minilm"
    threads: int | None = 1
    """torch threads of the trainer; 1 leaves the other core to the in-process service
    (2 threads on 2 cores oversubscribe and make a step 10x slower)."""
    per_positive_table: bool = True
    """Also train UNS, ESANS (paper) and ESANS (default) per positive (secondary table)."""
