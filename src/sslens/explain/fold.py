"""BatchNorm folded into the preceding convolutions, in a private copy of an encoder.

In eval mode BatchNorm is the per-channel affine map ``γ (x − μ) / √(σ² + ε) + β``, so
``BN(conv(x))`` is one convolution with rescaled weights and a bias
(:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`): the same function up to float rounding, one
pass over the activations fewer per BatchNorm. The masking explainers run their many masked
batches through such a copy on the CPU (:func:`sslens.explain.engine.inference_encoder`); the
caller's encoder is never modified.
"""

from __future__ import annotations

import contextlib
import copy

import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batch_norms(encoder: nn.Module) -> tuple[nn.Module, int]:
    """A private inference copy of ``encoder`` (eval mode) with every BatchNorm2d that directly
    follows a Conv2d folded into that convolution, and the number folded.

    In eval mode BatchNorm is the per-channel affine map ``γ (x − μ) / √(σ² + ε) + β``, so
    ``BN(conv(x))`` is one convolution with rescaled weights and a bias
    (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`): the same function up to float rounding,
    one pass over the activations fewer per BatchNorm. The copy is traced with ``torch.fx``; a
    pair is folded only when the convolution's output feeds nothing but the BatchNorm, the
    convolution module is called once and its parameters are not read elsewhere. A module
    whose forward cannot be traced (e.g. data-dependent branches, as in
    :class:`~sslens.models.adapt.InputAdapter`) keeps its own forward and has its children
    folded instead. ``encoder`` itself is never modified. Raises the tracing error when
    nothing could be traced.
    """
    return _fold(copy.deepcopy(encoder).eval())


def _fold(module: nn.Module) -> tuple[nn.Module, int]:
    try:
        traced = torch.fx.symbolic_trace(module)
    except Exception as error:  # torch.fx raises many types for untraceable forwards
        folded = 0
        for name, child in module.named_children():
            if any(isinstance(m, nn.BatchNorm2d) for m in child.modules()):
                with contextlib.suppress(Exception):  # an untraceable child stays as it is
                    new, count = _fold(child)
                    if count:
                        setattr(module, name, new)
                        folded += count
        if not folded:
            raise error
        return module, folded
    modules = dict(traced.named_modules())
    calls: dict[str, int] = {}
    read: set[str] = set()  # modules whose parameters the graph reads directly
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            read.add(node.target.rpartition(".")[0])
    folded = 0
    for node in list(traced.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or len(node.args) != 1:
            continue
        source = node.args[0]
        conv = modules.get(source.target) if isinstance(source, torch.fx.Node) and source.op == "call_module" else None
        if (
            not isinstance(conv, nn.Conv2d) or len(source.users) != 1 or calls[source.target] != 1
            or source.target in read
        ):
            continue
        parent, _, name = source.target.rpartition(".")
        setattr(traced.get_submodule(parent), name, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
        folded += 1
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced, folded
