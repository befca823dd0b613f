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
