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

python3.11 - "$result" "$total" "$clone" "${#steps[@]}" "${steps[@]}" "${seconds[@]}" <<'EOF'
import json, platform, sys
from pathlib import Path

def elapsed(span: str) -> float:  # "END-START", both $EPOCHREALTIME
    end, start = map(float, span.split("-"))
    return end - start


result, total, clone, count = sys.argv[1], elapsed(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
steps, seconds = sys.argv[5:5 + count], [elapsed(s) for s in sys.argv[5 + count:5 + 2 * count]]
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
machine = {"cpu_model": cpu, "cpus": len([l for l in open("/proc/cpuinfo") if l.startswith("processor")]),
           "cpu_native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags, "python": platform.python_version()}
for step, sec in zip(steps, seconds):
    print(f"{sec / 60:6.1f} min  {step}")
print(f"{total / 60:6.1f} min  total ({machine['cpu_model']}, {machine['cpus']} CPUs, bf16: {machine['cpu_native_bf16']})")
metrics = json.loads((clone / "runs/lite0/metrics.json").read_text()) if (clone / "runs/lite0/metrics.json").is_file() else None
payload = {"command": " && ".join(steps), "total_minutes": round(total / 60, 2),
           "steps": [{"step": s, "minutes": round(t / 60, 2)} for s, t in zip(steps, seconds)],
           "machine": machine, "run": str(clone / "runs/lite0"),
           "clean_test": None if metrics is None else {
               "balanced_accuracy": metrics["test"]["clean"]["balanced_accuracy"],
               "melanoma_auc": metrics["test"]["clean"]["per_class"]["melanoma"]["auc"]}}
Path(result).write_text(json.dumps(payload, indent=1) + "\n")
print(f"wrote {result}")
EOF
