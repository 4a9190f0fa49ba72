#!/usr/bin/env bash
# GPU figures in one run: `modnet bench` for both tiny families on one CUDA device.
#
#   bash bench/gpu.sh [OUT_DIR]     # from the repository root; OUT_DIR default bench/results/gpu
#
# Writes one CSV per measurement to OUT_DIR (refusing to overwrite an existing one)
# and a log of everything printed (not yet timed on a GPU; on 2 CPU cores with
# DEVICE=cpu BATCHES="1 4" ROUNDS=2 it took about 4 minutes). What it measures:
#   fp32.csv      inference and training, batch 1-256, against the timm model of the same shape
#   bf16.csv      the same under bf16 autocast (batch 1, 16, 64, 256)
#   compile.csv   torch.compile against eager, inference at batch 64 and 256
#   export.csv    the soft route against its route baked into plain blocks, batch 1-256
# DEVICE=cpu BATCHES="1 4" ROUNDS=2 bash bench/gpu.sh /tmp/x checks the script without a GPU.
set -euo pipefail
out=${1:-bench/results/gpu}
device=${DEVICE:-cuda}
batches=(${BATCHES:-1 4 16 64 256})
rounds=${ROUNDS:-5}
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -e "$out/log.txt" ]; then
    echo "bench/gpu.sh: $out already holds a run (log.txt): give another OUT_DIR" >&2
    exit 2
fi
# Checked before anything is written, so a refusal leaves nothing behind.
machine=$("$python" - "$device" <<'EOF'
import sys
try:
    import timm, torch
except ImportError as error:
    sys.exit(f"bench/gpu.sh: {error}: set PYTHON to an interpreter with torch and timm")
device = torch.device(sys.argv[1])
if device.type == "cuda" and not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is False)")
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
print(f"torch {torch.__version__}, timm {timm.__version__}, {name}")
EOF
)
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
echo "$machine"

bench() {
    local file=$1
    shift
    echo "== $file: $*"
    "$python" -m modnet bench --device "$device" --rounds "$rounds" --min-time 0.2 \
        --model modnet_conv_tiny modnet_vit_tiny --results-file "$out/$file" "$@"
}
last=${batches[-1]}
bench fp32.csv --bench both --batch-size "${batches[@]}" --compare timm
bench bf16.csv --bench both --batch-size "${batches[0]}" "${batches[@]:2}" \
    --precision amp_bfloat16 --compare timm
bench compile.csv --bench inference --batch-size "${batches[@]: -2}" --compare eager --no-memory
bench export.csv --bench inference --batch-size "${batches[@]}" --compare export
echo "== done: $out (largest batch $last)"
