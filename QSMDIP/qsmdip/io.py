"""Reading and writing 3D volumes with SimpleITK, keeping their geometry.

This is the only module that converts between SimpleITK's ``[k, j, i]`` NumPy arrays and the library's
``[i, j, k]`` order (see :mod:`qsmdip.geometry`). A :class:`Volume` carries the array together with the
geometry a QSM must keep: the output is written on exactly the grid of the input field, so it overlays
the field in any viewer. World coordinates are ITK's LPS (millimetres).

A :class:`Volume` is always 3D, so a 4D field or mask keeps being refused; the one input that may come
with several echoes, the GRE magnitude, is read by :func:`read_echoes` into an :class:`EchoSeries`.

Only formats whose readers keep NaN and Inf and notice truncated files are read: NIfTI (voxel data read
with nibabel, because ITK's NIfTI reader turns NaN and Inf into 0 and pads a truncated file with zeros;
the geometry still comes from ITK, as everywhere else), NRRD and MetaImage (read by SimpleITK). Every
map is written to a hidden temporary file and renamed, and a map holding NaN or Inf is never written.
"""
from __future__ import annotations

import os
import tempfile
import uuid
import zlib
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
#: NIfTI (and its .hdr/.img pair): header through ITK, voxel data through nibabel (see the module docstring).
NIFTI_SUFFIXES = (".nii.gz", ".nii", ".hdr", ".img")
#: Formats whose ITK readers refuse truncated data and keep NaN/Inf (checked in tests/test_io.py).
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
READ_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


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
    """Read one 3D scalar image (NIfTI, NRRD or MetaImage) as a :class:`Volume`.

    The array keeps the file's pixel type (a label map stays integer) and its NaN and Inf values;
    :mod:`qsmdip.validation` turns it into a float field or a boolean mask and decides about them.

    A 4D image whose fourth dimension has size 1 is accepted and squeezed to 3D (some tools save a
    single frame that way). 2D images, 4D series, vector and complex images, truncated files and other
    formats are refused with a one-line message naming the file, because QSM needs exactly one real 3D
    field map.
    """
    path = Path(path)
    image = _ImageFile.open(path, "a real local field map")
    if image.components != 1:
        raise QSMInputError(f"{path} has {image.components} components per voxel:"
                            " QSMDIP expects a scalar 3D field map")
    size = image.size
    if image.dimension == 4 and size[3] == 1:
        array = image.pixels()[0]  # [t, k, j, i] -> [k, j, i]
        return _volume(np.ascontiguousarray(array.transpose(2, 1, 0)), image.spacing[:3], image.origin[:3],
                       np.array(image.direction).reshape(4, 4)[:3, :3], path)
    if image.dimension == 4:
        raise QSMInputError(f"{path} is 4D (shape {size}): QSMDIP expects one 3D local field map;"
                            " pick one echo/frame")
    if image.dimension != 3:
        raise QSMInputError(f"{path} is {image.dimension}D (shape {size}): QSMDIP expects a 3D volume")
    array = np.ascontiguousarray(image.pixels().transpose(2, 1, 0))
    return _volume(array, image.spacing, image.origin, image.direction, path)


def read_echoes(path: PathLike) -> EchoSeries:
    """Read a 3D image, or a 4D one with echoes on the fourth axis, as an :class:`EchoSeries`.

    For the GRE magnitude, which scanners and converters often save with all echoes in one file. A 3D
    image is a series of one echo. The grid is the first three axes' (spacing, origin, direction). A
    NRRD whose echo axis is a non-spatial ("list") axis reads as several components per voxel; in a
    NRRD those are taken as the echoes too. Elsewhere components mean something else (a complex image
    saved as MetaImage reads as two), so they are refused, as are missing, unreadable, truncated,
    complex, 2D and 5D files.
    """
    path = Path(path)
    image = _ImageFile.open(path, "a real magnitude image")
    size, dimension, components = image.size, image.dimension, image.components
    if components != 1 and not path.name.lower().endswith((".nrrd", ".nhdr")):
        raise QSMInputError(f"{path} has {components} components per voxel: give the magnitude as a 3D image,"
                            " or a 4D one with echoes on the fourth axis")
    if dimension == 4 and components == 1:
        array = image.pixels().transpose(3, 2, 1, 0)  # [echo, k, j, i] -> [i, j, k, echo]
        spacing, origin = image.spacing[:3], image.origin[:3]
        direction = np.array(image.direction).reshape(4, 4)[:3, :3]
    elif dimension == 3:
        array = image.pixels()  # [k, j, i] or, with components, [k, j, i, echo]
        array = array.transpose(2, 1, 0)[..., None] if components == 1 else array.transpose(2, 1, 0, 3)
        spacing, origin, direction = image.spacing, image.origin, image.direction
    else:
        raise QSMInputError(f"{path} is {dimension}D (shape {size}"
                            + (f", {components} components per voxel" if components != 1 else "")
                            + "): expected a 3D image, or a 4D one with echoes on the fourth axis")
    try:
        return EchoSeries(np.ascontiguousarray(array), tuple(spacing), tuple(origin),
                          np.array(direction, dtype=np.float64).reshape(3, 3))
    except QSMInputError as exc:
        raise QSMInputError(f"{path}: {exc}") from exc


def check_output_path(path: PathLike) -> Path:
    """Refuse, before any work, an output path that :func:`write_volume` could not write.

    Checks the suffix (one of ``WRITE_SUFFIXES``, lower or upper case), that the path is not a folder,
    and that its folder exists or can be created and accepts a new file (a probe file is created and
    removed in the nearest existing folder). Returns the path.
    """
    path = Path(path)
    _write_suffix(path)
    if path.is_dir():
        raise QSMInputError(f"cannot write {path}: it is a folder; give a file name ending in"
                            f" {', '.join(WRITE_SUFFIXES)}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise QSMInputError(f"cannot write {path}: {folder} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".qsmdip-probe-", dir=str(folder))
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise QSMInputError(f"cannot write {path}: the folder {folder} does not accept new files"
                            f" ({exc.strerror or exc})") from exc
    return path


def write_volume(path: PathLike, array: np.ndarray, like: Optional[Volume] = None, *,
                 spacing_mm: Optional[Sequence[float]] = None, origin: Optional[Sequence[float]] = None,
                 direction: Optional[np.ndarray] = None) -> Path:
    """Write ``array`` (``[i, j, k]``) as float32 with the geometry of ``like`` or the given keywords.

    Keywords override ``like``; without either the grid is 1 mm, origin 0, identity direction. The
    file appears atomically (written under a hidden temporary name in the same folder, then renamed),
    so a reader polling for it never sees half a file. Parent folders are created. An array holding
    NaN or Inf (after conversion to float32) is refused: no map with non-finite values is written.
    Returns the path.
    """
    path = Path(path)
    suffix = _write_suffix(path)
    if like is not None and np.shape(array) != like.shape:
        raise QSMInputError(f"cannot write {path}: array shape {np.shape(array)} differs from the grid {like.shape}")
    with np.errstate(over="ignore"):  # values beyond float32's range become Inf, refused just below
        values = np.asarray(array, dtype=np.float32)
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise QSMInputError(f"cannot write {path}: the map holds {bad} NaN/Inf voxels (or values beyond"
                            " float32's range)")
    if path.is_dir():
        raise QSMInputError(f"cannot write {path}: it is a folder")
    grid = like if like is not None else Volume(np.zeros((1, 1, 1)))
    volume = Volume(
        values,
        spacing_mm if spacing_mm is not None else grid.spacing_mm,
        origin if origin is not None else grid.origin,
        direction if direction is not None else grid.direction,
    )
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array.transpose(2, 1, 0)), isVector=False)
    image.SetSpacing(volume.spacing_mm)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(float(x) for x in volume.direction.ravel()))

    # SimpleITK picks the format from the (lower-case) extension, so the temporary name ends in it.
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(tmp))
        os.replace(tmp, path)
    except RuntimeError as exc:
        raise QSMInputError(f"cannot write {path}: {str(exc).strip().splitlines()[-1]}") from exc
    except OSError as exc:
        raise QSMInputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_suffix(path: Path) -> str:
    """The lower-case suffix of a path we can write; mixed case is refused (ITK cannot read it back)."""
    name = path.name
    for suffix in WRITE_SUFFIXES:
        if name.endswith(suffix) or name.endswith(suffix.upper()):
            return suffix
    if name.lower().endswith(WRITE_SUFFIXES):
        raise QSMInputError(f"cannot write {path}: write the suffix in lower case (or all upper case)")
    raise QSMInputError(f"cannot write {path}: use one of {', '.join(WRITE_SUFFIXES)}")


@dataclass
class _ImageFile:
    """An image file's header (ITK's view of its grid) and a way to read its voxels safely.

    ``pixels()`` returns the voxels in SimpleITK's layout (``[..., k, j, i]``, components last).
    """

    path: Path
    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]
    components: int
    image: Optional[sitk.Image] = None  #: the whole image, for the formats ITK reads safely

    @property
    def dimension(self) -> int:
        return len(self.size)

    @classmethod
    def open(cls, path: Path, expected: str) -> "_ImageFile":
        """Read the header (and, for NRRD / MetaImage, the image), refusing unusable files in one line."""
        if not path.exists():
            raise QSMInputError(f"no such file: {path}")
        if path.is_dir():
            raise QSMInputError(f"{path} is a folder, not an image file (convert DICOM to NIfTI or NRRD first)")
        if not path.name.lower().endswith(READ_SUFFIXES):
            raise QSMInputError(f"cannot read {path}: QSMDIP reads NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) and"
                                " MetaImage (.mha, .mhd), whose readers detect damaged files; convert it first")
        nifti = path.name.lower().endswith(NIFTI_SUFFIXES)
        try:
            if nifti:  # header only: the voxels come from nibabel
                source = sitk.ImageFileReader()
                source.SetFileName(str(path))
                source.ReadImageInformation()
                components, pixel = source.GetNumberOfComponents(), source.GetPixelID()
                image = None
            else:
                source = image = sitk.ReadImage(str(path))
                components, pixel = image.GetNumberOfComponentsPerPixel(), image.GetPixelID()
        except RuntimeError as exc:
            raise QSMInputError(f"cannot read {path} as an image: {_itk_reason(exc, path)}") from exc
        if "complex" in sitk.GetPixelIDValueAsString(pixel):
            raise QSMInputError(f"{path} holds complex values: QSMDIP expects {expected}")
        return cls(path, tuple(int(n) for n in source.GetSize()), tuple(source.GetSpacing()),
                   tuple(source.GetOrigin()), tuple(source.GetDirection()), int(components), image)

    def pixels(self) -> np.ndarray:
        """The voxel values in SimpleITK's array layout, NaN and Inf kept."""
        if self.image is not None:
            return sitk.GetArrayFromImage(self.image)
        if self.components != 1:  # callers refuse these first: NIfTI components are never echoes
            raise QSMInputError(f"{self.path} has {self.components} components per voxel: expected scalars")
        return _read_nifti_voxels(self.path, self.size)


def _read_nifti_voxels(path: Path, size: Sequence[int]) -> np.ndarray:
    """Scalar NIfTI voxels through nibabel (scaled by scl_slope / scl_inter), which keeps NaN / Inf and
    refuses truncated or damaged data; in the layout SimpleITK gives for the header ITK read."""
    try:
        import nibabel
        from nibabel.filebasedimages import ImageFileError
    except ImportError as exc:  # a core dependency; only a broken install lacks it
        from .errors import MissingDependencyError

        raise MissingDependencyError(f"reading NIfTI needs nibabel (pip install nibabel): {exc}") from exc
    try:
        data = np.asanyarray(nibabel.load(str(path), mmap=False).dataobj)
    except (OSError, EOFError, ValueError, zlib.error, ImageFileError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QSMInputError(f"cannot read {path}: its voxel data is truncated or damaged ({reason})") from exc
    layout = tuple(reversed(tuple(size)))  # nibabel is [i, j, k, ...]; SimpleITK [..., k, j, i]
    if data.size != int(np.prod(layout)):
        raise QSMInputError(f"cannot read {path}: its header says {tuple(size)} voxels but nibabel read"
                            f" an array of shape {data.shape}")
    return np.ascontiguousarray(data.T).reshape(layout)


def _itk_reason(exc: RuntimeError, path: Path) -> str:
    """The useful last line of an ITK error; MetaImage reports a short read as a missing file."""
    reason = str(exc).strip().splitlines()[-1].replace("sitk::ERROR: ", "")
    if "No such file or directory" in reason and path.exists():
        reason = "its data could not be read completely (is the file truncated, or its data file missing?)"
    return reason


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
        raise QSMInputError(f"{name} must be three finite numbers, got {_fmt(v)}")
    return (float(v[0]), float(v[1]), float(v[2]))


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(x):.6g}" for x in values) + ")"
