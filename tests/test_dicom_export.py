"""DICOM export of a QSM: values back in ppm within 1 ppb, geometry kept, patient and study from the source."""
import logging
import sys

import numpy as np
import pytest
import SimpleITK as sitk

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from qsmdip import __version__  # noqa: E402
from qsmdip.dicom_export import MAX_ABS_PPM, export_qsm_dicom  # noqa: E402
from qsmdip.errors import MissingDependencyError, QSMInputError  # noqa: E402
from qsmdip.io import Volume, write_volume  # noqa: E402
from test_io import rotation  # noqa: E402  (Rodrigues' formula, one copy)

SHAPE = (7, 5, 4)  # [i, j, k], non-cubic so that rows and columns cannot be swapped unnoticed
SPACING = (0.7, 1.1, 2.3)
ORIGIN = (-90.5, 12.25, 33.1)


OBLIQUE = rotation((1, 2, 3), 37)


def qsm_volume(direction=OBLIQUE, seed=0):
    chi = np.random.default_rng(seed).normal(scale=0.2, size=SHAPE)
    chi[0, 0, 0], chi[1, 0, 0] = 1.2345, -0.0004  # a calcification-sized value; a sub-ppb one rounds to 0
    return Volume(chi, SPACING, ORIGIN, direction)


def read_series(folder):
    """The series as SimpleITK reads it (GDCM: sorted along the normal, rescale applied)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    return array, image


def test_series_reads_back_in_ppm_within_one_ppb_with_oblique_geometry(tmp_path):
    volume = qsm_volume()
    files = export_qsm_dicom(volume, tmp_path / "dicom")
    assert len(files) == SHAPE[2] and all(f.exists() for f in files)

    array, image = read_series(tmp_path / "dicom")
    assert image.GetSize() == SHAPE
    assert np.max(np.abs(array - volume.array)) <= 0.0005 + 1e-9  # ppm: whole ppb, rounded
    assert array[0, 0, 0] == pytest.approx(1.2345, abs=0.0005) and array[1, 0, 0] == 0
    np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN, atol=1e-6)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), OBLIQUE, atol=1e-9)


def test_stored_ppb_rescale_window_and_derived_description(tmp_path):
    volume = qsm_volume(direction=np.eye(3))
    files = export_qsm_dicom(volume, tmp_path / "dicom")
    datasets = [pydicom.dcmread(str(f)) for f in files]
    first = datasets[0]

    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    assert first.PixelRepresentation == 1 and first.BitsStored == 16
    stored = first.pixel_array  # [row = j, column = i]
    assert stored.dtype == np.int16
    assert np.array_equal(stored.T, np.rint(volume.array[:, :, 0] * 1000).astype(np.int16))
    assert float(first.RescaleSlope) == 0.001 and float(first.RescaleIntercept) == 0
    assert first.RescaleType == "PPM"
    mapping = first.RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "[ppm]" and mapping.RealWorldValueSlope == 0.001
    # The window applies after the rescale: centre 0 ppm, width 0.3 ppm = -150..150 ppb.
    assert float(first.WindowCenter) == 0 and float(first.WindowWidth) == pytest.approx(0.3)
    assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert f"QSMDIP {__version__}" in first.SeriesDescription
    assert "QSMDIP" in first.DerivationDescription and "ppb" in first.DerivationDescription

    assert len({d.SeriesInstanceUID for d in datasets}) == 1
    assert len({d.SOPInstanceUID for d in datasets}) == len(datasets)
    assert [int(d.InstanceNumber) for d in datasets] == [1, 2, 3, 4]
    for k, d in enumerate(datasets):
        np.testing.assert_allclose([float(x) for x in d.ImagePositionPatient],
                                   np.add(ORIGIN, (0, 0, k * SPACING[2])), atol=1e-9)
    assert [float(x) for x in first.PixelSpacing] == [SPACING[1], SPACING[0]]  # row spacing (j) first

    again = pydicom.dcmread(str(export_qsm_dicom(volume, tmp_path / "again")[0]))
    assert again.SeriesInstanceUID != first.SeriesInstanceUID and again.StudyInstanceUID != first.StudyInstanceUID


def test_exports_a_file_written_by_the_library(tmp_path):
    volume = qsm_volume()
    path = write_volume(tmp_path / "chi.nrrd", volume.array, like=volume)
    export_qsm_dicom(path, tmp_path / "dicom")
    array, image = read_series(tmp_path / "dicom")
    assert np.max(np.abs(array - volume.array)) <= 0.0005 + 1e-6  # the file holds float32
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN, atol=1e-5)


def test_left_handed_grid_reads_back_on_the_same_voxels_flipped_along_k(tmp_path):
    flipped = OBLIQUE.copy()
    flipped[:, 2] *= -1  # det = -1: k runs against i x j
    volume = qsm_volume(direction=flipped)
    files = export_qsm_dicom(volume, tmp_path / "dicom")
    numbers = [int(pydicom.dcmread(str(f)).InstanceNumber) for f in files]
    assert numbers == [4, 3, 2, 1]  # instances follow the normal, files are returned in k order

    array, image = read_series(tmp_path / "dicom")
    assert np.max(np.abs(array - volume.array[:, :, ::-1])) <= 0.0005 + 1e-9
    last = np.add(ORIGIN, (SHAPE[2] - 1) * SPACING[2] * flipped[:, 2])
    np.testing.assert_allclose(image.GetOrigin(), last, atol=1e-6)
    expected = flipped.copy()
    expected[:, 2] *= -1
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), expected, atol=1e-9)


def save_dicom(ds, path):
    """Save with preamble and meta header under pydicom 2 (Slicer 5.6 ships 2.x) or 3."""
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(str(path), enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)


def write_source_series(folder, study_uid, *, slices=2, patient=("Doe^Jane", "P123")):
    """A small MR series as a scanner would send it, the acquisition the field was computed from."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, frame_uid = generate_uid(), generate_uid()
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = patient
        ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, "20240102", "101500"
        ds.AccessionNumber, ds.StudyID, ds.StudyDescription = "ACC42", "S1", "Brain GRE"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series_uid, 7, "MR"
        ds.FrameOfReferenceUID, ds.MagneticFieldStrength = frame_uid, 3
        ds.InstanceNumber = k + 1
        ds.Rows = ds.Columns = 2
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.zeros((2, 2), "<u2").tobytes()
        save_dicom(ds, folder / f"src{k}.dcm")
    (folder / "notes.txt").write_text("not DICOM")  # stray files next to a series are common
    return series_uid, frame_uid


def test_like_copies_patient_and_study_into_a_new_series(tmp_path):
    study = generate_uid()
    source_series, frame = write_source_series(tmp_path / "source", study)
    files = export_qsm_dicom(qsm_volume(), tmp_path / "dicom", like_dicom_dir=tmp_path / "source")
    ds = pydicom.dcmread(str(files[0]))
    assert str(ds.PatientName) == "Doe^Jane" and ds.PatientID == "P123" and ds.PatientSex == "F"
    assert ds.StudyInstanceUID == study and ds.AccessionNumber == "ACC42" and ds.StudyDescription == "Brain GRE"
    assert ds.FrameOfReferenceUID == frame and float(ds.MagneticFieldStrength) == 3
    assert ds.SeriesInstanceUID != source_series and int(ds.SeriesNumber) == 1007
    # one file of the source series serves as well (Slicer knows the field's source instances)
    one = export_qsm_dicom(qsm_volume(), tmp_path / "from-file", like_dicom_dir=tmp_path / "source" / "src0.dcm")
    again = pydicom.dcmread(str(one[0]))
    assert again.StudyInstanceUID == study and again.PatientID == "P123" and again.FrameOfReferenceUID == frame


def test_like_refuses_a_folder_without_dicom_or_with_two_studies(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(QSMInputError, match="no DICOM images found"):
        export_qsm_dicom(qsm_volume(), tmp_path / "out1", like_dicom_dir=tmp_path / "empty")
    write_source_series(tmp_path / "mixed" / "a", generate_uid())
    write_source_series(tmp_path / "mixed" / "b", generate_uid())
    with pytest.raises(QSMInputError, match="2 studies"):
        export_qsm_dicom(qsm_volume(), tmp_path / "out2", like_dicom_dir=tmp_path / "mixed")
    with pytest.raises(QSMInputError, match="neither a DICOM file nor a folder"):
        export_qsm_dicom(qsm_volume(), tmp_path / "out3", like_dicom_dir=tmp_path / "missing")


def test_values_beyond_int16_ppb_are_refused_or_clipped_on_request(tmp_path, caplog):
    volume = qsm_volume(direction=np.eye(3))
    volume.array[2, 2, 2], volume.array[3, 3, 3] = MAX_ABS_PPM, -32.768  # the limits themselves fit
    export_qsm_dicom(volume, tmp_path / "limits")
    array, _ = read_series(tmp_path / "limits")
    assert array[2, 2, 2] == pytest.approx(32.767) and array[3, 3, 3] == pytest.approx(-32.768)

    volume.array[4, 4, 3] = 40.0
    with pytest.raises(QSMInputError, match=r"reaches 40 ppm in 1 voxels, beyond the \+-32.767 ppm"):
        export_qsm_dicom(volume, tmp_path / "refused")
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())

    with caplog.at_level(logging.WARNING, logger="qsmdip.dicom_export"):
        export_qsm_dicom(volume, tmp_path / "clipped", clip=True)
    assert "1 voxels beyond +-32.767 ppm" in caplog.text
    array, _ = read_series(tmp_path / "clipped")
    assert array[4, 4, 3] == pytest.approx(MAX_ABS_PPM)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(tmp_path, bad):
    volume = qsm_volume()
    volume.array[1, 2, 3] = bad
    with pytest.raises(QSMInputError, match="1 NaN or infinite voxels"):
        export_qsm_dicom(volume, tmp_path / "dicom")
    assert not (tmp_path / "dicom").exists()


def test_output_folder_must_be_new_or_empty(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "IM00001.dcm").write_bytes(b"old")
    with pytest.raises(QSMInputError, match="is not empty"):
        export_qsm_dicom(qsm_volume(), tmp_path / "used")
    (tmp_path / "file").write_text("x")
    with pytest.raises(QSMInputError, match="is a file"):
        export_qsm_dicom(qsm_volume(), tmp_path / "file")
    assert (tmp_path / "used" / "IM00001.dcm").read_bytes() == b"old"


def test_missing_pydicom_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # what 'import pydicom' meets when it is not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'qsmdip\[dicom\]'"):
        export_qsm_dicom(qsm_volume(), tmp_path / "dicom")
