"""The ``ldt`` command line: one module per command, registered in one table (:mod:`lowdose_toolkit.cli.app`)."""

from lowdose_toolkit.cli.app import app, main

__all__ = ["app", "main"]
