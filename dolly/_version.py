"""Dolly's version, one place: the package's ``__version__`` and the agent image's tag read it."""
__version__ = "0.1.0"
# The distribution's name (`pip install dolly-checkpoint`): "dolly" on PyPI is another project.
# The package it installs is `dolly`.
DISTRIBUTION = "dolly-checkpoint"
