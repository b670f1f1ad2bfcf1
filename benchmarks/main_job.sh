#!/usr/bin/env bash
# The README main job as a newcomer runs it: a fresh clone of HEAD beside this checkout (so ../shared is the same),
# a fresh venv, no pip cache. Each '&&'-joined step of the README's first command is timed; the total is the figure
# the 20-minute target is about. Prints a table and writes benchmarks/results/main_job.json (or $1).
#
#     bash benchmarks/main_job.sh [RESULT.json]
#
# Run it alone on the machine: anything else on the cores lengthens every step.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
result="${1:-$repo/benchmarks/results/main_job.json}"
command="$(awk '/^```bash$/ {getline; print; exit}' "$repo/README.md")"
[[ "$command" == python3.11* ]] || { echo "main_job.sh: README's first bash block is not the main job: $command" >&2; exit 2; }

clone="$(dirname "$repo")/melanoma-main-job"
rm -rf "$clone"
git clone --quiet "$repo" "$clone"
cd "$clone"
export PIP_NO_CACHE_DIR=1

steps=()
seconds=()
IFS=$'\n' read -r -d '' -a parts < <(sed 's/ && /\n/g' <<<"$command" && printf '\0')
total_start=$EPOCHREALTIME
for part in "${parts[@]}"; do
  start=$EPOCHREALTIME
  bash -c "$part"
  steps+=("$part")
  seconds+=("$EPOCHREALTIME-$start")
done
total="$EPOCHREALTIME-$total_start"

# the clone's own venv reports the machine the way every benchmark does (benchmarks/_common.py)
.venv/bin/python - "$clone/benchmarks" "$result" "$total" "$clone" "${#steps[@]}" "${steps[@]}" "${seconds[@]}" <<'EOF'
import json, sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from _common import machine, write_results  # noqa: E402


def elapsed(span: str) -> float:  # "END-START", both $EPOCHREALTIME
    end, start = map(float, span.split("-"))
    return end - start


result, total, clone, count = sys.argv[2], elapsed(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
steps, seconds = sys.argv[6:6 + count], [elapsed(s) for s in sys.argv[6 + count:6 + 2 * count]]
where = machine()
for step, sec in zip(steps, seconds):
    print(f"{sec / 60:6.1f} min  {step}")
print(f"{total / 60:6.1f} min  total ({where['cpu_model']}, {where['cpus']} CPUs, bf16: {where['cpu_native_bf16']})")
metrics_file = clone / "runs/lite0/metrics.json"
metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
write_results("main_job", {
    "command": " && ".join(steps), "total_minutes": round(total / 60, 2),
    "steps": [{"step": s, "minutes": round(t / 60, 2)} for s, t in zip(steps, seconds)],
    "run": str(clone / "runs/lite0"),
    "clean_test": None if metrics is None else {
        "balanced_accuracy": metrics["test"]["clean"]["balanced_accuracy"],
        "melanoma_auc": metrics["test"]["clean"]["per_class"]["melanoma"]["auc"]}}, result)
EOF
