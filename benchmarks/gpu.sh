#!/usr/bin/env bash
# Every benchmark that needs a GPU, in one call on one H100 (about 20 minutes in all):
#   throughput  bf16 training img/s of Lite0, ResNet-50, ViT-B/16 (eager / compile x NCHW / channels_last)
#               against the matmul ceiling measured in the same run
#   overhead    hf_transfer's Trainer step vs. a plain PyTorch loop, alternating, median ratio
#   input       loader img/s (CPU resize vs. device resize, several worker counts) vs. model step rate
#   full        full fine-tuning of Lite0 on all of CIFAR-10 to >= 97% test accuracy, time-to-accuracy
#   staged      head_only (feature cache) and staged (fastai preset) Lite0 on all of CIFAR-10
#   cache       benchmarks/feature_cache.py on CIFAR-10 (cached vs. uncached head_only)
#   strategies  benchmarks/freeze_strategies.py on CIFAR-10 (head_only, last_n:2, full, staged)
#
# Usage: benchmarks/gpu.sh [part ...]              default: all parts, in the order above
#        benchmarks/gpu.sh --cpu-smoke [part ...]  the same commands at tiny sizes on the CPU (wiring check)
# Environment: CIFAR10 (the mirror folder, default ../shared/datasets/cifar10),
#              BENCH_RESULTS_DIR (tables, default benchmarks/results), LOG_DIR (logs, default /tmp/hf_transfer_bench)
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then SMOKE=1; shift; fi
if (( $# )); then PARTS=("$@"); else PARTS=(throughput overhead input full staged cache strategies); fi
export CIFAR10=${CIFAR10:-../shared/datasets/cifar10}
LOG_DIR=${LOG_DIR:-/tmp/hf_transfer_bench}
mkdir -p "$LOG_DIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if (( SMOKE )); then
    export CUDA_VISIBLE_DEVICES=""
    WORKERS=1
    THROUGHPUT=(--models tf_efficientnet_lite0 --variants eager,eager_cl --batch-size 2 --warmup 1 --steps 1 --windows 1 --matmul-size 256)
    OVERHEAD=(--batch-size 2 --image-size 64 --rounds 1 --steps 2 --warmup 1)
    INPUT=(--images 64 --workers 0,1 --batch-size 8 --model-steps 1)
    SMALL=(--max-train-samples 32 --max-test-samples 20 --batch-size 8 --image-size 64 --epochs 2)
    FULL=("${SMALL[@]}")
    STAGED=("${SMALL[@]}")
    CACHE=(--datasets cifar10 --epochs 1 --max-train-samples 32 --max-eval-samples 16 --max-test-samples 20 --batch-size 8)
    STRATEGIES=(--strategies head_only,staged --epochs 3 --max-train-samples 32 --max-eval-samples 16 --max-test-samples 20 --batch-size 8 --image-size 64)
    LIMIT=600
else
    WORKERS=$(( $(nproc) - 2 ))
    THROUGHPUT=(--batch-size 256)
    OVERHEAD=(--batch-size 256 --bf16 --channels-last --rounds 5 --warmup 2 --steps 10)
    INPUT=(--images 10000 --workers "0,4,8,$WORKERS" --batch-size 250 --model-steps 10)
    # The usual fine-tuning schedule (cosine, label smoothing); batch 250 divides 50,000 and 10,000, so
    # every batch has one shape and cuDNN autotunes once.
    FULL=(--epochs 12 --batch-size 250 --eval-batch-size 1000 --lr 1e-3 --scheduler cosine --label-smoothing 0.1 --channels-last)
    STAGED=(--epochs 5 --batch-size 250 --eval-batch-size 1000 --lr 1e-3 --scheduler cosine --label-smoothing 0.1 --channels-last)
    CACHE=(--datasets cifar10 --bf16 --epochs 5 --batch-size 250 --eval-batch-size 1000 --workers "$WORKERS")
    STRATEGIES=(--epochs 3 --bf16 --batch-size 125 --eval-batch-size 1000 --workers "$WORKERS" --max-train-samples 10000 --max-eval-samples 1000)
    LIMIT=${PART_TIME_LIMIT:-330}
fi

run() {  # run <name> <command...>: log to $LOG_DIR/<name>.log, stop it after $LIMIT s, go on if it fails
    local name=$1; shift
    echo "=== $name: $*"
    local start=$SECONDS status=ok
    timeout "$LIMIT" "$@" >"$LOG_DIR/$name.log" 2>&1 || status="FAILED ($?)"
    echo "=== $name: $status in $(( SECONDS - start )) s"
    grep -v -e "it/s]" -e "s/it]" -e "examples/s]" "$LOG_DIR/$name.log" | grep -e "^|" -e "Error" -e "error:" | tail -n 20 || true
}

python3 - <<'EOF'
import torch, importlib.metadata as m
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print({n: m.version(n) for n in ("timm", "transformers", "accelerate", "datasets", "huggingface_hub", "evaluate")})
EOF

for part in "${PARTS[@]}"; do
    case $part in
    throughput) run throughput python3 benchmarks/throughput.py "${THROUGHPUT[@]}" ;;
    overhead) run overhead python3 benchmarks/overhead.py "${OVERHEAD[@]}" ;;
    input) run input_pipeline python3 benchmarks/input_pipeline.py --dataset "$CIFAR10" "${INPUT[@]}" ;;
    full) run full_finetune python3 benchmarks/accuracy.py --dataset "$CIFAR10" --strategies full --device-resize \
            --workers "$WORKERS" --target 0.97 --name time_to_accuracy "${FULL[@]}" ;;
    staged) run head_and_staged python3 benchmarks/accuracy.py --dataset "$CIFAR10" --strategies head_only,fastai \
            --device-resize --workers "$WORKERS" --target 0.90 --name accuracy "${STAGED[@]}" ;;
    cache) run feature_cache python3 benchmarks/feature_cache.py "${CACHE[@]}" ;;
    strategies) run freeze_strategies python3 benchmarks/freeze_strategies.py --dataset "$CIFAR10" "${STRATEGIES[@]}" ;;
    *) echo "unknown part '$part': use throughput overhead input full staged cache strategies"; exit 2 ;;
    esac
done
