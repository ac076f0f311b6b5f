"""`python -m engine.proposals --data DIR`: selective-search region proposals, computed once per
image and cached, for the methods that train on boxes (CCOP, DetReg).

    python -m engine.proposals --data /path/to/coco/train2017     # DIR/.densesim-proposals.128.bin
    python -m engine.proposals --data /read-only/imagenet --out ~/in1k.proposals.bin --workers 8

Boxes: OpenCV's selective search (fast mode) on the image resized to --size x --size (DetReg: 128;
0 = the original pixels), rescaled to the original image: float32 x1 y1 x2 y2 edge coordinates,
the first --top (100, CCOP's cap) in selective search's order, boxes under 1 pixel dropped;
deterministic (pipelines/proposals.py has the details and the cache format).

The cache is one file per folder and size (default `DIR/.densesim-proposals.<size>.bin`, a hidden
file the data loaders ignore; --out FILE anywhere else, required when DIR is read-only). Records
are appended and fsync'ed every --flush-every images: a killed run loses at most those, and the
same command continues it. Every rerun hashes each file (BLAKE2b): unchanged files are skipped
(--trust-mtime skips those whose size and mtime are unchanged without reading them), changed
ones are recomputed, new ones added, and the entries of removed files are dropped when the run
ends. Bad input gives one `error:` line and exit code 2.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time

from engine.monitor import format_seconds
from pipelines.datasets import DataError, resolve_source
from pipelines.proposals import (DEFAULT_SIZE, DEFAULT_TOP, ProposalCache, ProposalCacheError,
                                 default_cache_path, opencv_selective_search, proposal_task,
                                 relative_key)

# Seconds to sleep per computed image: lets the tests kill a run part-way (not for users).
DELAY_ENV = "DENSESIM_PROPOSALS_TEST_DELAY"
FLUSH_SECONDS = 30.0


class ProposalsError(ValueError):
    """Options or a setup that cannot work; the one-line message says what to do."""


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.proposals",
        description="Selective-search region proposals for a folder of images, computed once "
                    "and cached in one file (resumable; reruns update only what changed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="folder of images, class/img.jpg or flat (default: the embedded "
                             "sample photos)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="cache file (default DIR/.densesim-proposals.<size>.bin; required "
                             "when DIR is read-only; a folder gets densesim-proposals.<size>.bin)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP,
                        help="boxes kept per image, the first in selective search's order")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help="selective search runs on the image resized to SIZE x SIZE "
                             "(DetReg's 128); 0 = on the original pixels (much slower)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes (0 or 1: in this process)")
    parser.add_argument("--flush-every", type=int, default=64, metavar="N",
                        help=f"append and fsync the records every N images (and at least every "
                             f"{FLUSH_SECONDS:.0f} s): a kill loses at most these")
    parser.add_argument("--trust-mtime", action="store_true",
                        help="skip files whose size and mtime match the cache without reading "
                             "and hashing them")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


class LineProgress:
    """`proposals [####----] 120/1000 | 35.2 img/s | ETA 0:25` on stderr: redrawn in place on a
    terminal, otherwise one line about every 10% (or 30 s)."""

    def __init__(self, total: int, stream=None, quiet: bool = False, width: int = 24):
        self.total, self.width, self.quiet = total, width, quiet
        self.stream = stream or sys.stderr
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = self.last = time.perf_counter()
        self.last_done = 0

    def update(self, done: int) -> None:
        if self.quiet or not self.total:
            return
        now = time.perf_counter()
        final = done >= self.total
        if self.interactive:
            due = now - self.last >= 0.2
        else:
            due = (done - self.last_done >= max(1, self.total // 10)) or now - self.last >= 30
        if not (due or final):
            return
        self.last, self.last_done = now, done
        elapsed = now - self.started
        frac = done / self.total
        filled = round(self.width * frac)
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = "" if not done or final else f" | ETA {format_seconds(elapsed / frac * (1 - frac))}"
        line = (f"proposals [{'#' * filled}{'-' * (self.width - filled)}] {done}/{self.total} | "
                f"{rate:.1f} img/s{eta}")
        if self.interactive:
            self.stream.write("\r" + line + "\033[K" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import cv2
    cv2.setNumThreads(1)                             # one image per process; no nested threads


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def resolve_cache_path(out: str | None, root: str, size: int) -> str:
    if out is None:
        return default_cache_path(root, size)
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.isdir(out):
        return os.path.join(out, f"densesim-proposals.{size}.bin")
    return out


def open_cache(path: str, size: int, top: int, default: bool, root: str) -> ProposalCache:
    try:
        parent = os.path.dirname(path)
        if not default:
            os.makedirs(parent, exist_ok=True)
        return ProposalCache.open(path, size, top, writable=True)
    except ProposalCacheError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if default:
            raise ProposalsError(f"cannot write the proposal cache in the data folder {root} "
                                 f"({reason}): a read-only folder needs --out FILE on a "
                                 f"writable disk") from None
        raise ProposalsError(f"cannot write the proposal cache {path} ({reason}): choose a "
                             f"writable --out") from None


def check_args(args) -> None:
    if args.top < 1:
        raise ProposalsError(f"--top must be at least 1, got {args.top}")
    if args.size != 0 and args.size < 8:
        raise ProposalsError(f"--size must be 0 (original pixels) or at least 8, got {args.size}")
    if args.workers < 0:
        raise ProposalsError(f"--workers must be 0 or more, got {args.workers}")
    if args.flush_every < 1:
        raise ProposalsError(f"--flush-every must be at least 1, got {args.flush_every}")


def run(args) -> dict:
    """Fill / update the cache; returns the counts the summary line prints."""
    check_args(args)
    dataset = resolve_source(args.data)
    try:
        cv2 = opencv_selective_search()
    except ImportError as exc:
        raise ProposalsError(str(exc)) from None
    cv2.setNumThreads(1)
    default = args.out is None
    path = resolve_cache_path(args.out, dataset.root, args.size)
    cache = open_cache(path, args.size, args.top, default, dataset.root)
    started = time.perf_counter()
    stats = {"images": len(dataset.paths), "new": 0, "changed": 0, "unchanged": 0, "failed": 0,
             "vanished": 0, "damaged": cache.damaged, "dropped": 0, "cache": path,
             "failed_example": None}
    try:
        keys = [relative_key(p, dataset.root) for p in dataset.paths]
        delay = float(os.environ.get(DELAY_ENV) or 0)
        tasks = []
        for p, key in zip(dataset.paths, keys):
            entry = cache.get(key)
            if entry is not None and args.trust_mtime:
                try:
                    if entry.matches_stat(os.stat(p)):
                        stats["unchanged"] += 1
                        continue
                except OSError:
                    pass
            tasks.append((p, key, entry.digest if entry else None, args.size, args.top, delay))
        interrupted = _process(tasks, cache, stats, args)
        cache.flush()
        if interrupted:
            stats["interrupted"] = True
            return stats
        order = [k for k in keys if k in cache.entries]
        wanted = set(keys)
        stats["dropped"] = sum(1 for k in cache.entries if k not in wanted)
        if not cache.canonical(order):
            cache.save(order)
        counts = [cache.entries[k].count for k in order if not cache.entries[k].failed]
        stats["cached"] = len(order)
        stats["mean_boxes"] = sum(counts) / len(counts) if counts else 0.0
    finally:
        cache.close()
    stats["seconds"] = time.perf_counter() - started
    return stats


def _process(tasks: list, cache: ProposalCache, stats: dict, args) -> bool:
    """Run the tasks (in worker processes when asked), appending results to the cache; returns
    True when interrupted (Ctrl-C / SIGTERM) after flushing what was done."""
    progress = LineProgress(len(tasks), quiet=args.quiet)
    workers = min(args.workers, len(tasks))
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context().Pool(workers, initializer=_init_worker)
        results = pool.imap_unordered(proposal_task, tasks, chunksize=1)
    else:
        results = map(proposal_task, tasks)
    last_flush = time.perf_counter()
    try:
        for done, (key, status, size, mtime, digest, width, height, boxes) in enumerate(
                results, 1):
            if status == "gone":
                stats["vanished"] += 1
            elif status == "same":
                entry = cache.get(key)
                if (entry.file_size, entry.mtime_ns) != (size, mtime):
                    cache.restat(key, size, mtime)
                stats["unchanged"] += 1
            else:
                stats["changed" if key in cache else "new"] += 1
                failed = status == "failed"
                if failed:
                    stats["failed"] += 1
                    stats["failed_example"] = stats["failed_example"] or key
                cache.update(key, size, mtime, digest, width, height, boxes, failed)
            if cache.pending >= args.flush_every or (
                    cache.pending and time.perf_counter() - last_flush >= FLUSH_SECONDS):
                cache.flush()
                last_flush = time.perf_counter()
            progress.update(done)
    except KeyboardInterrupt:
        if pool is not None:
            pool.terminate()
            pool.join()
        cache.flush()
        return True
    if pool is not None:
        pool.close()
        pool.join()
    return False


def summary(stats: dict, args) -> str:
    computed = stats["new"] + stats["changed"]
    parts = [f"proposals: {stats['images']} images",
             f"{computed} computed ({stats['new']} new, {stats['changed']} changed), "
             f"{stats['unchanged']} unchanged",
             f"{stats['mean_boxes']:.1f} boxes per image (mean; --top {args.top}, "
             f"--size {args.size})",
             f"{format_seconds(stats['seconds'])} ({stats['seconds']:.1f} s)",
             f"cache {stats['cache']}"]
    notes = []
    if stats["failed"]:
        notes.append(f"{stats['failed']} unreadable (no boxes, e.g. {stats['failed_example']})")
    if stats["vanished"]:
        notes.append(f"{stats['vanished']} vanished while running")
    if stats["dropped"]:
        notes.append(f"{stats['dropped']} entries of files no longer in the folder dropped")
    if stats["damaged"]:
        notes.append(f"{stats['damaged']} damaged records dropped (recomputed)")
    return " | ".join(parts) + ("\n  " + "; ".join(notes) if notes else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)   # stop like Ctrl-C: flush first
    except ValueError:       # not the main thread
        previous = None
    try:
        stats = run(args)
    except (ProposalsError, ProposalCacheError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: nothing to keep yet; rerun the same command", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if stats.get("interrupted"):
        done = stats["new"] + stats["changed"]
        print(f"\ninterrupted: {done} images computed and saved in {stats['cache']}; rerun the "
              f"same command to continue", file=sys.stderr)
        return 130
    print(summary(stats, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
