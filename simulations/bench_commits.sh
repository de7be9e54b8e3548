#!/usr/bin/env bash
# Side-by-side CPU benchmarks of two checkouts (e.g. the commit an issue started from and main), in one
# run, alternating the two so that the shared machine's load hits both alike:
#   simulations/bench_commits.sh /path/to/base-checkout /path/to/new-checkout [rounds]
# Prints one JSON line per benchmark and checkout (tagged "tree"), with `uptime` before and after.
set -euo pipefail
BASE=$(cd "$1" && pwd); NEW=$(cd "$2" && pwd); ROUNDS=${3:-2}
PY=${PY:-$NEW/.venv/bin/python}; [ -x "$PY" ] || PY=$(command -v python3)
uptime
for i in $(seq "$ROUNDS"); do
  for tree in "$BASE" "$NEW"; do
    for bench in "diffrec-speed bench.reference_eval=false bench.repeats=2" \
                 "cross-device-round bench.repeats=3" \
                 "cross-device bench.skip_flat=true"; do
      (cd "$tree" && PYTHONPATH="$tree" "$PY" -m simulations.bench $bench 2>/dev/null) \
        | sed "s|^{|{\"tree\": \"$(basename "$tree")\", \"pass\": $i, |"
    done
  done
done
uptime
