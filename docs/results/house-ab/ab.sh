#!/bin/bash
CMD="bench decode --synthetic dbrx-like --modes ep,sliced,single --batch 1,8 --steps 24 --rounds 3 --no-roofline"
cd /tmp
for i in 1 2 3; do
  PYTHONPATH=/work/wt-old /work/main/.venv/bin/mpirun --allow-run-as-root -x PYTHONPATH -n 2 /work/main/.venv/bin/python -m moe_mpi $CMD --json /tmp/bench/ab2-old-$i.json > /tmp/bench/ab2-old-$i.txt 2>&1
  /work/main/.venv/bin/mpirun --allow-run-as-root -n 2 /work/main/.venv/bin/python -m moe_mpi $CMD --json /tmp/bench/ab2-new-$i.json > /tmp/bench/ab2-new-$i.txt 2>&1
done
echo done > /tmp/bench/ab2.done
