"""`python -m bench.shard_pytest --shards N --out DIR PATH... [-- PYTEST_ARGS...]`: one pytest
selection as N pytest processes at once.

For the compiled Triton tests on a GPU machine (`bench/gpu_suite.sh`): their time is mostly Triton
JIT compilation, which is CPU work (one core per process), so N processes on a 16-core machine
finish several times sooner than one, on the same GPU. Never use it for timings.

The test ids are collected once (`pytest --collect-only -q`), dealt round-robin into N shards,
and each shard runs as `pytest -q -p no:cacheprovider --junitxml DIR/shard-K.xml [PYTEST_ARGS]
IDS...` with its output in DIR/shard-K.log. Prints one line per shard and the totals; exits with
the worst shard's status (0 when all passed). An interrupt (SIGINT, as `timeout -s INT` sends to
the process group) reaches every shard, and each writes the results it has.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path


def collect(paths: list[str], pytest_args: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *pytest_args, *paths],
                         capture_output=True, text=True, check=False)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    if out.returncode not in (0, 5) or not ids:
        sys.stdout.write(out.stdout[-4000:] + out.stderr[-4000:])
    return ids


def shards(ids: list[str], count: int) -> list[list[str]]:
    """Round-robin: neighbouring ids (often the same kernel at other sizes) spread out."""
    return [chunk for chunk in (ids[k::count] for k in range(count)) if chunk]


def tally(log: str) -> dict[str, int]:
    """Counts from pytest's last summary line ('3 failed, 40 passed, 1 skipped in 9.1s')."""
    counts: dict[str, int] = {}
    for line in reversed(log.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", line)
        if found:
            for number, word in found:
                counts[word.rstrip("s") if word.startswith("error") else word] = int(number)
            break
    return counts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m bench.shard_pytest",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="test files or directories")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True, help="folder for shard logs and XML")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ids = collect(args.paths, pytest_args)
    if not ids:
        print("no tests collected")
        return 5
    started = time.perf_counter()
    running = []
    for k, chunk in enumerate(shards(ids, args.shards)):
        log = open(args.out / f"shard-{k}.log", "w")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={args.out / f'shard-{k}.xml'}", *pytest_args, *chunk]
        running.append((k, len(chunk), log, subprocess.Popen(command, stdout=log,
                                                             stderr=subprocess.STDOUT)))
    print(f"{len(ids)} tests in {len(running)} shards", flush=True)
    worst, totals = 0, {}
    try:
        for k, size, log, process in running:
            code = process.wait()
            log.close()
            counts = tally((args.out / f"shard-{k}.log").read_text())
            for key, value in counts.items():
                totals[key] = totals.get(key, 0) + value
            worst = max(worst, code)
            print(f"shard {k}: {size} tests, exit {code}, "
                  + ", ".join(f"{v} {key}" for key, v in counts.items()), flush=True)
    except KeyboardInterrupt:
        for _, _, _, process in running:
            process.wait()
        print("interrupted: each shard wrote the results it had", flush=True)
        worst = max(worst, 2)
    print(f"total: {', '.join(f'{v} {k}' for k, v in totals.items()) or 'nothing ran'} in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
