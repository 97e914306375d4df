"""Export a QSM as a DICOM series that a PACS stores and a radiology viewer shows sensibly.

What a reader gets:
- One classic single-frame *MR Image Storage* file per slice (k), the SOP class that viewers, PACS and
  ITK/GDCM (hence SimpleITK and 3D Slicer) read with full geometry and rescale.
- Stored values are signed 16-bit integers in **ppb** (parts per billion). ``RescaleSlope`` 0.001 and
  ``RescaleIntercept`` 0 turn them into **ppm**, the unit of every QSMDIP map (``RescaleType`` "PPM";
  a ``RealWorldValueMappingSequence`` states the same with the UCUM unit ``[ppm]``). Rounding to whole
  ppb changes a value by at most 0.5 ppb.
- DICOM applies the window *after* the rescale, so ``WindowCenter`` 0 and ``WindowWidth`` 0.3 are in ppm:
  viewers open the map at -150..150 ppb, the range of normal brain tissue.
- int16 at 1 ppb holds -32.768..32.767 ppm. A map reaching beyond that is refused (one line naming its
  extreme value) unless ``clip=True``, which saturates those voxels at the limits and logs a warning.
  NaN or Inf is always refused: a viewer would show it as a plausible number.
- ``ImageType`` DERIVED\\SECONDARY\\OTHER\\QSM, a ``DerivationDescription`` and the ``SeriesDescription``
  name QSMDIP and its version.
- Geometry: world coordinates of a :class:`qsmdip.io.Volume` are LPS, which is DICOM's patient frame, so
  they are written as they are: ``ImageOrientationPatient`` = the i and j axes' directions (columns of
  ``direction``), ``ImagePositionPatient`` = the centre of voxel (0, 0, k), ``PixelSpacing`` = (j, i)
  spacing (row spacing first), ``SliceThickness`` and ``SpacingBetweenSlices`` = the k spacing. Instance
  numbers increase along the slice normal (i x j), so a left-handed grid reads back flipped along k but
  on the same voxels in space.
- New Series and SOP Instance UIDs on every export. With ``like_dicom_dir`` (the DICOM series the field
  was computed from), the patient, study and frame of reference are copied from it, so the QSM arrives
  in PACS as a new series of that study; without it, a new study is made.
"""
from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Union

import numpy as np

from . import __version__
from .errors import MissingDependencyError, QSMInputError
from .io import PathLike, Volume, read_volume

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: Stored integers are ppb; the rescale gives ppm.
PPB_PER_PPM = 1000
RESCALE_SLOPE_PPM = 1.0 / PPB_PER_PPM
INT16_MIN, INT16_MAX = -32768, 32767
#: The largest magnitude a map may have without clipping, in ppm (int16 at 1 ppb).
MAX_ABS_PPM = INT16_MAX / PPB_PER_PPM
#: Default display window (ppm, applied after the rescale): -150..150 ppb.
WINDOW_CENTER_PPM = 0.0
WINDOW_WIDTH_PPM = 0.3

#: Attributes copied from ``like_dicom_dir``: patient, study, frame of reference and the acquisition
#: facts that stay true of a map derived from it.
PATIENT_ATTRIBUTES = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientSize", "PatientWeight", "OtherPatientIDsSequence", "PatientIdentityRemoved",
    "DeidentificationMethod",
)
STUDY_ATTRIBUTES = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription",
)
ACQUISITION_ATTRIBUTES = (
    "PatientPosition", "BodyPartExamined", "PositionReferenceIndicator", "MagneticFieldStrength",
    "ScanningSequence", "SequenceVariant", "MRAcquisitionType", "InstitutionName",
)


def export_qsm_dicom(qsm: Union[PathLike, Volume], out_dir: PathLike, *,
                     like_dicom_dir: Optional[PathLike] = None,
                     series_description: Optional[str] = None,
                     series_number: Optional[int] = None,
                     patient_name: str = "", patient_id: str = "",
                     clip: bool = False) -> List[Path]:
    """Write the QSM ``qsm`` (a file SimpleITK reads, or a :class:`Volume`, in ppm) as a DICOM series.

    ``out_dir`` must be empty or not yet exist (a second series in the same folder would confuse
    importers); one file per slice is written there. ``like_dicom_dir`` is the DICOM folder of the
    acquisition the field came from, or one file of it: its patient, study and frame of reference
    are reused. Without it
    a new study is made for ``patient_name`` / ``patient_id`` (empty by default). ``series_number``
    defaults to the like-series' number + 1000, or 1000 without it. Values beyond +-32.767 ppm are
    refused unless ``clip`` saturates them. Returns the written files in slice order.
    """
    pydicom = _pydicom()
    volume = qsm if isinstance(qsm, Volume) else read_volume(qsm)
    stored = _to_stored_ppb(volume.array, clip, _name(qsm))
    out_dir = _prepare_out_dir(Path(out_dir))
    like = _read_like(Path(like_dicom_dir)) if like_dicom_dir is not None else None

    template = _series_template(pydicom, like, series_description, series_number, patient_name, patient_id)
    row, col = volume.direction[:, 0], volume.direction[:, 1]
    normal = np.cross(row, col)
    slice_axis = volume.direction[:, 2] * volume.spacing_mm[2]
    positions = [np.asarray(volume.origin) + k * slice_axis for k in range(volume.shape[2])]
    order = np.argsort([float(np.dot(p, normal)) for p in positions], kind="stable")
    written: List[Path] = []
    try:
        for number, k in enumerate(order, start=1):
            dataset = _slice_dataset(pydicom, template, volume, stored[:, :, k], positions[k], normal, number)
            path = out_dir / f"IM{number:05d}.dcm"
            _save(pydicom, dataset, path)
            written.append(path)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        raise QSMInputError(f"cannot write the DICOM series to {out_dir}: {exc.strerror or exc}") from exc
    by_slice: Dict[int, Path] = {int(k): path for k, path in zip(order, written)}
    return [by_slice[k] for k in range(volume.shape[2])]


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:
        raise MissingDependencyError("exporting DICOM needs pydicom: pip install 'qsmdip[dicom]'"
                                     " (3D Slicer ships it)") from exc
    return pydicom


def _pydicom_3(pydicom) -> bool:
    return int(pydicom.__version__.split(".")[0]) >= 3


def _save(pydicom, dataset: "Dataset", path: Path) -> None:
    """Save as a standard DICOM file (preamble and meta header) with pydicom 2 or 3."""
    if _pydicom_3(pydicom):
        dataset.save_as(str(path), enforce_file_format=True)
    else:
        dataset.save_as(str(path), write_like_original=False)


def _name(qsm: Union[PathLike, Volume]) -> str:
    return "the QSM" if isinstance(qsm, Volume) else str(qsm)


def _to_stored_ppb(array: np.ndarray, clip: bool, name: str) -> np.ndarray:
    """The map in whole ppb as int16, refusing non-finite values and (unless ``clip``) overflow."""
    array = np.asarray(array)
    if np.iscomplexobj(array) or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise QSMInputError(f"{name} must hold real numbers in ppm, got {array.dtype}")
    ppm = array.astype(np.float64)
    bad = ~np.isfinite(ppm)
    if bad.any():
        raise QSMInputError(f"{name} has {int(bad.sum())} NaN or infinite voxels: a DICOM series cannot"
                            " mark them, so they are refused (fix or mask the map first)")
    ppb = np.rint(ppm * PPB_PER_PPM)
    outside = (ppb < INT16_MIN) | (ppb > INT16_MAX)
    if outside.any():
        extreme = float(ppm.flat[np.argmax(np.abs(ppm))])
        if not clip:
            raise QSMInputError(f"{name} reaches {extreme:.6g} ppm in {int(outside.sum())} voxels, beyond the"
                                f" +-{MAX_ABS_PPM} ppm that 16-bit integers in ppb hold; export with clipping"
                                " to saturate them")
        log.warning("%s: %d voxels beyond +-%s ppm (extreme %.6g ppm) were clipped to the limits",
                    name, int(outside.sum()), MAX_ABS_PPM, extreme)
        ppb = np.clip(ppb, INT16_MIN, INT16_MAX)
    return ppb.astype(np.int16)


def _prepare_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise QSMInputError(f"{out_dir} is a file: give a folder for the DICOM series")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise QSMInputError(f"{out_dir} is not empty: give a new or empty folder for the DICOM series")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QSMInputError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    return out_dir


def _read_like(source: Path) -> "Dataset":
    """One header of the source series (a DICOM file, or a folder of one study's files)."""
    pydicom = _pydicom()
    if source.is_file():
        paths = [source]
    elif source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.is_file())
    else:
        raise QSMInputError(f"{source} is neither a DICOM file nor a folder of DICOM files (like_dicom_dir)")
    headers = []
    for path in paths:
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError):
            continue
        if "StudyInstanceUID" in header and "SOPClassUID" in header:  # skips DICOMDIR and stray files
            headers.append(header)
    if not headers:
        raise QSMInputError(f"no DICOM images found in {source}")
    studies = {str(h.StudyInstanceUID) for h in headers}
    if len(studies) > 1:
        raise QSMInputError(f"{source} holds {len(studies)} studies: give the folder (or one file) of the series"
                            " the field was computed from")
    like = headers[0]
    frames = {str(h.get("FrameOfReferenceUID", "")) for h in headers}
    if len(frames) != 1:  # several frames of reference: none of them can be claimed for the map
        del like.FrameOfReferenceUID
    return like


def _series_template(pydicom, like: Optional["Dataset"], description: Optional[str], number: Optional[int],
                     patient_name: str, patient_id: str) -> "Dataset":
    """The attributes every slice shares: patient, study, series, equipment, pixel format, rescale."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    ds = Dataset()
    if like is None:
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, for whatever patient name the caller gives
    elif "SpecificCharacterSet" in like:
        ds.SpecificCharacterSet = like.SpecificCharacterSet  # the copied names are in the source's encoding
    if like is not None:
        for keyword in PATIENT_ATTRIBUTES + STUDY_ATTRIBUTES + ACQUISITION_ATTRIBUTES:
            if keyword in like:
                setattr(ds, keyword, like.data_element(keyword).value)
        ds.FrameOfReferenceUID = like.get("FrameOfReferenceUID") or generate_uid()
        if number is None:
            number = int(like.get("SeriesNumber") or 0) + 1000
    else:
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.PatientBirthDate, ds.PatientSex = "", ""
        ds.StudyInstanceUID = generate_uid()
        ds.StudyDate, ds.StudyTime = date, time
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", ""
        ds.FrameOfReferenceUID = generate_uid()
        ds.PositionReferenceIndicator = ""
    for keyword, value in (("PatientPosition", ""), ("ScanningSequence", "RM"), ("SequenceVariant", "NONE"),
                           ("MRAcquisitionType", "3D")):
        if keyword not in ds:
            setattr(ds, keyword, value)
    ds.ScanOptions, ds.EchoTime, ds.EchoTrainLength = "", "", ""
    ds.Modality = "MR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1000 if number is None else int(number)
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SeriesDescription = (description or f"QSM ppm (QSMDIP {__version__})")[:64]
    ds.Manufacturer = "QSMDIP"
    ds.SoftwareVersions = __version__
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER", "QSM"]
    ds.DerivationDescription = (f"Quantitative susceptibility map computed by QSMDIP {__version__};"
                                " stored in ppb, rescaled to ppm")
    ds.ImageComments = "QSM in ppm (stored integers are ppb; RescaleSlope 0.001)"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", _ds(RESCALE_SLOPE_PPM), "PPM"
    ds.WindowCenter, ds.WindowWidth = _ds(WINDOW_CENTER_PPM), _ds(WINDOW_WIDTH_PPM)
    ds.WindowCenterWidthExplanation = "QSM -150..150 ppb"
    ds.RealWorldValueMappingSequence = [_real_world_mapping(pydicom)]
    return ds


def _real_world_mapping(pydicom) -> "Dataset":
    """The rescale restated with its unit as a code (UCUM ``[ppm]``), which MR readers may show."""
    from pydicom.dataset import Dataset

    unit = Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "[ppm]", "UCUM", "parts per million"
    mapping = Dataset()
    mapping.add_new(0x00409216, "SS", INT16_MIN)  # RealWorldValueFirstValueMapped (signed pixels)
    mapping.add_new(0x00409211, "SS", INT16_MAX)  # RealWorldValueLastValueMapped
    mapping.RealWorldValueIntercept, mapping.RealWorldValueSlope = 0.0, RESCALE_SLOPE_PPM
    mapping.LUTExplanation, mapping.LUTLabel = "magnetic susceptibility", "QSM"
    mapping.MeasurementUnitsCodeSequence = [unit]
    return mapping


def _slice_dataset(pydicom, template: "Dataset", volume: Volume, stored_ij: np.ndarray, position: np.ndarray,
                   normal: np.ndarray, number: int) -> "Dataset":
    """One slice: the template plus its own UID, position and pixels (rows = j, columns = i)."""
    import copy

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = copy.deepcopy(template)
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_IMAGE_STORAGE, uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    if not _pydicom_3(pydicom):
        ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, uid
    ds.InstanceNumber = number
    si, sj, sk = volume.spacing_mm
    ds.ImageOrientationPatient = [_ds(x) for x in np.concatenate([volume.direction[:, 0], volume.direction[:, 1]])]
    ds.ImagePositionPatient = [_ds(x) for x in position]
    ds.SliceLocation = _ds(float(np.dot(position, normal)))
    ds.PixelSpacing = [_ds(sj), _ds(si)]
    ds.SliceThickness = _ds(sk)
    ds.SpacingBetweenSlices = _ds(sk)
    ds.Rows, ds.Columns = int(stored_ij.shape[1]), int(stored_ij.shape[0])
    pixels = np.ascontiguousarray(stored_ij.T).astype("<i2")  # [j, i]: rows, then columns
    ds.SmallestImagePixelValue = int(pixels.min())
    ds.LargestImagePixelValue = int(pixels.max())
    ds["SmallestImagePixelValue"].VR = ds["LargestImagePixelValue"].VR = "SS"
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (DICOM's DS), as precise as that allows."""
    from pydicom.valuerep import format_number_as_ds

    value = float(value)
    if value == 0:
        return "0"
    return format_number_as_ds(value)
