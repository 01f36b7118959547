#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (H100/H200 with CUDA 13,
# PyTorch and transformers; no Rust, no network), from the repository root,
# with the binary that deploy/build-cuda.sh packed:
#
#   benches/gpu-check/run.sh [dist/strata-cuda]     (or its .tar.xz beside it)
#
#   a. every kernel against its CPU reference (f32, bf16, f16);
#   b. the tiny golden models on CUDA against the CPU and transformers'
#      fixtures, and one served completion on CUDA equal to the CPU's;
#   e. NCCL at world size 1 through the communicator;
#   c. random bf16 weights with Llama-3.1-8B's shapes, made here with
#      PyTorch: time to ready, decode tok/s at batch 1/16/64, prefill tok/s
#      of 2,048-token prompts, batch-1 decode against the HBM roofline;
#   d. the same figures for transformers' generate on the same card.
# Logs and results go to $OUT (default /tmp/gpu-check). Exits non-zero when a
# check fails; speed targets are reported, not enforced. SKIP_TRANSFORMERS=1
# leaves out d. (a minute; its figures do not change with strata's code);
# NCU=1 adds Nsight Compute's GPU time per kernel over one decode step.
# The 8B server logs each step's timing (step_times.py summarizes it).
set -uo pipefail
DIST=${1:-dist/strata-cuda}
# deploy/build-cuda.sh also packs the folder as DIST.tar.xz (small enough to
# send with the repository).
[ -x "$DIST/strata" ] || tar -C "$(dirname "$DIST")" -xJf "$DIST.tar.xz"
DIST=$(cd "$DIST" && pwd)
BIN=$DIST/strata
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
# shellcheck source=/dev/null
source "$HERE/device-env.sh"
export LD_LIBRARY_PATH=$DIST:$LD_LIBRARY_PATH
export RUST_LOG=${RUST_LOG:-info}
failed=()
step() { echo; echo "== $*"; }
run() { "$@" || failed+=("$*"); }

# Waits until $1/health answers 200; prints the seconds it took.
wait_ready() {
    local t0=$SECONDS
    for _ in $(seq 1 600); do
        if python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('$1/health').status != 200)" 2>/dev/null; then
            echo $((SECONDS - t0)); return 0
        fi
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.5
    done
    return 1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"

step "a. kernels against their CPU references"
run "$BIN" check kernels --device cuda

step "b. tiny golden models: CUDA against the CPU and transformers"
for m in llama-gqa mistral llama3-rope llama-tied; do
    run "$BIN" check model --device cuda --model "tests/fixtures/tiny/$m"
done

step "b. a served completion on CUDA equals the CPU's (f32, greedy)"
complete() {  # device port -> completion text
    "$BIN" serve --model tests/fixtures/tiny/llama-chat --device "$1" --dtype float32 \
        --port "$2" --kv-cache-memory 64MiB >"$OUT/tiny-$1.log" 2>&1 &
    local pid=$!
    wait_ready "http://127.0.0.1:$2" $pid >/dev/null || { kill $pid; return 1; }
    python3 - "$2" <<'PY'
import json, sys, urllib.request
body = json.dumps({"model": "llama-chat", "prompt": "Hello there", "max_tokens": 24,
                   "temperature": 0, "ignore_eos": True}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/completions", body,
                             {"Content-Type": "application/json"})
print(json.load(urllib.request.urlopen(req))["choices"][0]["text"])
PY
    kill $pid; wait $pid 2>/dev/null
}
on_cuda=$(complete cuda 8201); on_cpu=$(complete cpu 8202)
echo "cuda: $on_cuda"; echo "cpu:  $on_cpu"
if [ -n "$on_cuda" ] && [ "$on_cuda" = "$on_cpu" ]; then echo "served completion: ok"; else failed+=("served completion"); fi

step "e. NCCL through the communicator (world size 1)"
run "$BIN" check nccl --device cuda --dtype float32,bfloat16

step "c. Llama-3.1-8B shapes, random bf16 weights"
M=/dev/shm/strata-llama8b
[ "$(df --output=avail -B1G /dev/shm | tail -1)" -gt 40 ] || M=/tmp/strata-llama8b
[ -f "$M/config.json" ] || python3 "$HERE/make_model.py" "$M" >"$OUT/weight_bytes.txt"
weight_bytes=$(python3 -c "import json;print(json.load(open('$M/model.safetensors.index.json'))['metadata']['total_size'])")
python3 "$HERE/hf_baseline.py" "$M" --skip-generate | tee "$OUT/bandwidth.json"
RUST_LOG="$RUST_LOG,strata::step=debug" "$BIN" serve --model "$M" --served-model-name llama8b \
    --device cuda --port 8123 --max-num-seqs 64 --max-num-batched-tokens 2048 --max-model-len 8192 \
    >"$OUT/serve-8b.log" 2>&1 &
pid=$!
if ready=$(wait_ready http://127.0.0.1:8123 $pid); then
    echo "time to ready: ${ready}s"
    grep -E "KV cache|computing on" "$OUT/serve-8b.log"
    python3 "$HERE/client.py" http://127.0.0.1:8123 llama8b 128256 | tee "$OUT/strata.json"
    echo "where a step goes (the runner's step log):"
    python3 "$HERE/step_times.py" "$OUT/serve-8b.log" | tee "$OUT/steps.txt"
else
    failed+=("serving the 8B model"); tail -20 "$OUT/serve-8b.log"
fi
kill $pid 2>/dev/null; wait $pid 2>/dev/null

if [ "${NCU:-0}" = 1 ] && command -v ncu >/dev/null; then
    step "c. GPU time per kernel over ~one decode step at batch 1 (Nsight Compute)"
    timeout 150 ncu --clock-control none --target-processes all --launch-skip 4000 \
        --launch-count 420 --csv --metrics gpu__time_duration.sum "$BIN" serve --model "$M" \
        --served-model-name llama8b --device cuda --port 8124 --max-model-len 8192 \
        >"$OUT/ncu.csv" 2>"$OUT/ncu.log" &
    pid=$!
    if wait_ready http://127.0.0.1:8124 $pid >/dev/null; then
        timeout 120 python3 "$HERE/client.py" http://127.0.0.1:8124 llama8b 128256 --batches 1 \
            --tokens 48 --prefill-runs 0 >/dev/null 2>&1
    fi
    kill $pid 2>/dev/null; wait $pid 2>/dev/null
    python3 "$HERE/kernel_times.py" "$OUT/ncu.csv" | tee "$OUT/kernels.txt"
fi

step "d. transformers generate on the same card"
if [ "${SKIP_TRANSFORMERS:-0}" = 1 ]; then
    echo "skipped (SKIP_TRANSFORMERS=1)"
else
    python3 "$HERE/hf_baseline.py" "$M" | tee "$OUT/hf.json"
fi

step "summary"
python3 - "$OUT" "$weight_bytes" "${ready:-nan}" <<'PY'
import json, os, sys
out, wbytes, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
load = lambda n: json.load(open(os.path.join(out, n))) if os.path.exists(os.path.join(out, n)) else {}
s, h, bw = load("strata.json"), load("hf.json"), load("bandwidth.json")
roof = bw["copy_bandwidth_GBps"] * 1e9 / wbytes
print(f"card: {bw.get('card')}; weights {wbytes / 2**30:.2f} GiB; copy bandwidth {bw['copy_bandwidth_GBps']:.0f} GB/s; roofline {roof:.1f} tok/s at batch 1")
print(f"time to ready: {ready} s")
print(f"{'':12} {'strata':>10} {'transformers':>13}")
for k in ["batch1_tok_s", "batch16_tok_s", "batch64_tok_s", "prefill2048_tok_s"]:
    print(f"{k:20} {s.get(k, float('nan')):10.1f} {h.get('hf_' + k, float('nan')):13.1f}")
if s:
    frac = s["batch1_decode_tok_s"] / roof
    ratio = s["batch64_tok_s"] / h["hf_batch64_tok_s"] if h else float("nan")
    print(f"batch-1 decode {s['batch1_decode_tok_s']:.1f} tok/s = {100 * frac:.1f}% of the roofline (target 85%)")
    print(f"batch-64 aggregate = {ratio:.2f}x transformers (target 3x)")
PY

echo
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"; exit 1
fi
echo "all checks passed"
