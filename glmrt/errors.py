"""Every error glmrt raises on purpose derives from GlmrtError and reads as one line naming
the file, key or value at fault. The CLI prints these without a traceback."""


class GlmrtError(Exception):
    """Base of all glmrt errors."""


class ConfigError(GlmrtError):
    """config.json is missing, malformed, for another architecture, or lacks a required key."""


class CheckpointError(GlmrtError):
    """A checkpoint's shards, index or tensors do not match what the config says."""


class ArtifactError(GlmrtError):
    """An exported model folder or engine is missing, corrupted or incompatible."""


class InputError(GlmrtError, ValueError):
    """A prompt, message list or sampling parameter is not acceptable."""


class ContextOverflowError(InputError):
    """A prompt does not fit the model's context. The message names the Python keyword
    (truncate=True); `cli_message()` names the CLI's --truncate flag instead."""

    def __init__(self, what: str, tokens: int, context: int):
        self.what, self.tokens, self.context = what, tokens, context
        super().__init__(self._say("pass truncate=True to drop the oldest"))

    def _say(self, remedy: str) -> str:
        return f"{self.what} of {self.tokens} tokens is longer than the model's context ({self.context}); {remedy}"

    def cli_message(self) -> str:
        return self._say("run with --truncate to drop the oldest turns")


class TruncationWarning(UserWarning):
    """truncate=True dropped messages or cut a message to fit the context (the CLI prints it)."""


class QueueFullError(GlmrtError):
    """A loaded model's request queue is full (glmrt.load(..., slots=N, max_queue=M)): every
    slot is busy and M requests already wait. Try again later (a server answers 429)."""
