"""Device ablation at 1 mm: which use of the magnitude costs DIP at 1 mm; warm timings."""
import json, os, sys, time
sys.path.insert(0, "QSMDIP")
import numpy as np, torch
from qsmdip.realistic_phantom import make_realistic_phantom
from qsmdip.metrics import all_metrics, nrmse
import qsmdip.solvers.dip as dip

voxel = float(sys.argv[1]); out = sys.argv[2]; deadline = time.time() + float(sys.argv[3])
t = time.time()
ph = make_realistic_phantom(None, (voxel,) * 3, snr=100, seed=0)
print(f"phantom {ph.chi_ppm.shape} {time.time() - t:.1f}s", flush=True)

def run(tag, mag, est_s, **over):
    if time.time() + est_s > deadline:
        print("SKIP", tag, flush=True); return
    curve = []
    def cb(p):
        if p.iteration and p.iteration % 100 == 0:
            curve.append((p.iteration, round(nrmse(p.chi_ppm, ph.chi_ppm, ph.mask), 2)))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = dip.solve_dip(ph.field_ppm, ph.mask, ph.voxel_size_mm, settings=dip.dip_settings("default", **over),
                      magnitude=ph.magnitude if mag else None, callback=cb if over.get("iterations", 200) > 200 else None,
                      callback_every=100)
    wall = time.perf_counter() - t0
    m = {k: round(v, 3) for k, v in all_metrics(r.chi_ppm, ph.chi_ppm, ph.mask).items() if k in ("nrmse", "hfen", "xsim")}
    rec = dict(tag=tag, voxel=voxel, magnitude=mag, set=over, metrics=m, iterations=r.iterations, stop=r.stop_reason,
               solver_s=round(r.elapsed_s, 2), wall_s=round(wall, 2), device=r.device, curve=curve,
               cudnn_benchmark=torch.backends.cudnn.benchmark)
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")

run("warmup", True, 10, iterations=5)
run("nomag", False, 25)
run("mag-noweight", True, 25, magnitude_weighting=False)
run("mag-noinput", True, 25, magnitude_input=False)
run("mag", True, 25)
run("nomag-400", False, 45, iterations=400)
torch.backends.cudnn.benchmark = True
run("mag-cudnnbench-warmup", True, 15, iterations=5)
run("mag-cudnnbench", True, 25)
