#!/usr/bin/env bash
# Run every benchmark in turn with its default sizes (each about a minute or two on a 2-core CPU).
# Extra arguments (e.g. --no-memory, --repeats 3) are passed to every script.
# The tiny models are built once into $PROXYTUNE_HOME (a temporary folder unless set).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PROXYTUNE_HOME:-}" ]; then
  PROXYTUNE_HOME="$(mktemp -d -t proxytune-bench-home-XXXXXX)"
  export PROXYTUNE_HOME
  trap 'rm -rf "$PROXYTUNE_HOME"' EXIT
fi
failed=()
for name in teacher_step synthesis_throughput student_step sampling_kv_cache evaluation_scoring stage_run_start; do
  echo "=================== $name"
  python "benchmarks/$name.py" "$@" || failed+=("$name")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
