"""A fuzz campaign against the pure protocol core: framing, ``Connection`` and both codecs.

Run it with ``make fuzz`` or ``python -m fuzz --runs 200000``; see ``docs/security.md``
for what it checks and the record of its runs. No sockets, no event loop: every input
is a byte string fed to :class:`asyncapy.domain.connection.Connection` (and its payloads to the
codecs directly), then judged by :mod:`fuzz.oracle`.

The engine (:mod:`fuzz.campaign`) is a small mutational fuzzer on the standard library
alone: a corpus of seeds (:mod:`fuzz.seeds`: valid packets of both encodings in every
header layout, pipelined, split, and the edge cases of ``protocol.md``), byte- and
structure-level mutations, and a crude feedback loop that keeps any input showing a
new behaviour (a new sequence of event kinds or a new decoder error). It is seeded, so
a run is reproducible from its ``--seed``.
"""
