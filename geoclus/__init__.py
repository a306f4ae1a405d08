"""geoclus: the per-node daemon, CLI, NBD export and cluster service.

This package's ``__init__`` stays import-light on purpose: ``replicator`` and
``quorum`` import :mod:`geoclus.errors` and must not pull in the daemon.
"""

__version__ = "0.1.0"
