#!/usr/bin/env bash
# The GPU benchmark as one prepared script: ours against timm 1.0.31 on the same
# GPU (see bench/gpu_bench.py for the four checks and how each is measured).
#
#   bench/gpu.sh --pack            here, after `scripts/setup`: builds the binaries of
#                                  the working tree, then writes target/gpu-bundle/
#                                  (stripped worker and coordinator, VERSION naming the
#                                  commit they were built from, the timm 1.0.31 wheel,
#                                  the source photos), about 27 MB
#   bench/gpu.sh [--out DIR]       on a fresh single-GPU host (PyTorch 2.11.0+cu130 in
#                                  /opt/torch/.venv, no Rust, no network), from the
#                                  repository root with target/gpu-bundle carried along;
#                                  finishes within 8 minutes
#   bench/gpu.sh --dry-run [--bundle] [--out DIR]
#                                  the same commands on this machine's CPU at toy sizes
#                                  (CI runs it), with target/release's binaries, or with
#                                  the bundle's (--bundle: the ones that travel)
#
# It prints one summary table and writes it to DIR/summary.md (and .json, and
# every log in DIR/logs.tar.gz: three files, as the device tool brings back at
# most eight); DIR defaults to $OUT when set (the device tool's folder that
# comes back), else target/gpu-bench. The runs themselves work in a temporary
# folder. The exit status is 0 only when every check succeeded.
set -euo pipefail
cd "$(dirname "$0")/.."
timm_version=1.0.31
bundle=target/gpu-bundle
mode=gpu
use_bundle=
out=${OUT:-target/gpu-bench}
while [ $# -gt 0 ]; do
  case $1 in
    --pack) mode=pack ;;
    --dry-run) mode=dry-run ;;
    --bundle) use_bundle=1 ;;
    --out) out=$2; shift ;;
    *) echo "bench/gpu.sh: unknown argument $1 (see the header of bench/gpu.sh)" >&2; exit 2 ;;
  esac
  shift
done

# What the bundle's binaries were built from (its VERSION file).
bundle_version() {
  cat "$bundle/VERSION" 2>/dev/null || echo 'no VERSION file'
}

# The commit of the working tree, `-dirty` when it has uncommitted changes.
tree_version() {
  local commit
  commit=$(git rev-parse --short HEAD 2>/dev/null) || { echo unknown; return; }
  if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    commit="$commit-dirty"
  fi
  echo "$commit"
}

if [ "$mode" = pack ]; then
  [ -d .venv/libtorch ] || { echo ".venv/libtorch missing: run scripts/setup first" >&2; exit 1; }
  # The binaries of this very tree: a bundle packed from an older build
  # would spend the GPU's one chance on old code.
  # Built as the tests build them (tests/src/lib.rs, BINARIES_BUILD): with
  # --examples, cargo resolves features as `cargo test --workspace` does and
  # reuses that build's libraries, so nothing is rebuilt under CI.
  cargo build -q --workspace --bins --examples --release
  rm -rf "$bundle" && mkdir -p "$bundle/bin" "$bundle/wheels" "$bundle/photos"
  for b in worker coordinator; do
    strip -o "$bundle/bin/$b" "target/release/$b"
  done
  echo "$(tree_version) built $(date -u +%Y-%m-%dT%H:%MZ)" >"$bundle/VERSION"
  .venv/bin/python tests/oracle/assets.py >/dev/null   # the wheels' photos into .cache/photos
  cp .cache/photos/*.jpg "$bundle/photos/"
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d "$bundle/wheels" "timm==$timm_version"
  du -sh "$bundle"
  echo "bundle of $(bundle_version): carry $bundle and run: bash bench/gpu.sh"
  exit 0
fi

if [ "$mode" = dry-run ]; then
  python=.venv/bin/python
  worker=target/release/worker coordinator=target/release/coordinator
  version=(--bundle-version "target/release, $(tree_version)")
  if [ -n "$use_bundle" ]; then
    worker=$bundle/bin/worker coordinator=$bundle/bin/coordinator
    version=(--bundle-version "$(bundle_version)")
  fi
  photos=()
  [ -d .cache/photos ] && photos=(--photos-src .cache/photos)
  exec "$python" bench/gpu_bench.py --dry-run --worker "$worker" --coordinator "$coordinator" \
    --python "$python" "${photos[@]}" "${version[@]}" --out "$out"
fi

# On the GPU host: the host's torch (the binaries were linked against the same
# libtorch version from PyPI), its lib/ and nvidia/*/lib on the loader's path.
# Every step before the checks is bounded, and the checks get what is left
# of the 8 minutes (less a margin for writing the summary).
export PYTHONUNBUFFERED=1
python=/opt/torch/.venv/bin/python3
[ -x "$python" ] || python=$(command -v python3)
for b in worker coordinator; do
  [ -f "$bundle/bin/$b" ] || { echo "$bundle/bin/$b missing: run bench/gpu.sh --pack here and carry $bundle" >&2; exit 1; }
  chmod +x "$bundle/bin/$b"   # in case the transfer dropped the mode
done
echo "bundle: $(bundle_version)"
# A torch that does not import fails the checks that need it, in the table.
torch_dir=$(timeout 120 "$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))') \
  || { echo "torch does not import with $python" >&2; torch_dir=; }
if [ -n "$torch_dir" ]; then
  site=$(dirname "$torch_dir")
  nvidia_libs=$(ls -d "$site"/nvidia/*/lib 2>/dev/null | paste -sd: || true)
  export LD_LIBRARY_PATH="$torch_dir/lib${nvidia_libs:+:$nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# timm (and Pillow, torchvision) only serve timm's side of the checks: a
# problem there is reported, and our own checks still run.
host_timm=$(timeout 60 "$python" -c 'import timm; print(timm.__version__)' 2>/dev/null || echo none)
if [ "$host_timm" != "$timm_version" ]; then
  echo "host timm is $host_timm: using the carried timm $timm_version wheel" >&2
  rm -rf /tmp/rsb-timm && mkdir -p /tmp/rsb-timm
  # A wheel is a zip: unpacked without pip, which a venv may lack.
  "$python" -m zipfile -e "$bundle"/wheels/timm-*.whl /tmp/rsb-timm \
    || echo "could not unpack the timm wheel: timm's side of the checks will fail" >&2
  export PYTHONPATH=/tmp/rsb-timm${PYTHONPATH:+:$PYTHONPATH}
fi
timeout 60 "$python" -c 'import torch; print("host torch", torch.__version__, "cuda", torch.cuda.is_available())' || true
timeout 60 "$python" -c 'import timm, torchvision, PIL; print("timm", timm.__version__, "torchvision", torchvision.__version__, "Pillow", PIL.__version__)' \
  || echo "timm, torchvision or Pillow does not import: timm's side of the checks will fail" >&2
timeout 60 "$bundle/bin/worker" doctor || echo "worker doctor failed (status $?)" >&2
# What a failure to start our binaries, or a second rank on the GPU, would
# come from: the C library (ours need glibc 2.34) and the GPU's compute mode.
ldd --version 2>/dev/null | head -1 | sed 's/^/C library: /' || true
timeout 20 nvidia-smi --query-gpu=compute_mode --format=csv,noheader 2>/dev/null | sed 's/^/compute mode: /' || true
# timm's DataLoader workers hand their batches over in /dev/shm.
df -h /dev/shm 2>/dev/null | tail -1 | sed 's/^/shared memory: /' || true
budget=$((450 - SECONDS))
exec "$python" bench/gpu_bench.py --worker "$bundle/bin/worker" --coordinator "$bundle/bin/coordinator" \
  --python "$python" --photos-src "$bundle/photos" --out "$out" --budget-s "$budget" \
  --bundle-version "$(bundle_version)"
