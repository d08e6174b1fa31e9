"""AsyncAPY: serve APIs over raw TCP with trio, speaking AsyncAProto 22.

The names of AsyncAPY 0.5 are here: ``Server``, ``Client`` (the handler's view of a
peer, :class:`asyncapy.core.Client`) and ``Packet``. The bundled network client is
:class:`asyncapy.client.Client` (blocking) and :class:`asyncapy.client.AsyncClient`.

The pure protocol core is installed as :mod:`asyncapy.domain` and the bundled store
adapters as :mod:`asyncapy.adapters` (the repository keeps them as top-level folders).
The names below are imported on first use (PEP 562), so that ``import
asyncapy.domain.connection`` runs without trio, as the core promises.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.6.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Client": "asyncapy.core",
    "Handler": "asyncapy.core",
    "Packet": "asyncapy.core",
    "Session": "asyncapy.core",
    "StopPropagation": "asyncapy.errors",
    "Filter": "asyncapy.filters",
    "Filters": "asyncapy.filters",
    "Server": "asyncapy.server",
    "APIKeyFactory": "asyncapy.util",
}

__all__ = [
    "Server",
    "Client",
    "Packet",
    "Handler",
    "Session",
    "Filter",
    "Filters",
    "StopPropagation",
    "APIKeyFactory",
    "__version__",
]

if TYPE_CHECKING:  # what editors and type checkers see
    from .core import Client, Handler, Packet, Session
    from .errors import StopPropagation
    from .filters import Filter, Filters
    from .server import Server
    from .util import APIKeyFactory


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use and cache the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncapy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
