"""Clear HDF5 file-consistency flags after a crashed SWMR writer (``h5clear -s``).

A writer in SWMR mode marks the superblock (version 2/3) as open for writing; a killed
writer leaves the mark, and HDF5 then refuses to open the file. SWMR's ordered flushes
keep the file itself consistent, so resuming only needs the mark reset and the
superblock checksum (Jenkins lookup3) recomputed.
"""

from __future__ import annotations

import os
import struct

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MASK = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _MASK
    a ^= _rot(c, 4)
    c = (c + b) & _MASK
    b = (b - a) & _MASK
    b ^= _rot(a, 6)
    a = (a + c) & _MASK
    c = (c - b) & _MASK
    c ^= _rot(b, 8)
    b = (b + a) & _MASK
    a = (a - c) & _MASK
    a ^= _rot(c, 16)
    c = (c + b) & _MASK
    b = (b - a) & _MASK
    b ^= _rot(a, 19)
    a = (a + c) & _MASK
    c = (c - b) & _MASK
    c ^= _rot(b, 4)
    b = (b + a) & _MASK
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b
    c = (c - _rot(b, 14)) & _MASK
    a ^= c
    a = (a - _rot(c, 11)) & _MASK
    b ^= a
    b = (b - _rot(a, 25)) & _MASK
    c ^= b
    c = (c - _rot(b, 16)) & _MASK
    a ^= c
    a = (a - _rot(c, 4)) & _MASK
    b ^= a
    b = (b - _rot(a, 14)) & _MASK
    c ^= b
    c = (c - _rot(b, 24)) & _MASK
    return c


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' hashlittle, as HDF5's H5_checksum_lookup3."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK
    pos = 0
    while length - pos > 12:
        x, y, z = struct.unpack_from("<III", data, pos)
        a, b, c = _mix((a + x) & _MASK, (b + y) & _MASK, (c + z) & _MASK)
        pos += 12
    if length - pos == 0:
        return c
    tail = data[pos:] + bytes(12 - (length - pos))
    x, y, z = struct.unpack("<III", tail)
    return _final((a + x) & _MASK, (b + y) & _MASK, (c + z) & _MASK)


def clear_consistency_flags(path: str | os.PathLike[str]) -> bool:
    """Reset the superblock's write-access flags; True if they were set."""
    with open(path, "r+b") as handle:
        head = handle.read(12)
        if len(head) < 12 or head[:8] != _SIGNATURE or head[8] not in (2, 3):
            return False
        if head[11] == 0:
            return False
        offset_size = head[9]
        body_size = 12 + 4 * offset_size
        handle.seek(0)
        block = bytearray(handle.read(body_size + 4))
        (stored,) = struct.unpack_from("<I", block, body_size)
        if lookup3(bytes(block[:body_size])) != stored:
            raise ValueError("HDF5 superblock checksum does not match")
        block[11] = 0
        struct.pack_into("<I", block, body_size, lookup3(bytes(block[:body_size])))
        handle.seek(0)
        handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    return True
