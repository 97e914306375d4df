"""File IO: axis order, geometry round trips, B0 direction from the file, refusal of unusable files."""
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from qsmdip.errors import QSMInputError
from qsmdip.io import EchoSeries, Volume, check_output_path, read_echoes, read_volume, volume_like, write_volume

SHAPE = (7, 9, 11)  # [i, j, k], deliberately non-cubic
SPACING = (0.7, 1.1, 2.3)
ORIGIN = (-90.5, 12.25, 33.1)


def rotation(axis, degrees):
    """Rotation matrix about ``axis`` (Rodrigues' formula)."""
    u = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    t = math.radians(degrees)
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return math.cos(t) * np.eye(3) + math.sin(t) * cross + (1 - math.cos(t)) * np.outer(u, u)


OBLIQUE = rotation((1, 2, 3), 37)


def random_field(seed=0):
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


@pytest.mark.parametrize("suffix, tol", [(".nii.gz", 1e-5), (".nrrd", 1e-12)])
def test_round_trip_keeps_values_axis_order_and_geometry(tmp_path, suffix, tol):
    # NIfTI headers store geometry as float32, hence the looser tolerance there.
    array = random_field()
    path = write_volume(tmp_path / f"field{suffix}", array, spacing_mm=SPACING, origin=ORIGIN, direction=OBLIQUE)
    volume = read_volume(path)
    assert volume.shape == SHAPE
    assert np.array_equal(volume.array, array)
    np.testing.assert_allclose(volume.spacing_mm, SPACING, rtol=0, atol=tol)
    np.testing.assert_allclose(volume.origin, ORIGIN, rtol=0, atol=tol * 100)
    np.testing.assert_allclose(volume.direction, OBLIQUE, rtol=0, atol=tol)

    image = sitk.ReadImage(str(path))
    assert image.GetSize() == SHAPE
    for index in [(0, 0, 0), (6, 0, 0), (0, 8, 0), (0, 0, 10), (3, 5, 7), (6, 8, 10)]:
        assert image.GetPixel(*index) == pytest.approx(float(array[index]))


def test_reading_follows_itk_index_order(tmp_path):
    # An image built directly with SimpleITK, so the check does not rely on write_volume.
    image = sitk.Image(list(SHAPE), sitk.sitkInt16)
    image.SetPixel(6, 1, 2, 7)
    image.SetPixel(1, 8, 3, -3)
    image.SetSpacing(SPACING)
    sitk.WriteImage(image, str(tmp_path / "label.nrrd"))
    volume = read_volume(tmp_path / "label.nrrd")
    assert volume.array[6, 1, 2] == 7 and volume.array[1, 8, 3] == -3
    assert np.count_nonzero(volume.array) == 2
    assert volume.spacing_mm == pytest.approx(SPACING)


def test_write_as_float32_with_geometry_of_like(tmp_path):
    like = Volume(random_field(), SPACING, ORIGIN, OBLIQUE)
    labels = np.arange(np.prod(SHAPE), dtype=np.int64).reshape(SHAPE)
    path = write_volume(tmp_path / "deep" / "er" / "qsm.nrrd", labels, like)
    image = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkFloat32
    back = read_volume(path)
    assert back.same_geometry(like, tol=1e-9)
    assert np.array_equal(back.array, labels.astype(np.float32))


def test_keywords_override_like(tmp_path):
    like = Volume(random_field(), SPACING, ORIGIN, OBLIQUE)
    back = read_volume(write_volume(tmp_path / "x.nrrd", like.array, like, origin=(1.0, 2.0, 3.0)))
    assert back.origin == pytest.approx((1.0, 2.0, 3.0))
    assert back.spacing_mm == pytest.approx(SPACING)


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "snap.nii.gz"
    write_volume(path, random_field(0))
    write_volume(path, random_field(1))  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap.nii.gz"]
    assert np.array_equal(read_volume(path).array, random_field(1))


def test_write_refuses_detached_header_and_wrong_shape(tmp_path):
    with pytest.raises(QSMInputError, match="nhdr"):
        write_volume(tmp_path / "x.nhdr", random_field())
    like = Volume(np.zeros((4, 4, 4)))
    with pytest.raises(QSMInputError, match=r"\(7, 9, 11\)"):
        write_volume(tmp_path / "x.nrrd", random_field(), like)
    assert list(tmp_path.iterdir()) == []


def test_b0_dir_of_axial_image_is_along_k():
    assert Volume(np.zeros(SHAPE)).b0_dir() == pytest.approx((0.0, 0.0, 1.0))
    flipped = np.diag([1.0, 1.0, -1.0])  # k runs inferior
    assert Volume(np.zeros(SHAPE), direction=flipped).b0_dir() == pytest.approx((0.0, 0.0, -1.0))


def test_b0_dir_of_image_tilted_30_degrees_about_x(tmp_path):
    tilt = rotation((1, 0, 0), 30)
    volume = read_volume(write_volume(tmp_path / "t.nrrd", random_field(), direction=tilt))
    # B0 (world superior) seen from the voxel axes: tilt.T @ (0, 0, 1) = (0, sin 30, cos 30).
    assert volume.b0_dir() == pytest.approx((0.0, 0.5, math.sqrt(3) / 2), abs=1e-9)


def test_4d_with_one_frame_is_squeezed(tmp_path):
    frame = sitk.GetImageFromArray(random_field().transpose(2, 1, 0))
    frame.SetSpacing(SPACING)
    frame.SetOrigin(ORIGIN)
    sitk.WriteImage(sitk.JoinSeries([frame]), str(tmp_path / "one.nrrd"))
    assert sitk.ReadImage(str(tmp_path / "one.nrrd")).GetDimension() == 4
    volume = read_volume(tmp_path / "one.nrrd")
    assert np.array_equal(volume.array, random_field())
    assert volume.spacing_mm == pytest.approx(SPACING)
    assert volume.origin == pytest.approx(ORIGIN)


def test_4d_series_is_refused(tmp_path):
    frame = sitk.GetImageFromArray(random_field().transpose(2, 1, 0))
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(tmp_path / "echoes.nii.gz"))
    with pytest.raises(QSMInputError, match=r"echoes\.nii\.gz is 4D .*pick one echo"):
        read_volume(tmp_path / "echoes.nii.gz")


def echo_frames(count):
    """One SimpleITK image per echo on the oblique grid, each with its own values."""
    frames = []
    for echo in range(count):
        frame = sitk.GetImageFromArray(np.abs(random_field(echo)).transpose(2, 1, 0))
        frame.SetSpacing(SPACING)
        frame.SetOrigin(ORIGIN)
        frame.SetDirection(tuple(OBLIQUE.ravel()))
        frames.append(frame)
    return frames


@pytest.mark.parametrize("suffix, tol", [(".nii.gz", 1e-5), (".nrrd", 1e-12)])
def test_4d_magnitude_reads_as_echoes_on_the_3d_grid(tmp_path, suffix, tol):
    path = tmp_path / f"magnitude{suffix}"
    sitk.WriteImage(sitk.JoinSeries(echo_frames(3)), str(path))
    series = read_echoes(path)
    assert isinstance(series, EchoSeries) and series.echoes == 3 and series.shape == SHAPE
    for echo in range(3):
        assert np.array_equal(series.array[..., echo], np.abs(random_field(echo)))
    np.testing.assert_allclose(series.spacing_mm, SPACING, rtol=0, atol=tol)
    np.testing.assert_allclose(series.origin, ORIGIN, rtol=0, atol=tol * 100)
    np.testing.assert_allclose(series.direction, OBLIQUE, rtol=0, atol=tol)
    grid = series.echo(1)
    assert isinstance(grid, Volume) and np.array_equal(grid.array, np.abs(random_field(1)))
    # the field, mask and reference reader still refuses the same file
    with pytest.raises(QSMInputError, match="is 4D"):
        read_volume(path)


def test_3d_magnitude_reads_as_one_echo(tmp_path):
    array = np.abs(random_field())
    path = write_volume(tmp_path / "magnitude.nrrd", array, spacing_mm=SPACING, origin=ORIGIN, direction=OBLIQUE)
    series = read_echoes(path)
    assert series.echoes == 1 and np.array_equal(series.array[..., 0], array)
    assert series.echo(0).same_geometry(read_volume(path), tol=1e-9)


def test_nrrd_with_a_list_axis_of_echoes_reads_as_echoes(tmp_path):
    # 3D space plus a non-spatial fourth axis, as NRRD writers record echoes: ITK reads it as components.
    data = np.arange(np.prod(SHAPE) * 2, dtype=np.float32)   # file order: i fastest, echo slowest
    header = ("NRRD0004\ntype: float\ndimension: 4\nspace: left-posterior-superior\n"
              f"sizes: {SHAPE[0]} {SHAPE[1]} {SHAPE[2]} 2\n"
              f"space directions: ({SPACING[0]},0,0) (0,{SPACING[1]},0) (0,0,{SPACING[2]}) none\n"
              "kinds: domain domain domain list\nendian: little\nencoding: raw\n"
              f"space origin: ({ORIGIN[0]},{ORIGIN[1]},{ORIGIN[2]})\n\n")
    path = tmp_path / "echoes.nrrd"
    path.write_bytes(header.encode() + data.astype("<f4").tobytes())
    series = read_echoes(path)
    expected = data.reshape(2, SHAPE[2], SHAPE[1], SHAPE[0]).transpose(3, 2, 1, 0)
    assert series.echoes == 2 and np.array_equal(series.array, expected)
    assert series.spacing_mm == pytest.approx(SPACING) and series.origin == pytest.approx(ORIGIN)


def test_read_echoes_refuses_what_read_volume_refuses(tmp_path):
    with pytest.raises(QSMInputError, match="no such file"):
        read_echoes(tmp_path / "nothere.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((5, 6), np.float32)), str(tmp_path / "slice.nrrd"))
    with pytest.raises(QSMInputError, match=r"slice\.nrrd is 2D .*4D one with echoes"):
        read_echoes(tmp_path / "slice.nrrd")
    # MetaImage stores a complex image as two components per voxel: not echoes
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((5, 6, 7), np.complex64)), str(tmp_path / "cplx.mha"))
    with pytest.raises(QSMInputError, match=r"cplx\.mha has 2 components per voxel"):
        read_echoes(tmp_path / "cplx.mha")
    with pytest.raises(QSMInputError, match="4D"):
        EchoSeries(np.zeros(SHAPE))


def test_2d_image_is_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((5, 6), np.float32)), str(tmp_path / "slice.nrrd"))
    with pytest.raises(QSMInputError, match=r"slice\.nrrd is 2D"):
        read_volume(tmp_path / "slice.nrrd")


def test_vector_and_complex_images_are_refused(tmp_path):
    vector = sitk.GetImageFromArray(np.ones((5, 6, 7, 3), np.float32), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "vec.nrrd"))
    with pytest.raises(QSMInputError, match="3 components"):
        read_volume(tmp_path / "vec.nrrd")
    complex_image = sitk.GetImageFromArray(np.ones((5, 6, 7), np.complex64))
    sitk.WriteImage(complex_image, str(tmp_path / "cplx.mha"))
    with pytest.raises(QSMInputError, match="complex"):
        read_volume(tmp_path / "cplx.mha")


def test_missing_and_garbage_files_are_refused(tmp_path):
    with pytest.raises(QSMInputError, match="no such file: .*nothere.nii.gz"):
        read_volume(tmp_path / "nothere.nii.gz")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not an image at all" * 20)
    with pytest.raises(QSMInputError, match="cannot read .*garbage.nii.gz"):
        read_volume(garbage)
    with pytest.raises(QSMInputError, match="folder"):
        read_volume(tmp_path)


def test_geometry_difference_names_what_differs():
    a = Volume(np.zeros(SHAPE), SPACING, ORIGIN, OBLIQUE)
    assert a.same_geometry(volume_like(a, np.ones(SHAPE)))
    moved = Volume(np.zeros(SHAPE), SPACING, (ORIGIN[0] + 0.5, ORIGIN[1], ORIGIN[2]), OBLIQUE)
    assert a.geometry_difference(moved).startswith("origin")
    assert Volume(np.zeros(SHAPE), (0.7, 1.1, 2.0), ORIGIN, OBLIQUE).geometry_difference(a).startswith("spacing")
    assert Volume(np.zeros(SHAPE), SPACING, ORIGIN).geometry_difference(a).startswith("direction")
    assert not a.same_geometry(Volume(np.zeros((7, 9, 12)), SPACING, ORIGIN, OBLIQUE))
    tiny = Volume(np.zeros(SHAPE), SPACING, (ORIGIN[0] + 1e-6, ORIGIN[1], ORIGIN[2]), OBLIQUE)
    assert a.same_geometry(tiny)  # float32 header round-off is not a different grid


def test_volume_refuses_bad_arrays_and_geometry():
    with pytest.raises(QSMInputError, match="3D"):
        Volume(np.zeros((4, 4)))
    with pytest.raises(QSMInputError, match="spacing"):
        Volume(np.zeros((4, 4, 4)), spacing_mm=(1.0, 0.0, 1.0))
    with pytest.raises(QSMInputError, match="orthonormal"):
        Volume(np.zeros((4, 4, 4)), direction=np.array([[1, 0.3, 0], [0, 1, 0], [0, 0, 1]]))
    with pytest.raises(QSMInputError, match=r"\(4, 4, 4\)"):
        volume_like(Volume(np.zeros((4, 4, 4))), np.zeros((4, 4, 5)))


def test_nifti_keeps_nan_and_inf(tmp_path):
    """ITK's own NIfTI reader turns NaN and Inf into 0; the library reads NIfTI voxels with nibabel."""
    import nibabel

    array = random_field()
    array[1, 2, 3], array[4, 5, 6], array[6, 0, 10] = np.nan, np.inf, -np.inf
    for suffix in (".nii.gz", ".nii"):
        nibabel.save(nibabel.Nifti1Image(array, np.diag([0.7, 1.1, 2.3, 1.0])), str(tmp_path / f"f{suffix}"))
        volume = read_volume(tmp_path / f"f{suffix}")
        assert np.isnan(volume.array[1, 2, 3]) and volume.array[4, 5, 6] == np.inf and volume.array[6, 0, 10] == -np.inf
        finite = np.isfinite(array)
        assert np.array_equal(volume.array[finite], array[finite])
        assert volume.spacing_mm == pytest.approx((0.7, 1.1, 2.3))


def test_nifti_scaling_matches_itk(tmp_path):
    """Integer voxels with scl_slope / scl_inter are scaled as ITK scales them."""
    import nibabel

    raw = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 300 - 150).astype(np.int16)
    image = nibabel.Nifti1Image(raw, np.eye(4))
    image.header.set_slope_inter(0.5, 3.0)
    nibabel.save(image, str(tmp_path / "scaled.nii.gz"))
    volume = read_volume(tmp_path / "scaled.nii.gz")
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "scaled.nii.gz"))).transpose(2, 1, 0)
    np.testing.assert_allclose(volume.array, raw * 0.5 + 3.0)
    np.testing.assert_allclose(volume.array, itk)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("reader", [read_volume, read_echoes])
def test_truncated_files_are_refused(tmp_path, suffix, reader):
    path = write_volume(tmp_path / f"field{suffix}", random_field())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(QSMInputError, match=rf"cannot read .*field{suffix}") as error:
        reader(path)
    assert "\n" not in str(error.value)


def test_formats_that_cannot_prove_a_complete_read_are_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(random_field()), str(tmp_path / "field.vtk"))
    with pytest.raises(QSMInputError, match=r"field\.vtk: QSMDIP reads NIfTI .*, NRRD .* and MetaImage"):
        read_volume(tmp_path / "field.vtk")


def test_check_output_path_refuses_before_any_work(tmp_path):
    (tmp_path / "x.nii.gz").mkdir()
    (tmp_path / "plain.txt").write_text("a file")
    assert check_output_path(tmp_path / "new" / "deeper" / "q.nii.gz") == tmp_path / "new" / "deeper" / "q.nii.gz"
    assert not (tmp_path / "new").exists()  # checked, not created
    for path, message in ((tmp_path / "q.png", "use one of"), (tmp_path / "x.nii.gz", "it is a folder"),
                          (tmp_path / "plain.txt" / "q.nii.gz", "is a file, not a folder"),
                          (tmp_path / "q.Nii.gz", "lower case")):
        with pytest.raises(QSMInputError, match=message):
            check_output_path(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt", "x.nii.gz"]  # no probe file left


def test_upper_case_suffix_is_written_in_that_format(tmp_path):
    path = write_volume(tmp_path / "MAP.NRRD", random_field())
    assert path.read_bytes()[:4] == b"NRRD"
    assert np.array_equal(read_volume(path).array, random_field())


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder nobody may write to")
def test_check_output_path_refuses_a_folder_that_takes_no_files():
    with pytest.raises(QSMInputError, match="the folder /proc does not accept new files"):
        check_output_path("/proc/qsmdip-test/qsm.nii.gz")
