"""Test helpers for AsyncAPY applications and for people writing their own store adapters.

Testing handlers (see ``docs/testing.md``):

- :func:`open_test_client` drives a server's whole session pipeline (admission,
  framing, filters, groups, sessions, error replies, timeouts) in-process, through an
  in-memory stream: no port, no socket.
- :func:`open_test_server` runs a server on a free loopback port, for tests that need
  a real socket. The pytest plugin :mod:`asyncapy.testing.plugin`, registered when
  AsyncAPY is installed, hands it out as the ``asyncapy_serve`` fixture.

Both need trio only. Testing store adapters:

:mod:`asyncapy.testing.contracts` holds the contract suites every
:class:`~asyncapy.domain.ports.SessionStore` and :class:`~asyncapy.domain.ports.KeyStore` adapter must
pass: subclass one in your own test file, give it a ``store`` fixture, and every
inherited test runs against your adapter. The contracts need ``pytest`` and
``pytest-trio``, which are test dependencies, not dependencies of AsyncAPY itself:
importing this package does not import them, importing ``contracts`` (or ``plugin``)
does. :mod:`asyncapy.testing.ratelimit_contracts` is the same for
:class:`~asyncapy.domain.ports.RateLimiter` adapters.
"""

import sys

_pytest = sys.modules.get("pytest")
if _pytest is not None:
    # Under pytest, have it rewrite the asserts of the contract suites (as it does in
    # test files), so that a store failing one shows the values that differ, not a
    # bare AssertionError. It must be registered before the module is imported, and
    # using pytest here only when it is already loaded keeps it a test dependency.
    _pytest.register_assert_rewrite("asyncapy.testing.contracts", "asyncapy.testing.ratelimit_contracts")
del _pytest

# After the registration above, which must come first.
from .client import TestClient, open_test_client  # noqa: E402
from .serving import open_test_server  # noqa: E402

__all__ = ["open_test_client", "open_test_server", "TestClient"]
