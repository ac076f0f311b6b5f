"""Region proposals (selective search) computed once per image and cached (CCOP, DetReg).

`python -m engine.proposals --data DIR` fills the cache; a loader reads it with
`load_proposals(cache_file, dataset, top)`. This module imports OpenCV only when it computes boxes.

Boxes (`compute_proposals`, `selective_search`):

* OpenCV's selective search (`cv2.ximgproc.segmentation`, `switchToSelectiveSearchFast()`, from
  `opencv-contrib-python-headless`) on the image resized to `size`×`size` (DetReg: 128, aspect
  not kept, `cv2.resize` bilinear as DetReg's `selective_search`); `size=0` runs it on the original
  pixels instead. The 8-bit RGB array goes to OpenCV exactly as DetReg passes it (OpenCV takes it
  for BGR, so its HSV/Lab strategies see R and B swapped): kept for parity with the reference.
* Each (x, y, w, h) on the resized image becomes (x·W/size, y·H/size, (x+w)·W/size, (y+h)·H/size):
  float32 (x1, y1, x2, y2) EDGE coordinates of the original image (pixel k spans [k, k+1]), the
  convention of `pipelines.geometry.boxes_in_view`.
* Boxes narrower or lower than 1 original pixel are dropped, then the first `top` (default
  100: CCOP's "at most 100 boxes per image"; DetReg's topk takes the first 30 of them) are kept
  in selective search's own order.
* Determinism: OpenCV ranks the regions with C `rand()` (`rank = rand()/RAND_MAX · level`), so
  the order -- and which boxes are "the first `top`" -- depends on the process's C random state.
  `srand(PROPOSAL_SEED)` is called right before every `process()`, which makes the boxes a
  function of the image alone (any worker, any order, any rerun). The C generator is per process:
  do not call this from several threads at once (the CLI uses processes).

Cache file (one per data folder and `size`; default `default_cache_path(root, size)` =
`ROOT/.densesim-proposals.<size>.bin`, a hidden file that `ImageFolder` ignores):

* A header (magic + JSON: format, size, top, method, seed, OpenCV version), then an append-only
  journal of records, each framed by a marker, its length and a CRC-32. A record holds one image:
  its path relative to the data root ("/"-separated), file size, mtime_ns, BLAKE2b-128 of the file
  bytes, image width/height, a failed flag (undecodable image: no boxes) and its float32 boxes.
  Records are flushed and fsync'ed in chunks; a kill can only cut the last record, which is
  recognised (length/CRC) and dropped on the next open, so a rerun loses at most the images since
  the last flush and never reads a damaged record. A later record for the same path supersedes an
  earlier one; `ProposalCache.save` rewrites the file compacted (temporary file, fsync, rename).
* Keys: the path relative to the root, so a moved/copied folder keeps its cache (with mtimes).
  At compute time (the CLI) a file is re-read and hashed: same hash -> kept (a new mtime is
  recorded), other hash -> recomputed; a file no longer in the folder is dropped at the end. At
  load time (`load_proposals`) only (size, mtime_ns) recorded at compute time is compared with
  `os.stat` (hashing a whole dataset at every start would be slow): a mismatch counts as missing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import json
import mmap
import os
import struct
import time
import warnings
import zlib
from dataclasses import dataclass
from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image

from .datasets import DataError, _to_rgb, decode_rgb

PROPOSAL_SEED = 0
DEFAULT_SIZE = 128
DEFAULT_TOP = 100
FORMAT_VERSION = 1
METHOD = "opencv-ximgproc-selective-search-fast"
MAGIC = b"DENSESIM-PROPOSALS\n"
_HEADER_LEN = struct.Struct("<II")            # JSON length, CRC-32 of the JSON
_REC_MARK = b"PRP1"
_REC_HEAD = struct.Struct("<4sII")            # marker, payload length, CRC-32 of the payload
# file size, mtime_ns, width, height, number of boxes, flags, path length
_REC_META = struct.Struct("<QqIIIBH")
_DIGEST = 16
_MAX_PAYLOAD = 1 << 30
FLAG_FAILED = 1
_FIX = "delete it and rerun python -m engine.proposals"


class ProposalCacheError(DataError):
    """The proposal cache cannot be used as it is; the one-line message says what to do."""


def default_cache_path(root: str | os.PathLike, size: int = DEFAULT_SIZE) -> str:
    """Where `python -m engine.proposals --data ROOT --size SIZE` writes without --out."""
    return os.path.join(os.fspath(root), f".densesim-proposals.{size}.bin")


def relative_key(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """A dataset path as the cache's key: relative to the data root, "/"-separated."""
    return os.path.relpath(os.fspath(path), os.fspath(root)).replace(os.sep, "/")


def file_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST).digest()


# ----------------------------------------------------------------------------- computing boxes

_SRAND = None


def _seed_c_rand(seed: int = PROPOSAL_SEED) -> bool:
    """srand(seed) in the C library that OpenCV's rand() resolves to (the process's own libc)."""
    global _SRAND
    if _SRAND is None:
        _SRAND = False
        for name in (None, ctypes.util.find_library("c")):
            try:
                _SRAND = ctypes.CDLL(name).srand
                break
            except (OSError, AttributeError, TypeError):
                continue
    if _SRAND is False:
        return False
    _SRAND(ctypes.c_uint(seed))
    return True


def opencv_selective_search():
    """The cv2 module if OpenCV with ximgproc (opencv-contrib) is importable, else raise
    ImportError with the install line."""
    try:
        import cv2
    except ImportError as exc:
        raise ImportError("OpenCV is not installed: pip install opencv-contrib-python-headless "
                          "(or pip install -e \".[proposals]\")") from exc
    if not hasattr(cv2, "ximgproc"):
        raise ImportError(f"OpenCV {cv2.__version__} has no ximgproc (selective search is in the "
                          f"contrib build): pip uninstall opencv-python opencv-python-headless, "
                          f"then pip install opencv-contrib-python-headless")
    return cv2


def selective_search(rgb: np.ndarray, size: int = DEFAULT_SIZE,
                     top: int = DEFAULT_TOP) -> np.ndarray:
    """(P, 4) float32 x1 y1 x2 y2 boxes of an (H, W, 3) uint8 RGB array, in its own pixels
    (conventions in the module docstring); P <= top."""
    cv2 = opencv_selective_search()
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"an (H, W, 3) RGB array expected, got shape {rgb.shape}")
    height, width = rgb.shape[:2]
    if size:
        small = cv2.resize(rgb, (size, size))
        sx, sy = width / size, height / size
    else:
        small, sx, sy = rgb, 1.0, 1.0
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(small)
    search.switchToSelectiveSearchFast()
    _seed_c_rand()
    rects = np.asarray(search.process(), dtype=np.float64).reshape(-1, 4)
    x1, y1 = rects[:, 0] * sx, rects[:, 1] * sy
    x2, y2 = (rects[:, 0] + rects[:, 2]) * sx, (rects[:, 1] + rects[:, 3]) * sy
    boxes = np.stack([x1, y1, x2, y2], axis=1)
    keep = (x2 - x1 >= 1.0) & (y2 - y1 >= 1.0)
    boxes = boxes[keep][:top]
    np.clip(boxes[:, 0::2], 0.0, width, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0.0, height, out=boxes[:, 1::2])
    return boxes.astype(np.float32)


def compute_proposals(image: Image.Image, size: int = DEFAULT_SIZE,
                      top: int = DEFAULT_TOP) -> torch.Tensor:
    """Selective-search boxes of a PIL image: (P, 4) float32 x1 y1 x2 y2 in its original pixels,
    P <= top, in selective search's order (see the module docstring)."""
    rgb = np.asarray(_to_rgb(image))     # the loaders' RGB policy (alpha composited on black)
    return torch.from_numpy(selective_search(rgb, size, top))


# ----------------------------------------------------------------------------- the cache file

@dataclass
class Entry:
    """One image's cached record (its boxes stay in the file: `ProposalCache.boxes`)."""
    file_size: int
    mtime_ns: int
    digest: bytes
    width: int
    height: int
    count: int
    failed: bool
    offset: int = -1     # of the record in the file
    length: int = 0

    def matches_stat(self, st: os.stat_result) -> bool:
        return self.file_size == st.st_size and self.mtime_ns == st.st_mtime_ns


def encode_record(key: str, file_size: int, mtime_ns: int, digest: bytes, width: int,
                  height: int, boxes: np.ndarray | None, failed: bool = False) -> bytes:
    path = key.encode("utf-8")
    boxes = np.zeros((0, 4), np.float32) if boxes is None else np.ascontiguousarray(
        boxes, dtype="<f4").reshape(-1, 4)
    if len(digest) != _DIGEST:
        raise ValueError("digest must be 16 bytes (BLAKE2b-128)")
    payload = b"".join([
        _REC_META.pack(file_size, mtime_ns, width, height, len(boxes),
                       FLAG_FAILED if failed else 0, len(path)),
        path, digest, boxes.tobytes()])
    return _REC_HEAD.pack(_REC_MARK, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(buf, start: int, length: int) -> tuple[str, Entry, int]:
    """(key, entry without offset, offset of the boxes) of the payload at buf[start:start+length];
    ValueError when it does not parse."""
    (file_size, mtime_ns, width, height, count, flags,
     path_len) = _REC_META.unpack_from(buf, start)
    pos = start + _REC_META.size
    if _REC_META.size + path_len + _DIGEST + 16 * count != length:
        raise ValueError("record length")
    key = bytes(buf[pos:pos + path_len]).decode("utf-8")
    digest = bytes(buf[pos + path_len:pos + path_len + _DIGEST])
    entry = Entry(file_size, mtime_ns, digest, width, height, count, bool(flags & FLAG_FAILED))
    return key, entry, pos + path_len + _DIGEST


class ProposalCache:
    """The cache file of one data folder (format in the module docstring).

    `ProposalCache.open(path)` reads it; `open(path, size, top, writable=True)` creates it if
    needed, takes an exclusive lock (a second writer gets a one-line error), drops a damaged tail
    and lets `update` append records (`flush` writes and fsyncs them; `save` rewrites the file
    compacted). `entries` maps key -> Entry (the newest record of each path).
    """

    def __init__(self, path: str, meta: dict, writable: bool):
        self.path = path
        self.meta = meta
        self.size = int(meta["size"])
        self.top = int(meta["top"])
        self.writable = writable
        self.entries: dict[str, Entry] = {}
        self.record_keys: list[str] = []    # every intact record, in file order (for `canonical`)
        self.damaged = 0                    # records skipped for a bad CRC / a cut tail
        self._fd: int | None = None
        self._mm: mmap.mmap | None = None
        self._end = 0
        self._pending: list[tuple[str, Entry, bytes]] = []
        self.appended = 0

    # -- opening

    @classmethod
    def open(cls, path: str | os.PathLike, size: int | None = None, top: int | None = None,
             writable: bool = False) -> ProposalCache:
        path = os.fspath(path)
        if not os.path.exists(path):
            if not writable:
                raise ProposalCacheError(
                    f"no proposal cache at {path}: compute it first with "
                    f"python -m engine.proposals --data DIR (--out FILE)")
            if size is None or top is None:
                raise ValueError("a new cache needs size and top")
            cls._create(path, size, top)
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            if writable:
                _lock(fd, path)
            cache = cls._read(path, fd, writable)
            if writable and (size, top) != (cache.size, cache.top) and size is not None:
                raise ProposalCacheError(
                    f"{path} holds proposals for --size {cache.size} --top {cache.top}, this run "
                    f"asks for --size {size} --top {top}: pass those, another --out, or delete it")
        except BaseException:
            os.close(fd)
            raise
        return cache

    @staticmethod
    def _create(path: str, size: int, top: int) -> None:
        try:
            import cv2
            version = cv2.__version__
        except ImportError:
            version = None
        meta = {"format": FORMAT_VERSION, "size": size, "top": top, "method": METHOD,
                "seed": PROPOSAL_SEED, "opencv": version}
        _atomic_write(path, [_encode_header(meta)])

    @classmethod
    def _read(cls, path: str, fd: int, writable: bool) -> ProposalCache:
        total = os.fstat(fd).st_size
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if total else None
        buf = mm if mm is not None else b""
        try:
            meta, pos = _decode_header(buf, path)
        except BaseException:
            if mm is not None:
                mm.close()
            raise
        cache = cls(path, meta, writable)
        cache._fd, cache._mm = fd, mm
        while pos < total:
            if total - pos < _REC_HEAD.size:
                cache.damaged += 1
                break
            mark, length, crc = _REC_HEAD.unpack_from(buf, pos)
            start = pos + _REC_HEAD.size
            if mark != _REC_MARK or length > _MAX_PAYLOAD or start + length > total:
                cache.damaged += 1      # a cut tail (or garbage we cannot frame): stop here
                break
            if zlib.crc32(buf[start:start + length]) != crc:
                cache.damaged += 1      # a damaged record: skip it, its image is recomputed
                pos = start + length
                continue
            try:
                key, entry, _ = _decode_payload(buf, start, length)
            except (ValueError, struct.error, UnicodeDecodeError):
                cache.damaged += 1
                pos = start + length
                continue
            entry.offset, entry.length = pos, _REC_HEAD.size + length
            cache.entries[key] = entry
            cache.record_keys.append(key)
            pos = start + length
        cache._end = pos
        if writable and pos < total:
            os.ftruncate(fd, pos)       # drop the cut tail before appending
            os.fsync(fd)
        return cache

    # -- reading

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def boxes(self, key: str) -> np.ndarray:
        """(P, 4) float32 boxes of `key` (KeyError if absent)."""
        entry = self.entries[key]
        raw = self._record_bytes(entry)
        _, _, box_at = _decode_payload(raw, _REC_HEAD.size, entry.length - _REC_HEAD.size)
        return np.frombuffer(raw, dtype="<f4", count=4 * entry.count,
                             offset=box_at).reshape(-1, 4).astype(np.float32)

    def _record_bytes(self, entry: Entry) -> bytes:
        if entry.offset < 0:
            for _, pending, record in self._pending:
                if pending is entry:
                    return record
            raise KeyError("pending record not found")
        if self._mm is not None and entry.offset + entry.length <= len(self._mm):
            return self._mm[entry.offset:entry.offset + entry.length]
        return os.pread(self._fd, entry.length, entry.offset)

    # -- writing

    def update(self, key: str, file_size: int, mtime_ns: int, digest: bytes, width: int,
               height: int, boxes: np.ndarray | None, failed: bool = False) -> None:
        """Add (or supersede) the record of `key`; written at the next `flush`."""
        self._need_writable()
        record = encode_record(key, file_size, mtime_ns, digest, width, height, boxes, failed)
        count = 0 if boxes is None else int(np.asarray(boxes).reshape(-1, 4).shape[0])
        entry = Entry(file_size, mtime_ns, digest, width, height, count, failed, -1, len(record))
        self.entries[key] = entry
        self._pending.append((key, entry, record))

    def restat(self, key: str, file_size: int, mtime_ns: int) -> None:
        """Same content, new (size, mtime): a new record with the same boxes."""
        old = self.entries[key]
        self.update(key, file_size, mtime_ns, old.digest, old.width, old.height,
                    None if old.failed else self.boxes(key), old.failed)

    def flush(self) -> None:
        """Append the pending records and fsync: what a kill after this returns keeps."""
        if not self._pending:
            return
        self._need_writable()
        data = b"".join(record for _, _, record in self._pending)
        _write_all(self._fd, data, self._end)
        os.fsync(self._fd)
        pos = self._end
        for key, entry, record in self._pending:
            entry.offset = pos
            pos += len(record)
            self.record_keys.append(key)
        self._end = pos
        self.appended += len(self._pending)
        self._pending = []

    @property
    def pending(self) -> int:
        """Records added by `update` and not yet flushed."""
        return len(self._pending)

    def canonical(self, order: list[str]) -> bool:
        """True when the file holds exactly one intact record per key of `order`, in that order."""
        return not self._pending and not self.damaged and self.record_keys == order

    def save(self, order: Iterable[str] | None = None) -> None:
        """Rewrite the file with only the newest record of each key in `order` (default: all
        keys, sorted), atomically (temporary file, fsync, rename); keys not in the cache are
        skipped."""
        self._need_writable()
        self.flush()
        keys = [k for k in (sorted(self.entries) if order is None else order)
                if k in self.entries]
        records = (self._record_bytes(self.entries[k]) for k in keys)
        _atomic_write(self.path, [_encode_header(self.meta)], records)
        fd = os.open(self.path, os.O_RDWR)
        try:
            _lock(fd, self.path)
            fresh = ProposalCache._read(self.path, fd, True)
        except BaseException:
            os.close(fd)
            raise
        self.close()
        self.__dict__.update(fresh.__dict__)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)        # also releases the lock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _need_writable(self):
        if not self.writable or self._fd is None:
            raise ValueError("this ProposalCache was opened read-only (or is closed)")


def _encode_header(meta: dict) -> bytes:
    text = json.dumps(meta, sort_keys=True).encode("utf-8")
    return MAGIC + _HEADER_LEN.pack(len(text), zlib.crc32(text)) + text


def _decode_header(buf, path: str) -> tuple[dict, int]:
    bad = ProposalCacheError(f"{path} is not a densesim proposal cache, or it is damaged: {_FIX}")
    if len(buf) < len(MAGIC) + _HEADER_LEN.size or bytes(buf[:len(MAGIC)]) != MAGIC:
        raise bad
    length, crc = _HEADER_LEN.unpack_from(buf, len(MAGIC))
    start = len(MAGIC) + _HEADER_LEN.size
    text = bytes(buf[start:start + length])
    if len(text) != length or zlib.crc32(text) != crc:
        raise bad
    try:
        meta = json.loads(text)
        if meta.get("format") != FORMAT_VERSION:
            raise ProposalCacheError(f"{path} has cache format {meta.get('format')}, this "
                                     f"version reads format {FORMAT_VERSION}: {_FIX}")
        int(meta["size"]), int(meta["top"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise bad from None
    return meta, start + length


def _lock(fd: int, path: str) -> None:
    try:
        import fcntl
    except ImportError:      # not POSIX: no lock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ProposalCacheError(f"another process is writing {path}: wait for it to finish "
                                 f"(or stop it; a rerun continues where it stopped)") from None


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _atomic_write(path: str, *chunk_lists: Iterable[bytes]) -> None:
    """Write the chunks to PATH.tmp, fsync, rename over PATH (a kill leaves PATH as it was)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        for chunks in chunk_lists:
            for chunk in chunks:
                _write_all(fd, chunk, offset)
                offset += len(chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    os.replace(tmp, path)
    try:
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------- the loader side

def load_proposals(cache_file: str | os.PathLike, dataset,
                   top: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The cached boxes of every image of `dataset` (an ImageFolder: `.root`, `.paths`).

    Returns (boxes, counts, missing): boxes (N, top, 4) float32 x1 y1 x2 y2 in original pixels,
    the first `counts[i]` rows real and the rest zero; counts (N,) int64; missing, the dataset
    paths with no valid entry (not in the cache, or size/mtime_ns differ from those recorded when
    the boxes were computed: rerun python -m engine.proposals). An image that could not be decoded
    when the cache was made has a valid entry with 0 boxes. Raises ProposalCacheError (one line)
    for an absent or damaged cache file.
    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    cache = ProposalCache.open(cache_file)
    try:
        n = len(dataset.paths)
        boxes = np.zeros((n, top, 4), np.float32)
        counts = np.zeros(n, np.int64)
        missing: list[str] = []
        buf = cache._mm
        for i, path in enumerate(dataset.paths):
            entry = cache.entries.get(relative_key(path, dataset.root))
            try:
                st = os.stat(path)
            except OSError:
                missing.append(path)
                continue
            if entry is None or not entry.matches_stat(st):
                missing.append(path)
                continue
            k = min(top, entry.count)
            if k:
                _, _, box_at = _decode_payload(buf, entry.offset + _REC_HEAD.size,
                                               entry.length - _REC_HEAD.size)
                boxes[i, :k] = np.frombuffer(buf, dtype="<f4", count=4 * k,
                                             offset=box_at).reshape(k, 4)
            counts[i] = k
    finally:
        cache.close()
    return torch.from_numpy(boxes), torch.from_numpy(counts), missing


def describe_missing(missing: list[str], total: int, cache_file: str | os.PathLike) -> str:
    """One line for the log about the images `load_proposals` found no boxes for."""
    if not missing:
        return f"proposals: all {total} images have cached boxes ({cache_file})"
    first = missing[0]
    return (f"proposals: {len(missing)} of {total} images have no cached boxes (e.g. {first}); "
            f"they get none: rerun python -m engine.proposals to add them ({cache_file})")


# ----------------------------------------------------------------------------- a worker's task

def proposal_task(task: tuple) -> tuple:
    """One image for `python -m engine.proposals`: task = (path, key, cached digest or None,
    size, top, delay_s). Returns (key, status, file_size, mtime_ns, digest, width, height, boxes):
    status "same" (content unchanged: nothing computed), "ok", "failed" (not decodable or
    selective search failed: no boxes) or "gone" (the file vanished)."""
    path, key, cached_digest, size, top, delay = task
    try:
        with open(path, "rb") as handle:
            st = os.fstat(handle.fileno())
            data = handle.read()
    except OSError:
        return (key, "gone", 0, 0, b"", 0, 0, None)
    digest = file_digest(data)
    if cached_digest is not None and digest == cached_digest:
        return (key, "same", st.st_size, st.st_mtime_ns, digest, 0, 0, None)
    if delay:
        time.sleep(delay)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            image = decode_rgb(io.BytesIO(data))
        width, height = image.size
    except Exception:  # noqa: BLE001 - any decode failure: no boxes for this file
        return (key, "failed", st.st_size, st.st_mtime_ns, digest, 0, 0, None)
    try:
        boxes = selective_search(np.asarray(image), size, top)
    except ImportError:
        raise
    except Exception:  # noqa: BLE001 - e.g. OpenCV refusing a degenerate image
        return (key, "failed", st.st_size, st.st_mtime_ns, digest, width, height, None)
    return (key, "ok", st.st_size, st.st_mtime_ns, digest, width, height, boxes)


__all__ = ["DEFAULT_SIZE", "DEFAULT_TOP", "Entry", "PROPOSAL_SEED", "ProposalCache",
           "ProposalCacheError", "compute_proposals", "default_cache_path", "describe_missing",
           "load_proposals", "opencv_selective_search", "relative_key", "selective_search"]
