"""Handshake checks: may these two copies replicate to each other? (pure)"""

from __future__ import annotations

from replicator.frames import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Hello,
    Role,
)


def negotiate_version(local: Hello, remote: Hello) -> int | None:
    """Return the highest protocol version both sides speak, or None."""
    high = min(local.proto_max, remote.proto_max)
    low = max(local.proto_min, remote.proto_min)
    return high if high >= low else None


def check_hello(local: Hello, remote: Hello) -> str | None:
    """Return None if ``local`` may replicate with ``remote``, else a reason that
    says what differs and what the operator should do about it.

    Checks, in order: protocol version overlap, volume id, size, block size,
    roles (exactly one primary), mode. The data histories are compared by the
    generation decision (:func:`replicator.generations.decide`) on the lineages
    both HELLOs carry; a peer without a lineage must have the same generation.
    """
    if negotiate_version(local, remote) is None:
        return (
            f"no common protocol version: we speak {local.proto_min}..{local.proto_max}, "
            f"the peer {remote.proto_min}..{remote.proto_max}; upgrade the older node"
        )
    if local.volume_id != remote.volume_id:
        return (
            f"volume id mismatch: ours {local.volume_id.hex()}, the peer's "
            f"{remote.volume_id.hex()}; the two configs name different volumes"
        )
    if local.size_bytes != remote.size_bytes:
        return (
            f"volume size mismatch: ours {local.size_bytes} bytes, the peer's "
            f"{remote.size_bytes}; set the same [volume] size on both sites"
        )
    if local.block_size != remote.block_size:
        return f"block size mismatch: ours {local.block_size}, the peer's {remote.block_size}"
    if local.role == remote.role:
        both = "primary" if local.role == Role.PRIMARY else "secondary"
        extra = (
            " (two primaries: split brain; demote one side before reconnecting)"
            if local.role == Role.PRIMARY
            else "; make one of them primary"
        )
        return f"both copies are {both}{extra}"
    if local.mode != remote.mode:
        return (
            f"mode mismatch: ours {local.mode.name.lower()}, the peer's "
            f"{remote.mode.name.lower()}; set the same [volume] mode on both sites"
        )
    if not local.lineage and not remote.lineage and local.generation != remote.generation:
        # Without lineages only the current generations can be compared.
        return (
            f"generation mismatch: ours {local.generation:#x}, the peer's "
            f"{remote.generation:#x}; the copies hold different data histories and "
            "need a full resync before they can replicate"
        )
    return None


def make_hello(
    *,
    role: Role,
    mode: int,
    flags: int,
    block_size: int,
    size_bytes: int,
    volume_id: bytes,
    generation: int,
    applied_seq: int,
    durable_seq: int,
    node: str,
    lineage: bytes = b"",
) -> Hello:
    """Build this side's HELLO with the protocol versions we speak."""
    from replicator.frames import Mode

    return Hello(
        MIN_PROTOCOL_VERSION,
        PROTOCOL_VERSION,
        role,
        Mode(mode),
        flags,
        block_size,
        size_bytes,
        volume_id,
        generation,
        applied_seq,
        durable_seq,
        node,
        lineage,
    )
