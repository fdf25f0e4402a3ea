"""lowdose-toolkit: recover standard-dose PET from low-dose PET, one plugin at a time."""

from lowdose_toolkit.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
