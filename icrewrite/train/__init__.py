"""Fine-tuning (``loop``: one process or torchrun + DDP, resumable), data loaders (``data``),
seeded paired comparisons of variants (``compare``, with the statistics in ``significance``)
and evaluation with calibration and Monte-Carlo-dropout uncertainty (``validate``). Needs
``pip install 'icrewrite[train]'`` for the plots and the bundled digits data."""
from __future__ import annotations

from .loop import FinetuneConfig, FinetuneResult, finetune

__all__ = ["finetune", "FinetuneConfig", "FinetuneResult"]
