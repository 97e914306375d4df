"""The command line's phase part: ``qsmdip field`` and ``qsmdip reconstruct --phase``.

A thin layer over :func:`qsmdip.field_runner.run_field` and ``run_field_and_reconstruction``: the flags map onto
:class:`FieldRequest` and the pipeline settings' fields (``--unwrap``, ``--bfr`` = background, ``--offsets``),
each finished stage is one line on stderr (its seconds and notes), and every user error is one line and exit
status 2 (see :mod:`qsmdip.cli`).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable, Dict, Optional


#: flag -> PipelineSettings field
PIPELINE_FLAGS = {"unwrap": "unwrap", "bfr": "background", "offsets": "offsets"}
#: flags of the phase input that make no sense with --field
PHASE_ONLY = ("echo_times", "unwrap", "bfr", "offsets", "out_field", "out_mask", "total_field")


def echo_times_arg(text: str) -> tuple:
    """``0.004,0.012,...`` -> seconds; the pipeline checks count, order and that they are not milliseconds."""
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--echo-times must be seconds separated by commas, got {text!r}")
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"--echo-times must be positive numbers of seconds, got {text!r}")
    return values


def add_phase_arguments(parser: argparse.ArgumentParser, *, reconstruct: bool) -> None:
    """The flags of the multi-echo input, shared by ``field`` and ``reconstruct --phase``."""
    from .phase.background import BACKGROUND_REMOVERS
    from .phase.offsets import OFFSET_METHODS
    from .phase.pipeline import PipelineSettings
    from .phase.unwrap import UNWRAPPERS

    defaults = PipelineSettings()
    parser.add_argument("--phase", nargs="+", required=not reconstruct, metavar="P",
                        help="GRE phase: one 4D NIfTI/NRRD (echoes on the 4th axis), one 3D file per echo in echo "
                             "order, or one file of a BIDS *_echo-N_part-phase_MEGRE set (its echoes are found). "
                             "Radians, or vendor integers such as -4096..4095 (detected and rescaled)"
                             + ("; instead of --field" if reconstruct else ""))
    parser.add_argument("--echo-times", type=echo_times_arg, default=None, metavar="S,S,...",
                        help="echo times in seconds (default: EchoTime of the JSON sidecars)")
    parser.add_argument("--unwrap", choices=sorted(UNWRAPPERS), default=None,
                        help=f"phase unwrapping (default {defaults.unwrap})")
    parser.add_argument("--bfr", choices=sorted(BACKGROUND_REMOVERS), default=None,
                        help=f"background-field removal (default {defaults.background})")
    parser.add_argument("--offsets", choices=list(OFFSET_METHODS), default=None,
                        help=f"phase offsets shared by the echoes (default {defaults.offsets})")
    parser.add_argument("--out-field", default=None, required=not reconstruct, metavar="F",
                        help="local field to write (ppm)" + (", kept from --phase" if reconstruct else ""))
    parser.add_argument("--out-mask", default=None, required=not reconstruct, metavar="MASK",
                        help="the mask the local field is valid in" + (", kept from --phase" if reconstruct else ""))
    parser.add_argument("--total-field", default=None, metavar="T",
                        help="also write the total field (ppm) before background removal")


def check_reconstruct_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The rules argparse cannot state for ``reconstruct``: --field or --phase, and what each needs."""
    if args.field and args.phase:
        parser.error("argument --phase: not allowed with argument --field (give a local field or the phase)")
    if args.phase:
        missing = [] if args.out else ["--out"]
        for flag in ("units", "te"):
            if getattr(args, flag) not in (None, "ppm"):
                parser.error(f"argument --{flag}: does not apply to --phase (the field it makes is in ppm)")
    else:
        missing = [flag for flag, value in (("--field", args.field), ("--mask", args.mask), ("--out", args.out))
                   if not value]
        given = [name for name in PHASE_ONLY if getattr(args, name) is not None]
        if not missing and given:
            parser.error(f"argument --{given[0].replace('_', '-')}: only with --phase")
        if not missing and args.magnitude and len(args.magnitude) != 1:
            parser.error("argument --magnitude: give one file with --field (a 4D file for several echoes)")
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")


class StagePrinter:
    """Prints each finished stage as one line on stderr: number, name, seconds and its notes."""

    def __init__(self, command: str):
        self.command = command

    def stage(self, report: Any, count: int, volumes: Dict[str, str]) -> None:  # noqa: ARG002 - listener hook
        notes = "; ".join(report.notes)
        print(f"{self.command}: stage {report.index + 1}/{count} {report.name} ({report.seconds:.2f} s)"
              + (f": {notes}" if notes else ""), file=sys.stderr)

    def cancel_requested(self) -> bool:
        return False


def field_request(args: argparse.Namespace, field_out: str, mask_out: str, total_out: Optional[str]):
    """The :class:`~qsmdip.field_runner.FieldRequest` the flags describe, writing to the given outputs."""
    from .field_runner import FieldRequest

    pipeline = {PIPELINE_FLAGS[flag]: getattr(args, flag) for flag in PIPELINE_FLAGS if getattr(args, flag)}
    return FieldRequest(phase_paths=list(args.phase), magnitude_paths=list(args.magnitude) if args.magnitude else None,
                        echo_times_s=args.echo_times, b0_tesla=args.b0, mask_path=args.mask,
                        field_output_path=field_out, mask_output_path=mask_out, total_field_output_path=total_out,
                        b0_direction_world=args.b0_direction, pipeline=pipeline)


def _run_field(args: argparse.Namespace, request) -> Any:
    from .field_runner import FieldListener, run_field

    printer = StagePrinter(args.command)

    class Listener(FieldListener):
        stage = staticmethod(printer.stage)

    result = run_field(request, Listener())
    _print_b0(args.command, result)
    return result


def _print_b0(command: str, result: Any) -> None:
    b0 = ", ".join(f"{float(v):.3f}" for v in result.b0_dir_voxel)
    print(f"{command}: B0 direction in the voxel frame (i, j, k): ({b0})", file=sys.stderr)


def cmd_field(args: argparse.Namespace) -> int:
    """``qsmdip field``: phase and magnitude echoes -> local field (ppm) and its mask."""
    run = _run_field(args, field_request(args, args.out_field, args.out_mask, args.total_field))
    mask = run.result.mask
    print(f"field: local field in {int(mask.sum())} voxels ({100.0 * mask.mean():.1f} % of the grid), "
          f"{sum(run.result.seconds.values()):.1f} s over {len(run.result.stages)} stages")
    for role, path in run.written.items():
        print(f"  {role}: {path}")
    return 0


def reconstruct_from_phase(args: argparse.Namespace, request, run: Callable[[Any], Any]) -> Any:
    """``qsmdip reconstruct --phase``: the field stage, then ``run(request)`` on its local field and mask
    (:func:`~qsmdip.field_runner.run_field_and_reconstruction`: the echoes' root sum of squares is the prior,
    and --out-field, --out-mask and --total-field are written only after the QSM)."""
    from .field_runner import FieldListener, run_field_and_reconstruction

    printer = StagePrinter(args.command)

    class Listener(FieldListener):
        stage = staticmethod(printer.stage)

    keep = {"local field": args.out_field, "mask": args.out_mask, "total field": args.total_field}
    field, result = run_field_and_reconstruction(field_request(args, "", "", None), request,
                                                 {role: path for role, path in keep.items() if path},
                                                 listener=Listener(), run=run)
    _print_b0(args.command, field)
    for role, path in field.written.items():
        print(f"{args.command}: kept the {role}: {path}", file=sys.stderr)
    return result
