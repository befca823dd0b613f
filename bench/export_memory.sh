#!/usr/bin/env bash
# Export wall time and peak RSS on this machine (2 cores, 24 GB) for GLM-Z1-9B shapes written
# to disk as sharded bf16 safetensors (random weights), to int4 and fp8; and GLM-4-32B layer
# shapes (synthetic source) at two depths to show the peak does not grow with depth.
# Usage: bash bench/export_memory.sh [WORKDIR]   -> bench/export_memory.log
#        ONLY_32B=1 appends the GLM-4-32B rows alone.
set -uo pipefail
W=${1:-/tmp/glmrt-bench}
LOG=$(cd "$(dirname "$0")" && pwd)/export_memory.log
mkdir -p "$W"
[ -n "${ONLY_32B:-}" ] || : > "$LOG"
measure() {  # label, command...
  local label=$1; shift
  /usr/bin/time -v "$@" > /dev/null 2> "$W/time.txt"
  local rc=$?
  echo "$label | rc $rc | $(grep -E 'Elapsed' "$W/time.txt" | sed 's/.*: //') wall | $(( $(grep 'Maximum resident' "$W/time.txt" | sed 's/.*: //') / 1024 )) MiB peak RSS" | tee -a "$LOG"
}
if [ -z "${ONLY_32B:-}" ]; then
[ -f "$W/glm-z1-9b/config.json" ] || measure "write glm-z1-9b checkpoint (19 GB bf16, 8 shards)" \
  glmrt tiny "$W/glm-z1-9b" --shape glm-z1-9b --shards 8
measure "glm-z1-9b -> int4 (onnxruntime, block 32)" glmrt export "$W/glm-z1-9b" -o "$W/z1-int4" --precision int4 --overwrite
rm -rf "$W/z1-int4"
measure "glm-z1-9b -> fp8 (tensorrt, 8 calibration prompts)" glmrt export "$W/glm-z1-9b" -o "$W/z1-fp8" --precision fp8 --target tensorrt --calibration-prompts 8 --overwrite
rm -rf "$W/z1-fp8"
fi
for layers in 2 6; do
  measure "synthetic:glm-4-32b:$layers -> int4" glmrt export "synthetic:glm-4-32b:$layers" -o "$W/g32-int4" --precision int4 --overwrite
  measure "synthetic:glm-4-32b:$layers -> fp8" glmrt export "synthetic:glm-4-32b:$layers" -o "$W/g32-fp8" --precision fp8 --target tensorrt --calibration-prompts 8 --overwrite
  rm -rf "$W/g32-int4" "$W/g32-fp8"
done
