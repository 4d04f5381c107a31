#!/usr/bin/env bash
# The GPU check of issue 11, one command, at most about 10 minutes on one H200-class GPU (each step
# has a time limit: 150 + 240 + 120 + 50 s; the limits are estimates, never measured on a GPU):
#
#   COMFYUI_PATH=/path/to/ComfyUI bench/gpu_check.sh [OUT_DIR]
#
#   1. the host tests on CUDA (tests/host; the browser tests skip themselves without chromium)
#   2. the real-size checks (tests/host/test_realsize.py): random full-size SD1.5 and SDXL
#      checkpoints, their loader check, the four SD1.5/SDXL workflows at 1024 px, LoRA == Apply
#   3. bench/bench_realsize.py on SDXL at 1024 px, bf16: Train Sparse Concept vs TrainLoraNode
#      (s/step, peak memory), Apply's patch time vs a stock LoRA of equal rank, sampling overhead
#   4. a Flux-size dictionary build (Build Atom Dictionary on a random full-size Flux), when the
#      GPU has 60 GiB free
#
# Python: $PYTHON if set, else python3 when its torch sees a GPU, else a new .venv-gpu built from
# PyPI (ComfyUI's requirements and ours; needs the network). Every step's log, the GPU memory
# samples and the figures go to OUT_DIR (default /tmp/sparse_atoms_gpu_check); the summary is
# printed at the end. Any failed or missing piece makes the script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/sparse_atoms_gpu_check}
mkdir -p "$OUT"
die() { echo "gpu_check: FAILED: $*" >&2; exit 1; }

[ -n "${COMFYUI_PATH:-}" ] || die "set COMFYUI_PATH to a ComfyUI checkout"
[ -f "$COMFYUI_PATH/comfy/sd.py" ] || die "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no comfy/sd.py)"
export COMFYUI_PATH=$(cd "$COMFYUI_PATH" && pwd)
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this check needs an NVIDIA GPU"
for piece in tools/random_checkpoint.py tests/host/test_realsize.py bench/bench_realsize.py; do
    [ -f "$piece" ] || die "$piece is missing"
done

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
PY=${PYTHON:-python3}
if ! has_cuda "$PY"; then
    echo "gpu_check: $PY has no torch that sees a GPU; creating .venv-gpu from PyPI"
    python3 -m venv .venv-gpu
    .venv-gpu/bin/python -m pip install -q -r "$COMFYUI_PATH/requirements.txt" -r requirements.txt \
        -r requirements-host.txt -r requirements-dev.txt || die "pip could not build .venv-gpu"
    PY=.venv-gpu/bin/python
    has_cuda "$PY" || die "the torch pip installed in .venv-gpu does not see the GPU"
fi
# Every distribution ComfyUI (its essential list; it runs without torchaudio) and this project
# need, by name: fail now, not minutes into a step.
"$PY" - "$COMFYUI_PATH/requirements.txt" requirements.txt requirements-dev.txt <<'EOF' || die "missing Python packages (above)"
import importlib.metadata, re, sys
names = []
for path in sys.argv[1:]:
    for line in open(path):
        if line.lower().startswith("#non essential"):
            break
        if line.strip() and not line.lstrip().startswith("#"):
            names.append(re.split(r"[<>=!~;\[ ]", line.strip())[0])
names = [name for name in names if name != "torchaudio"]
missing = []
for name in names:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        missing.append(name)
if missing:
    print("gpu_check: not installed:", ", ".join(missing), file=sys.stderr)
sys.exit(1 if missing else 0)
EOF
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))'

export SPARSE_ATOMS_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
STATUS=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, sample GPU memory
    local name=$1 limit=$2; shift 2
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/$name.gpu_mib" &
    local sampler=$! start=$SECONDS rc=0
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
    local peak=$(sort -n "$OUT/$name.gpu_mib" | tail -1)
    STATUS+=("$name: rc=$rc ($([ $rc = 124 ] && echo "TIMED OUT after ${limit} s" || echo "$((SECONDS - start)) s")), GPU memory peak ${peak:-?} MiB (whole GPU)")
    tail -3 "$OUT/$name.log"
}

CKPTS="$OUT/checkpoints"
mkdir -p "$CKPTS"
step host_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/host
step realsize 240 env SPARSE_ATOMS_REALSIZE_ARCHS=sd15,sdxl SPARSE_ATOMS_REALSIZE_PX=1024 \
    SPARSE_ATOMS_REALSIZE_DIR="$CKPTS" SPARSE_ATOMS_REALSIZE_REPORT="$OUT/realsize.jsonl" \
    "$PY" -m pytest -q -s -p no:cacheprovider -m realsize tests/host/test_realsize.py
[ -f "$CKPTS/random_sdxl_fp16_seed0.safetensors" ] || "$PY" tools/random_checkpoint.py --arch sdxl \
    --out "$CKPTS/random_sdxl_fp16_seed0.safetensors" --dtype fp16
step bench_sdxl_1024 120 "$PY" bench/bench_realsize.py --checkpoint "$CKPTS/random_sdxl_fp16_seed0.safetensors" \
    --px 1024 --dtypes bf16 --checkpointing on --steps 4 --rank 16 --repeats 2 --sample-steps 4
FREE_MIB=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -1)
if [ "$FREE_MIB" -ge 61440 ]; then
    step flux_dictionary 50 "$PY" bench/bench_realsize.py --flux-dictionary --atoms 64
else
    STATUS+=("flux_dictionary: not run, ${FREE_MIB} MiB free on the GPU (needs 61440)")
fi

echo; echo "== figures"
[ -f "$OUT/realsize.jsonl" ] && grep -v '"step"' "$OUT/realsize.jsonl" || true
grep -h -A40 '^| ' "$OUT/bench_sdxl_1024.log" "$OUT"/flux_dictionary.log 2>/dev/null || true
echo; echo "== steps (logs in $OUT)"
printf '%s\n' "${STATUS[@]}"
if printf '%s\n' "${STATUS[@]}" | grep -qv ': rc=0 \|not run'; then
    die "a step failed (see its log in $OUT)"
fi
echo "gpu_check: all steps passed"
