#!/usr/bin/env bash
# Builds .gpu_bundle/site.tar.xz (git-ignored) from requirements.txt: the Python packages the GPU
# machine's image lacks, for bench/gpu_check.py (needs network to PyPI and a Python 3.12 pip).
# Usage: bench/gpu_bundle/build.sh [PIP]   (PIP defaults to a throwaway 3.12 venv's pip in /tmp/toolvenv)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="$HERE/../../.gpu_bundle"
mkdir -p "$OUT"
SITE=/tmp/gpusite
PIP="${1:-/tmp/toolvenv/bin/pip}"
if [ ! -x "$PIP" ]; then
  ${PYTHON312:-python3.12} -m venv /tmp/toolvenv
  PIP=/tmp/toolvenv/bin/pip
fi
rm -rf "$SITE"
# --isolated: ignore this machine's pip config (local cp311 mirror, torch constraint file)
"$PIP" --isolated --cert /etc/ssl/certs/ca-certificates.crt install --no-deps --no-compile --target "$SITE" \
  --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
  --platform manylinux1_x86_64 --platform linux_x86_64 --platform any \
  -r "$HERE/requirements.txt"
cd "$SITE"
# parts of Ray this project never uses (Java jars, RLlib, Serve, LLM, the dashboard's web UI build)
rm -rf ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client/build bin/serve
find . -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
# debug info out of every ELF file over 1 MB, and of all .so files
for f in $(find . -type f \( -name '*.so' -o -name '*.so.*' -o -size +1M \)); do
  if head -c4 "$f" | grep -q 'ELF'; then strip --strip-debug "$f"; fi
done
# console scripts: pip wrote this machine's interpreter into them; point them at the device's
for f in bin/*; do
  if head -c2 "$f" | grep -q '#!'; then sed -i '1s|^#!.*python.*$|#!/opt/torch/.venv/bin/python3|' "$f"; fi
done
tar -C "$SITE" --owner=0 --group=0 --sort=name -cf - . | xz -T2 -8 > "$OUT/site.tar.xz.tmp"
mv "$OUT/site.tar.xz.tmp" "$OUT/site.tar.xz"
ls -l "$OUT/site.tar.xz"
