"""Reading 2D (HA)ADF-STEM images with their pixel size, for image restoration (``method=cgrdn``).

Formats read by :func:`load_image` (chosen by suffix, then by content for HDF5):

* ``.npy`` with a YAML beside it (``<stem>.yaml`` / ``<stem>.yml``) or given (``calibration=``) that holds
  ``pixel_size_A``, the convention of :func:`evaluation.io.load_4dstem` for 4D scans; the 4D calibration
  keys (``energy_eV``, ...) may stand in the same file and are ignored, any other key is an error;
* ``.tif`` / ``.tiff`` (tifffile, a dependency of scikit-image; PIL where tifffile is missing): the pixel
  size from the YAML beside it when there is one, else from the ImageJ unit with the X/Y resolution tags,
  or from resolution tags in centimetres;
* ``deepstem.image/1`` HDF5 (the HAADF generator's shards, :data:`datagen.store.IMAGE`: dataset ``image``
  (N, H, W), dataset ``pixel_size_A`` (N,)); a file of several images needs ``index``;
  ``deepstem.restored/1`` (what ``method=cgrdn`` writes, :data:`datagen.store.RESTORED`) reads back too;
* RosettaSciIO formats (Digital Micrograph ``.dm3`` / ``.dm4``, Velox / FEI ``.emd``, TIA ``.ser``) when
  the ``io`` extra is installed (``pip install 'deepstem[io]'``): the 2D signals of the file; several need
  ``index`` unless exactly one is titled HAADF.

Conventions: an image is a 2D array indexed ``[row, column]`` as stored in the file: rows are scan lines
(slow scan, ``y``), columns positions along a line (fast scan, ``x``), the layout of
:mod:`training.distortions` that the restoration networks were trained on. ``pixel_size_A`` is
``(along rows, along columns)`` in Angstrom (a single number in a file means square pixels). Intensities
are kept in the file's units (counts, detector units, fractions of the beam) as float64. ``overrides``
(``pixel_size_A=``) replace the file's value. Errors are :class:`ImageError` with one line naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from datagen import store
from evaluation.io import _LENGTH_TO_A, CALIBRATION_KEYS

__all__ = ["RSCIIO_IMAGE_SUFFIXES", "Image2D", "ImageError", "image_input_message", "load_image"]

#: suffixes read through RosettaSciIO -> its reader module
RSCIIO_IMAGE_SUFFIXES = {
    ".dm3": "rsciio.digitalmicrograph",
    ".dm4": "rsciio.digitalmicrograph",
    ".emd": "rsciio.emd",
    ".ser": "rsciio.tia",
}
TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
#: keys a pixel-size YAML may hold: ``pixel_size_A`` and, ignored, the 4D-scan calibration keys
_YAML_KEYS = ("pixel_size_A", *CALIBRATION_KEYS, "k_pixel_mrad", "scan_rotation_deg", "scan_transpose")
_YAML_KEYS += ("Cs_A", "defocus_A")
_LENGTH_UNITS_TO_A = {**_LENGTH_TO_A, "micron": 1e4, "microns": 1e4, "\\u00b5m": 1e4, "cm": 1e8, "mm": 1e7}


class ImageError(ValueError):
    """An image cannot be read or is not a usable 2D image; the message is one line naming the file."""


@dataclass
class Image2D:
    """A 2D image ``data`` (rows, columns), float64 in the file's units, and its pixel size (Angstrom per
    pixel along rows and columns); ``source_format`` names the reader."""

    data: np.ndarray
    pixel_size_A: tuple[float, float]
    path: Path
    source_format: str

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.data.shape[0]), int(self.data.shape[1])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _pixel_pair(value: Any, where: str) -> tuple[float, float]:
    """``pixel_size_A`` as ``(rows, columns)``: one positive number or two."""
    try:
        array = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ImageError(f"{where}: pixel_size_A must be a number or two numbers, got {value!r}") from None
    if array.size == 1:
        array = np.repeat(array, 2)
    if array.size != 2 or not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ImageError(
            f"{where}: pixel_size_A must be one or two positive numbers (Angstrom), got {value!r}"
        )
    return float(array[0]), float(array[1])


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ImageError(f"{path}: not a readable YAML file: {_first_line(err)}") from None
    if not isinstance(content, Mapping):
        raise ImageError(f"{path}: the pixel-size YAML must be a mapping of keys to values")
    unknown = sorted(set(content) - set(_YAML_KEYS))
    if unknown:
        raise ImageError(f"{path}: unknown key(s) {unknown}; an image's YAML holds pixel_size_A (Angstrom)")
    return dict(content)


def _yaml_beside(path: Path, calibration: str | os.PathLike | None) -> tuple[dict[str, Any], Path | None]:
    """The content of ``calibration`` or of ``<stem>.yaml`` / ``<stem>.yml`` beside ``path`` (and which)."""
    if calibration is not None:
        return _read_yaml(Path(calibration)), Path(calibration)
    for candidate in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if candidate.is_file():
            return _read_yaml(candidate), candidate
    return {}, None


def _scan_error(path: Path, what: str) -> ImageError:
    return ImageError(
        f"{path}: {what}, not an image: method=cgrdn restores 2D images; reconstruct scans with a 4D "
        "method (ssb, epie, icom, ricom, vadf, airpi, chang_unet, ptychonn)"
    )


def _check_2d(data: np.ndarray, path: Path) -> np.ndarray:
    shape = tuple(data.shape)
    if len(shape) == 4:
        raise _scan_error(path, f"a 4D-STEM scan (shape {shape})")
    if len(shape) == 3 and shape[-1] in (3, 4):
        raise ImageError(f"{path}: a colour image (shape {shape}); give a single-channel (grey) image")
    if len(shape) != 2:
        raise ImageError(f"{path}: expected a 2D image (rows, columns), got shape {shape}")
    if min(shape) < 2:
        raise ImageError(f"{path}: image of shape {shape} is too small (at least 2 x 2 pixels)")
    array = np.asarray(data, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ImageError(f"{path}: the image holds NaN or inf")
    return array


# --------------------------------------------------------------------------------------------------
# .tif


def _tiff_pixel_size(path: Path) -> tuple[float, float] | None:
    """Pixel size (Angstrom, rows then columns) from the TIFF tags, or None when they do not give one."""
    try:
        import tifffile
    except ImportError:
        return None
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tags = page.tags

        def resolution(name: str) -> float | None:  # pixels per unit
            tag = tags.get(name)
            if tag is None:
                return None
            value = tag.value
            number = value[0] / value[1] if isinstance(value, tuple) and value[1] else value
            return float(number) if number else None

        x_res, y_res = resolution("XResolution"), resolution("YResolution")
        if x_res is None:
            return None
        y_res = y_res or x_res
        unit_A = None
        imagej = tif.imagej_metadata or {}
        unit = str(imagej.get("unit", "")).strip().lower().replace("µ", "u").replace("μ", "u")
        if unit:
            unit_A = _LENGTH_UNITS_TO_A.get(unit)
        else:
            unit_tag = tags.get("ResolutionUnit")
            if unit_tag is not None and int(unit_tag.value) == 3:  # centimetre; inch (2) is a print size
                unit_A = 1e8
        if unit_A is None:
            return None
        return unit_A / y_res, unit_A / x_res


def _load_tiff(path: Path) -> tuple[np.ndarray, tuple[float, float] | None, str]:
    try:
        import tifffile

        try:
            data = tifffile.imread(path)
        except Exception as err:  # tifffile raises many kinds for a file that is not a TIFF
            raise ImageError(f"{path}: not a readable TIFF file: {_first_line(err)}") from None
        return np.asarray(data), _tiff_pixel_size(path), "TIFF"
    except ImportError:
        pass
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as handle:
            return np.asarray(handle), None, "TIFF (PIL)"
    except (OSError, UnidentifiedImageError) as err:
        raise ImageError(f"{path}: not a readable TIFF file: {_first_line(err)}") from None


# --------------------------------------------------------------------------------------------------
# deepstem.image/1, deepstem.restored/1


def _load_deepstem_image(
    path: Path, schema: str, index: int | None
) -> tuple[np.ndarray, tuple[float, float] | None, str]:
    if schema == store.SCAN4D.id:
        raise _scan_error(path, f"a 4D-STEM scan ({schema})")
    if schema not in (store.IMAGE.id, store.RESTORED.id):
        raise ImageError(f"{path}: a {schema} file, not an image ({store.IMAGE.id} or {store.RESTORED.id})")
    try:
        with store.open_checked(path, schema) as handle:
            if schema == store.RESTORED.id:
                return handle["image"][()], _pixel_pair(handle.attrs["pixel_size_A"], str(path)), schema
            images = handle["image"]
            count = int(images.shape[0]) if images.ndim == 3 else 0
            if images.ndim != 3:
                raise ImageError(f"{path}: {schema} dataset 'image' must be (N, H, W), got {images.shape}")
            if index is None:
                if count != 1:
                    raise ImageError(
                        f"{path}: holds {count} images: choose one with cgrdn.index=0..{count - 1}"
                    )
                index = 0
            if not 0 <= int(index) < count:
                raise ImageError(f"{path}: index {index} out of range: the file holds {count} images")
            pixel = np.asarray(handle["pixel_size_A"][int(index)])
            return images[int(index)], _pixel_pair(pixel, str(path)), f"{schema}[{int(index)}]"
    except store.StoreError as err:
        raise ImageError(str(err)) from None


def _hdf5_schema(path: Path) -> str | None:
    """The ``schema`` attribute of an HDF5 file (None without one); ImageError for unreadable files."""
    try:
        with h5py.File(path, "r") as handle:
            value = handle.attrs.get("schema")
            emd = handle.attrs.get("emd_group_type")
    except OSError as err:
        raise ImageError(f"{path}: not a readable HDF5 file: {_first_line(err)}") from None
    if value is None:
        if emd is not None and str(emd.decode() if isinstance(emd, bytes) else emd) == "file":
            return "EMD 1.0"
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------------------------------
# RosettaSciIO (.dm3, .dm4, .emd, .ser)


def _title(signal: Mapping[str, Any]) -> str:
    return str(signal.get("metadata", {}).get("General", {}).get("title", ""))


def _load_rsciio(path: Path, index: int | None) -> tuple[np.ndarray, tuple[float, float] | None, str]:
    import importlib

    suffix = path.suffix.lower()
    module = RSCIIO_IMAGE_SUFFIXES[suffix]
    try:
        file_reader = importlib.import_module(module).file_reader
    except ImportError:
        raise ImageError(
            f"{path}: reading {suffix} files needs RosettaSciIO, which is not installed: install the io "
            "extra (pip install 'deepstem[io]')"
        ) from None
    try:
        signals = list(file_reader(str(path), lazy=False))
    except Exception as err:  # rsciio raises many kinds
        raise ImageError(f"{path}: RosettaSciIO could not read it: {_first_line(err)}") from None
    images = [s for s in signals if np.ndim(s["data"]) == 2]
    if not images:
        shapes = [tuple(np.shape(s["data"])) for s in signals]
        if any(len(shape) == 4 for shape in shapes):
            raise _scan_error(path, f"a 4D-STEM scan (shape {next(s for s in shapes if len(s) == 4)})")
        raise ImageError(f"{path}: no 2D image in the file (datasets of shapes {shapes})")
    if index is not None:
        if not 0 <= int(index) < len(images):
            raise ImageError(f"{path}: index {index} out of range: the file holds {len(images)} 2D images")
        signal = images[int(index)]
    elif len(images) == 1:
        signal = images[0]
    else:
        haadf = [s for s in images if "haadf" in _title(s).lower()]
        if len(haadf) != 1:
            titles = ", ".join(f"{i}: {_title(s) or '?'}" for i, s in enumerate(images))
            raise ImageError(
                f"{path}: holds {len(images)} 2D images ({titles}): choose one with cgrdn.index=N"
            )
        signal = haadf[0]
    pixel = None
    axes = list(signal.get("axes", []))
    if len(axes) == 2:
        units = [str(a.get("units", "")).strip().lower().replace("µ", "u").replace("μ", "u") for a in axes]
        if all(u in _LENGTH_UNITS_TO_A for u in units):
            pixel = tuple(float(a["scale"]) * _LENGTH_UNITS_TO_A[u] for a, u in zip(axes, units, strict=True))
    return np.asarray(signal["data"]), pixel, f"RosettaSciIO {suffix}"  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------


def _suffix_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return "npy"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    if suffix == ".emd":
        return "emd"
    if suffix in RSCIIO_IMAGE_SUFFIXES:
        return "rsciio"
    return "unknown"


def load_image(
    path: str | os.PathLike,
    calibration: str | os.PathLike | None = None,
    *,
    index: int | None = None,
    pixel_size_A: float | tuple[float, float] | None = None,
) -> Image2D:
    """Read a 2D image and its pixel size (see the module docstring for formats and conventions).

    ``calibration`` is a YAML file with ``pixel_size_A`` (default: the one beside the file); ``index`` picks
    one image of a file that holds several; ``pixel_size_A`` overrides the file's value. A 4D scan, a
    missing pixel size or an unreadable file raise :class:`ImageError` with one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    kind = _suffix_kind(path)
    found_pixel: tuple[float, float] | None = None
    if kind == "npy":
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ImageError(f"{path}: not a readable .npy file: {_first_line(err)}") from None
        source = ".npy"
    elif kind == "tiff":
        data, found_pixel, source = _load_tiff(path)
    elif kind in ("hdf5", "emd"):
        schema = _hdf5_schema(path) if h5py.is_hdf5(path) else None
        if schema == "EMD 1.0":
            raise _scan_error(path, "an EMD 1.0 file (py4DSTEM): a 4D-STEM scan")
        if schema is not None:
            data, found_pixel, source = _load_deepstem_image(path, schema, index)
        elif kind == "emd":
            data, found_pixel, source = _load_rsciio(path, index)  # Velox / FEI EMD
        else:
            raise ImageError(f"{path}: an HDF5 file without a deepstem schema, not a {store.IMAGE.id} image")
    elif kind == "rsciio":
        data, found_pixel, source = _load_rsciio(path, index)
    else:
        raise ImageError(
            f"{path}: unknown image format {path.suffix!r}; readable: .npy + YAML (pixel_size_A), .tif, "
            f"{store.IMAGE.id} .h5, and with the io extra .dm3, .dm4, .emd, .ser"
        )
    image = _check_2d(data, path)
    pixel: tuple[float, float] | None
    if pixel_size_A is not None:
        pixel = _pixel_pair(pixel_size_A, f"{path}: pixel_size_A override")
    else:
        values, yaml_path = _yaml_beside(path, calibration)
        if "pixel_size_A" in values:
            pixel = _pixel_pair(values["pixel_size_A"], str(yaml_path))
        elif yaml_path is not None and (kind == "npy" or calibration is not None):
            raise ImageError(f"{yaml_path}: no pixel_size_A (Angstrom per pixel) for the image {path.name}")
        else:
            pixel = found_pixel
    if pixel is None:
        raise ImageError(
            f"{path}: no pixel size; write {path.with_suffix('.yaml').name} beside it with pixel_size_A: "
            "<Angstrom per pixel>, or pass calibration=FILE.yaml or cgrdn.pixel_size_A=..."
        )
    return Image2D(data=image, pixel_size_A=pixel, path=path, source_format=source)


def image_input_message(path: str | os.PathLike, method: str) -> str | None:
    """For a 4D method: the one-line error when ``path`` is a 2D image (by suffix, ``.npy`` header or HDF5
    schema), None when it may be a scan (the 4D reader then has the last word)."""
    path = Path(path)
    if not path.is_file():
        return None
    kind = _suffix_kind(path)
    what = None
    if kind in ("tiff",) or path.suffix.lower() in (".dm3", ".dm4"):
        what = f"a {path.suffix.lower()} image"
    elif kind == "npy":
        try:
            ndim = np.load(path, mmap_mode="r", allow_pickle=False).ndim
        except (OSError, ValueError):
            return None
        what = "a 2D array" if ndim == 2 else None
    elif kind in ("hdf5", "emd") and h5py.is_hdf5(path):
        try:
            schema = _hdf5_schema(path)
        except ImageError:
            return None
        what = f"a {schema} image" if schema in (store.IMAGE.id, store.RESTORED.id) else None
    if what is None:
        return None
    return (
        f"{path}: {what}, not a 4D-STEM scan: method={method} needs a 4D scan (Rx, Ry, Kx, Ky); "
        "restore 2D images with method=cgrdn"
    )
