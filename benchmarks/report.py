"""What every benchmark records beside its numbers, and how it writes them."""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
from datetime import date
from pathlib import Path

import torch


def meta(args) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if os.path.exists("/proc/cpuinfo") else ""
    return {"date": str(date.today()), "machine": f"{platform.machine()} {cpu}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads", "torch": torch.__version__, "args": vars(args)}


def emit(args, results: dict, path: str | None) -> dict:
    """Print the JSON record and write it to ``path`` if given."""
    record = {"meta": meta(args), "results": results}
    print(json.dumps(record))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2))
    return record


def median_ci(values, *, level: float = 0.95, reps: int = 2000, seed: int = 0) -> list[float]:
    """Percentile-bootstrap confidence interval of the median of ``values`` (seeded: reruns print the same).

    The per-round ratios of a shared machine spread by ±5-10 %; a median alone does not say whether a 1 %
    difference between two variants is real, the interval does.
    """
    values = list(values)
    if len(values) < 2:
        return [values[0], values[0]] if values else []
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(reps))
    lo = int((1 - level) / 2 * reps)
    return [meds[lo], meds[reps - 1 - lo]]
