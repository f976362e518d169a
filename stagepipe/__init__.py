"""stagepipe: resumable, distributable SVD-family compression of causal language models."""

__version__ = "0.1.0"
