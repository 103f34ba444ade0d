#!/usr/bin/env bash
# bench/gpu_check.sh: everything fusedrnn's CUDA backend needs a GPU for, in one run.
#
# For a GPU machine WITHOUT network access whose python3 already has torch (CUDA,
# cuDNN), cmake, ninja, pybind11, scikit-build-core, numpy, pytest and hypothesis,
# with nvcc and compute-sanitizer on PATH (or under /usr/local/cuda/bin). Wheels
# the image lacks (scipy-openblas32) may be carried in .whl/ at the repository
# root; they are installed offline.
#
# Phases (each timed; a failed phase does not stop the next ones):
#   info       nvidia-smi, the device as torch sees it
#   deps       .whl/*.whl -> $SITE (offline, no dependencies)
#   build      fusedrnn with its CUDA extension (FUSEDRNN_CUDA=ON, sm_90 by default)
#              from this working tree -> $SITE, build folder outside the tree
#   import     the installed package (with _cuda) is the one Python imports
#   tests      tests/test_cuda.py (+ tests/test_torch.py -k cuda when present),
#              run from outside the source tree
#   memcheck   compute-sanitizer --tool memcheck on a tiny lstm+gru forward+backward,
#              then the persistent kernels again in cluster mode
#   racecheck  compute-sanitizer --tool racecheck on the same, persistent kernels (the
#              only ones with shared memory), grid and cluster mode
#   bench      python -m fusedrnn bench --device cuda (full grid) -> $OUT, then
#              bench/rule_report.py on its CSV (auto's picks against the faster
#              algorithm) -> $OUT/cuda-<gpu>-rule.txt
#   units      bench/persistent_units.py: the persistent kernels with fewer, larger
#              blocks (FUSEDRNN_CUDA_PERSISTENT_UNITS), float32 -> $OUT
#
# Output: everything is also logged to $OUT/gpu_check.log; the benchmark writes
# $OUT/cuda-<gpu>.csv and .txt. OUT defaults to bench/results. Exit status 0
# only when every phase passed. Budget: about 5 minutes on an H100 (the build
# is the longest phase after the benchmark).
#
# Environment knobs: OUT, PYTHON (python3), SITE (/tmp/fusedrnn-site),
# FUSEDRNN_CUDA_ARCHITECTURES (90), BENCH_ARGS (extra options for the benchmark,
# e.g. "--quick"), SKIP_BENCH=1, SKIP_UNITS=1, SKIP_SANITIZER=1, SKIP_TESTS=1, and SKIP_BUILD=1 (use
# the package an earlier run on the same machine installed in $SITE: a second call
# within the device's idle time, e.g. for the sanitizers only).

set -u -o pipefail
export PYTHONUNBUFFERED=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/bench/results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/fusedrnn-site}"
WORK="$(mktemp -d /tmp/fusedrnn-gpu-check.XXXXXX)"
export FUSEDRNN_CUDA_ARCHITECTURES="${FUSEDRNN_CUDA_ARCHITECTURES:-90}"
export PATH="$PATH:/usr/local/cuda/bin"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# the installed package first; keep whatever the caller had after it
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$SITE"

FAILED=()
T_ALL=$SECONDS

phase() {  # phase NAME FUNCTION: run, time, record a failure, never stop the script
  local name="$1" fn="$2" t0=$SECONDS rc
  echo
  echo "=== [$name] start $(date +%H:%M:%S)"
  "$fn"
  rc=$?
  echo "=== [$name] $( ((rc == 0)) && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s"
  ((rc == 0)) || FAILED+=("$name")
  return 0
}

info() {
  echo "repository: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
  echo "output:     $OUT"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi || true
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2
  "$PY" - <<'EOF'
import sys
print("python", sys.version.split()[0], sys.executable)
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda,
      "cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print("torch.cuda.is_available():", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {torch.cuda.get_device_name(0)}, sm_{p.major}{p.minor}, "
          f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
}

deps() {
  shopt -s nullglob
  local wheels=("$ROOT"/.whl/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]} == 0)); then
    echo "no wheels in .whl/: using the image's packages"
  else
    printf 'installing %s\n' "${wheels[@]##*/}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$SITE" "${wheels[@]}" || return 1
  fi
  # _core finds libscipy_openblas through its RUNPATH ($ORIGIN/../scipy_openblas32/lib,
  # i.e. $SITE when the wheel went there); elsewhere, through LD_LIBRARY_PATH
  local libdir
  libdir="$("$PY" -c 'import scipy_openblas32 as s; print(s.get_lib_dir())')" || {
    echo "scipy-openblas32 is neither in the image nor in .whl/: the build needs it"
    return 1
  }
  echo "scipy_openblas32: $libdir"
  export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

build() {
  # --target installs into $SITE; the build folder lives outside the tree, so a
  # build/ carried in the working tree (other settings, other Python) is not reused
  FUSEDRNN_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" timeout 600 \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index --no-compile \
    --no-cache-dir --upgrade --target "$SITE" --config-settings=build-dir="$WORK/build" "$ROOT" \
    > "$WORK/build.log" 2>&1
  local rc=$?
  tail -n 25 "$WORK/build.log"
  grep -E "fusedrnn: (building|no CUDA)" "$WORK/build.log" || true
  return $rc
}

import_check() {
  (cd "$WORK" && "$PY" - "$SITE" <<'EOF'
import os, sys
import fusedrnn, fusedrnn._cuda
site = os.path.realpath(sys.argv[1])
where = os.path.realpath(fusedrnn.__file__)
print("fusedrnn from", where)
print("fusedrnn._cuda from", fusedrnn._cuda.__file__)
print("cuda_status():", fusedrnn.cuda_status())
print("cuda_available():", fusedrnn.cuda_available())
if not where.startswith(site + os.sep):
    sys.exit(f"the imported fusedrnn is not the one just built into {site}")
sys.exit(0 if fusedrnn.cuda_available() else 1)
EOF
  )
}

tests() {
  local rc=0 r
  # from outside the source tree, so the package in $SITE is what gets imported
  (cd "$WORK" && timeout 300 "$PY" -m pytest -q -p no:cacheprovider -rs \
    "$ROOT/tests/test_cuda.py") || rc=$?
  if [ -f "$ROOT/tests/test_torch.py" ]; then
    (cd "$WORK" && timeout 300 "$PY" -m pytest -q -p no:cacheprovider -rs \
      "$ROOT/tests/test_torch.py" -k cuda)
    r=$?
    if ((r == 5)); then
      echo "(tests/test_torch.py has no test matching -k cuda)"
    elif ((r != 0)); then
      rc=$r
    fi
  fi
  return $rc
}

write_tiny() {  # the sanitizers' workload: no torch, small arrays, every algorithm
  cat > "$WORK/tiny.py" <<'EOF'
"""The sanitizers' workload: lstm and gru, forward+backward and inference, with each
algorithm, with lengths, with a mask, and reversed batch-first; the projected lstm (each
algorithm) and checkpointed caches (standard algorithm); float32 DeviceArray inputs (no
torch: a short run under the sanitizer)."""
import os
import sys

import numpy as np
import fusedrnn
from fusedrnn import DeviceArray, _device

algos = [a for a in sys.argv[1:] if a != "cluster"] or ["standard", "persistent"]
if "cluster" in sys.argv[1:]:  # the persistent kernels' cluster mode (sm_90)
    os.environ["FUSEDRNN_CUDA_PERSISTENT_CLUSTER"] = "1"
    print("cluster mode:", _device._cuda.persistent_layout("lstm", "float32", 3, 40, False, 0))
rng = np.random.default_rng(0)
T, B, I, H = 5, 3, 4, 40
for cell in ("lstm", "gru"):
    G = fusedrnn.CELLS[cell]
    for algo in algos:
        for kw in ({"lengths": np.array([5, 0, 3])}, {"mask": rng.random((T, B)) < 0.6},
                   {"reverse": True, "batch_first": True}):
            bf = kw.get("batch_first", False)
            d = lambda *s: DeviceArray.from_host(rng.standard_normal(s) * 0.3, dtype="float32")
            x = d(B, T, I) if bf else d(T, B, I)
            c0 = d(B, H) if cell == "lstm" else None
            y, h_n, c_n, cache = _device.forward(cell, x, d(G * H, I), d(G * H, H), d(G * H),
                                                 d(G * H), d(B, H), c0, algo=algo, **kw)
            assert cache.algo == algo, cache.algo
            dy = d(B, T, H) if bf else d(T, B, H)
            g = fusedrnn.backward(cache, dy, d(B, H), d(B, H) if cell == "lstm" else None)
            vals = [y.get(), h_n.get()] + [v.get() for v in g.values() if v is not None]
            assert all(np.isfinite(v).all() for v in vals)
            _device.forward(cell, x, d(G * H, I), d(G * H, H), None, None, None, None,
                            algo=algo, training=False, **kw)[0].get()
        print(cell, algo, "ok")
if "persistent" in algos:  # H = 300: the forward's k split among warps (H = 40: backward's)
    H2, G = 300, 4
    d = lambda *s: DeviceArray.from_host(rng.standard_normal(s) * 0.1, dtype="float32")
    y, h_n, c_n, cache = _device.forward("lstm", d(T, B, I), d(G * H2, I), d(G * H2, H2),
                                         d(G * H2), d(G * H2), algo="persistent",
                                         lengths=np.array([5, 0, 3]))
    g = fusedrnn.backward(cache, d(T, B, H2))
    assert all(np.isfinite(v.get()).all() for v in g.values() if v is not None)
    print("lstm H=300 persistent ok")
for algo in algos:  # the LSTM projection, P = 24 < H (persistent: in grid mode)
    P = 24
    for kw in ({"lengths": np.array([5, 0, 3])}, {"mask": rng.random((T, B)) < 0.6},
               {"reverse": True, "batch_first": True}):
        bf = kw.get("batch_first", False)
        d = lambda *s: DeviceArray.from_host(rng.standard_normal(s) * 0.3, dtype="float32")
        x = d(B, T, I) if bf else d(T, B, I)
        y, h_n, c_n, cache = _device.forward("lstm", x, d(4 * H, I), d(4 * H, P), d(4 * H),
                                             d(4 * H), d(B, P), d(B, H), w_hr=d(P, H),
                                             algo=algo, **kw)
        g = fusedrnn.backward(cache, d(*y.shape), d(B, P), d(B, H))
        assert all(np.isfinite(v.get()).all() for v in g.values() if v is not None)
    print("lstm projection", algo, "ok")
if "standard" in algos:
    for cell in ("lstm", "gru"):  # checkpointed caches (standard algorithm), k = 2
        G = fusedrnn.CELLS[cell]
        for kw in ({"lengths": np.array([5, 0, 3])}, {"reverse": True, "batch_first": True}):
            bf = kw.get("batch_first", False)
            x = d(B, T, I) if bf else d(T, B, I)
            c0 = d(B, H) if cell == "lstm" else None
            y, h_n, c_n, cache = _device.forward(cell, x, d(G * H, I), d(G * H, H), d(G * H),
                                                 d(G * H), d(B, H), c0, checkpoint=2, **kw)
            g = fusedrnn.backward(cache, d(*y.shape))
            assert all(np.isfinite(v.get()).all() for v in g.values() if v is not None)
    print("checkpoint standard ok")
EOF
}

sanitize() {  # sanitize TOOL [ALGO...]
  local tool="$1" rc
  shift
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer: not found"
    return 1
  fi
  write_tiny
  (cd "$WORK" && timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 86 \
    --print-limit 20 "$PY" tiny.py "$@") 2>&1 | tee "$WORK/$tool.log"
  rc=$?
  ((rc == 124)) && echo "compute-sanitizer --tool $tool: timed out after 240 s"
  if grep -q "Device not supported" "$WORK/$tool.log"; then
    echo "compute-sanitizer --tool $tool: 'Device not supported' on this machine; not counted"
    return 0
  fi
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$WORK/$tool.log" | tail -n 2
  return $rc
}
# (then the persistent kernels' cluster mode, on a device that has it)
memcheck() { sanitize memcheck && sanitize memcheck persistent cluster; }
# shared-memory races: only the persistent kernels use shared memory
racecheck() { sanitize racecheck persistent && sanitize racecheck persistent cluster; }

bench() {
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of options
  (cd "$WORK" && timeout 300 "$PY" -m fusedrnn bench --device cuda --out "$OUT" ${BENCH_ARGS:-}) ||
    return
  # how well auto's rule picked, from the CSV just written (the newest in $OUT)
  local csv
  csv="$(ls -t "$OUT"/cuda-*.csv | head -n 1)"
  "$PY" "$ROOT/bench/rule_report.py" "$csv" | tee "${csv%.csv}-rule.txt"
}

units() {  # the persistent kernels with fewer, larger blocks (bench/persistent_units.py)
  (cd "$WORK" && timeout 120 "$PY" "$ROOT/bench/persistent_units.py" --out "$OUT")
}

phase info info
phase deps deps
[ "${SKIP_BUILD:-0}" != 1 ] && phase build build
phase import import_check
if [[ " ${FAILED[*]} " == *" build "* || " ${FAILED[*]} " == *" import "* ]]; then
  echo "the build or the import failed: skipping the phases that need the package"
else
  [ "${SKIP_TESTS:-0}" != 1 ] && phase tests tests
  if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
    phase memcheck memcheck
    phase racecheck racecheck
  fi
  [ "${SKIP_BENCH:-0}" != 1 ] && phase bench bench
  [ "${SKIP_UNITS:-0}" != 1 ] && phase units units
fi

echo
echo "=== gpu_check: $((SECONDS - T_ALL)) s in all; log: $LOG"
if ((${#FAILED[@]})); then
  echo "=== FAILED phases: ${FAILED[*]}"
  exit 1
fi
echo "=== all phases passed"
