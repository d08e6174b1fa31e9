"""Adapters: the outside world behind the ports of :mod:`domain.ports`."""
