#!/usr/bin/env bash
# Everything in issue 8 that needs a GPU, in one call on one H100 (about 15 minutes):
#   throughput   bf16 training img/s of Lite0, ResNet-50, ViT-B/16 (eager / compile x NCHW / channels_last)
#                against the matmul ceiling measured in the same run
#   overhead     hf_transfer's Trainer step vs. a plain PyTorch loop, alternating, median ratio
#   input        loader img/s (CPU resize vs. device resize, several worker counts) vs. model step rate
#   full         full fine-tuning of Lite0 on all of CIFAR-10 to >= 97% test accuracy, time-to-accuracy
#   strategies   head_only (feature cache) and staged (fastai) Lite0 runs on all of CIFAR-10;
#                then benchmarks/feature_cache.py and benchmarks/freeze_strategies.py where present
#
# Usage: benchmarks/gpu.sh [part ...]          default: all parts, in the order above
#        benchmarks/gpu.sh --cpu-smoke [part ...]  the same commands at tiny sizes on the CPU (wiring check)
# Environment: CIFAR10 (the mirror folder, default ../shared/datasets/cifar10),
#              BENCH_RESULTS_DIR (tables, default benchmarks/results), LOG_DIR (logs, default /tmp/hf_transfer_bench)
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then SMOKE=1; shift; fi
PARTS=("${@:-throughput overhead input full strategies}")
PARTS=(${PARTS[@]})
CIFAR10=${CIFAR10:-../shared/datasets/cifar10}
LOG_DIR=${LOG_DIR:-/tmp/hf_transfer_bench}
mkdir -p "$LOG_DIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if (( SMOKE )); then
    export CUDA_VISIBLE_DEVICES=""
    WORKERS=$(( $(nproc) > 2 ? 2 : 1 ))
    THROUGHPUT=(--models tf_efficientnet_lite0 --variants eager,eager_cl --batch-size 2 --warmup 1 --steps 1 --windows 1 --matmul-size 256)
    OVERHEAD=(--batch-size 2 --image-size 64 --rounds 1 --steps 2 --warmup 1)
    INPUT=(--images 64 --workers 0,1 --batch-size 8 --model-steps 1)
    SIZES=(--max-train-samples 32 --max-test-samples 20 --batch-size 8 --image-size 64 --epochs 2)
    FULL=("${SIZES[@]}")
    STAGED=("${SIZES[@]}")
else
    WORKERS=$(( $(nproc) - 2 ))
    THROUGHPUT=(--batch-size 256)
    OVERHEAD=(--batch-size 256 --bf16 --channels-last --rounds 7 --warmup 3 --steps 20)
    INPUT=(--images 10000 --workers "0,4,8,$WORKERS" --batch-size 256 --model-steps 10)
    # 10 epochs, cosine, label smoothing: the usual fine-tuning schedule; the target is 97% test accuracy
    FULL=(--epochs 10 --batch-size 256 --eval-batch-size 1024 --lr 1e-3 --scheduler cosine --label-smoothing 0.1 --channels-last)
    STAGED=(--epochs 5 --batch-size 256 --eval-batch-size 1024 --lr 1e-3 --scheduler cosine --label-smoothing 0.1 --channels-last)
fi

run() {  # run <name> <command...>: log to $LOG_DIR/<name>.log, keep going if one part fails
    local name=$1; shift
    echo "=== $name: $*"
    local start=$SECONDS
    if "$@" >"$LOG_DIR/$name.log" 2>&1; then status=ok; else status="FAILED ($?)"; fi
    echo "=== $name: $status in $(( SECONDS - start )) s"
    grep -v -e "it/s]" -e "s/it]" "$LOG_DIR/$name.log" | tail -n 25
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
    full)
        run full_finetune python3 benchmarks/accuracy.py --dataset "$CIFAR10" --strategies full --device-resize \
            --workers "$WORKERS" --target 0.97 --name time_to_accuracy "${FULL[@]}" ;;
    strategies)
        run head_and_staged python3 benchmarks/accuracy.py --dataset "$CIFAR10" --strategies head_only,fastai --device-resize \
            --workers "$WORKERS" --target 0.90 --name accuracy "${STAGED[@]}"
        if [[ -f benchmarks/feature_cache.py ]]; then
            run feature_cache python3 benchmarks/feature_cache.py ${FEATURE_CACHE_ARGS:-}
        fi
        if [[ -f benchmarks/freeze_strategies.py ]]; then
            run freeze_strategies python3 benchmarks/freeze_strategies.py ${FREEZE_STRATEGIES_ARGS:-}
        fi ;;
    *) echo "unknown part '$part' (throughput overhead input full strategies)"; exit 2 ;;
    esac
done
