"""quorum: majority node set, quorum disk, witness (built in a later issue)."""
