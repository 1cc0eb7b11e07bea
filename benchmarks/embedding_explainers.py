"""Seconds per image of the explainers made for embeddings, beside reference implementations, in one run.

Two random-weight encoders at ``--size`` px on the CPU (speed does not depend on the weights):
``create_backbone("resnet18-cifar")`` and timm's ViT-Tiny (``vit_tiny_patch16_224``: 12 blocks,
width 192, 3 heads) with 4-px patches, an 8 x 8 token grid at 32 px. Every explainer runs with
its default options: ``labelfree-ig``, ``labelfree-gxi``, ``cocoa-ig``, ``cocoa-masking`` (corpus
and foil: ``--set-size`` random images each) and ``correspondence`` (each image against the next
one) on both; ``rollout``, ``cls-attention`` and ``gradient-attention`` (against the next image)
on the ViT only, as they read a ViT's attention.

References, on the same inputs and targets:

* Captum's ``IntegratedGradients`` (50 Gauss-Legendre steps, zero baseline,
  ``internal_batch_size`` = sslens's batch size) and ``InputXGradient`` of the label-free target
  ``⟨f(x), f(x̃)⟩``: what lfxai, the label-free paper's code, runs. Each reference's time
  includes computing what it holds fixed (f(x); COCOA's corpus and foil means), as sslens's does.
* Captum's ``IntegratedGradients`` of COCOA's contrastive corpus similarity
  ``⟨f(x̃)/‖f(x̃)‖, μ_C − μ_F⟩``: what cl-explainability, COCOA's code, runs for its IG rows.
* The attention rollout of jacobgil/vit-explain (``VITAttentionRollout`` with
  ``head_fusion="mean"``, ``discard_ratio=0``), re-typed here since it is no PyPI package: a
  hook on every ``attn_drop``, one image at a time, ``(A + I) / 2`` per block; its mask is
  upsampled as sslens's maps are, and both are divided by their maximum before comparing.

No reference is run for ``cocoa-masking`` (cl-explainability's RISE draws other masks),
``correspondence`` (BiLRP's code explains its own VGG with LRP rules) or ``cls-attention`` and
``gradient-attention`` (Chefer et al.'s code needs its own modified ViT). Each function runs once
to warm up, then ``--repeats`` times, all functions in turn so they share the machine's load;
the table shows the median seconds per image and, for a row with a reference, the largest
difference between the maps over the largest value of sslens's (and the IG rows' largest
completeness gap ``|Σ IG − (g(x) − g(x'))| / |g(x) − g(x')|``).

    python benchmarks/embedding_explainers.py --images 2 --repeats 3 --json /tmp/embedding.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from captum.attr import InputXGradient, IntegratedGradients

from sslens.explain.base import create_explainer, preserved_state
from sslens.explain.engine import default_batch_size
from sslens.models import create_backbone

MAP_EXPLAINERS = ("labelfree-ig", "labelfree-gxi", "cocoa-ig", "cocoa-masking", "correspondence")
VIT_EXPLAINERS = ("rollout", "cls-attention", "gradient-attention")
VIT_OPTIONS = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4}


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Seconds of ``repeats`` runs of every function, in turn, after one warm-up run each, and
    each function's last result."""
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return times, results


def captum_map(attribution, encoder, images, target: Callable, reference: torch.Tensor, **attribute) -> torch.Tensor:
    """A Captum attribution of ``target(encoder(x), reference)`` per image, summed over colour
    channels (B, H, W), with gradients for the input only, as sslens takes them."""
    with preserved_state(encoder):
        encoder.eval()
        encoder.requires_grad_(False)
        attributions = attribution(lambda x, ref: target(encoder(x), ref)).attribute(
            images, additional_forward_args=(reference,), **attribute
        )
    return attributions.sum(dim=1)


def labelfree_target(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (embeddings * reference).sum(dim=1)


def cocoa_target(embeddings: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    return (F.normalize(embeddings, dim=1) * direction).sum(dim=1)


def vit_explain_rollout(vit_backbone, images: torch.Tensor) -> torch.Tensor:
    """jacobgil/vit-explain's ``rollout`` (mean fusion, nothing discarded), one image at a time:
    (B, h, w) masks of the class token over the patches, each divided by its maximum."""
    vit = vit_backbone.model
    attentions: list[torch.Tensor] = []
    handles = [block.attn.attn_drop.register_forward_hook(lambda m, i, out: attentions.append(out.cpu()))
               for block in vit.blocks]
    fused = [block.attn.fused_attn for block in vit.blocks]
    for block in vit.blocks:
        block.attn.fused_attn = False
    masks = []
    try:
        with torch.no_grad():
            for image in images:
                attentions.clear()
                vit_backbone(image[None])
                result = torch.eye(attentions[0].size(-1))
                for attention in attentions:
                    heads_fused = attention.mean(dim=1)
                    identity = torch.eye(heads_fused.size(-1))
                    a = (heads_fused + 1.0 * identity) / 2
                    a = a / a.sum(dim=-1)  # as vit-explain writes it; rows already sum to 1 here
                    result = torch.matmul(a, result)
                mask = result[0, 0, 1:]
                width = int(mask.size(-1) ** 0.5)
                masks.append(mask.reshape(width, width) / mask.max())
    finally:
        for handle in handles:
            handle.remove()
        for block, flag in zip(vit.blocks, fused, strict=True):
            block.attn.fused_attn = flag
    return torch.stack(masks)


def max_difference(reference: torch.Tensor, ours: torch.Tensor) -> float:
    return ((reference - ours).abs().max() / ours.abs().max()).item()


def peak_normalised(maps: torch.Tensor) -> torch.Tensor:
    return maps / maps.flatten(1).max(dim=1).values[:, None, None]


def completeness(result) -> str:
    info = result.info
    gaps = [abs(g) / abs(t - b) for g, t, b in zip(
        info["completeness_gap"], info["target"], info["target_at_baseline"], strict=True
    )]
    return f"completeness gap ≤ {max(gaps):.2%} of \\|g(x) − g(x')\\|"


def encoder_rows(label, encoder, images, corpus, foil, repeats, vit: bool) -> list[dict]:
    """The table rows of one encoder: every explainer and every reference, timed together."""
    partners = images.roll(1, dims=0)
    names = MAP_EXPLAINERS + (VIT_EXPLAINERS if vit else ())

    def explain(name: str) -> Callable[[], object]:
        explainer = create_explainer(name, encoder)
        if name.startswith("cocoa"):
            return lambda: explainer(images, corpus=corpus, foil=foil)
        if name in ("correspondence", "gradient-attention"):
            return lambda: explainer(images, reference=partners)
        return lambda: explainer(images)

    fns = {name: explain(name) for name in names}

    # The references pay for what sslens's calls pay for: the held-fixed f(x), COCOA's sets.
    @torch.no_grad()
    def own() -> torch.Tensor:
        return encoder.eval()(images)

    @torch.no_grad()
    def direction() -> torch.Tensor:
        encoder.eval()
        mean = lambda x: F.normalize(encoder(x), dim=1).mean(0)  # noqa: E731
        return (mean(corpus) - mean(foil))[None].expand(len(images), -1)

    ig = {"baselines": torch.zeros_like(images), "n_steps": create_explainer("labelfree-ig", encoder).steps,
          "method": "gausslegendre", "internal_batch_size": default_batch_size(images.device, tuple(images.shape[-2:]))}
    references = {
        "labelfree-ig": ("captum IntegratedGradients", lambda: captum_map(
            IntegratedGradients, encoder, images, labelfree_target, own(), **ig)),
        "labelfree-gxi": ("captum InputXGradient", lambda: captum_map(
            InputXGradient, encoder, images, labelfree_target, own())),
        "cocoa-ig": ("captum IntegratedGradients (COCOA target)", lambda: captum_map(
            IntegratedGradients, encoder, images, cocoa_target, direction(), **ig)),
    }
    if vit:
        references["rollout"] = ("vit-explain rollout", lambda: vit_explain_rollout(encoder, images))
    for ours, (name, fn) in references.items():
        fns[f"{name} [ref. of {ours}]"] = fn
    times, results = timed(fns, repeats)

    rows = []
    for name in names:
        result, note = results[name], []
        if "completeness_gap" in result.info:
            note.append(completeness(result))
        if name in references:
            reference_name = references[name][0]
            reference = results[f"{reference_name} [ref. of {name}]"]
            if name == "rollout":
                size = tuple(images.shape[-2:])
                reference = F.interpolate(reference[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                difference = max_difference(peak_normalised(reference), peak_normalised(result.importance))
            else:
                difference = max_difference(reference, result.importance)
            reference_seconds = statistics.median(times[f"{reference_name} [ref. of {name}]"]) / len(images)
            note.append(f"{reference_name}: {reference_seconds:.3f} s / image, max \\|ref − sslens\\| / max \\|sslens\\| "
                        f"= {difference:.1e}")
        rows.append({"encoder": label, "explainer": name, "seconds_per_image": statistics.median(times[name]) / len(images),
                     "runs": times[name], "note": "; ".join(note)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2, help="images explained per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each explainer (after one warm-up)")
    parser.add_argument("--size", type=int, default=32, help="image side in px")
    parser.add_argument("--set-size", type=int, default=8, help="images in COCOA's corpus and in its foil")
    parser.add_argument("--json", help="also write the measurements to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    encoders = {
        "resnet18-cifar": (create_backbone("resnet18-cifar").eval(), False),
        "ViT-Tiny, 4-px patches": (create_backbone("timm", **{**VIT_OPTIONS, "img_size": args.size}).eval(), True),
    }
    generator = torch.Generator().manual_seed(1)
    images, corpus, foil = (
        torch.randn(n, 3, args.size, args.size, generator=generator) for n in (args.images, args.set_size, args.set_size)
    )
    rows = []
    for label, (encoder, vit) in encoders.items():
        rows += encoder_rows(label, encoder, images, corpus, foil, args.repeats, vit)

    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{args.size} px, {args.images} image(s) per call, median of {args.repeats} runs"
    )
    print("\n| encoder | explainer | s / image | reference and notes |\n|---|---|---:|---|")
    for row in rows:
        print(f"| {row['encoder']} | {row['explainer']} | {row['seconds_per_image']:.3f} | {row['note']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
