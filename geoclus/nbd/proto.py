"""Wire constants of the NBD protocol, named as in the specification.

Source: ``doc/proto.md`` of https://github.com/NetworkBlockDevice/nbd. Every
value here is sent in network byte order; the ``struct`` formats at the bottom
describe the fixed-size frames. Nothing in this module does I/O or raises.
"""

from __future__ import annotations

import struct
from typing import Final

# --- Magic numbers -----------------------------------------------------------

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC", the INIT_PASSWD
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT", newstyle magic and option magic
NBD_OPT_REPLY_MAGIC: Final = 0x3E889045565A9  # option-haggling replies
NBD_REQUEST_MAGIC: Final = 0x25609513  # transmission requests
NBD_SIMPLE_REPLY_MAGIC: Final = 0x67446698  # simple replies
NBD_STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF  # structured reply chunks

# --- Handshake flags (server, 16 bits) ---------------------------------------

NBD_FLAG_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_NO_ZEROES: Final = 1 << 1

# --- Client flags (32 bits) ---------------------------------------------------

NBD_FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_C_NO_ZEROES: Final = 1 << 1

# --- Transmission flags (16 bits) --------------------------------------------

NBD_FLAG_HAS_FLAGS: Final = 1 << 0
NBD_FLAG_READ_ONLY: Final = 1 << 1
NBD_FLAG_SEND_FLUSH: Final = 1 << 2
NBD_FLAG_SEND_FUA: Final = 1 << 3
NBD_FLAG_ROTATIONAL: Final = 1 << 4
NBD_FLAG_SEND_TRIM: Final = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
NBD_FLAG_SEND_DF: Final = 1 << 7
NBD_FLAG_CAN_MULTI_CONN: Final = 1 << 8
NBD_FLAG_SEND_RESIZE: Final = 1 << 9
NBD_FLAG_SEND_CACHE: Final = 1 << 10
NBD_FLAG_SEND_FAST_ZERO: Final = 1 << 11
NBD_FLAG_BLOCK_STATUS_PAYLOAD: Final = 1 << 12

# --- Option types -------------------------------------------------------------

NBD_OPT_EXPORT_NAME: Final = 1
NBD_OPT_ABORT: Final = 2
NBD_OPT_LIST: Final = 3
NBD_OPT_PEEK_EXPORT: Final = 4  # withdrawn
NBD_OPT_STARTTLS: Final = 5
NBD_OPT_INFO: Final = 6
NBD_OPT_GO: Final = 7
NBD_OPT_STRUCTURED_REPLY: Final = 8
NBD_OPT_LIST_META_CONTEXT: Final = 9
NBD_OPT_SET_META_CONTEXT: Final = 10
NBD_OPT_EXTENDED_HEADERS: Final = 11

OPTION_NAMES: Final[dict[int, str]] = {
    NBD_OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    NBD_OPT_ABORT: "NBD_OPT_ABORT",
    NBD_OPT_LIST: "NBD_OPT_LIST",
    NBD_OPT_PEEK_EXPORT: "NBD_OPT_PEEK_EXPORT",
    NBD_OPT_STARTTLS: "NBD_OPT_STARTTLS",
    NBD_OPT_INFO: "NBD_OPT_INFO",
    NBD_OPT_GO: "NBD_OPT_GO",
    NBD_OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    NBD_OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    NBD_OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
    NBD_OPT_EXTENDED_HEADERS: "NBD_OPT_EXTENDED_HEADERS",
}

# --- Option reply types ------------------------------------------------------

NBD_REP_ACK: Final = 1
NBD_REP_SERVER: Final = 2
NBD_REP_INFO: Final = 3
NBD_REP_META_CONTEXT: Final = 4
NBD_REP_FLAG_ERROR: Final = 1 << 31  # every error reply type has bit 31 set
NBD_REP_ERR_UNSUP: Final = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY: Final = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID: Final = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM: Final = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD: Final = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN: Final = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN: Final = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD: Final = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG: Final = NBD_REP_FLAG_ERROR | 9
NBD_REP_ERR_EXT_HEADER_REQD: Final = NBD_REP_FLAG_ERROR | 10

REPLY_NAMES: Final[dict[int, str]] = {
    NBD_REP_ACK: "NBD_REP_ACK",
    NBD_REP_SERVER: "NBD_REP_SERVER",
    NBD_REP_INFO: "NBD_REP_INFO",
    NBD_REP_META_CONTEXT: "NBD_REP_META_CONTEXT",
    NBD_REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP",
    NBD_REP_ERR_POLICY: "NBD_REP_ERR_POLICY",
    NBD_REP_ERR_INVALID: "NBD_REP_ERR_INVALID",
    NBD_REP_ERR_PLATFORM: "NBD_REP_ERR_PLATFORM",
    NBD_REP_ERR_TLS_REQD: "NBD_REP_ERR_TLS_REQD",
    NBD_REP_ERR_UNKNOWN: "NBD_REP_ERR_UNKNOWN",
    NBD_REP_ERR_SHUTDOWN: "NBD_REP_ERR_SHUTDOWN",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    NBD_REP_ERR_TOO_BIG: "NBD_REP_ERR_TOO_BIG",
    NBD_REP_ERR_EXT_HEADER_REQD: "NBD_REP_ERR_EXT_HEADER_REQD",
}

# --- NBD_REP_INFO information types -------------------------------------------

NBD_INFO_EXPORT: Final = 0
NBD_INFO_NAME: Final = 1
NBD_INFO_DESCRIPTION: Final = 2
NBD_INFO_BLOCK_SIZE: Final = 3

# --- Command (request) types --------------------------------------------------

NBD_CMD_READ: Final = 0
NBD_CMD_WRITE: Final = 1
NBD_CMD_DISC: Final = 2
NBD_CMD_FLUSH: Final = 3
NBD_CMD_TRIM: Final = 4
NBD_CMD_CACHE: Final = 5
NBD_CMD_WRITE_ZEROES: Final = 6
NBD_CMD_BLOCK_STATUS: Final = 7
NBD_CMD_RESIZE: Final = 8

COMMAND_NAMES: Final[dict[int, str]] = {
    NBD_CMD_READ: "NBD_CMD_READ",
    NBD_CMD_WRITE: "NBD_CMD_WRITE",
    NBD_CMD_DISC: "NBD_CMD_DISC",
    NBD_CMD_FLUSH: "NBD_CMD_FLUSH",
    NBD_CMD_TRIM: "NBD_CMD_TRIM",
    NBD_CMD_CACHE: "NBD_CMD_CACHE",
    NBD_CMD_WRITE_ZEROES: "NBD_CMD_WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "NBD_CMD_BLOCK_STATUS",
    NBD_CMD_RESIZE: "NBD_CMD_RESIZE",
}

# --- Command flags (16 bits) --------------------------------------------------

NBD_CMD_FLAG_FUA: Final = 1 << 0
NBD_CMD_FLAG_NO_HOLE: Final = 1 << 1
NBD_CMD_FLAG_DF: Final = 1 << 2
NBD_CMD_FLAG_REQ_ONE: Final = 1 << 3
NBD_CMD_FLAG_FAST_ZERO: Final = 1 << 4
NBD_CMD_FLAG_PAYLOAD_LEN: Final = 1 << 5

# --- Structured replies (transmission, after NBD_OPT_STRUCTURED_REPLY) ---------

# Structured reply flags (16 bits).
NBD_REPLY_FLAG_DONE: Final = 1 << 0

# Structured reply types (16 bits). Every error chunk type has bit 15 set.
NBD_REPLY_TYPE_NONE: Final = 0
NBD_REPLY_TYPE_OFFSET_DATA: Final = 1
NBD_REPLY_TYPE_OFFSET_HOLE: Final = 2
NBD_REPLY_TYPE_BLOCK_STATUS: Final = 5
NBD_REPLY_TYPE_BLOCK_STATUS_EXT: Final = 6  # experimental EXTENDED_HEADERS only
NBD_REPLY_TYPE_ERROR_BIT: Final = 1 << 15
NBD_REPLY_TYPE_ERROR: Final = NBD_REPLY_TYPE_ERROR_BIT | 1
NBD_REPLY_TYPE_ERROR_OFFSET: Final = NBD_REPLY_TYPE_ERROR_BIT | 2

REPLY_TYPE_NAMES: Final[dict[int, str]] = {
    NBD_REPLY_TYPE_NONE: "NBD_REPLY_TYPE_NONE",
    NBD_REPLY_TYPE_OFFSET_DATA: "NBD_REPLY_TYPE_OFFSET_DATA",
    NBD_REPLY_TYPE_OFFSET_HOLE: "NBD_REPLY_TYPE_OFFSET_HOLE",
    NBD_REPLY_TYPE_BLOCK_STATUS: "NBD_REPLY_TYPE_BLOCK_STATUS",
    NBD_REPLY_TYPE_BLOCK_STATUS_EXT: "NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
    NBD_REPLY_TYPE_ERROR: "NBD_REPLY_TYPE_ERROR",
    NBD_REPLY_TYPE_ERROR_OFFSET: "NBD_REPLY_TYPE_ERROR_OFFSET",
}

# --- Metadata contexts -----------------------------------------------------------

# The one context the spec defines, and its namespace.
NBD_META_NS_BASE: Final = "base"
NBD_CONTEXT_BASE_ALLOCATION: Final = "base:allocation"
# base:allocation status flags (32 bits per descriptor).
NBD_STATE_HOLE: Final = 1 << 0
NBD_STATE_ZERO: Final = 1 << 1

# --- Error values (the reply's error field) ----------------------------------

NBD_SUCCESS: Final = 0
NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108

ERROR_NAMES: Final[dict[int, str]] = {
    NBD_SUCCESS: "success",
    NBD_EPERM: "NBD_EPERM",
    NBD_EIO: "NBD_EIO",
    NBD_ENOMEM: "NBD_ENOMEM",
    NBD_EINVAL: "NBD_EINVAL",
    NBD_ENOSPC: "NBD_ENOSPC",
    NBD_EOVERFLOW: "NBD_EOVERFLOW",
    NBD_ENOTSUP: "NBD_ENOTSUP",
    NBD_ESHUTDOWN: "NBD_ESHUTDOWN",
}

# --- Sizes the specification fixes -------------------------------------------

# Strings (export names, messages) MUST be no longer than this.
NBD_MAX_STRING_BYTES: Final = 4096
# The spec's default/"always acceptable" maximum payload: payloads up to 2^25 bytes
# SHOULD NOT be treated as a denial of service.
NBD_DEFAULT_MAX_PAYLOAD_BYTES: Final = 1 << 25
# An advertised minimum block size MUST NOT exceed 2^16.
NBD_MAX_MINIMUM_BLOCK_BYTES: Final = 1 << 16
# Reserved zero bytes after NBD_OPT_EXPORT_NAME's reply unless NO_ZEROES was negotiated.
NBD_EXPORT_NAME_ZEROES: Final = 124
# Servers SHOULD NOT send more block status descriptors than this in one chunk.
NBD_MAX_BLOCK_STATUS_DESCRIPTORS: Final = 1 << 20

# --- Fixed frame layouts (network byte order) ---------------------------------

# Server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
GREETING: Final = struct.Struct(">QQH")
# Client flags after the greeting.
CLIENT_FLAGS: Final = struct.Struct(">I")
# Option header: IHAVEOPT, option, data length.
OPTION_HEADER: Final = struct.Struct(">QII")
# Option reply header: reply magic, option, reply type, data length.
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")
# Reply to NBD_OPT_EXPORT_NAME: export size, transmission flags.
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
# NBD_INFO_EXPORT payload: info type, export size, transmission flags.
INFO_EXPORT: Final = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE payload: info type, minimum, preferred, maximum payload.
INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")
# Request header: magic, command flags, type, cookie, offset, length.
REQUEST_HEADER: Final = struct.Struct(">IHHQQI")
# Simple reply header: magic, error, cookie.
SIMPLE_REPLY_HEADER: Final = struct.Struct(">IIQ")
# Structured reply chunk header: magic, flags, type, cookie, payload length.
STRUCTURED_REPLY_HEADER: Final = struct.Struct(">IHHQI")
# Start of an error chunk's payload: error, message length (the message follows).
ERROR_CHUNK_START: Final = struct.Struct(">IH")
# One NBD_REPLY_TYPE_BLOCK_STATUS descriptor: extent length, status flags.
BLOCK_DESCRIPTOR: Final = struct.Struct(">II")
