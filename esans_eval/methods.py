"""The methods of the evaluation and the validation trials each gets (the same number)."""

from __future__ import annotations

from typing import Any

from esans_eval.negatives import BEHAVIOUR_ONLY, GLOBAL_SECONDARY, Method

SERVICE_PNS_ALPHA = 0.75
"""The exponent the service's PNS sampler applies to (count + 1); other exponents are served
from an artifact whose counts are pre-warped (see :func:`popularity_artifact`)."""

ESANS_PAPER = Method("ESANS (paper)", "esans", role="paper", m_h=5, use_edis=True)

METHODS: tuple[Method, ...] = (
    Method("UNS", "uniform"),
    Method("PNS", "popularity", pns_alpha=SERVICE_PNS_ALPHA),
    Method("debiased MNS", "uniform", in_batch=True, log_q=True),
    Method("in-batch + log-q", None, in_batch=True, log_q=True),
    ESANS_PAPER,
    Method(
        "ESANS (default)",
        "esans",
        role="default",
        m_h=5,
        use_edis=True,
        log_q=True,
        mask_history=True,
    ),
    Method("ESANS w/o EDIS", "esans", role="ablation", m_h=5),
    Method("ESANS w/o secondary codebook", "esans", role="ablation", use_edis=True),
    Method(
        "ESANS w/o multimodal",
        "esans",
        role="ablation",
        codebook=BEHAVIOUR_ONLY,
        m_h=5,
        use_edis=True,
    ),
    Method(
        "ESANS global secondary",
        "esans",
        role="ablation",
        codebook=GLOBAL_SECONDARY,
        m_h=5,
        use_edis=True,
    ),
)
"""The main table's methods, ablations (of the paper's ESANS) last."""

TUNING: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "PNS": (
        ("alpha 0.25", {"pns_alpha": 0.25}),
        ("alpha 0.5", {"pns_alpha": 0.5}),
        ("alpha 1.0", {"pns_alpha": 1.0}),
    ),
    "debiased MNS": (
        ("2 uniform", {"per_positive": 2}),
        ("5 uniform", {"per_positive": 5}),
        ("10 uniform", {"per_positive": 10}),
    ),
    "in-batch + log-q": (
        ("log-q", {}),
        ("+ user's items masked", {"mask_history": True}),
        ("no log-q", {"log_q": False}),
    ),
    "UNS": (
        ("10 uniform", {}),
        ("+ user's items masked", {"mask_history": True}),
        ("20 uniform", {"per_positive": 20}),
    ),
}
"""Three validation trials per baseline, on the knob a trainer would turn; ESANS (paper)
spends its three on K_p / K_s, the default on its levers (see :data:`DEFAULT_LEVERS`)."""

DEFAULT_LEVERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("log-q + user's items masked", {}),
    (
        "in-batch softmax + ESANS hard negatives",
        {"in_batch": True, "simple_negatives": False, "correct_drawn": False},
    ),
    (
        "in-batch softmax + each row's own ESANS hard negatives",
        {"in_batch": True, "simple_negatives": False, "correct_drawn": False, "shared": False},
    ),
)
"""The product default's validation trials: levers over paper ESANS that the issue names."""
