"""kNN and linear-probe top-1 of a study's architectures at initialisation: the floor to read the
trained models' representation quality against.

For every model of a finished study (``STUDY/models/NAME``), the same method and backbone are
built afresh (``torch.manual_seed(--seed)``, no training) and evaluated exactly as the study's
quality experiment evaluates the trained model: pooled features, weighted kNN (k=200, T=0.1)
and a linear probe, on the same image folder.

    python benchmarks/init_quality.py /tmp/study-cifar-cpu --data-dir /tmp/cifar-subset --linear-epochs 30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sslens.data import load_dataset
from sslens.evaluate import evaluate_encoder
from sslens.models.adapt import adapt_input
from sslens.store import META_FILE, build_method, resolve_model_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a finished study's output folder")
    parser.add_argument("--data-dir", required=True, help="the image folder the study ran on (train/ and test/)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--linear-epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = load_dataset("imagefolder", "train", data_dir=args.data_dir, image_size=args.image_size)
    test = load_dataset("imagefolder", "test", data_dir=args.data_dir, image_size=args.image_size)
    models = sorted(p for p in (args.study / "models").iterdir() if p.is_dir())
    if not models:
        parser.error(f"{args.study / 'models'} holds no model folders: is {args.study} a finished study?")
    for run in models:
        meta = json.loads((resolve_model_file(run).parent / META_FILE).read_text())
        torch.manual_seed(args.seed)
        method = build_method(meta).eval()
        encoder = adapt_input(method.encoder("pooled"), meta, image_size=test.image_size, mean=test.mean, std=test.std)
        result = evaluate_encoder(
            encoder, train, test, k=200, temperature=0.1, linear=True, linear_epochs=args.linear_epochs, seed=args.seed
        )
        print(f"{run.name:<10} {meta['method']:<6} {meta['backbone']:<14} at initialisation: "
              f"kNN top-1 {result['knn_top1']:.3f}, linear top-1 {result['linear_top1']:.3f}")


if __name__ == "__main__":
    main()
