"""Evaluation: RULER-style long-context tasks (``long_context``) and perplexity by position (``perplexity``)."""

from lcjax.eval.long_context import (RULER_PRESETS, TASKS, Sample, make_sample, make_samples, score,
                                     string_match_all, string_match_part)  # fmt: skip
from lcjax.eval.perplexity import PositionPerplexity, perplexity_by_position, token_nll

__all__ = ["RULER_PRESETS", "TASKS", "Sample", "make_sample", "make_samples", "score", "string_match_all",
           "string_match_part", "PositionPerplexity", "perplexity_by_position", "token_nll"]
