"""What every benchmark records beside its numbers, and how it writes them."""
from __future__ import annotations

import json
import os
import platform
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
