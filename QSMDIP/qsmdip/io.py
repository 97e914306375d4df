"""Reading and writing 3D volumes with SimpleITK, keeping their geometry.

This is the only module that converts between SimpleITK's ``[k, j, i]`` NumPy arrays and the library's
``[i, j, k]`` order (see :mod:`qsmdip.geometry`). A :class:`Volume` carries the array together with the
geometry a QSM must keep: the output is written on exactly the grid of the input field, so it overlays
the field in any viewer. World coordinates are ITK's LPS (millimetres).

A :class:`Volume` is always 3D, so a 4D field or mask keeps being refused; the one input that may come
with several echoes, the GRE magnitude, is read by :func:`read_echoes` into an :class:`EchoSeries`.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import QSMInputError
from .geometry import SUPERIOR, Vector3, b0_direction_in_voxel_frame, check_direction_matrix

PathLike = Union[str, "os.PathLike[str]"]

#: Single-file formats we write (a detached header such as .nhdr or .mhd could not be renamed atomically).
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass(eq=False)
class Volume:
    """A 3D image: ``array`` indexed ``[i, j, k]`` plus its grid in world (LPS, mm) coordinates.

    ``direction`` is the 3x3 matrix whose columns are the world directions of the i, j and k axes
    (``np.array(image.GetDirection()).reshape(3, 3)``); ``spacing_mm`` and ``origin`` follow ITK.
    """

    array: np.ndarray
    spacing_mm: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise QSMInputError(f"a volume must be 3D, got an array of shape {self.array.shape}")
        self.spacing_mm = _three_floats(self.spacing_mm, "spacing")
        if any(s <= 0 for s in self.spacing_mm):
            raise QSMInputError(f"spacing must be positive, got {self.spacing_mm} mm")
        self.origin = _three_floats(self.origin, "origin")
        self.direction = check_direction_matrix(self.direction)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Array shape in ``[i, j, k]`` order."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    def b0_dir(self, b0_world: Sequence[float] = SUPERIOR) -> Vector3:
        """Unit B0 direction along this volume's (i, j, k) axes (default: scanner superior axis)."""
        return b0_direction_in_voxel_frame(self.direction, b0_world)

    def geometry_difference(self, other: "Volume", tol: float = 1e-3) -> Optional[str]:
        """Describe how ``other``'s voxel grid differs from this one, or None when they match.

        ``tol`` is relative for the spacing, a fraction of the smallest voxel for the origin, and
        absolute for the direction cosines, so that float32 header round-off (NIfTI) is tolerated.
        """
        if self.shape != other.shape:
            return f"shape {self.shape} vs {other.shape}"
        a, b = np.array(self.spacing_mm), np.array(other.spacing_mm)
        if np.any(np.abs(a - b) > tol * np.maximum(a, b)):
            return f"spacing {self.spacing_mm} mm vs {other.spacing_mm} mm"
        origin_tol = tol * min(min(self.spacing_mm), min(other.spacing_mm))
        if np.any(np.abs(np.subtract(self.origin, other.origin)) > origin_tol):
            return f"origin {_fmt(self.origin)} mm vs {_fmt(other.origin)} mm"
        if np.any(np.abs(self.direction - other.direction) > tol):
            return (f"direction {_fmt(self.direction.ravel())} vs {_fmt(other.direction.ravel())}"
                    " (columns = world axes of i, j, k)")
        return None

    def same_geometry(self, other: "Volume", tol: float = 1e-3) -> bool:
        """True when both volumes share shape, spacing, origin and direction (within ``tol``)."""
        return self.geometry_difference(other, tol) is None


def volume_like(volume: Volume, array: np.ndarray) -> Volume:
    """A new volume holding ``array`` on ``volume``'s grid (shapes must match)."""
    array = np.asarray(array)
    if array.shape != volume.shape:
        raise QSMInputError(f"array of shape {array.shape} does not fit a volume of shape {volume.shape}")
    return Volume(array, volume.spacing_mm, volume.origin, volume.direction.copy())


@dataclass(eq=False)
class EchoSeries:
    """Images of several echoes on one 3D grid: ``array`` indexed ``[i, j, k, echo]``.

    Kept apart from :class:`Volume` so that only the inputs meant to have echoes (the GRE magnitude)
    accept them; the geometry fields mean what they mean in :class:`Volume`.
    """

    array: np.ndarray
    spacing_mm: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 4 or self.array.shape[3] < 1:
            raise QSMInputError(f"an echo series must be 4D [i, j, k, echo], got an array of shape {self.array.shape}")
        grid = self.echo(0)  # checks the geometry exactly as a Volume does, and normalises it
        self.spacing_mm, self.origin, self.direction = grid.spacing_mm, grid.origin, grid.direction

    @property
    def shape(self) -> Tuple[int, int, int]:
        """The 3D grid's shape in ``[i, j, k]`` order (echoes not counted)."""
        return tuple(int(n) for n in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def echoes(self) -> int:
        """Number of echoes (1 for a plain 3D image)."""
        return int(self.array.shape[3])

    def echo(self, index: int) -> Volume:
        """One echo as a :class:`Volume` on the series' grid (a view, not a copy)."""
        return Volume(self.array[..., index], self.spacing_mm, self.origin, np.array(self.direction, dtype=np.float64))


def read_volume(path: PathLike) -> Volume:
    """Read one 3D scalar image (NIfTI, NRRD or anything else SimpleITK reads) as a :class:`Volume`.

    The array keeps the file's pixel type (a label map stays integer); :mod:`qsmdip.validation` turns
    it into a float field or a boolean mask.

    A 4D image whose fourth dimension has size 1 is accepted and squeezed to 3D (some tools save a
    single frame that way). 2D images, 4D series, vector and complex images are refused with a
    one-line message naming the file, because QSM needs exactly one real 3D field map.
    """
    path = Path(path)
    image = _open_image(path, "a real local field map")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise QSMInputError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel:"
                            " QSMDIP expects a scalar 3D field map")
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:
        return _squeeze_4d(image, path)
    if image.GetDimension() == 4:
        raise QSMInputError(f"{path} is 4D (shape {size}): QSMDIP expects one 3D local field map;"
                            " pick one echo/frame")
    if image.GetDimension() != 3:
        raise QSMInputError(f"{path} is {image.GetDimension()}D (shape {size}): QSMDIP expects a 3D volume")
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    return _volume(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection(), path)


def read_echoes(path: PathLike) -> EchoSeries:
    """Read a 3D image, or a 4D one with echoes on the fourth axis, as an :class:`EchoSeries`.

    For the GRE magnitude, which scanners and converters often save with all echoes in one file. A 3D
    image is a series of one echo. The grid is the first three axes' (spacing, origin, direction). A
    NRRD whose echo axis is a non-spatial ("list") axis reads as several components per voxel; in a
    NRRD those are taken as the echoes too. Elsewhere components mean something else (a complex image
    saved as MetaImage reads as two), so they are refused, as are missing, unreadable, complex, 2D and
    5D files.
    """
    path = Path(path)
    image = _open_image(path, "a real magnitude image")
    size, dimension = image.GetSize(), image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1 and not path.name.lower().endswith((".nrrd", ".nhdr")):
        raise QSMInputError(f"{path} has {components} components per voxel: give the magnitude as a 3D image,"
                            " or a 4D one with echoes on the fourth axis")
    if dimension == 4 and components == 1:
        array = sitk.GetArrayFromImage(image).transpose(3, 2, 1, 0)  # [echo, k, j, i] -> [i, j, k, echo]
        spacing, origin = image.GetSpacing()[:3], image.GetOrigin()[:3]
        direction = np.array(image.GetDirection()).reshape(4, 4)[:3, :3]
    elif dimension == 3:
        array = sitk.GetArrayFromImage(image)  # [k, j, i] or, with components, [k, j, i, echo]
        array = array.transpose(2, 1, 0)[..., None] if components == 1 else array.transpose(2, 1, 0, 3)
        spacing, origin, direction = image.GetSpacing(), image.GetOrigin(), image.GetDirection()
    else:
        raise QSMInputError(f"{path} is {dimension}D (shape {size}"
                            + (f", {components} components per voxel" if components != 1 else "")
                            + "): expected a 3D image, or a 4D one with echoes on the fourth axis")
    try:
        return EchoSeries(np.ascontiguousarray(array), tuple(spacing), tuple(origin),
                          np.array(direction, dtype=np.float64).reshape(3, 3))
    except QSMInputError as exc:
        raise QSMInputError(f"{path}: {exc}") from exc


def write_volume(path: PathLike, array: np.ndarray, like: Optional[Volume] = None, *,
                 spacing_mm: Optional[Sequence[float]] = None, origin: Optional[Sequence[float]] = None,
                 direction: Optional[np.ndarray] = None) -> Path:
    """Write ``array`` (``[i, j, k]``) as float32 with the geometry of ``like`` or the given keywords.

    Keywords override ``like``; without either the grid is 1 mm, origin 0, identity direction. The
    file appears atomically (written under a hidden temporary name in the same folder, then renamed),
    so a reader polling for it never sees half a file. Parent folders are created. Returns the path.
    """
    path = Path(path)
    if not path.name.lower().endswith(WRITE_SUFFIXES):
        raise QSMInputError(f"cannot write {path}: use one of {', '.join(WRITE_SUFFIXES)}")
    if like is not None and np.shape(array) != like.shape:
        raise QSMInputError(f"cannot write {path}: array shape {np.shape(array)} differs from the grid {like.shape}")
    grid = like if like is not None else Volume(np.zeros((1, 1, 1)))
    volume = Volume(
        np.asarray(array, dtype=np.float32),
        spacing_mm if spacing_mm is not None else grid.spacing_mm,
        origin if origin is not None else grid.origin,
        direction if direction is not None else grid.direction,
    )
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array.transpose(2, 1, 0)), isVector=False)
    image.SetSpacing(volume.spacing_mm)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(float(x) for x in volume.direction.ravel()))

    path.parent.mkdir(parents=True, exist_ok=True)
    # SimpleITK picks the format from the extension, so the temporary name must end like the real one.
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        sitk.WriteImage(image, str(tmp))
        os.replace(tmp, path)
    except RuntimeError as exc:
        raise QSMInputError(f"cannot write {path}: {str(exc).strip().splitlines()[-1]}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _open_image(path: Path, expected: str) -> sitk.Image:
    """Read any image SimpleITK can, refusing missing, unreadable and complex files in one line."""
    if not path.exists():
        raise QSMInputError(f"no such file: {path}")
    if path.is_dir():
        raise QSMInputError(f"{path} is a folder, not an image file (convert DICOM to NIfTI or NRRD first)")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].replace("sitk::ERROR: ", "")
        raise QSMInputError(f"cannot read {path} as an image: {reason}") from exc
    if "complex" in image.GetPixelIDTypeAsString():
        raise QSMInputError(f"{path} holds complex values: QSMDIP expects {expected}")
    return image


def _squeeze_4d(image: sitk.Image, path: Path) -> Volume:
    """Drop a size-1 fourth axis, keeping the 3D part of the spacing, origin and direction."""
    array = sitk.GetArrayFromImage(image)[0]  # [t, k, j, i] -> [k, j, i]
    direction4 = np.array(image.GetDirection()).reshape(4, 4)
    return _volume(np.ascontiguousarray(array.transpose(2, 1, 0)), image.GetSpacing()[:3],
                   image.GetOrigin()[:3], direction4[:3, :3], path)


def _volume(array: np.ndarray, spacing: Sequence[float], origin: Sequence[float],
            direction: Sequence[float], path: Path) -> Volume:
    """Build a Volume, naming the file when its geometry is unusable (e.g. a sheared grid)."""
    try:
        return Volume(array, tuple(spacing), tuple(origin), np.array(direction, dtype=np.float64).reshape(3, 3))
    except QSMInputError as exc:
        raise QSMInputError(f"{path}: {exc}") from exc


def _three_floats(values: Sequence[float], name: str) -> Tuple[float, float, float]:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size != 3 or not np.all(np.isfinite(v)):
        raise QSMInputError(f"{name} must be three finite numbers, got {list(v)}")
    return (float(v[0]), float(v[1]), float(v[2]))


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(x):.6g}" for x in values) + ")"
