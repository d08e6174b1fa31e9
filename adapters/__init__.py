"""Adapters: the outside world behind the ports of :mod:`asyncapy.domain.ports`."""
