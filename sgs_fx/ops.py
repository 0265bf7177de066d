"""Where the S mechanism's classes were imported from before it was split into modules (kept so that existing
imports and models pickled by earlier versions, which name ``sgs_fx.ops``, keep working).

Today: ``backward.py`` (``scale_grad``), ``ownership.py`` (which tensor each S scales), ``record.py`` (the record of
new gradients under ``scaling="step"``), ``hooks.py`` (keeping hooks on the weights in use), ``conv.py`` (the SGS conv
classes), ``graph_weight.py`` (``SGSGraphWeight``), ``step.py`` (S at the optimizer step).
"""
from .backward import scale_grad
from .conv import SGSConv1d, SGSConv2d, SGSConv3d, SGSConvMixin, is_sgs_conv, rebuild_sgs_conv, sgs_class_for
from .graph_weight import SGSGraphWeight

_rebuild_sgs_conv = rebuild_sgs_conv  # the name pickles of SGS convs written before the split refer to

__all__ = ["scale_grad", "SGSConvMixin", "SGSConv1d", "SGSConv2d", "SGSConv3d", "SGSGraphWeight", "sgs_class_for",
           "is_sgs_conv"]
