"""The README's quick start runs as printed (with a tiny stand-in for the user's data)."""
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README.md: no python block under '## Quick start'"
    return blocks[0]


@pytest.mark.slow
def test_readme_quick_start_runs(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    # what the snippet leaves to the user: their loader, epochs, loss and a few batches for verify
    namespace = {"train_loader": data, "epochs": 2, "loss_fn": torch.nn.functional.cross_entropy,
                 "batches": [x for x, _ in data]}
    monkeypatch.chdir(tmp_path)  # it writes ckpt.pt and model.onnx into the working directory
    exec(compile(_quick_start(), "README.md quick start", "exec"), namespace)
    out = capsys.readouterr().out
    assert namespace["report"].passed and (tmp_path / "model.onnx").exists() and (tmp_path / "ckpt.pt").exists()
    ckpt = torch.load(tmp_path / "ckpt.pt")
    assert set(ckpt["model"]) == set(namespace["plain"].state_dict())  # the plain model's keys
    s = ckpt["sgs"]["scales"]["layer1.0.conv1"]
    assert s.shape == (3, 3) and not torch.equal(s, torch.ones_like(s)), "epoch 1 calibrates S from the data"
    assert "EQUIVALENT" in out and "PASSED" in out
