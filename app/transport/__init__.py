"""Transports besides HTTP: the same-host shared-memory path (:mod:`app.transport.local`)."""
