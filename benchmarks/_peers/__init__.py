"""The pieces of ``benchmarks.peers`` (optserve beside Ray, torch RPC, a raw HTTP echo and an
in-process step), shared with ``benchmarks.step_latency``.

- ``timing``: CPU wake-up, per-step samples, interleaved rounds, repetitions per N.
- ``cases``: the optimizers, the seeded parameters and gradients, the in-process replay.
- ``base``: the ``System`` interface and the registry of systems.
- ``systems``: every registered system (and the extension points for more).
- ``proc``: one process per system, driven over a pipe.
- ``driver``: the run itself (start, cases, rounds, bitwise checks).
- ``report``: Markdown tables and the JSON record.
- ``pyspy``: optional py-spy recording of a server while it is measured.
"""
