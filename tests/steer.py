"""Steering a real model's output for tests: a logits processor that forces the tokens of a
scripted reply chosen from the prompt, through the real runtime (nothing is mocked)."""
import numpy as np


class Script:
    """reply_for(prompt_text) -> the reply text to force, ending with a stop token's text."""

    def __init__(self, tokenizer, reply_for):
        self.tok, self.reply_for = tokenizer, reply_for
        self.start, self.last, self.forced = None, -1, []
        self.prompts = []

    def __call__(self, ids, logits):
        if len(ids) != self.last + 1:                       # a new generation began
            self.start = len(ids)
            prompt = self.tok.decode(ids, skip_special=False)
            self.prompts.append(prompt)
            self.forced = self.tok.encode(self.reply_for(prompt))
        self.last = len(ids)
        k = len(ids) - self.start
        out = np.full_like(logits, -np.inf)
        out[self.forced[min(k, len(self.forced) - 1)]] = 0.0
        return out
