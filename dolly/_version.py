"""Dolly's version, one place: the package's ``__version__`` and the agent image's tag read it."""
__version__ = "0.1.0"
