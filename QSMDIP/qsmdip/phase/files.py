"""Multi-echo GRE files: read a phase and magnitude set (4D, one file per echo, or BIDS), write one.

Accepted layouts, for the phase and the magnitude alike:

- one 4D NIfTI or NRRD with the echoes on the fourth axis;
- several 3D files, one per echo, in echo order;
- one file of a BIDS set (``sub-X_echo-1_part-phase_MEGRE.nii.gz``): its sibling echoes are found and put
  in echo-number order, and the magnitude defaults to the ``part-mag`` files beside it.

Echo times and B0 come from JSON sidecars (BIDS ``EchoTime`` in seconds, ``MagneticFieldStrength`` in
tesla) when they are there; values given on the command line win, and a disagreement is an error.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import QSMInputError
from ..io import EchoSeries, Volume, read_echoes, write_volume

_BIDS_ECHO = re.compile(r"_echo-(\d+)_")
_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class MultiEchoFiles:
    """What was read: raw phase and magnitude ([echo, i, j, k]), the grid, and the sidecars' values."""

    phase: np.ndarray
    magnitude: Optional[np.ndarray]
    grid: Volume                                    # geometry of the echoes (array: the first echo's phase)
    echo_times_s: Optional[Tuple[float, ...]] = None
    b0_tesla: Optional[float] = None
    phase_paths: List[Path] = field(default_factory=list)
    magnitude_paths: List[Path] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def strip_suffix(path: Path) -> str:
    """The file name without its image suffix (``.nii.gz`` counts as one)."""
    name = path.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar BIDS puts beside an image."""
    return path.with_name(strip_suffix(path) + ".json")


def bids_siblings(path: Path) -> List[Path]:
    """All echoes of the BIDS set ``path`` belongs to, in echo-number order (``[path]`` if not BIDS)."""
    match = _BIDS_ECHO.search(path.name)
    if not match:
        return [path]
    pattern = re.compile(re.escape(path.name[: match.start()]) + r"_echo-(\d+)_" + re.escape(path.name[match.end():]))
    found = []
    for candidate in path.parent.iterdir():
        m = pattern.fullmatch(candidate.name)
        if m:
            found.append((int(m.group(1)), candidate))
    found.sort()
    numbers = [n for n, _ in found]
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise QSMInputError(f"the BIDS echoes beside {path.name} are numbered {numbers}: an echo is missing")
    return [p for _, p in found]


def magnitude_beside(phase_paths: Sequence[Path]) -> Optional[List[Path]]:
    """The ``part-mag`` files of a BIDS ``part-phase`` set, when they all exist."""
    paths = []
    for p in phase_paths:
        if "_part-phase_" not in p.name:
            return None
        q = p.with_name(p.name.replace("_part-phase_", "_part-mag_"))
        if not q.exists():
            return None
        paths.append(q)
    return paths


def read_multi_echo(phase: Sequence[Path], magnitude: Optional[Sequence[Path]] = None) -> MultiEchoFiles:
    """Read the phase and magnitude echoes from any accepted layout (see the module docstring)."""
    phase_paths = _expand([Path(p) for p in phase], "phase")
    notes: List[str] = []
    if magnitude:
        magnitude_paths = _expand([Path(p) for p in magnitude], "magnitude")
    else:
        magnitude_paths = magnitude_beside(phase_paths) or []
        if magnitude_paths:
            notes.append(f"magnitude: the BIDS part-mag files beside the phase ({len(magnitude_paths)} echoes)")
    phase_series = _read_series(phase_paths, "phase")
    grid = phase_series.echo(0)
    mag_array = None
    if magnitude_paths:
        mag_series = _read_series(magnitude_paths, "magnitude")
        difference = grid.geometry_difference(mag_series.echo(0))
        if difference:
            raise QSMInputError(f"the magnitude's grid differs from the phase's: {difference}")
        if mag_series.echoes != phase_series.echoes:
            raise QSMInputError(f"the phase has {phase_series.echoes} echoes but the magnitude has {mag_series.echoes}")
        mag_array = np.moveaxis(mag_series.array, 3, 0)
    tes, b0 = _read_sidecars(phase_paths + magnitude_paths, phase_series.echoes, notes)
    return MultiEchoFiles(phase=np.moveaxis(phase_series.array, 3, 0), magnitude=mag_array, grid=grid,
                          echo_times_s=tes, b0_tesla=b0, phase_paths=phase_paths, magnitude_paths=magnitude_paths,
                          notes=notes)


def merge_acquisition_parameters(files: MultiEchoFiles, echo_times_s: Optional[Sequence[float]],
                                 b0_tesla: Optional[float]) -> Tuple[Optional[Tuple[float, ...]], Optional[float]]:
    """The echo times and B0 to use: the command line's, checked against the sidecars' when both exist."""
    tes = tuple(float(t) for t in echo_times_s) if echo_times_s else files.echo_times_s
    if echo_times_s and files.echo_times_s and not np.allclose(tes, files.echo_times_s, rtol=1e-3, atol=1e-6):
        raise QSMInputError(f"the echo times given {tes} disagree with the sidecars' EchoTime {files.echo_times_s}")
    b0 = float(b0_tesla) if b0_tesla is not None else files.b0_tesla
    if b0_tesla is not None and files.b0_tesla is not None and abs(b0 - files.b0_tesla) > 0.05 * files.b0_tesla:
        raise QSMInputError(f"the B0 given ({b0} T) disagrees with the sidecars' MagneticFieldStrength {files.b0_tesla} T")
    return tes, b0


def write_multi_echo(directory: Path, phase_rad: np.ndarray, magnitude: np.ndarray, grid: Volume,
                     echo_times_s: Sequence[float], b0_tesla: float, *, layout: str = "bids",
                     subject: str = "01", session: Optional[str] = None,
                     phase_scale: str = "radians") -> Tuple[List[Path], List[Path]]:
    """Write echoes as BIDS (one file per echo, with sidecars) or as two 4D NIfTI files.

    BIDS files go to ``sub-<subject>[/ses-<session>]/anat`` under ``directory``.
    ``phase_scale`` "radians" writes float radians; "siemens" writes integers -4096..4095 as Siemens does.
    Returns (phase paths, magnitude paths).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    phase_rad = np.asarray(phase_rad)
    if phase_scale == "siemens":
        stored = np.clip(np.round(phase_rad / np.pi * 4096), -4096, 4095).astype(np.int16)
    elif phase_scale == "radians":
        stored = phase_rad.astype(np.float32)
    else:
        raise QSMInputError(f"unknown phase scale {phase_scale!r}: use radians or siemens")
    if layout == "4d":
        phase_path, mag_path = directory / "phase.nii.gz", directory / "magnitude.nii.gz"
        write_series(phase_path, stored, grid)
        write_series(mag_path, np.asarray(magnitude, np.float32), grid)
        for path in (phase_path, mag_path):
            sidecar_path(path).write_text(json.dumps({"EchoTime": list(map(float, echo_times_s)),
                                                      "MagneticFieldStrength": float(b0_tesla)}, indent=1))
        return [phase_path], [mag_path]
    if layout != "bids":
        raise QSMInputError(f"unknown layout {layout!r}: use bids or 4d")
    anat = directory / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    phases, mags = [], []
    for n, te in enumerate(echo_times_s, start=1):
        for part, data, out in (("phase", stored[n - 1], phases), ("mag", magnitude[n - 1], mags)):
            path = anat / f"{prefix}_echo-{n}_part-{part}_MEGRE.nii.gz"
            write_volume(path, np.asarray(data), grid)
            sidecar_path(path).write_text(json.dumps({"EchoTime": float(te), "MagneticFieldStrength": float(b0_tesla),
                                                      "EchoNumber": n}, indent=1))
            out.append(path)
    return phases, mags


def write_series(path: Path, echoes: np.ndarray, grid: Volume) -> Path:
    """Write [echo, i, j, k] as one 4D image (echoes on the fourth axis) on ``grid``, atomically."""
    import SimpleITK as sitk

    images = []
    for echo in np.asarray(echoes):
        image = sitk.GetImageFromArray(np.ascontiguousarray(echo.transpose(2, 1, 0)))
        image.SetSpacing(grid.spacing_mm)
        image.SetOrigin(grid.origin)
        image.SetDirection(tuple(float(x) for x in grid.direction.ravel()))
        images.append(image)
    joined = sitk.JoinSeries(images)
    path = Path(path)
    tmp = path.with_name(".tmp-" + path.name)
    try:
        sitk.WriteImage(joined, str(tmp))
        tmp.replace(path)
    except (RuntimeError, OSError) as error:
        raise QSMInputError(f"cannot write {path}: {str(error).strip().splitlines()[-1]}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _expand(paths: List[Path], what: str) -> List[Path]:
    """One BIDS file stands for its whole set; several files are taken in the order given."""
    if not paths:
        raise QSMInputError(f"no {what} file given")
    for p in paths:
        if not p.is_file():
            raise QSMInputError(f"{what} file {p} does not exist")
    if len(paths) == 1:
        return bids_siblings(paths[0])
    return paths


def _read_series(paths: List[Path], what: str) -> EchoSeries:
    """Read one 4D file, or stack 3D files (one echo each) after checking they share a grid."""
    series = [read_echoes(p) for p in paths]
    if len(series) == 1:
        return series[0]
    first = series[0]
    for p, s in zip(paths[1:], series[1:]):
        if s.echoes != 1:
            raise QSMInputError(f"{what} file {p} holds {s.echoes} echoes: give one 4D file or one 3D file per echo")
        difference = first.echo(0).geometry_difference(s.echo(0))
        if difference:
            raise QSMInputError(f"{what} echo files {paths[0].name} and {p.name} differ: {difference}")
    if first.echoes != 1:
        raise QSMInputError(f"{what} file {paths[0]} holds {first.echoes} echoes: give one 4D file or one 3D file per echo")
    stacked = np.concatenate([s.array for s in series], axis=3)
    return EchoSeries(stacked, first.spacing_mm, first.origin, first.direction)


def _read_sidecars(paths: List[Path], echoes: int, notes: List[str]) -> Tuple[Optional[Tuple[float, ...]], Optional[float]]:
    """EchoTime per echo and MagneticFieldStrength from the sidecars that exist (phase files first)."""
    tes: List[float] = []
    b0s: List[float] = []
    for path in paths:
        side = sidecar_path(path)
        if not side.is_file():
            continue
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as error:
            raise QSMInputError(f"sidecar {side} is not valid JSON: {error}") from None
        if not isinstance(meta, dict):
            raise QSMInputError(f"sidecar {side} does not hold a JSON object")
        te = meta.get("EchoTime")
        if te is not None:
            tes.extend(float(t) for t in (te if isinstance(te, list) else [te]))
        if meta.get("MagneticFieldStrength") is not None:
            b0s.append(float(meta["MagneticFieldStrength"]))
    echo_times = None
    if len(tes) >= echoes:
        echo_times = tuple(tes[:echoes])
        notes.append(f"echo times from the sidecars: {', '.join(f'{t:g}' for t in echo_times)} s")
    b0 = None
    if b0s:
        if max(b0s) - min(b0s) > 0.05 * max(b0s):
            raise QSMInputError(f"the sidecars disagree on MagneticFieldStrength: {sorted(set(b0s))}")
        b0 = b0s[0]
        notes.append(f"B0 from the sidecars: {b0:g} T")
    return echo_times, b0
