"""The ``qsmdip`` command line: phantom, field, reconstruct, batch, evaluate, export-dicom, demo.

A thin layer over the library: flags map onto :class:`runner.ReconstructionRequest`,
:class:`field_runner.FieldRequest` and the solvers' and pipeline's settings fields; every user error ends
in one line on stderr and exit status 2, never a traceback. The phase part (``field`` and
``reconstruct --phase``) lives in :mod:`qsmdip.cli_field`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import typing
from typing import List, Optional, Sequence

from .errors import MissingDependencyError, QSMInputError, is_out_of_memory

EXIT_INPUT = 2
EXIT_INTERRUPTED = 130  #: 128 + SIGINT, what shells report for a command stopped by Ctrl-C
log = logging.getLogger("qsmdip")


def _floats(text: str, count: int, name: str) -> tuple:
    try:
        values = [float(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be numbers separated by commas, got {text!r}")
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"{name} needs 1 or {count} values, got {text!r}")
    return tuple(values)


def voxel_arg(text: str) -> tuple:
    values = _floats(text, 3, "--voxel")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"--voxel must be positive numbers of mm, got {text!r}")
    return values


def size_arg(text: str) -> tuple:
    values = _floats(text, 3, "--size")
    if any(v < 8 or v != int(v) for v in values):
        raise argparse.ArgumentTypeError(f"--size must be whole numbers of at least 8 voxels, got {text!r}")
    return tuple(int(v) for v in values)


def direction_arg(text: str) -> tuple:
    values = _floats(text, 3, "--b0-direction")
    if not all(math.isfinite(v) for v in values) or not any(values):
        raise argparse.ArgumentTypeError(f"--b0-direction must be a non-zero vector of finite numbers, got {text!r}")
    return values


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit status 2), like every other error."""

    def error(self, message: str) -> "typing.NoReturn":
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .cli_batch import add_batch_parser
    from .cli_field import add_phase_arguments
    from .solvers import METHODS
    from .units import FIELD_UNITS

    parser = OneLineErrorParser(
        prog="qsmdip",
        description="Quantitative susceptibility mapping from a local field map by Deep Image Prior, "
                    "with TKD, Tikhonov and total-variation baselines.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ph = sub.add_parser("phantom", help="write a numerical head phantom (field, mask, true chi)",
                        description="Write a numerical head phantom: field.nii.gz (local field), "
                                    "mask.nii.gz (brain mask), chi.nii.gz (true susceptibility, ppm), "
                                    "labels.nii.gz (tissue labels) and, for --kind realistic, magnitude.nii.gz "
                                    "(GRE magnitude, root sum of squares over the echoes).")
    ph.add_argument("outdir", help="folder to write into (created if missing)")
    ph.add_argument("--kind", choices=("simple", "realistic"), default="simple",
                    help="simple: piecewise-constant blocks built in code (default); realistic: MNI152 grey/white "
                         "matter partial volumes with texture, iron-graded nuclei, veins, a calcification and a "
                         "bleed, and a simulated multi-echo GRE (needs nilearn: pip install 'qsmdip[phantom]')")
    ph.add_argument("--voxel", type=voxel_arg, default=(2.0, 2.0, 2.0),
                    help="voxel size in mm, one value or i,j,k (default 2)")
    ph.add_argument("--size", type=size_arg, default=None,
                    help="matrix size, one value or i,j,k (default: a whole head at the given voxel size)")
    ph.add_argument("--oblique", type=float, default=0.0, metavar="DEG",
                    help="tilt the slices by DEG degrees about the i axis; the file's direction matrix "
                         "records it, so B0 is oblique in the voxel frame (default 0: axial)")
    ph.add_argument("--snr", type=float, default=None,
                    help="noise (default: none). simple: Gaussian noise on the field, SNR = rms(field in mask) / "
                         "noise std; realistic: complex Gaussian noise on the GRE signal, SNR = mean first-echo "
                         "magnitude in the brain / noise std (100 is typical of 3 T)")
    ph.add_argument("--echo-times", default=None, metavar="S,S,...",
                    help="realistic: echo times in seconds (default 0.004,0.012,0.020,0.028)")
    ph.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    ph.add_argument("--units", choices=FIELD_UNITS, default="ppm",
                    help="unit of the written field (hz needs --b0; rad needs --b0 and --te); default ppm")
    ph.add_argument("--b0", type=float, default=None,
                    help="B0 field strength in tesla: for --units hz/rad, and for the realistic phantom's simulated "
                         "acquisition (phase per ppm, R2*; default 3 there)")
    ph.add_argument("--te", type=float, default=None, help="echo time in seconds (for --units rad)")
    ph.add_argument("--format", choices=("nii.gz", "nrrd"), default="nii.gz", help="file format (default nii.gz)")

    fd = sub.add_parser("field", help="multi-echo GRE phase and magnitude -> local field (ppm) and its mask",
                        description="Make the local field (ppm) from multi-echo GRE phase and magnitude: phase "
                                    "scaling, phase offsets, unwrapping, magnitude-weighted echo fit, mask, "
                                    "background-field removal. Each stage's seconds and notes go to stderr. The "
                                    "outputs lie on the phase's grid and are written only when every stage succeeded.")
    add_phase_arguments(fd, reconstruct=False)
    fd.add_argument("--magnitude", nargs="+", default=None, metavar="M",
                    help="GRE magnitude in the phase's layout (default: the BIDS part-mag files beside the phase)")
    fd.add_argument("--b0", type=float, default=None,
                    help="field strength in tesla (default: MagneticFieldStrength of the JSON sidecars)")
    fd.add_argument("--mask", default=None, metavar="USER_MASK",
                    help="your own brain mask on the phase's grid (default: made from the magnitude and refined "
                         "by phase quality)")
    fd.add_argument("--b0-direction", type=direction_arg, default=None, metavar="X,Y,Z",
                    help="main-field direction in the files' world frame (LPS); default: the scanner's superior axis")

    rc = sub.add_parser("reconstruct", help="reconstruct a QSM from a local field map and a mask, or from the phase",
                        description="Reconstruct a susceptibility map (ppm) with the geometry of the field. With "
                                    "--phase (instead of --field) the local field and its mask are made first from "
                                    "the multi-echo phase and --magnitude; the default method there is single-step "
                                    "TV on the total field (with --method dip, the magnitude's root sum of squares "
                                    "serves DIP as its prior).")
    rc.add_argument("--field", default=None, help="local field map (NIfTI or NRRD); or give --phase")
    rc.add_argument("--mask", default=None,
                    help="brain mask (non-zero inside); required with --field, optional with --phase")
    rc.add_argument("--out", default=None, help="output QSM file (ppm, float32); required")
    rc.add_argument("--method", choices=METHODS, default=None,
                    help="dip (default with --field), or the classical tkd, tikhonov, tv; single-step-tv (default "
                         "with --phase) inverts the total field with its own background removal (SMV), the most "
                         "accurate from the phase")
    rc.add_argument("--preset", default=None,
                    help="settings preset (dip: 'default', the TV-started hybrid; 'fast', half its width; "
                         "'original', the published method's settings)")
    rc.add_argument("--units", choices=FIELD_UNITS, default="ppm",
                    help="unit of the field: ppm (default), hz (needs --b0), rad (needs --b0 and --te)")
    rc.add_argument("--b0", type=float, default=None, help="B0 field strength in tesla")
    rc.add_argument("--te", type=float, default=None, help="echo time in seconds (not ms)")
    rc.add_argument("--b0-direction", type=direction_arg, default=None, metavar="X,Y,Z",
                    help="main-field direction in the file's world frame (LPS); default: the scanner's "
                         "superior axis, so B0 follows the image's direction matrix")
    rc.add_argument("--reference", default=None, help="known susceptibility to score against (ppm)")
    rc.add_argument("--magnitude", nargs="+", default=None, metavar="M",
                    help="GRE magnitude on the field's grid, optional; 4D = echoes, combined by root sum of "
                         "squares; used by DIP as an anatomical prior. With --phase: the magnitude echoes in the "
                         "phase's layout")
    rc.add_argument("--snapshots", default=None, metavar="DIR", help="write the estimate every --every iterations here")
    rc.add_argument("--every", type=int, default=10, metavar="K", help="snapshot / progress interval (default 10)")
    rc.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, mps")
    rc.add_argument("--iterations", type=int, default=None, help="iterations (iterative methods)")
    rc.add_argument("--seed", type=int, default=None,
                    help="random seed (dip: network weights and noise input; tv: the voxels held out to choose alpha)")
    rc.add_argument("--max-seconds", type=float, default=None,
                    help="wall-time limit in seconds (iterative methods); checked after each iteration, so a run "
                         "can end up to one iteration (for DIP on a CPU, seconds) past it")
    rc.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override any setting of the method, e.g. --set learning_rate=0.002 (repeatable)")
    rc.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_phase_arguments(rc, reconstruct=True)
    rc.set_defaults(subparser=rc)  # so that its own rules are reported under its name (cli_field)

    ev = sub.add_parser("evaluate", help="score a QSM against a reference (QSM-challenge metrics)",
                        description="NRMSE %%, HFEN %%, SSIM, XSIM, PSNR and Pearson correlation inside the mask.")
    ev.add_argument("--qsm", required=True, help="QSM to score (ppm)")
    ev.add_argument("--reference", required=True, help="reference susceptibility (ppm)")
    ev.add_argument("--mask", required=True, help="mask (non-zero inside)")
    ev.add_argument("--json", action="store_true",
                    help="print JSON instead of a table (strict JSON: an infinite PSNR, for identical maps, is null)")

    dx = sub.add_parser("export-dicom", help="write a QSM as a DICOM series for PACS (integers in ppb, rescale to ppm)",
                        description="Write a QSM (ppm) as an MR DICOM series: 16-bit integers in ppb with a rescale "
                                    "slope of 0.001 to ppm, a default window of -150..150 ppb, a derived-image "
                                    "description and the map's geometry. With --like, the patient and study come "
                                    "from the DICOM series the field was computed from, and the QSM is a new series "
                                    "of that study.")
    dx.add_argument("--qsm", required=True, help="QSM to export (ppm; NIfTI, NRRD or MetaImage)")
    dx.add_argument("--out", required=True, help="new or empty folder for the DICOM files")
    dx.add_argument("--like", default=None, metavar="DICOM_DIR",
                    help="DICOM folder (or one file) of the acquisition the field came from")
    dx.add_argument("--description", default=None, help="series description (default names QSMDIP and its version)")
    dx.add_argument("--clip", action="store_true",
                    help="saturate values beyond +-32.767 ppm (16-bit ppb) instead of refusing the map")

    add_batch_parser(sub)

    dm = sub.add_parser("demo", help="phantom -> TKD and DIP -> metrics table and a PNG of middle slices",
                        description="Make a head phantom, reconstruct it with TKD and DIP, print the metrics "
                                    "and write a PNG comparing truth, TKD, DIP and the DIP error.")
    dm.add_argument("--outdir", default="qsmdip-demo", help="folder for the files and the PNG (default qsmdip-demo)")
    dm.add_argument("--voxel", type=voxel_arg, default=(3.0, 3.0, 3.0), help="phantom voxel size in mm (default 3)")
    dm.add_argument("--kind", choices=("simple", "realistic"), default="simple",
                    help="phantom: simple (default) or realistic (needs nilearn; DIP also gets its magnitude)")
    dm.add_argument("--iterations", type=int, default=None, help="DIP iterations (default: the preset's)")
    dm.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    dm.add_argument("--seed", type=int, default=0)
    return parser


def _parse_overrides(pairs: Sequence[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise QSMInputError(f"--set expects NAME=VALUE, got {pair!r}")
        name, value = pair.split("=", 1)
        try:
            out[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[name.strip()] = value
    return out


def cmd_phantom(args) -> int:
    import numpy as np

    from . import io as qio
    from .geometry import b0_direction_in_voxel_frame
    from .phantom import make_head_phantom
    from .units import ppm_to_unit

    _check_output_folder(args.outdir, f"field.{args.format}")
    angle = math.radians(args.oblique)
    c, s = math.cos(angle), math.sin(angle)
    direction = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=float)
    b0_dir = b0_direction_in_voxel_frame(direction)
    if args.kind == "realistic":
        from .realistic_phantom import DEFAULT_ECHO_TIMES_S, make_realistic_phantom

        echo_times = DEFAULT_ECHO_TIMES_S
        if args.echo_times:
            try:
                echo_times = tuple(float(t) for t in args.echo_times.split(",") if t.strip())
            except ValueError:
                raise QSMInputError(f"--echo-times must be seconds separated by commas, got {args.echo_times!r}")
        phantom = make_realistic_phantom(args.size, args.voxel, b0_dir=b0_dir, snr=args.snr, seed=args.seed,
                                         b0_tesla=args.b0 if args.b0 is not None else 3.0, echo_times_s=echo_times)
    else:
        phantom = make_head_phantom(args.size, args.voxel, b0_dir=b0_dir, snr=args.snr, seed=args.seed)
    field = ppm_to_unit(phantom.field_ppm, args.units, args.b0, args.te)
    geometry = dict(spacing_mm=args.voxel, origin=(0.0, 0.0, 0.0), direction=direction)
    written = []
    outputs = [("field", field), ("mask", phantom.mask.astype(np.float32)),
               ("chi", phantom.chi_ppm), ("labels", phantom.labels.astype(np.float32))]
    if getattr(phantom, "magnitude", None) is not None:
        outputs.append(("magnitude", phantom.magnitude))
    for name, array in outputs:
        path = os.path.join(args.outdir, f"{name}.{args.format}")
        qio.write_volume(path, array, **geometry)
        written.append(path)
    print(f"{args.kind} phantom {phantom.chi_ppm.shape} at {args.voxel} mm, B0 in voxel frame "
          f"({b0_dir[0]:.3f}, {b0_dir[1]:.3f}, {b0_dir[2]:.3f}), field in {args.units}:")
    for path in written:
        print(f"  {path}")
    return 0


def _check_output_folder(folder: str, example_name: str) -> None:
    """Refuse an output folder that is a file or cannot take new files, before any work is done."""
    from . import io as qio

    if os.path.exists(folder) and not os.path.isdir(folder):
        raise QSMInputError(f"{folder} is a file, not a folder: give a folder to write into")
    qio.check_output_path(os.path.join(folder, example_name))


class ProgressBar:
    """tqdm progress bar fed by the runner's listener hooks."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.last = 0

    def started(self, info):
        for warning in info.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{info.method}: {info.device}", file=sys.stderr)
        b0 = ", ".join(f"{float(v):.3f}" for v in info.b0_dir_voxel)
        print(f"{info.method}: B0 direction in the voxel frame (i, j, k): ({b0})", file=sys.stderr)
        if self.enabled and info.max_iterations > 0:
            from tqdm import tqdm
            self.bar = tqdm(total=info.max_iterations, unit="it", file=sys.stderr, dynamic_ncols=True)

    def progress(self, progress):
        if self.bar is not None:
            self.bar.update(progress.iteration - self.last)
            self.last = progress.iteration
            self.bar.set_postfix(loss=f"{progress.loss:.3g}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def solver_overrides(args) -> dict:
    """The method's setting overrides from --set, --seed, --max-seconds and --iterations (reconstruct, batch)."""
    overrides = _parse_overrides(args.set)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.max_seconds is not None:
        overrides["max_seconds"] = args.max_seconds
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    if args.method in ("tkd", "tikhonov"):
        for flag in ("iterations", "seed", "max_seconds"):
            if flag in overrides:
                raise QSMInputError(f"--{flag.replace('_', '-')} does not apply to the closed-form method {args.method}")
    return overrides


def cmd_reconstruct(args) -> int:
    from .cli_field import reconstruct_from_phase
    from .runner import ReconstructionRequest, RunListener, run_reconstruction
    from .solvers import default_method

    from_phase = bool(args.phase)
    if args.method is None:
        args.method = default_method(from_phase)
    overrides = solver_overrides(args)
    request = ReconstructionRequest(
        field_path=args.field or "", mask_path=args.mask or "", output_path=args.out, method=args.method,
        preset=args.preset, units=args.units, b0_tesla=None if from_phase else args.b0, te_s=args.te,
        b0_direction_world=args.b0_direction, reference_path=args.reference,
        magnitude_path=args.magnitude[0] if args.magnitude and not from_phase else None,
        snapshot_dir=args.snapshots, snapshot_every=args.every, device=args.device, settings=overrides)
    bar = ProgressBar(enabled=not args.no_progress)

    class Listener(RunListener):
        started = staticmethod(bar.started)
        progress = staticmethod(bar.progress)

    def run(req: ReconstructionRequest):
        try:
            return run_reconstruction(req, Listener())
        finally:
            bar.close()

    # Ctrl-C stops at once (KeyboardInterrupt, exit status 130 in main) and leaves no file at --out (nor at
    # --out-field, --out-mask, --total-field), so a script cannot mistake an interrupted run for a finished
    # one; complete snapshots are kept.
    outputs = [args.out] + [p for p in (args.out_field, args.out_mask, args.total_field) if p]
    before = {path: _file_identity(path) for path in outputs}
    try:
        result = reconstruct_from_phase(args, request, run) if from_phase else run(request)
    except KeyboardInterrupt:
        for path in outputs:
            if _file_identity(path) not in (None, before[path]):  # interrupted just after it appeared
                with contextlib.suppress(OSError):
                    os.remove(path)
        raise
    print(f"{args.method}: {result.stop_reason} after {result.iterations} iterations in "
          f"{result.elapsed_s:.1f} s on {result.device}; wrote {result.output_path}")
    for name in ("alpha", "lambda_"):
        rule = result.chosen.get(f"{name.rstrip('_')}_rule", "given")
        if name in result.chosen and rule != "given":
            print(f"{args.method}: {name} {result.chosen[name]:.4g} chosen from the data ({rule})")
    if result.metrics:
        print(format_metrics_table({args.method: result.metrics}))
    return 0


def _file_identity(path: str) -> Optional[tuple]:
    """(inode, device, modification time) of an existing file, None if there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_dev, info.st_mtime_ns)


def format_metrics_table(rows: dict, seconds: Optional[dict] = None) -> str:
    """A plain-text table: one row per method, the challenge metrics as columns."""
    names = ["nrmse", "hfen", "ssim", "xsim", "psnr", "pearson"]
    header = f"{'method':<10}" + "".join(f"{n.upper():>9}" for n in names) + ("  seconds" if seconds else "")
    lines = [header]
    for method, m in rows.items():
        line = f"{method:<10}" + "".join(f"{m[n]:>9.3f}" if n in ("ssim", "xsim", "pearson") else f"{m[n]:>9.2f}"
                                         for n in names)
        if seconds:
            line += f"  {seconds.get(method, float('nan')):7.1f}"
        lines.append(line)
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from . import io as qio
    from .metrics import all_metrics
    from .validation import binarise_mask, check_reference, check_same_grid

    qsm = qio.read_volume(args.qsm)
    mask = qio.read_volume(args.mask)
    check_same_grid(mask, qsm, "mask", "QSM")
    mask_bool, warnings = binarise_mask(mask.array)
    reference, ref_warnings = check_reference(qio.read_volume(args.reference), qsm)
    for warning in warnings + ref_warnings:
        print(f"warning: {warning}", file=sys.stderr)
    metrics = all_metrics(qsm.array, reference, mask_bool)
    if args.json:  # strict JSON: an infinite PSNR (identical maps) is null
        finite = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        print(json.dumps(finite, indent=2, allow_nan=False))
    else:
        print(format_metrics_table({os.path.basename(args.qsm): metrics}))
    return 0


def cmd_export_dicom(args) -> int:
    from .dicom_export import export_qsm_dicom

    if args.like is not None and not os.path.exists(args.like):
        raise QSMInputError(f"--like {args.like}: no such DICOM folder or file")
    written = export_qsm_dicom(args.qsm, args.out, like_dicom_dir=args.like, series_description=args.description,
                               clip=args.clip)
    print(f"wrote {len(written)} DICOM files (one per slice) to {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    _check_output_folder(args.outdir, "chi.nii.gz")
    run_demo(args.outdir, voxel_size_mm=args.voxel, dip_iterations=args.iterations, device=args.device,
             seed=args.seed, kind=args.kind, report=print)
    return 0


def cmd_field(args) -> int:
    from .cli_field import cmd_field as run_field_command

    return run_field_command(args)


def cmd_batch(args) -> int:
    from .cli_batch import cmd_batch as run_batch_command

    return run_batch_command(args)


COMMANDS = {"phantom": cmd_phantom, "batch": cmd_batch, "field": cmd_field, "reconstruct": cmd_reconstruct, "evaluate": cmd_evaluate,
            "export-dicom": cmd_export_dicom, "demo": cmd_demo}


def main(argv: Optional[List[str]] = None) -> int:
    from .cli_field import check_reconstruct_arguments

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "reconstruct":
        check_reconstruct_arguments(args.subparser, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except QSMInputError as error:
        print(f"qsmdip {args.command}: error: {error}", file=sys.stderr)
        return EXIT_INPUT
    except MissingDependencyError as error:
        print(f"qsmdip {args.command}: missing dependency: {error}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"qsmdip {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        print(f"qsmdip {args.command}: error: out of memory ({str(error).splitlines()[0]}); "
              "try --method tkd, a smaller volume or a larger GPU", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
