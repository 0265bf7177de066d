"""Run by torchrun from test_int8_train: `train --qat` under DDP, recording every rank's model after each epoch."""
import sys

import torch
import torch.distributed as dist

from sgs_fx.cifar import train as train_mod

out, qat_epoch = sys.argv[1], int(sys.argv[2])
seen = {}
_train_epoch = train_mod._train_epoch


def _recording(model, opt, batches, epoch, cfg, d):
    result = _train_epoch(model, opt, batches, epoch, cfg, d)
    core = getattr(model, "module", model)
    seen[epoch] = {"params": {n: p.detach().clone() for n, p in core.named_parameters()},
                   "buffers": {n: b.clone() for n, b in core.named_buffers()}}
    return result


train_mod._train_epoch = _recording
train_mod.train(train_mod.TrainConfig(model="vgg11_bn", width=0.0625, epochs=3, qat_epoch=qat_epoch, batch_size=32,
                                      every=1, warmup=0, data="synthetic", out=out, progress=False, plots=False,
                                      export=False))
torch.save(seen, f"{out}/rank{dist.get_rank()}.pt")
