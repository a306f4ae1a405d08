"""The stretched cluster service: node manager (heartbeats), membership
(regroup), global update manager and configuration log (docs/cluster.md).
The decision cores are sans-I/O (``node.py``); ``sim.py`` runs them in a
deterministic simulation."""
