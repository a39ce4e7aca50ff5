"""``python -m dolly``: the ``dolly`` command (:mod:`dolly.cli`)."""
from .cli import main

main()
