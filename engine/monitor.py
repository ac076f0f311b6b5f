"""What a run shows and leaves behind: a progress line, a JSON-lines metrics log, a loss-curve PNG.

The plot is drawn with Pillow (already a dependency) so that no plotting library is needed.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


class MetricsLog:
    """Appends one JSON object per line; appending keeps a resumed run's history in one file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after `step` (a resumed run redoes them: without this, a run
        killed after its last checkpoint would log those steps twice); returns how many were
        dropped. The file is rewritten atomically."""
        if not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:   # a line cut by a crash
                dropped += 1
                continue
            if record.get("step", 0) > step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        return dropped

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: skip it, keep the rest
                continue
        return records


class ProgressBar:
    """One status line: bar, step, loss, img/s, data-wait %, ETA.

    On a terminal it redraws in place; otherwise (CI, a log file) it prints one line per update.
    """

    def __init__(self, total_steps: int, stream=None, width: int = 24):
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.width = width
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()

    def update(self, step: int, loss: float, img_per_s: float, data_wait: float,
               lr: float | None = None, skipped_steps: int = 0) -> None:
        done = step / max(1, self.total)
        filled = int(round(self.width * done))
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self.started
        eta = "" if step == 0 else f" | ETA {format_seconds(elapsed / done * (1 - done))}"
        lr_text = "" if lr is None else f" | lr {lr:.2e}"
        line = (f"[{bar}] step {step}/{self.total} | loss {loss:.4f}{lr_text} | "
                f"{img_per_s:.1f} img/s | data-wait {100 * data_wait:.0f}%{eta}"
                + (f" | {skipped_steps} bad steps skipped" if skipped_steps else ""))
        if self.interactive:
            self.stream.write("\r" + line + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of its own (e.g. an evaluation result) that the redrawn bar does not erase."""
        self.stream.write(("\r\033[K" if self.interactive else "") + message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    # the round step closest to span/count (the smallest one above it can leave only two ticks)
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10)), key=lambda c: abs(c - raw))
    first = math.ceil(low / step) * step
    ticks, value = [], first
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 10))
        value += step
    return ticks


KNN_COLOUR = (200, 70, 30)


def _knn_value(record: dict) -> float | None:
    """The online monitor's headline figure in a metrics record (kNN top-1, k=200 if present)."""
    value = record.get("knn_top1")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _draw_knn_axis(draw, font, records, x_low, x_high, margins, size) -> None:
    """kNN top-1 (online monitor) against step on a right-hand 0-1 axis, as dots joined by lines."""
    points = sorted((r["step"], _knn_value(r)) for r in records
                    if "step" in r and _knn_value(r) is not None)
    if not points:
        return
    left, right, top, bottom = margins
    width, height = size

    def to_xy(step: float, value: float) -> tuple[float, float]:
        x = left + (step - x_low) / (x_high - x_low) * (width - left - right)
        return x, top + (1.0 - value) * (height - top - bottom)

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = to_xy(x_low, tick)
        draw.line([width - right, y, width - right + 4, y], fill=KNN_COLOUR)
        draw.text((width - right + 8, y), f"{tick:.2f}", fill=KNN_COLOUR, font=font, anchor="lm")
    xy = [to_xy(s, v) for s, v in points]
    if len(xy) > 1:
        draw.line(xy, fill=KNN_COLOUR, width=2)
    for x, y in xy:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=KNN_COLOUR)
    draw.text((width - right + 4, top - 20), "kNN top-1", fill=KNN_COLOUR, font=font)


def plot_loss_curve(records: list[dict], path: Path, title: str = "SIM pre-training loss",
                    size: tuple[int, int] = (800, 480)) -> Path | None:
    """Loss against step as a PNG (raw points light, a running mean dark), and the online kNN
    monitor's top-1 on a right-hand axis where the records have it. None if no loss points."""
    points = [(r["step"], r["loss"]) for r in records
              if "loss" in r and "step" in r and math.isfinite(r["loss"])]
    if not points:
        return None
    points.sort()
    width, height = size
    has_knn = any(_knn_value(r) is not None for r in records)
    left, right, top, bottom = 80, 64 if has_knn else 24, 40, 56
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    x_low, x_high = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    y_low, y_high = min(losses), max(losses)
    pad = 0.05 * (y_high - y_low or abs(y_high) or 1.0)
    y_low, y_high = y_low - pad, y_high + pad

    def to_xy(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - x_low) / (x_high - x_low) * (width - left - right)
        y = top + (y_high - loss) / (y_high - y_low) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for tick in _nice_ticks(y_low, y_high):
        _, y = to_xy(x_low, tick)
        draw.line([left - 4, y, width - right, y], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{tick:.4g}", fill="black", font=font, anchor="rm")
    for tick in _nice_ticks(x_low, x_high):
        x, _ = to_xy(tick, y_low)
        draw.line([x, top, x, height - bottom + 4], fill=(225, 225, 225))
        draw.text((x, height - bottom + 8), f"{tick:g}", fill="black", font=font, anchor="ma")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    raw = [to_xy(s, v) for s, v in points]
    if len(raw) > 1:
        draw.line(raw, fill=(150, 180, 230), width=1)
    half = max(1, len(points) // 40)  # a centred running mean: it does not lag the raw curve
    smooth = []
    for i in range(len(points)):
        chunk = losses[max(0, i - half): i + half + 1]
        smooth.append(to_xy(steps[i], sum(chunk) / len(chunk)))
    if len(smooth) > 1:
        draw.line(smooth, fill=(20, 60, 160), width=2)
    else:
        x, y = smooth[0]
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 60, 160))
    draw.text((width / 2, 14), title, fill="black", font=font, anchor="mm")
    draw.text((width / 2, height - 16), "optimiser step", fill="black", font=font, anchor="mm")
    draw.text((12, top - 20), "loss", fill="black", font=font)
    _draw_knn_axis(draw, font, records, x_low, x_high, (left, right, top, bottom), size)
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    image.save(tmp)
    tmp.replace(path)
    return Path(path)
