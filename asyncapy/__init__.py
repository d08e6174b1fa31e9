"""AsyncAPY: serve APIs over raw TCP with trio, speaking AsyncAProto 22.

The names of AsyncAPY 0.5 are here: ``Server``, ``Client`` (the handler's view of a
peer, :class:`asyncapy.core.Client`) and ``Packet``. The bundled network client is
:class:`asyncapy.client.Client` (blocking) and :class:`asyncapy.client.AsyncClient`.
"""

from .core import Client, Handler, Packet, Session
from .errors import StopPropagation
from .filters import Filter, Filters
from .server import Server
from .util import APIKeyFactory

__version__ = "0.6.0"

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
