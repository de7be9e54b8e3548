#!/usr/bin/env bash
# Exact-resume check: run a config to the end; run it again, kill -9 it once metrics.jsonl has KILL_AT
# lines, resume it with resume=true, and compare the two runs (test metrics, metrics.jsonl).
# usage (from the repository root, venv active): bash simulations/check_resume.sh NAME KILL_AT OVERRIDES...
set -u
name=$1; kill_at=$2; shift 2
root=${RESUME_ROOT:-/tmp/fedrec-resume}/$name
rm -rf $root; mkdir -p $root/full $root/killed
PY=${PYTHON:-python}
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
t0=$(date +%s)
$PY -m simulations.run "$@" paths.output_root=$root/full > $root/full.log 2>&1
t1=$(date +%s)
$PY -m simulations.run "$@" paths.output_root=$root/killed > $root/killed1.log 2>&1 &
pid=$!
while true; do
  f=$(ls $root/killed/runs/*/metrics.jsonl 2>/dev/null | head -1)
  if [ -n "$f" ] && [ $(wc -l < $f) -ge $kill_at ]; then kill -9 $pid; break; fi
  if ! kill -0 $pid 2>/dev/null; then echo "finished before kill"; break; fi
  sleep 0.2
done
wait $pid 2>/dev/null
echo "killed at $(wc -l < $f) lines"
sleep 5
$PY -m simulations.run "$@" paths.output_root=$root/killed resume=true > $root/killed2.log 2>&1
t2=$(date +%s)
$PY - $root <<'PY'
import json, sys, glob
root = sys.argv[1]
a = json.load(open(glob.glob(f"{root}/full/runs/*/summary.json")[0]))
b = json.load(open(glob.glob(f"{root}/killed/runs/*/summary.json")[0]))
print("best_round", a["best_round"], b["best_round"])
diff = max(abs(a["test"][k] - b["test"][k]) for k in a["test"])
print("test full  ", {k: round(v, 6) for k, v in a["test"].items() if k.endswith("@20")})
print("test resumed", {k: round(v, 6) for k, v in b["test"].items() if k.endswith("@20")})
print("max |diff| over test metrics:", diff)
la = [json.loads(l) for l in open(glob.glob(f"{root}/full/runs/*/metrics.jsonl")[0])]
lb = [json.loads(l) for l in open(glob.glob(f"{root}/killed/runs/*/metrics.jsonl")[0])]
strip = lambda r: {k: v for k, v in r.items() if not k.endswith("_s")}
print("metrics.jsonl rounds", len(la), len(lb), "identical (timings aside):", [strip(x) for x in la] == [strip(x) for x in lb])
PY
echo "full run $((t1-t0)) s; killed+resumed $((t2-t1)) s"; uptime
