"""`glmrt eval`: perplexity of a text under a model, through Model.logits, in windows."""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError


def window_nll(logits: np.ndarray, ids) -> float:
    """logits (n, V) of a window of n token ids -> the summed negative log-likelihood of ids[1:]
    (position i predicts id i + 1; the last position predicts nothing)."""
    lg = np.asarray(logits, np.float64)[:-1]                                 # (n-1, V)
    logz = lg.max(-1) + np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1))
    return float((logz - lg[np.arange(len(ids) - 1), ids[1:]]).sum())


def perplexity(model, text: str, window: int = 512) -> dict:
    """exp(mean negative log-likelihood) of every token after the first of each window.
    Windows do not overlap: each starts with no context, as a scoring run of that length.
    A window longer than the model's context is cut to it ("window" says what was used,
    "window_asked" what was asked)."""
    ids = model.tokenizer.encode(text)
    asked = window
    window = min(window, model.max_context)
    if window < 2 or len(ids) < 2:
        raise InputError("perplexity needs a window of at least 2 tokens and a text of 2 or more tokens")
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        nll += window_nll(model.logits(chunk), chunk)
        count += len(chunk) - 1
    return {"perplexity": math.exp(nll / count), "tokens": count, "window": window,
            "window_asked": asked, "vocab_size": model.config.vocab_size}
