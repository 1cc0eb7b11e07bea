#!/usr/bin/env bash
# Every GPU figure in docs/BENCHMARKS.md, in parts that fit the device limits of this workplace
# (one command at most 600 s; about 15 minutes of device time per session, a start included).
# Run from the repository root on the GPU machine, with the wheels of the packages its image
# lacks in .whl/ (kornia, kornia_rs, grad-cam, ttach, relax-xai, openTSNE; see
# docs/BENCHMARKS.md) and, for the time-to-accuracy part, the CIFAR-10 archive at CIFAR10_TAR.
# Results go to $OUT (default ./gpu-out): a text log and a JSON file per benchmark.
#
# PARTS picks the parts, in this order (default: all). Each part's time limit, in seconds:
#   tests    90   CUDA-only tests (augmentations without host syncs, bf16 paths)
#   relax   150   relax-xai vs sslens RELAX, 3000 masks, ResNet-18 at 32 px and ResNet-50 at 224 px
#   explain 150   explainer throughput against a plain forward pass (issue 5, part 5)
#   train   200   training throughput (a) PIL DataLoader, (b) sslens end to end, (c) model only
#   methods 120   each method's training step (the seven methods), resnet18-cifar, batch 512
#   cuda    145   sslens train + evaluate end to end on CUDA
#   profile 240   where a compiled training step's time goes, per preset in PRESETS
#   tta     420   time to kNN accuracy on CIFAR-10, per preset in PRESETS (5 min of training
#                 at most, plus compilation and decoding the JPEGs once)
# A 15-minute session fits two calls, e.g.
#   PARTS="relax explain tta" PRESETS=simclr-cifar10-fast bash benchmarks/gpu_suite.sh   (~9 min)
#   PARTS=tta PRESETS=moco-cifar10-fast bash benchmarks/gpu_suite.sh                     (~6 min)
# and the next session the remaining presets and parts. The device tool brings back at most 8
# files, so pack the folder into one: run with OUT=/tmp/gpu-out and end the command with
#   tar -czf "$OUT/gpu-out.tgz" -C /tmp gpu-out   (there $OUT is the tool's folder again).
set -uo pipefail
OUT=${OUT:-gpu-out}
PARTS=${PARTS:-"tests relax explain train methods cuda profile tta"}
PRESETS=${PRESETS:-"simclr-cifar10-fast moco-cifar10-fast swav-cifar10-fast"}
CIFAR10_TAR=${CIFAR10_TAR:-../shared/data/cifar10-jpeg.tar.gz}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/device.txt"

wanted() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
target_of() { case $1 in moco-*) echo 0.847 ;; swav-*) echo 0.842 ;; *) echo 0.85 ;; esac; }

if wanted tests; then
    echo "== CUDA-only tests (augmentations without host syncs, bf16 paths)"
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/data/test_augment.py tests/explain/test_relax.py 2>&1 | tail -n 3 | tee "$OUT/cuda_tests.txt"
fi

if wanted relax; then
    echo "== RELAX: relax-xai vs sslens, 3000 masks, ResNet-18 at 32 px and ResNet-50 at 224 px"
    timeout 150 python3 benchmarks/relax_speed.py --num-masks 3000 --images 2 --sizes 32,224 --repeats 3 \
        --json "$OUT/relax_speed.json" 2>&1 | tee "$OUT/relax_speed.txt"
fi

if wanted explain; then
    echo "== explanation throughput against a plain forward pass of the same encoder"
    timeout 150 python3 benchmarks/explain_throughput.py --device cuda --sizes 32,224 \
        --json "$OUT/explain_throughput.json" 2>&1 | tee "$OUT/explain_throughput.txt"
fi

if wanted train; then
    echo "== training throughput: (a) PIL DataLoader fp32, (b) sslens end to end, (c) model only"
    timeout 200 python3 benchmarks/train_throughput.py --backbone resnet18-cifar --batch-size 512 --steps 50 \
        --repeats 3 --compile --json "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.txt"
fi

if wanted methods; then
    echo "== images/s of each method's training step (bf16, fixed device tensors: the models and losses only)"
    timeout 120 python3 benchmarks/method_throughput.py --device cuda --backbone resnet18-cifar --batch-size 512 \
        --steps 10 --warmup 3 --json "$OUT/method_throughput.json" 2>&1 | tee "$OUT/method_throughput.txt"
fi

if wanted cuda; then
    echo "== sslens train + evaluate on CUDA (bf16, channels_last, online kNN)"
    timeout 100 python3 -m sslens train --config simclr-synthetic --device cuda --backbone resnet18-cifar \
        --batch-size 512 --epochs 4 --set data_options.num_images=16384 --set knn_every=2 --out /tmp/gpu-run 2>&1 \
        | tail -n 8 | tee "$OUT/train_cuda.txt"
    timeout 45 python3 -m sslens evaluate /tmp/gpu-run --device cuda 2>&1 | tail -n 6 | tee -a "$OUT/train_cuda.txt"
fi

if wanted profile; then
    echo "== where a training step's time goes: torch.profiler, compiled, CIFAR-sized synthetic images"
    for preset in $PRESETS; do
        timeout 240 python3 benchmarks/profile_step.py --preset "$preset" --device cuda --set data=synthetic \
            --set 'data_options={num_images: 8192}' --warmup 10 --steps 20 --json "$OUT/profile_$preset.json" 2>&1 \
            | tee "$OUT/profile_$preset.txt"
    done
fi

if wanted tta; then
    echo "== time to kNN accuracy on CIFAR-10 (lightly's 200-epoch figures as targets for MoCo and SwAV)"
    if [ -f "$CIFAR10_TAR" ]; then
        mkdir -p /tmp/cifar10 && tar -xzf "$CIFAR10_TAR" -C /tmp/cifar10
        for preset in $PRESETS; do
            timeout 420 python3 benchmarks/time_to_accuracy.py --preset "$preset" --data-dir /tmp/cifar10 --device cuda \
                --warm-data --target "$(target_of "$preset")" --out "/tmp/tta-$preset" --overwrite \
                --json "$OUT/tta_$preset.json" 2>&1 | tee "$OUT/tta_$preset.txt"
        done
    else
        echo "no CIFAR-10 archive at $CIFAR10_TAR: set CIFAR10_TAR to cifar10-jpeg.tar.gz" | tee "$OUT/tta_skipped.txt"
    fi
fi
