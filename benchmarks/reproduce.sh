#!/usr/bin/env bash
# Reproduce the shipped measurements on a GPU: tune the phi-3 kernels, run the phi-3 sweep with
# the tuned configs, and check the CI gate (a rerun passes, a forced bad config fails).
# Usage: benchmarks/reproduce.sh OUTDIR [tune] [phi3] [gate]
# With no step named, all three run in that order. Each step takes minutes on an H100, so they
# can also run one at a time into the same OUTDIR: phi3 reads the configs tune wrote to
# OUTDIR/cache.json (or to DKBENCH_CACHE when that is set). Each step prints its wall time
# ("step tune took N s").
set -uo pipefail
out=${1:?usage: benchmarks/reproduce.sh OUTDIR [tune] [phi3] [gate]}
shift
steps=${*:-tune phi3 gate}
for step in $steps; do
    case $step in tune|phi3|gate) ;; *) echo "unknown step '$step' (steps: tune, phi3, gate)" >&2; exit 2;; esac
done
mkdir -p "$out"
# PYTHON picks the interpreter (default python3).
dk="${PYTHON:-python3} cli.py"
export DKBENCH_CACHE="${DKBENCH_CACHE:-$out/cache.json}"

tune() {
    # sweeps/phi3.yaml's shapes, each once: the forward, then the backward behind its winner.
    $dk tune sweeps/phi3-tune.yaml --block-m 64,128 --block-n 32,64,128 \
        --num-warps 4,8 --num-stages 2,3 --impl triton,gluon --out "$out/tune" --top 3 2>&1 \
        | tee "$out/tune.log"
}

phi3() {
    $dk run sweeps/phi3.yaml --out "$out/phi3" 2>&1 | tee "$out/phi3.log"
}

gate() {
    $dk run sweeps/ci.yaml --out "$out/ci-a" --quiet
    $dk run sweeps/ci.yaml --out "$out/ci-b" --quiet
    # A deliberately bad forward config (8 warps, 3 stages: about 2x slower on Hopper).
    sed 's/^check:/config: {block_m: 64, block_n: 32, num_warps: 8, num_stages: 3}\ncheck:/' \
        sweeps/ci.yaml > "$out/ci-worse.yaml"
    $dk run "$out/ci-worse.yaml" --out "$out/ci-worse" --quiet
    $dk gate "$out"/ci-b/ci-* --baseline "$out"/ci-a/ci-* --markdown "$out/gate-pass.md"
    echo "gate (rerun vs baseline) exit: $?"
    $dk gate "$out"/ci-worse/ci-* --baseline "$out"/ci-a/ci-* --markdown "$out/gate-fail.md"
    echo "gate (bad config vs baseline) exit: $?"
}

for step in $steps; do
    SECONDS=0
    $step
    echo "step $step took $SECONDS s"
done
