"""The model zoos users bring (issue 27, item 5): fourteen models from Ultralytics, MONAI, segmentation-models-pytorch,
Hugging Face transformers and torchvision detection, built from config with random weights at tiny sizes.

For each, in float64: ``transform`` gives a copy that instruments every selected conv and leaves the model alone;
the forward is identical (``torch.equal``, eval mode); after an optimizer step with lr=0 every conv weight's
gradient is exactly S ⊙ G and every other parameter's exactly G, G being the plain model's gradient of the same
loss; ``strip`` gives the plain model's state_dict keys and forward back; ``export_onnx`` writes it and onnxruntime
agrees. Slow. The libraries are the ``zoo`` extra (``make test-slow`` installs it): a case skips, naming its
library, only where that library is not installed. Nothing is downloaded (tests/conftest.py sets offline modes).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

import sgs_fx
from helpers import random_scales
from sgs_fx.passes.select import default_filter

pytestmark = pytest.mark.slow


def _leaves(out) -> list[torch.Tensor]:
    """The floating tensors of a model's output (tensors, tuples, lists, dicts, Hugging Face ModelOutputs)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):  # ModelOutput is an OrderedDict
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _leaves(v)]
    return []


def _outputs_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A scalar that depends on every output: the sum of their mean squares (eval mode)."""
    return sum(t.square().mean() for t in _leaves(model(x)))


def _detection_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision detection: the training losses for one box per image (in eval mode the RPN's proposals are
    detached and its head would get no gradient). Train mode for this forward only."""
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]], dtype=x.dtype), "labels": torch.tensor([1])}
               for _ in range(len(x))]
    model.train()
    try:
        return sum(model(list(x), targets).values())
    finally:
        model.eval()


@dataclass(frozen=True)
class Case:
    name: str
    library: str  # the imports that must succeed, else the case skips (space-separated)
    build: Callable[[], nn.Module]
    shape: tuple
    loss: Callable = _outputs_loss
    export: dict = field(default_factory=dict)  # export_onnx's keyword arguments where the defaults do not fit


# --- builders: tiny configs, random weights, nothing downloaded ------------------------------------------------

def _yolo(cfg):
    def build():
        from ultralytics.nn.tasks import DetectionModel, SegmentationModel

        cls = SegmentationModel if "-seg" in cfg else DetectionModel
        return cls(cfg, nc=2, verbose=False)
    return build


def _monai(name, **kw):
    def build():
        import monai.networks.nets as nets

        return getattr(nets, name)(**kw)
    return build


def _smp(arch, encoder, **kw):
    def build():
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder, encoder_weights=None, classes=2, **kw)  # "tu-": a timm encoder
    return build


def _hf(model_cls, config_cls, **kw):
    def build():
        import transformers

        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(num_labels=3, **kw))
    return build


def _fasterrcnn():
    from torchvision.models import detection

    return detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                            min_size=64, max_size=64)


# Ultralytics' Detect head builds its anchors in Python from the input's shape (``if self.shape != shape``): the
# exported graph holds the traced batch size as a constant, so these export at a fixed batch (as Ultralytics' own
# exporter does unless ``dynamic=True``).
FIXED_BATCH_YOLO = dict(dynamic_batch=False)
# torchvision detection: torch.export fails on its data-dependent number of proposals, and the TorchScript fallback
# traces per-batch split sizes, so it is exported at the example's batch size (checked at that size only). Its boxes
# come out of ONNX RoiAlign, which samples the features at box-dependent points computed in another order than
# torchvision's roi_align, and are decoded from them: measured 0.028 on coordinates up to 64 (4e-4 of the scale).
# torchvision's own ONNX tests of these models compare with rtol=1e-3 (test/test_onnx.py); so does this one.
FIXED_BATCH_DETECTION = dict(dynamic_batch=False, rtol=1e-3)

CASES = [
    Case("yolov8n", "ultralytics", _yolo("yolov8n.yaml"), (1, 3, 64, 64), export=FIXED_BATCH_YOLO),
    Case("yolo11n-seg", "ultralytics", _yolo("yolo11n-seg.yaml"), (1, 3, 64, 64), export=FIXED_BATCH_YOLO),
    Case("monai-UNet", "monai", _monai("UNet", spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16),
                                       strides=(2, 2), num_res_units=1), (1, 1, 32, 32)),
    Case("monai-SegResNet", "monai", _monai("SegResNet", spatial_dims=2, init_filters=8, in_channels=1,
                                            out_channels=2, blocks_down=(1, 1), blocks_up=(1,)), (1, 1, 32, 32)),
    Case("monai-DynUNet-3d", "monai", _monai("DynUNet", spatial_dims=3, in_channels=1, out_channels=2,
                                             kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                                             filters=[4, 8, 16]), (1, 1, 16, 16, 16)),
    Case("monai-BasicUNet", "monai", _monai("BasicUNet", spatial_dims=2, in_channels=1, out_channels=2,
                                            features=(4, 4, 8, 8, 16, 4)), (1, 1, 32, 32)),
    # (einops: MONAI's optional dependency for SwinUNETR, in the zoo extra)
    Case("monai-SwinUNETR", "monai einops", _monai("SwinUNETR", spatial_dims=2, in_channels=1, out_channels=2,
                                             feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
         (1, 1, 64, 64)),
    Case("smp-Unet-resnet18", "segmentation_models_pytorch",
         _smp("Unet", "tu-resnet18", encoder_depth=3, decoder_channels=(32, 16, 8)), (1, 3, 32, 32)),
    Case("smp-FPN-mobilenetv3", "segmentation_models_pytorch",
         _smp("FPN", "tu-mobilenetv3_small_050", decoder_pyramid_channels=16, decoder_segmentation_channels=32),
         (1, 3, 64, 64)),
    Case("hf-ResNet", "transformers", _hf("ResNetForImageClassification", "ResNetConfig", embedding_size=8,
                                          hidden_sizes=[8, 16], depths=[1, 1]), (1, 3, 32, 32)),
    Case("hf-ConvNext", "transformers", _hf("ConvNextForImageClassification", "ConvNextConfig", num_stages=2,
                                            hidden_sizes=[8, 16], depths=[1, 1]), (1, 3, 32, 32)),
    Case("hf-RegNet", "transformers", _hf("RegNetForImageClassification", "RegNetConfig", embedding_size=8,
                                          hidden_sizes=[8, 16], depths=[1, 1], groups_width=8), (1, 3, 32, 32)),
    Case("hf-MobileViT", "transformers", _hf("MobileViTForImageClassification", "MobileViTConfig", image_size=32,
                                             neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32], hidden_sizes=[16, 16, 16],
                                             num_attention_heads=2, mlp_ratio=1.0, expand_ratio=2.0),
         (1, 3, 32, 32)),
    Case("tv-fasterrcnn-mobilenet", "torchvision", _fasterrcnn, (1, 3, 64, 64), loss=_detection_loss,
         export=FIXED_BATCH_DETECTION),
]


def _same(a, b) -> bool:
    a, b = _leaves(a), _leaves(b)
    return len(a) == len(b) > 0 and all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_zoo_model(case, tmp_path):
    for library in case.library.split():
        pytest.importorskip(library,
                            reason=f"{library} is not installed (pip install -e '.[zoo]'; make test-slow installs it)")
    torch.manual_seed(0)
    plain = case.build().double().eval()
    before = copy.deepcopy(plain.state_dict())
    x = torch.rand(case.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    # transform: a copy with every selected conv instrumented; the model itself untouched
    sgs = sgs_fx.transform(plain, example_inputs=(x,))
    selected = sorted(n for n, m in plain.named_modules() if default_filter(n, m))
    assert selected and sorted(sgs_fx.instrumented(sgs)) == selected
    assert not sgs_fx.instrumented(plain)

    with torch.no_grad():
        assert _same(plain(x), sgs(x))

    # S ⊙ G at the optimizer's step, exactly: the same loss on both (same seed: detection samples proposals)
    sgs_fx.set_scales(sgs, random_scales(sgs, torch.Generator().manual_seed(1)))
    for model in (plain, sgs):
        torch.manual_seed(0)
        case.loss(model, x).backward()
    torch.optim.SGD(sgs.parameters(), lr=0.0).step()
    scales = sgs_fx.get_scales(sgs)
    grads = dict(plain.named_parameters())
    scaled = set()
    for name, p in sgs.named_parameters():
        g = grads[name].grad
        owner = name.rpartition(".")[0]
        if g is None:
            assert p.grad is None, name
        elif name.endswith("weight") and owner in scales:
            assert torch.equal(p.grad, g * scales[owner].to(g.dtype)), name
            scaled.add(owner)
        else:
            assert torch.equal(p.grad, g), name
    assert scaled == set(scales)  # every instrumented conv got a gradient, and S ⊙ G

    # strip: the plain model's keys and forward (lr=0 left every weight where it was)
    stripped = sgs_fx.strip(sgs)
    assert stripped.state_dict().keys() == before.keys()
    assert not sgs_fx.instrumented(stripped)
    with torch.no_grad():
        assert _same(plain(x), stripped(x))

    report = sgs_fx.export_onnx(stripped.float(), tmp_path / "model.onnx", x.float(), **case.export)
    assert report.passed
