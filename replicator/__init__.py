"""replicator: block stores, the replication wire codec and sessions, the volume shell."""
