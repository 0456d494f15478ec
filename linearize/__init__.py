"""linearize: replace the most linear transformer blocks by fitted linear maps.

Heavy imports (torch, transformers) happen inside the functions that need them, so
`import linearize` and `linearize --help` stay fast.
"""

from linearize.errors import LinearizeError

__version__ = "0.1.0"
__all__ = ["LinearizeError", "__version__", "load"]


def load(path, **kwargs):
    """Load a checkpoint saved by linearize, in either format (see linearize.checkpoint.load)."""
    from linearize.checkpoint import load as _load

    return _load(path, **kwargs)
