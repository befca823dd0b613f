"""glmrt: a compiled edge runtime for the GLM-4-0414 family (GLM-4-9B/32B-0414, GLM-Z1).

    m = glmrt.load("model-folder")       # made by `glmrt export`
    m.chat([{"role": "user", "content": "Hi"}])

Importing glmrt pulls in numpy only; onnxruntime and tokenizers load with a model.
"""
__version__ = "0.1.0"

from .errors import ArtifactError, CheckpointError, ConfigError, GlmrtError, InputError  # noqa: E402,F401


from .reply import parse_reply  # noqa: E402,F401  (pure: usable without a model)
from .sampling import SamplingParams  # noqa: E402,F401


def load(path, **kwargs):
    """Load an exported model folder. See glmrt.model.Model for the keyword arguments."""
    from .model import Model
    return Model(path, **kwargs)
