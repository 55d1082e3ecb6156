"""Video files: mp4 (H.264 via PyAV) and gif writing, mp4 reading, sample grids.

Clips are numpy arrays (T, H, W, 3), float in [0, 1] or uint8. Writes go to a temporary name in the
same directory and are renamed into place, so a killed writer never leaves a truncated video behind; on
s3:// and other object stores the file is encoded locally and uploaded in one PUT (atomic there).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import av
import fsspec
import numpy as np

from pipeline.storage import is_local


def to_uint8(clip: np.ndarray) -> np.ndarray:
    if clip.dtype == np.uint8:
        return clip
    return (np.clip(clip, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_mp4(clip: np.ndarray, path: str | Path, fps: int = 16, crf: int = 12) -> None:
    """H.264 in yuv444p (no chroma subsampling, so small toy clips keep their colours), atomically; `path`
    may be a local path or an fsspec URL (s3://...)."""
    frames = to_uint8(clip)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{path}: expected a clip (T, H, W, 3), got shape {frames.shape}")
    fs, target = fsspec.core.url_to_fs(str(path))
    if is_local(fs):
        _encode(frames, Path(target), fps, crf)
        return
    with tempfile.TemporaryDirectory(prefix="oneforce-mp4-") as tmp:
        local = Path(tmp) / Path(target).name
        _encode(frames, local, fps, crf)
        fs.put_file(str(local), target)


def _encode(frames: np.ndarray, path: Path, fps: int, crf: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a video is an ordinary file
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv444p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file as float32 (T, H, W, 3) in [0, 1]."""
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, OSError) as err:
        raise ValueError(f"{path}: cannot decode video ({err})") from err
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return np.stack(frames).astype(np.float32) / 255.0


def grid(clips: list[np.ndarray], columns: int = 4, gap: int = 2) -> np.ndarray:
    """Tile equally shaped clips into one clip (T, rows*H, columns*W, 3) for side-by-side viewing."""
    t, h, w, c = clips[0].shape
    rows = -(-len(clips) // columns)
    out = np.ones((t, rows * (h + gap) - gap, columns * (w + gap) - gap, c), np.float32)
    for i, clip in enumerate(clips):
        r, col = divmod(i, columns)
        out[:, r * (h + gap) : r * (h + gap) + h, col * (w + gap) : col * (w + gap) + w] = clip
    return out
