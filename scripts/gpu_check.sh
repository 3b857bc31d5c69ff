#!/usr/bin/env bash
# GPU check for an NVIDIA machine (made for one H100; ~8 minutes: build ~100 s, tests
# ~95 s, benchmarks up to 200 s, sanitizer ~25 s, profile ~60 s on 2026-11-27; the
# candidate kernels added after (cuda-* impls in the bench and profile), the bench's
# CUDA-graph cases, and the host and ncu steps add perhaps two or three minutes, a guess;
# DEADLINE_S, 570 s by default, cuts what does not fit one 600 s command of the lent
# machine, and the summary says which steps it skipped; a second call can run those,
# e.g. STEPS="build host ncu", the build then incremental):
#   build for this GPU's arch only, run the Triton and CUDA tests against the
#   reference, quick benchmarks, compute-sanitizer memcheck on a small subset, and a
#   profile of kernel times.
# Results land in $OUT (default ./out): summary.md (with info and the ncu table),
# tests.log, bench.log, gpu_bench.md, gpu_bench.json, sanitizer.log, profile.md, and
# build.log when the build fails (at most 8 files come back from the lent machine). Commit gpu_bench.md and the
# profile to benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
# DTK_NO_CLONES=1: the CPU kernels for one ISA level only, for a quicker build, the
# slowest step on the lent machine (159 s with clones; its last file to finish,
# csrc/cpu/max_pool2d.cpp, compiles in 32 s instead of 53 s on a 2-core machine).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 \
  DTK_NO_CLONES=${DTK_NO_CLONES:-1}
PY=${PYTHON:-python3}
STEPS=" ${STEPS:-build tests sanitizer bench profile ncu host} "  # a rerun can pick steps, e.g. STEPS="build bench"
# A rerun can also narrow them: TEST_PATHS (tests and sanitizer), BENCH_ARGS (e.g.
# "--ops max_pool2d --backends cuda"), PROFILE_ARGS (e.g. "--filter max_pool2d").
TEST_PATHS=${TEST_PATHS:-tests}
want() { [[ "$STEPS" == *" $1 "* ]]; }
summary="$OUT/summary.md"
echo "# dtkernels GPU check $(date -u +%FT%TZ), commit ${DTK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" > "$summary"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$summary" 2>&1
rc_all=0
# The lent machine's tool ends a command at 600 s and returns what is under $OUT then:
# every step's timeout is cut to what is left of DEADLINE_S, and a step that would get
# less than 30 s is skipped (said in the summary), so the summary is always complete.
DEADLINE_S=${DEADLINE_S:-570}
t_start=$(date +%s)
step() {  # step NAME TIMEOUT_S LOG CMD...
  local name=$1 t=$2 log=$3; shift 3
  local t0=$(date +%s)
  local left=$(( DEADLINE_S - (t0 - t_start) ))
  if [ "$left" -lt 30 ]; then
    echo "- $name: skipped, ${left} s left of DEADLINE_S=${DEADLINE_S}" | tee -a "$summary"
    rc_all=1
    return 124
  fi
  [ "$t" -gt "$left" ] && t=$left
  echo "== $name ($(date +%T), timeout ${t} s)"
  timeout "$t" "$@" > "$log" 2>&1
  local rc=$?
  tail -n 25 "$log"
  echo "- $name: rc=$rc, $(( $(date +%s) - t0 )) s" | tee -a "$summary"
  [ $rc -eq 0 ] || rc_all=1
  return $rc
}

step build 240 "$OUT/build.log" $PY setup.py -q build_ext --inplace || { cat "$summary"; exit 1; }
rm -f "$OUT/build.log"  # its tail is in the output above
{ echo '```'; $PY -m dtkernels info 2>&1; echo '```'; } | tee -a "$summary"

xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n ${XDIST:-12}"
# Correctness runs need no autotuning (DTK_TRITON_AUTOTUNE=0); the bench step tunes.
# A per-test timeout, so that one hang cannot eat the step; the failures go into the summary.
ptimeout=""; $PY -c "import pytest_timeout" 2>/dev/null && ptimeout="--timeout ${TEST_TIMEOUT:-90}"
if want tests; then
  step tests ${TESTS_TIMEOUT:-240} "$OUT/tests.log" env DTK_GPU_ONLY=1 DTK_TRITON_AUTOTUNE=0 \
    $PY -m pytest $TEST_PATHS -q -rfE -m "cuda or triton" $xdist $ptimeout -p no:cacheprovider --durations=10 ${PYTEST_ARGS:-}
  grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | head -40 | sed 's/^/  - /' >> "$summary"
fi

# Every case (results are written after each one, so a timeout keeps what was measured).
# The open targets first (max_pool2d, concat_skip), so that a timeout cuts the rest.
want bench && step bench ${BENCH_TIMEOUT:-200} "$OUT/bench.log" $PY benchmarks/demo.py --device cuda --rounds ${BENCH_ROUNDS:-10} \
  --first max_pool2d,concat_skip --json "$OUT/gpu_bench.json" --md "$OUT/gpu_bench.md" ${BENCH_ARGS:-}
if ! want sanitizer; then :
elif command -v compute-sanitizer >/dev/null; then
  # The tests marked `sanitize`: small, odd and misaligned shapes through every kernel.
  step sanitizer ${SANITIZER_TIMEOUT:-150} "$OUT/sanitizer.log" env DTK_GPU_ONLY=1 DTK_TRITON_AUTOTUNE=0 compute-sanitizer --tool memcheck \
    --error-exitcode 3 $PY -m pytest $TEST_PATHS -q -m "sanitize and (cuda or triton)" -p no:cacheprovider
else
  echo "- sanitizer: compute-sanitizer not found" >> "$summary"
fi

# Wall vs host vs kernel time per call, to tell host-bound calls from slow kernels.
want profile && step profile ${PROFILE_TIMEOUT:-180} "$OUT/profile.log" $PY benchmarks/gpu_profile.py --md "$OUT/profile.md" ${PROFILE_ARGS:-} \
  && rm -f "$OUT/profile.log"
# Hardware counters of the stem forward's kernels (benchmarks/ncu_stem.py; ~30 s, a
# guess: not yet run; before the host step, which the open target needs less): its
# table goes into the summary, so that no file is added (8 come back).
if ! want ncu; then :
elif command -v ncu >/dev/null; then
  step ncu ${NCU_TIMEOUT:-120} "$OUT/ncu.log" $PY benchmarks/ncu_stem.py --md "$OUT/ncu.md" \
    || { echo '```'; tail -n 15 "$OUT/ncu.log"; echo '```'; } >> "$summary"
  [ -f "$OUT/ncu.md" ] && cat "$OUT/ncu.md" >> "$summary"
  rm -f "$OUT/ncu.md" "$OUT/ncu.log"
else
  echo "- ncu: not found" >> "$summary"
fi
# Host µs per call (benchmarks/host_overhead.py; ~40 s, a guess), into the summary: the
# default route (CUDA C++) against eager on tiny tensors, then per Triton call and per
# layer of a launch. The H100's Triton calls were host-bound, the CUDA C++ stem forward's
# host time (0.027 ms) near its kernel's (0.030), and the CPU machine can only fake the
# driver (benchmarks/results/cpu-triton-host-20261128.md).
if want host; then
  step host ${HOST_TIMEOUT:-120} "$OUT/host.log" bash -c "$PY benchmarks/host_overhead.py --device cuda && $PY benchmarks/host_overhead.py --triton --device cuda"
  [ -f "$OUT/host.log" ] && grep "^|" "$OUT/host.log" >> "$summary"
  rm -f "$OUT/host.log"
fi
# The candidate kernels against the defaults (benchmarks/results/cuda-candidates-20261127.md),
# kernel times first, so that the summary alone can decide.
for f in "$OUT/profile.md" "$OUT/gpu_bench.md"; do
  [ -f "$f" ] || continue
  echo "- candidates in $(basename "$f"):" >> "$summary"
  grep -E "\| (cuda-vec-|cuda-tile-|cuda-nhwc|cuda-adjoint-|dtk-cuda|clone)" "$f" | grep -E "k3s2p1-fwd[ -]|k2s2-fwd( \| | )64x128x128x128|bilinear" | grep -v -- "-fwd-graph" | sed 's/^/  /' >> "$summary"
done
# Every impl's forward replayed from CUDA graphs (kernels without host time; Triton's included)
if [ -f "$OUT/gpu_bench.md" ]; then
  echo "- CUDA-graph forwards in gpu_bench.md:" >> "$summary"
  grep -E -- "-fwd-graph" "$OUT/gpu_bench.md" | sed 's/^/  /' >> "$summary"
fi
cat "$summary"
exit $rc_all
