"""Response audio formats, all streamed as the audio comes: WAV and raw PCM as is; FLAC, Ogg Opus
and MP3 encoded piece by piece by libsndfile (through soundfile), sending what the encoder has
written after each piece.

A streamed file cannot have its header rewritten at the end, which libsndfile does on close
for a seekable output: the client keeps the header written first. For FLAC that STREAMINFO
says "length unknown" (valid FLAC; players read to the end); for MP3 the first frame stays the
silent placeholder of the VBR tag, so MP3 is encoded at a constant bitrate, whose length
readers can estimate without that tag (libsndfile/mpg123 stop early on a tagless VBR stream).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf

SAMPLE_WIDTH = 2  # 16-bit PCM, as published by the workers (tasks.audio_stream)
# OpenAI's response_format -> (media type, soundfile format, subtype); None: streamed as is.
FORMATS = {
    "wav": ("audio/wav", None, None),
    "pcm": ("audio/pcm", None, None),
    "flac": ("audio/flac", "FLAC", "PCM_16"),
    "opus": ("audio/ogg", "OGG", "OPUS"),
    "mp3": ("audio/mpeg", "MP3", "MPEG_LAYER_III"),
}
STREAMED_FORMATS = ("wav", "pcm")  # the ones OpenAI's SSE events carry
# Formats the workers store (pocket_tts.audio.SUPPORTED_FORMATS) and their media types.
STORED_MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg"}


def supported_formats() -> tuple[str, ...]:
    """Response formats this process can produce: those whose libsndfile encoder is available."""
    available = sf.available_formats()
    return tuple(
        name
        for name, (_, container, subtype) in FORMATS.items()
        if container is None or (container in available and subtype in sf.available_subtypes(container))
    )


def streaming_wav_header(sample_rate: int) -> bytes:
    """A mono 16-bit WAV header for audio of unknown length: the sizes say "as long as possible"."""
    data_size = 0xFFFFFFFF - 36
    byte_rate = sample_rate * SAMPLE_WIDTH
    return (
        b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, byte_rate, SAMPLE_WIDTH, 8 * SAMPLE_WIDTH)
        + b"data" + struct.pack("<I", data_size)
    )  # fmt: skip


# libsndfile's SFC_SET_OGG_PAGE_LATENCY_MS (sndfile.h; soundfile has no name for it). By default an
# Ogg page holds ~1 s of Opus: measured, the first 12 pieces of 80 ms gave no bytes; at 80 ms, each does.
_SET_OGG_PAGE_LATENCY_MS = 0x1302
OGG_PAGE_LATENCY_MS = 80.0
MP3_COMPRESSION_LEVEL = 0.5  # constant bitrate: 80 kbit/s for 24 kHz mono


@dataclass
class _Sent:
    """The output libsndfile writes to: bytes past what was already sent wait in `pending`;
    writes over sent bytes (the header update on close) are dropped."""

    sent: int = 0
    position: int = 0
    pending: bytearray = field(default_factory=bytearray)

    def write(self, data) -> int:
        data = bytes(data)
        start = self.position - self.sent
        self.position += len(data)
        if start < 0:
            data, start = data[-start:], 0
        end = start + len(data)
        if end > len(self.pending):
            self.pending.extend(bytes(end - len(self.pending)))
        self.pending[start:end] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        size = self.sent + len(self.pending)
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: size}[whence] + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:  # libsndfile only writes; a read finds nothing
        return b""

    def take(self) -> bytes:
        out = bytes(self.pending)
        self.sent += len(out)
        self.pending.clear()
        return out


class StreamEncoder:
    """16-bit PCM pieces in, the FLAC / Ogg Opus / MP3 bytes ready so far out."""

    def __init__(self, sample_rate: int, response_format: str):
        _, container, subtype = FORMATS[response_format]
        self._out = _Sent()
        options = {"bitrate_mode": "CONSTANT", "compression_level": MP3_COMPRESSION_LEVEL} if container == "MP3" else {}
        self._file = sf.SoundFile(self._out, "w", sample_rate, 1, subtype, format=container, **options)
        if container == "OGG":
            latency = sf._ffi.new("double[1]", [OGG_PAGE_LATENCY_MS])
            sf._snd.sf_command(self._file._file, _SET_OGG_PAGE_LATENCY_MS, latency, sf._ffi.sizeof(latency))

    def encode(self, pcm: bytes) -> bytes:
        self._file.write(np.frombuffer(pcm, dtype="<i2"))
        return self._out.take()

    def finish(self) -> bytes:
        self._file.close()
        return self._out.take()

    def close(self) -> None:
        """Drop an unfinished stream (the client went away)."""
        if not self._file.closed:
            self._file.close()
