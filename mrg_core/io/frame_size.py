"""The size a compressed frame says it has, read from its own header, before any decoding.

A DICOM header can say 64 x 64 while its encapsulated frame is a 16000 x 16000 JPEG: the decoder
would allocate the frame's size, not the header's. JPEG and JPEG-LS keep the size in their
start-of-frame segment, JPEG 2000 in its SIZ segment.
"""
from __future__ import annotations

# JPEG start-of-frame markers (SOF0-SOF15 without DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55
_SOF = {m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)} | {0xF7}
_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC then SIZ: a JPEG 2000 codestream
_SCAN_BYTES = 1 << 16  # the size segments sit at the start; never scan a whole frame


def frame_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG / JPEG-LS / JPEG 2000 frame's own header; None for other
    encodings (RLE carries no size of its own) or when no size segment is found."""
    head = bytes(frame[:_SCAN_BYTES])
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(head)
    at = head.find(_J2K_SIZ)
    if at >= 0 and len(head) >= at + 24:
        x, y, x0, y0 = (int.from_bytes(head[at + 8 + 4 * k: at + 12 + 4 * k], "big")
                        for k in range(4))
        return max(y - y0, 0), max(x - x0, 0)
    return None


def _jpeg_size(b: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 <= len(b):
        if b[i] != 0xFF:
            i += 1
            continue
        marker = b[i + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill, TEM, RSTn, SOI
            i += 2 if marker != 0xFF else 1
            continue
        if marker in _SOF:
            return int.from_bytes(b[i + 5:i + 7], "big"), int.from_bytes(b[i + 7:i + 9], "big")
        i += 2 + int.from_bytes(b[i + 2:i + 4], "big")  # skip the segment
    return None
