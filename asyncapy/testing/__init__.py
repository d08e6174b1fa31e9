"""Test helpers for people writing their own AsyncAPY store adapters.

:mod:`asyncapy.testing.contracts` holds the contract suites every
:class:`~domain.ports.SessionStore` and :class:`~domain.ports.KeyStore` adapter must
pass: subclass one in your own test file, give it a ``store`` fixture, and every
inherited test runs against your adapter. The contracts need ``pytest`` and
``pytest-trio``, which are test dependencies, not dependencies of AsyncAPY itself:
importing this package does not import them, importing ``contracts`` does.
"""
