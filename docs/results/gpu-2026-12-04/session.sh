#!/usr/bin/env bash
# One device session: realistic-phantom benchmark at 1 mm (axial, 20 deg) and 2 mm, then DIP variants at 1 mm.
T0=$(date +%s); DEADLINE=570
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
step() { # cap name cmd...
  local cap=$1 name=$2; shift 2; local l; l=$(left); [ "$l" -lt "$cap" ] && cap=$l
  if [ "$cap" -lt 20 ]; then echo "SKIP $name (no time)"; return; fi
  echo "=== $name (cap ${cap}s, at $(( $(date +%s) - T0 ))s)"; timeout "$cap" "$@"; echo "=== $name rc=$? took $(( $(date +%s) - T0 ))s total"
}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,driver_version --format=csv
nproc; python3 -c "import torch, numpy, scipy, nilearn.datasets, nibabel; print(torch.__version__, numpy.__version__, scipy.__version__, torch.backends.cudnn.version())" || exit 4
B=benchmarks/benchmark.py
step 270 b1axial python3 $B --phantoms realistic --voxels 1 --tilts 0 --every 20 --json $OUT/b1-axial.json
step 200 b1tilt python3 $B --phantoms realistic --voxels 1 --tilts 20 --every 20 --json $OUT/b1-tilt20.json
step 70 b2axial python3 $B --phantoms realistic --voxels 2 --tilts 0 --every 20 --json $OUT/b2-axial.json
step 80 traj400 python3 benchmarks/dip_trajectory.py --kind realistic --voxel 1 --magnitude 1 --every 40 --set '{"iterations": 400}' --tag gpu-400 --out $OUT/dip-1mm-variants.jsonl
step 50 cudnnbench python3 -c "import sys, runpy, torch; torch.backends.cudnn.benchmark = True; sys.argv = ['dip_trajectory.py', '--kind', 'realistic', '--voxel', '1', '--every', '1000', '--tag', 'gpu-cudnn-benchmark', '--out', '$OUT/dip-1mm-variants.jsonl']; runpy.run_path('benchmarks/dip_trajectory.py', run_name='__main__')"
step 50 fp32 python3 benchmarks/dip_trajectory.py --kind realistic --voxel 1 --magnitude 1 --every 1000 --set '{"mixed_precision": false}' --tag gpu-fp32 --out $OUT/dip-1mm-variants.jsonl
step 50 plain python3 benchmarks/dip_trajectory.py --kind realistic --voxel 1 --magnitude 1 --every 1000 --tag gpu-default-nocallback --out $OUT/dip-1mm-variants.jsonl
step 70 b2tilt python3 $B --phantoms realistic --voxels 2 --tilts 20 --every 20 --json $OUT/b2-tilt20.json
echo DONE $(( $(date +%s) - T0 ))s
