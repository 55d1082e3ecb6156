"""The streaming server's wire format and request checks, without Ray: what `actors/streaming.py` serves
and what a client reads.

A stream's frames travel as one HTTP response of type `multipart/x-mixed-replace`: each part is one
frame (JPEG by default, PNG on request) with its own headers: `X-Frame` (index in the stream),
`X-Block`, `X-Prompt` (prompt switches applied so far), `X-Ms` (milliseconds since the stream was
requested) and `X-Held-Bytes` (what the stream's caches hold after its block). Why multipart JPEG
rather than fragmented MP4: a frame is sent the moment its block is decoded, with no encoder buffering
a group of pictures and no codec state to start; every browser plays it in a plain `<img>`, and a
program reads it with any multipart parser. It costs more bytes per frame than H.264, which matters
little at the sizes a one-step model streams per replica.
The stream ends with one JSON part: `{"done": true, ...}` or `{"error": "..."}`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

BOUNDARY = "oneforce-frame"
CONTENT_TYPE = f"multipart/x-mixed-replace; boundary={BOUNDARY}"
FORMATS = {"jpeg": "image/jpeg", "png": "image/png"}


class RequestError(ValueError):
    """A bad request: `field` names what was wrong, `status` is the HTTP status to answer."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status

    def __reduce__(self):  # raised in one Serve replica, caught in another
        return RequestError, (self.field, self.message, self.status)

    def body(self) -> dict[str, str]:
        return {"error": str(self), "field": self.field}


@dataclass(frozen=True)
class Limits:
    """What a request may ask for (from `serve` and `generate` settings and the model's block size)."""

    max_prompt_chars: int
    max_blocks: int
    frames_per_block: int
    clip_blocks: int  # the blocks of the clip the model was trained on
    cache_window: int  # the settings' (0 = all)
    sink_frames: int


@dataclass(frozen=True)
class StreamRequest:
    prompt: str
    seed: int = 0
    blocks: int = 0  # latent blocks to make
    cache_window: int = 0  # latent frames of KV context kept; 0 = all
    sink_frames: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_prompt(prompt: Any, limits: Limits, field: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(field, "must be non-empty text")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(field, f"{len(prompt)} characters, over the limit of {limits.max_prompt_chars}")
    return prompt


def _integer(body: dict[str, Any], field: str, default: int, low: int, high: int) -> int:
    value = body.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(field, f"must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise RequestError(field, f"must be in {low}..{high}, got {value}")
    return value


def parse_request(body: Any, limits: Limits) -> StreamRequest:
    """`POST /v1/streams`'s JSON body: {prompt, seed?, frames?, window?, sink_frames?}; `frames` are
    latent frames (rounded up to whole blocks), `window` the cache window in latent frames."""
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    unknown = sorted(set(body) - {"prompt", "seed", "frames", "window", "sink_frames"})
    if unknown:
        raise RequestError(unknown[0], "unknown field (known: prompt, seed, frames, window, sink_frames)")
    prompt = check_prompt(body.get("prompt"), limits)
    seed = _integer(body, "seed", 0, 0, 2**63 - 1)
    per_block = limits.frames_per_block
    frames = _integer(body, "frames", limits.clip_blocks * per_block, 1, limits.max_blocks * per_block)
    window = _integer(body, "window", limits.cache_window, 0, limits.max_blocks * per_block)
    sink = _integer(body, "sink_frames", limits.sink_frames if "window" not in body else 0, 0, limits.max_blocks * per_block)
    blocks = -(-frames // per_block)
    if blocks > limits.clip_blocks and not window:
        raise RequestError("frames", f"{frames} latent frames are longer than the clip ({limits.clip_blocks * per_block}): "
                                     "a longer stream needs a window")
    if window and window <= per_block:
        raise RequestError("window", f"must hold more than one block ({per_block} latent frames), got {window}")
    if sink and sink >= window:
        raise RequestError("sink_frames", f"must be below the window ({window}), got {sink}")
    return StreamRequest(prompt, seed, blocks, window, sink)


def parse_switch(body: Any, limits: Limits) -> tuple[str, int | None]:
    """`POST /v1/streams/{id}/prompt`'s body: {prompt, at_block?}; without `at_block` the switch applies
    from the next block the replica starts, with it from that block (a scripted change)."""
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    unknown = sorted(set(body) - {"prompt", "at_block"})
    if unknown:
        raise RequestError(unknown[0], "unknown field (known: prompt, at_block)")
    prompt = check_prompt(body.get("prompt"), limits)
    if body.get("at_block") is None:
        return prompt, None
    return prompt, _integer(body, "at_block", 0, 0, limits.max_blocks - 1)


def encode_frame(frame: np.ndarray, fmt: str, quality: int) -> bytes:
    """One (H, W, 3) frame in [0, 1] as JPEG or PNG bytes."""
    from PIL import Image

    image = Image.fromarray(np.clip(np.rint(frame * 255), 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality) if fmt == "jpeg" else image.save(out, format="PNG")
    return out.getvalue()


def part(body: bytes, content_type: str, headers: dict[str, Any] | None = None) -> bytes:
    """One part of the multipart stream."""
    lines = [f"--{BOUNDARY}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body + b"\r\n"


def json_part(payload: dict[str, Any]) -> bytes:
    return part(json.dumps(payload).encode(), "application/json")


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


def read_parts(chunks: Iterator[bytes]) -> Iterator[Part]:
    """The parts of a multipart stream as they arrive, from its bytes in chunks of any size (a client's
    reader: each part's Content-Length says where it ends)."""
    buffer = b""
    marker = f"--{BOUNDARY}\r\n".encode()
    for chunk in chunks:
        buffer += chunk
        while True:
            start = buffer.find(marker)
            end_of_headers = buffer.find(b"\r\n\r\n", start)
            if start < 0 or end_of_headers < 0:
                break
            head = buffer[start + len(marker):end_of_headers].decode()
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head.split("\r\n") if line)}
            length = int(headers["content-length"])
            body_start = end_of_headers + 4
            if len(buffer) < body_start + length:
                break
            yield Part(headers, buffer[body_start:body_start + length])
            buffer = buffer[body_start + length:]
