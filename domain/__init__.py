"""The pure core of AsyncAPY: no sockets, no trio, no redis.

Everything here can be driven with plain bytes and plain coroutines, so it is tested
without an event loop (see ``tests/unit``). The outer layers (``asyncapy``,
``adapters``) depend on this package; it depends on none of them.
"""
