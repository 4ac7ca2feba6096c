#!/bin/bash
# /tmp/before: `git worktree add --detach /tmp/before 15ae4d4` (before the redesign); /work/main: after
# before/after: decode.py and concurrency.py, alternating, one run (avx2 machine)
export HF_HUB_OFFLINE=1
PY=/work/main/.venv/bin/python
mkdir -p /tmp/ab
for round in 1 2; do
  for side in before after; do
    if [ $side = before ]; then dir=/tmp/before; else dir=/work/main; fi
    cd $dir/benchmarks
    echo "== round $round $side decode $(date +%T)"
    PYTHONPATH=$dir $PY decode.py --grid --contexts 1024 --batches 1,8,32 --prefixes 1 --steps 10 --out /tmp/ab/decode-$side-$round.json 2>&1 | tail -8
    echo "== round $round $side concurrency $(date +%T)"
    PYTHONPATH=$dir $PY concurrency.py --model qwen2.5-coder-0.5b --dtype auto --problems 8 --branches 8 -n 256 --ks 4 --out /tmp/ab/conc-$side-$round.json 2>&1 | tail -6
  done
done
echo "Exit status done"
