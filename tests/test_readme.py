"""The README's quick start and the INT8 page's example run as printed (with a tiny stand-in for the user's data)."""
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _python_block(heading: str | None, doc: str = "README.md") -> str:
    """The first python code block under ``## <heading>`` of ``doc`` (of the whole file if heading is None)."""
    text = (ROOT / doc).read_text()
    section = text if heading is None else text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"{doc}: no python block under '## {heading}'"
    return blocks[0]


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024, "the README is read in five minutes: details go to docs/"
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name}: {target}"


@pytest.mark.slow
def test_readme_quick_start_runs(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    # what the snippet leaves to the user: their loader, epochs, loss and a few batches for verify
    namespace = {"train_loader": data, "epochs": 2, "loss_fn": torch.nn.functional.cross_entropy,
                 "batches": [x for x, _ in data]}
    monkeypatch.chdir(tmp_path)  # it writes ckpt.pt and model.onnx into the working directory
    exec(compile(_python_block("Quick start"), "README.md quick start", "exec"), namespace)
    out = capsys.readouterr().out
    assert namespace["report"].passed and (tmp_path / "model.onnx").exists() and (tmp_path / "ckpt.pt").exists()
    ckpt = torch.load(tmp_path / "ckpt.pt")
    assert set(ckpt["model"]) == set(namespace["plain"].state_dict())  # the plain model's keys
    s = ckpt["sgs"]["scales"]["layer1.0.conv1"]
    assert s.shape == (3, 3) and not torch.equal(s, torch.ones_like(s)), "epoch 1 calibrates S from the data"
    assert "EQUIVALENT" in out and "PASSED" in out


@pytest.mark.slow
def test_readme_int8_block_runs(tmp_path, monkeypatch, capsys):
    from sgs_fx.cifar.models import build_model

    torch.manual_seed(0)
    images = torch.randn(96, 3, 32, 32)
    labels = torch.randint(0, 10, (96,))
    loader = [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]
    model = build_model("vgg11_bn", width=0.125)
    namespace = {"sgs_fx": __import__("sgs_fx"), "model": model, "float_model": model, "x": images[:32],
                 "train_loader": loader, "val_images": images}
    qat_part, ptq_part = _python_block(None, "docs/int8.md").split("\nptq = ", 1)
    before_export, export = qat_part.split("\nreport = ", 1)
    monkeypatch.chdir(tmp_path)  # the block writes int8.onnx and ptq_int8.onnx into the working directory
    exec(compile(before_export, "README.md INT8 block", "exec"), namespace)
    # "...train as usual": one epoch, with the scheduler the block made
    qat, sched = namespace["qat"], namespace["sched"]
    opt = torch.optim.SGD(qat.parameters(), lr=0.01, momentum=0.9)
    sched.step(0)
    for xb, yb in loader:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(qat(xb), yb).backward()
        opt.step()
    exec(compile("report = " + export + "\nptq = " + ptq_part, "README.md INT8 block", "exec"), namespace)
    report = namespace["report"]
    assert report.quantized and report.passed and report.ort_ops.get("QLinearConv", 0) == 8
    assert (tmp_path / "int8.onnx").exists() and (tmp_path / "ptq_int8.onnx").exists()
    assert "INT8 QDQ ONNX export" in capsys.readouterr().out
