"""Hook specifications: how a plugin adds parts to the toolkit.

Every hook receives a ``register(name, factory)`` callback. ``factory`` is a class or function whose
keyword arguments are what a recipe may set; its signature is checked before anything is built.

Example (a complete third-party plugin module)::

    from lowdose_toolkit import hookimpl

    @hookimpl
    def ldt_register_heads(register):
        register("edge_head", EdgeHead)
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "lowdose_toolkit"
ENTRY_POINT_GROUP = "lowdose_toolkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, Callable[..., object]], None]


@hookspec
def ldt_register_generators(register: Register) -> None:
    """Register generators: image-to-image networks mapping low-dose to full-dose volumes."""


@hookspec
def ldt_register_heads(register: Register) -> None:
    """Register auxiliary heads that read a named generator feature and predict a target."""


@hookspec
def ldt_register_refiners(register: Register) -> None:
    """Register refiners: networks that refine the generator's coarse output."""


@hookspec
def ldt_register_discriminators(register: Register) -> None:
    """Register discriminators for adversarial training."""


@hookspec
def ldt_register_guidances(register: Register) -> None:
    """Register guidance: parts that turn a dose head's prediction into a conditioning of the generator."""


@hookspec
def ldt_register_losses(register: Register) -> None:
    """Register loss terms."""


@hookspec
def ldt_register_schemes(register: Register) -> None:
    """Register training schemes (the training algorithm: supervised, paired GAN, ...)."""


@hookspec
def ldt_register_sources(register: Register) -> None:
    """Register data sources that list subjects (full-dose + low-dose files)."""


@hookspec
def ldt_register_loggers(register: Register) -> None:
    """Register loggers: where a training run reports each epoch (metrics.jsonl, TensorBoard, MLflow, ...)."""
