"""Offline evaluation of the sampler service on real data (Recall@K of a two-tower model).

Not imported by ``esans_sampler`` or ``esans_service``. Run ``python -m esans_eval --help``.
"""
