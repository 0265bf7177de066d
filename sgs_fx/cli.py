"""`sgs-fx demo | train | verify | export` — the command-line front end (reuses the library calls)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields

from .cifar.train import TrainConfig


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="vgg11_bn, vgg16_bn, resnet18 (CIFAR) or tv:<torchvision name>")
    p.add_argument("--width", type=float, default=d.width, help="channel width multiplier (default 1.0)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--sgs", dest="scales", action="store_const", const="mi", default="mi",
                   help="SGS with MI-driven scales (default)")
    p.add_argument("--no-sgs", dest="scales", action="store_const", const="none", help="plain baseline")
    p.add_argument("--scales", dest="scales", choices=["mi", "none", "acb", "repvgg", "skeleton"],
                   help="mi (SGS), none (baseline) or fixed scales equivalent to a branch recipe")
    p.add_argument("--mode", choices=["sgs", "branches"], default=d.mode,
                   help="branches: train real multi-branch blocks for --recipe (the structural baseline; α normalised "
                        "so that S has mean 1: the published block at lr/m, weight decay*m, docs/graphs.md)")
    p.add_argument("--recipe", choices=["acb", "repvgg", "skeleton"], help="with --mode branches (sets --scales)")
    p.add_argument("--scaling", choices=["step", "hook"], default=d.scaling,
                   help="when SGS scales the weight gradients: at the optimizer's step (default) or in the backward "
                        "pass (a gradient hook)")
    p.add_argument("--k", type=float, default=d.k)
    p.add_argument("--every", type=int, default=d.every)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--mi-batches", type=int, default=d.mi_batches)
    p.add_argument("--zero-removal", action="store_true")
    p.add_argument("--cutout", type=int, default=d.cutout, help="cutout size (paper: 16; default off)")
    p.add_argument("--subset", type=int, help="train on the first N shuffled images only")
    p.add_argument("--data", choices=["cifar10", "synthetic"], default=d.data)
    p.add_argument("--data-dir", help="a folder with cifar-10-batches-py/ (torchvision's format)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-export", dest="export", action="store_false")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap the steps of each epoch (smoke runs)")
    p.add_argument("--qat", dest="qat_epoch", type=int, metavar="EPOCH",
                   help="fake-quant INT8 training (QAT) from this 0-based epoch on (-1: the last epoch); "
                        "the run then exports model_int8.onnx")
    p.add_argument("--weight-bits", type=int, choices=[7, 8], default=d.weight_bits,
                   help="QAT weight bits: 7 (default; exact in onnxruntime on any x86 CPU) or 8 (VNNI / ARM)")


def _config(args) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if getattr(args, "recipe", None):
        values["scales"] = args.recipe
    if values.get("qat_epoch") is not None and values["qat_epoch"] < 0:  # -1: the last epoch
        values["qat_epoch"] += values.get("epochs", TrainConfig.epochs)
    return TrainConfig(**values)


def cmd_train(args) -> int:
    from .cifar.train import NaNLossError, train

    cfg = _config(args)
    try:
        summary = train(cfg, resume=args.resume)
    except NaNLossError as exc:
        print(f"sgs-fx train: {exc}", file=sys.stderr)
        return 3
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:  # under torchrun, rank 0 alone exports and reports
        return 0
    final = summary["final"]
    print(json.dumps({"out": cfg.out, "test_acc": final["test_acc"] if final else None,
                      "best_test_acc": summary["best_test_acc"], "onnx": summary.get("onnx")}))
    if summary.get("onnx") and not summary["onnx"]["passed"]:
        print(f"sgs-fx train: trained, but the exported {summary['onnx']['path']} failed its onnxruntime check "
              f"(kept for inspection; the checkpoint is in {cfg.out})", file=sys.stderr)
        return 4
    return 0


def cmd_demo(args) -> int:
    from .cifar.demo import run_demo

    return run_demo(out=args.out, epochs=args.epochs, subset=args.subset, width=args.width, data_dir=args.data_dir)


def cmd_verify(args) -> int:
    import torch

    from .cifar.models import build_model
    from .verify import verify

    torch.manual_seed(args.seed)
    model = build_model(args.model, width=args.width, num_classes=10)
    g = torch.Generator().manual_seed(args.seed)
    batches = [(torch.randn(args.batch_size, 3, args.size, args.size, generator=g),
                torch.randint(0, 10, (args.batch_size,), generator=g)) for _ in range(4)]
    factories = {
        "sgd": lambda p: torch.optim.SGD(p, lr=args.lr),
        "momentum": lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay),
        "nesterov": lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay),
        "adam": lambda p: torch.optim.Adam(p, lr=args.lr / 10),
    }
    report = verify(model, batches, steps=args.steps, optimizer_factory=factories[args.optimizer], branches=args.recipe)
    print(report.table())
    if not report.ok:
        print("sgs-fx verify: the equivalence does not hold where it should", file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    import torch

    from .export.onnx import export_onnx
    from .export.qdq import has_quantization
    from .cifar.models import build_model

    if not args.checkpoint and not args.model:
        print("sgs-fx export: give --checkpoint (written by `sgs-fx train`) or --model", file=sys.stderr)
        return 2
    model = build_model(args.model, width=args.width, num_classes=args.num_classes) if args.model else None
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and "model" in state and "config" in state:  # written by `sgs-fx train`
            from .cifar.train import load_trained

            model, _ = load_trained(args.checkpoint)  # SGS, branched or fake-quant, as trained
            state = model.state_dict()
        elif model is None:
            print(f"sgs-fx export: {args.checkpoint} is a plain state_dict; say which --model it belongs to",
                  file=sys.stderr)
            return 2
        elif args.recipe:  # a plain state_dict of a branch-mode model
            import sgs_fx

            model = sgs_fx.transform(model, mode="branches", branches=args.recipe)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            hint = " (a branch-mode state_dict needs --recipe)" if any(".branches." in k for k in state) else ""
            print(f"sgs-fx export: {args.checkpoint} does not fit --model {args.model}{hint}: "
                  f"{str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
    shape = tuple(int(v) for v in args.input_shape.split(","))
    check = None
    quantized = has_quantization(model)
    if args.int8 or quantized:
        from .cifar.data import load_cifar10, synthetic_cifar

        data = synthetic_cifar() if args.calib_data == "synthetic" else load_cifar10(args.data_dir)
        check = data.agreement_images()
        if not quantized:  # a float model: post-training quantization on training batches
            import sgs_fx

            model = sgs_fx.quantize_ptq(model, data.calibration_batches(args.calib_batches),
                                        num_batches=args.calib_batches, weight_bits=args.weight_bits)
    report = export_onnx(model, args.output, torch.randn(shape), opset=args.opset, check_input=check)
    print(report)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sgs-fx", description="Spatial Gradient Scaling for any PyTorch model")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a small VGG on CIFAR-10 with and without SGS, export, compare")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--subset", type=int, default=25000)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--data-dir")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("train", help="train on CIFAR-10 (the paper's recipe by default)")
    _add_train_args(p)
    p.add_argument("--out", default="runs/default")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("verify", help="branches vs SGS, side by side, float64")
    p.add_argument("--model", default="vgg11_bn")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--optimizer", choices=["sgd", "momentum", "nesterov", "adam"], default="momentum")
    p.add_argument("--recipe", choices=["acb", "repvgg", "skeleton"], default="acb")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--size", type=int, default=32, help="input side (torchvision models: e.g. 64)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("export", help="export a checkpoint to ONNX, checked with onnxruntime")
    p.add_argument("--model", help="the architecture of a plain state_dict (a train checkpoint says it itself)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--checkpoint", help="written by `sgs-fx train`, or a plain state_dict")
    p.add_argument("--recipe", choices=["acb", "repvgg", "skeleton"], help="of a branch-mode checkpoint")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--input-shape", default="1,3,32,32")
    p.add_argument("--opset", type=int)
    p.add_argument("--int8", action="store_true",
                   help="INT8 QDQ ONNX: a QAT checkpoint as trained; a float one by post-training quantization")
    p.add_argument("--calib-batches", type=int, default=32, help="--int8 on a float model: calibration batches")
    p.add_argument("--weight-bits", type=int, choices=[7, 8], default=7, help="--int8 PTQ weight bits")
    p.add_argument("--calib-data", choices=["cifar10", "synthetic"], default="cifar10",
                   help="--int8: calibration and agreement-check images (training / test split)")
    p.add_argument("--data-dir", help="a folder with cifar-10-batches-py/ (torchvision's format)")
    p.set_defaults(fn=cmd_export)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command in ("train", "demo") else logging.WARNING,
                        format="%(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"sgs-fx {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
