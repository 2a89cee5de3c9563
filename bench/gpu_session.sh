#!/usr/bin/env bash
# Issue 5's GPU figures in one call on a lent GPU machine, where a session gets 15 minutes of
# device time in all (the machine's start included) and 10 minutes a command:
#     run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# The machine has torch, transformers and triton but no torchao and no internet, so the torchao
# wheel comes along: `pip download --no-deps torchao==0.18.0 -d .whl` here first. Both scripts
# rewrite their JSON after every row, so what a timeout cuts off is all that is lost.
set -uo pipefail
out=${OUT:-results}
if ! python -c "import torchao" 2>/dev/null; then
    pip install -q --no-index --no-deps --target /tmp/site .whl/torchao-*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
# the kernel against fp16 SDPA first (issue 5's first three rows, then what each correction
# costs; never timed on the lent machine, so cut at 220 s), then end to end in what is left of
# the command's 10 minutes
timeout 220 python bench/gpu_decode.py --json "$out/gpu_decode.json"
echo "gpu_decode.py: exit $?"
timeout 340 python bench/gpu_e2e.py --json "$out/gpu_e2e.json" --budget-s 290
echo "gpu_e2e.py: exit $?"
