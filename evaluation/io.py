"""Reading 4D-STEM scans with their calibration (and writing EMD 1.0 for interchange).

The ``deepstem.4dstem/1`` writer :func:`save_4dstem` and :class:`ScanError` live in
:mod:`datagen.scan_store` (below datagen and evaluation, which both write scans); they are re-exported
here, so ``from evaluation.io import save_4dstem`` keeps working.

Formats read by :func:`load_4dstem` (chosen by content, then by suffix):

* ``deepstem.4dstem/1`` HDF5 files (``.h5``, ``.hdf5``; file contract 3),
* EMD 1.0 HDF5 files as py4DSTEM / emdfile write them (``.emd``, ``.h5``): the first 4D ``array`` node,
  calibration from a ``calibration`` metadata group (``R_pixel_size``/``R_pixel_units``,
  ``Q_pixel_size``/``Q_pixel_units``, ``QR_rotation_degrees``, ``QR_flip``, ``probe_semiangle``, energy)
  or from the node's dimension vectors,
* RosettaSciIO formats (Merlin ``.mib``, Velox ``.emd``, ``.blo``) when ``rsciio`` is installed,
* ``.npy`` with a calibration YAML (``calibration=`` or ``<stem>.yaml`` / ``<stem>.yml`` beside it),
* through LiberTEM's readers (the ``libertem`` extra), with the calibration YAML as for ``.npy``: headerless
  ``.raw`` (the YAML gives ``raw_nav_shape: [Rx, Ry]``, ``raw_sig_shape: [Kx, Ky]`` and ``raw_dtype``, e.g.
  ``float32`` or ``>u2``; C order, no headers; the file size must match), EMPAD ``.xml`` (with its ``.raw``
  beside it), and untested here: Norpix ``.seq``, TVIPS ``.tvips``, PNCCD ``.hdr`` (frms6), K2IS ``.gtg``,
  TIA ``.ser``, ``.mrc`` (``raw_nav_shape`` reshapes a flat series into the scan where the reader takes a
  ``nav_shape``). ``data`` is then a :class:`LiberTEMArray`: read in blocks by LiberTEM's ``PickUDF`` on an
  inline context, and ``engine=libertem`` hands LiberTEM the file itself.

Calibration (units: eV, mrad, Angstrom, 1/Angstrom): ``energy_eV``, ``semiangle_mrad``, ``scan_step_A``
(one value or x, y), ``k_pixel_invA`` (or ``k_pixel_mrad``), optional ``scan_rotation_deg`` (default 0),
``scan_transpose`` (default false), ``Cs_A``, ``defocus_A``. A missing required value is an error that
names it, never a default; keyword overrides fill or replace values from the file.

Data stay on disk: HDF5 datasets and ``np.memmap`` are returned lazily and every consumer reads them in
blocks of scan rows, so scans larger than memory work. Arrays are indexed ``[Rx, Ry, Kx, Ky]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml
from tqdm.auto import tqdm

from datagen import store
from datagen.scan_store import ScanError, _pair, _positive, save_4dstem
from physics import wavelength

__all__ = [
    "CALIBRATION_KEYS",
    "LIBERTEM_SUFFIXES",
    "RAW_KEYS",
    "LiberTEMArray",
    "Scan4D",
    "ScanError",
    "check_scan",
    "load_4dstem",
    "save_4dstem",
    "save_emd",
    "sparser_scan",
]

CALIBRATION_KEYS: dict[str, str] = {
    "energy_eV": "beam energy, eV",
    "semiangle_mrad": "convergence semi-angle, mrad",
    "scan_step_A": "scan step, Angstrom",
    "k_pixel_invA": "detector pixel, 1/Angstrom (or k_pixel_mrad)",
}
_OPTIONAL = ("scan_rotation_deg", "scan_transpose", "Cs_A", "defocus_A")
#: calibration-YAML keys of files read through LiberTEM (shape and type of headerless data)
RAW_KEYS: dict[str, str] = {
    "raw_nav_shape": "scan shape [Rx, Ry]",
    "raw_sig_shape": "pattern shape [Kx, Ky]",
    "raw_dtype": "data type on disk, e.g. float32, uint16, >u2",
}
#: suffix -> LiberTEM reader of the formats read through LiberTEM (``load_4dstem``)
LIBERTEM_SUFFIXES: dict[str, str] = {
    ".raw": "raw",
    ".xml": "empad",
    ".seq": "seq",
    ".tvips": "tvips",
    ".hdr": "frms6",
    ".gtg": "k2is",
    ".ser": "ser",
    ".mrc": "mrc",
}


@dataclass
class Scan4D:
    """A 4D-STEM scan: lazily read ``data`` ``(Rx, Ry, Kx, Ky)`` plus its calibration.

    ``data`` is a NumPy array, ``np.memmap``, ``h5py.Dataset`` or another array-like with ``shape`` and
    slicing (dask for RosettaSciIO); index it by scan rows (``data[i:j]``) to read blocks. Probe position
    ``(i, j)`` is at ``(i * scan_step_A[0], j * scan_step_A[1])``; detector vectors map to scan vectors by
    the optional component swap (``scan_transpose``) and then a rotation by ``scan_rotation_deg``
    (counter-clockwise from +x to +y). Simulated scans carry the true phase (``truth_phase``, rad) with its
    pixel size and the scan position of its pixel (0, 0). Close the file with :meth:`close` or use the scan
    as a context manager.
    """

    data: Any
    energy_eV: float
    semiangle_mrad: float
    scan_step_A: tuple[float, float]
    k_pixel_invA: tuple[float, float]
    scan_rotation_deg: float = 0.0
    scan_transpose: bool = False
    Cs_A: float = 0.0
    defocus_A: float = 0.0
    probe: np.ndarray | None = None
    truth_phase: np.ndarray | None = None
    truth_pixel_size_A: tuple[float, float] | None = None
    truth_origin_A: tuple[float, float] | None = None
    path: Path | None = None
    source_format: str = "array"
    _handle: Any = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def num_positions(self) -> int:
        return self.shape[0] * self.shape[1]

    def calibration(self) -> dict[str, Any]:
        """The calibration as plain values (for YAML or :func:`save_4dstem`)."""
        return {
            "energy_eV": self.energy_eV,
            "semiangle_mrad": self.semiangle_mrad,
            "scan_step_A": list(self.scan_step_A),
            "k_pixel_invA": list(self.k_pixel_invA),
            "scan_rotation_deg": self.scan_rotation_deg,
            "scan_transpose": self.scan_transpose,
            "Cs_A": self.Cs_A,
            "defocus_A": self.defocus_A,
        }

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Scan4D:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _calibrated_scan(
    data: Any, values: Mapping[str, Any], where: str, source_format: str, **extra: Any
) -> Scan4D:
    """Build a :class:`Scan4D` from ``values``, raising one clear error per missing/invalid key."""
    values = {k: v for k, v in values.items() if v is not None}
    if "k_pixel_invA" not in values and "k_pixel_mrad" in values and "energy_eV" in values:
        energy = _positive(values["energy_eV"], "energy_eV", where)
        values["k_pixel_invA"] = (
            np.asarray(values["k_pixel_mrad"], dtype=np.float64) * 1e-3 / wavelength(energy)
        )
    for key, meaning in CALIBRATION_KEYS.items():
        if key not in values:
            raise ScanError(
                f"{where}: missing calibration {key!r} ({meaning}); give it in the file, the "
                f"calibration YAML or as an override"
            )
    return Scan4D(
        data=data,
        energy_eV=_positive(values["energy_eV"], "energy_eV", where),
        semiangle_mrad=_positive(values["semiangle_mrad"], "semiangle_mrad", where),
        scan_step_A=_pair(values["scan_step_A"], "scan_step_A", where),
        k_pixel_invA=_pair(values["k_pixel_invA"], "k_pixel_invA", where),
        scan_rotation_deg=float(values.get("scan_rotation_deg", 0.0)),
        scan_transpose=bool(values.get("scan_transpose", False)),
        Cs_A=float(values.get("Cs_A", 0.0)),
        defocus_A=float(values.get("defocus_A", 0.0)),
        source_format=source_format,
        **extra,
    )


def sparser_scan(scan: Scan4D, stride: int) -> Scan4D:
    """``scan`` at every ``stride``-th probe position along x and y (the step x ``stride``; the first
    position, the calibration and the truth unchanged), read into memory: paper 001's sparse-scan study
    (every second to fourth pattern of one acquisition). ``stride`` 1 returns ``scan`` itself."""
    import dataclasses

    stride = int(stride)
    if stride < 1:
        raise ScanError(f"scan_stride must be a positive integer, got {stride}")
    if stride == 1:
        return scan
    data = np.asarray(scan.data[::stride, ::stride])
    if min(data.shape[:2]) < 3:
        raise ScanError(
            f"scan_stride={stride} leaves {data.shape[0]} x {data.shape[1]} positions (need >= 3 x 3)"
        )
    step = tuple(float(v) * stride for v in scan.scan_step_A)
    return dataclasses.replace(scan, data=data, scan_step_A=step, _handle=None)


def check_scan(scan: Scan4D, progress: bool = True) -> None:
    """Reject scans no method can use: not 4D, fewer than 3 x 3 positions, NaN/inf or negative values.

    Reads the data in blocks of scan rows; raises :class:`ScanError` with one line naming the file.
    """
    where = str(scan.path) if scan.path is not None else "scan"
    shape = tuple(getattr(scan.data, "shape", ()))
    if len(shape) != 4:
        raise ScanError(f"{where}: a 4D-STEM scan needs 4 dimensions (Rx, Ry, Kx, Ky), got shape {shape}")
    if min(shape[:2]) < 3:
        raise ScanError(f"{where}: the scan has {shape[0]}x{shape[1]} positions, at least 3x3 are needed")
    if min(shape[2:]) < 4:
        raise ScanError(f"{where}: diffraction patterns of {shape[2]}x{shape[3]} pixels are too small")
    rows = max(1, int(2**26 // max(1, shape[1] * shape[2] * shape[3] * 4)))
    starts = range(0, shape[0], rows)
    for start in tqdm(starts, desc="checking scan", disable=not progress or len(starts) < 2, leave=False):
        block = np.asarray(scan.data[start : start + rows])
        span = f"scan rows {start}..{min(start + rows, shape[0]) - 1}"
        if block.dtype.kind == "f" and not np.all(np.isfinite(block)):
            raise ScanError(f"{where}: the data contain NaN or inf ({span})")
        if block.dtype.kind in "fi" and block.min() < 0:
            raise ScanError(f"{where}: the data contain negative counts ({span})")
        if block.dtype.kind not in "fiu":
            raise ScanError(f"{where}: data of type {block.dtype} are not counts")


def _read_yaml_calibration(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ScanError(f"{path}: cannot read the calibration YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(content, Mapping):
        raise ScanError(f"{path}: the calibration YAML must be a mapping of keys to values")
    return dict(content)


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        return [v.decode() if isinstance(v, bytes) else v for v in value.tolist()]
    return value


# --------------------------------------------------------------------------------------------------
# deepstem.4dstem/1


def _load_deepstem(path: Path, overrides: Mapping[str, Any]) -> Scan4D:
    try:
        with store.open_checked(path, store.SCAN4D):
            pass
    except store.StoreError as err:
        raise ScanError(str(err)) from None
    handle = h5py.File(path, "r")
    try:
        values = {
            key: _attr(handle.attrs[key]) for key in (*CALIBRATION_KEYS, *_OPTIONAL) if key in handle.attrs
        }
        values.update(overrides)
        extra: dict[str, Any] = {"path": path, "_handle": handle}
        if "probe" in handle:
            extra["probe"] = handle["probe"][()]
        if "truth" in handle:
            truth = handle["truth"]

            def truth_value(key: str, default: Any = None) -> Any:
                if key in truth.attrs:
                    return truth.attrs[key]
                if isinstance(truth.get(key), h5py.Dataset):
                    return truth[key][()]
                return default

            extra["truth_phase"] = truth["phase"][()]
            extra["truth_pixel_size_A"] = _pair(truth_value("pixel_size_A"), "truth pixel_size_A", str(path))
            origin = np.broadcast_to(np.asarray(truth_value("origin_A", (0.0, 0.0)), dtype=np.float64), (2,))
            extra["truth_origin_A"] = (float(origin[0]), float(origin[1]))
        return _calibrated_scan(handle["data"], values, str(path), "deepstem.4dstem/1", **extra)
    except BaseException:
        handle.close()
        raise


# --------------------------------------------------------------------------------------------------
# EMD 1.0 (py4DSTEM / emdfile)

_LENGTH_TO_A = {"a": 1.0, "å": 1.0, "angstrom": 1.0, "nm": 10.0, "pm": 0.01, "um": 1e4, "µm": 1e4}
_INVERSE_LENGTH_TO_INVA = {"a^-1": 1.0, "1/a": 1.0, "å^-1": 1.0, "1/å": 1.0, "nm^-1": 0.1, "1/nm": 0.1}


def _is_emd1(handle: h5py.File) -> bool:
    return (
        _attr(handle.attrs.get("emd_group_type")) == "file" and int(handle.attrs.get("version_major", 0)) >= 1
    )


def _emd_metadata(group: h5py.Group) -> dict[str, Any]:
    values = {key: _attr(value) for key, value in group.attrs.items()}
    for key, item in group.items():
        if isinstance(item, h5py.Dataset):
            values[key] = _attr(item[()])
    return values


def _emd_calibration(handle: h5py.File, array_group: h5py.Group, where: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Group) and name.rsplit("/", 1)[-1] == "calibration":
            found.update(_emd_metadata(item))

    handle.visititems(visit)
    values: dict[str, Any] = {}
    # step from R_pixel_size, or from the first two dimension vectors
    r_size, r_units = found.get("R_pixel_size"), str(found.get("R_pixel_units", "")).lower()
    q_size, q_units = found.get("Q_pixel_size"), str(found.get("Q_pixel_units", "")).lower()
    dims = [array_group.get(f"dim{i}") for i in range(1, 5)]
    if r_size is None and all(d is not None and d.shape[0] > 1 for d in dims[:2]):
        r_size = [float(d[1] - d[0]) for d in dims[:2]]
        r_units = str(_attr(dims[0].attrs.get("units", ""))).lower()
    if q_size is None and all(d is not None and d.shape[0] > 1 for d in dims[2:]):
        q_size = [float(d[1] - d[0]) for d in dims[2:]]
        q_units = str(_attr(dims[2].attrs.get("units", ""))).lower()
    if r_size is not None and r_units in _LENGTH_TO_A:
        values["scan_step_A"] = np.asarray(r_size, dtype=np.float64) * _LENGTH_TO_A[r_units]
    if q_size is not None and q_units in _INVERSE_LENGTH_TO_INVA:
        values["k_pixel_invA"] = np.asarray(q_size, dtype=np.float64) * _INVERSE_LENGTH_TO_INVA[q_units]
    elif q_size is not None and q_units == "mrad":
        values["k_pixel_mrad"] = np.asarray(q_size, dtype=np.float64)
    for key in ("energy_eV", "energy", "beam_energy_eV", "accelerating_voltage"):
        if key in found:
            values["energy_eV"] = float(found[key])
            break
    for key in ("semiangle_mrad", "probe_semiangle", "convergence_semiangle_mrad"):
        if key in found:
            values["semiangle_mrad"] = float(found[key])
            break
    if "QR_rotation_degrees" in found:
        values["scan_rotation_deg"] = float(found["QR_rotation_degrees"])
    if "QR_flip" in found:
        values["scan_transpose"] = bool(found["QR_flip"])
    for key in _OPTIONAL:
        if key in found:
            values[key] = found[key]
    return values


def _load_emd1(path: Path, handle: h5py.File, overrides: Mapping[str, Any]) -> Scan4D:
    arrays: list[h5py.Group] = []

    def visit(name: str, item: Any) -> None:
        if (
            isinstance(item, h5py.Group)
            and _attr(item.attrs.get("emd_group_type")) in ("array", 1)
            and isinstance(item.get("data"), h5py.Dataset)
            and item["data"].ndim == 4
        ):
            arrays.append(item)

    handle.visititems(visit)
    if not arrays:
        raise ScanError(f"{path}: EMD 1.0 file without a 4D array node (no 4D-STEM datacube)")
    group = arrays[0]
    values = _emd_calibration(handle, group, str(path))
    values.update(overrides)
    return _calibrated_scan(group["data"], values, str(path), "EMD 1.0", path=path, _handle=handle)


def save_emd(
    path: str | os.PathLike,
    data: np.ndarray,
    *,
    energy_eV: float,
    semiangle_mrad: float,
    scan_step_A: float | Sequence[float],
    k_pixel_invA: float | Sequence[float],
    scan_rotation_deg: float = 0.0,
    scan_transpose: bool = False,
    name: str = "datacube",
) -> Path:
    """Write an EMD 1.0 file in the layout py4DSTEM (emdfile) uses, for exchange with py4DSTEM.

    ``/`` (``emd_group_type='file'``, version 1.0) > root group (``'root'``) > ``name`` array node
    (``'array'``, dataset ``data`` and dimension vectors ``dim1..dim4`` in A and A^-1) and
    ``root/metadatabundle/calibration`` with ``R_pixel_size``, ``Q_pixel_size``, units,
    ``QR_rotation_degrees``, ``QR_flip``, ``probe_semiangle`` (mrad) and ``energy`` (eV).
    """
    path = Path(path)
    where = str(path)
    step = _pair(scan_step_A, "scan_step_A", where)
    k_pixel = _pair(k_pixel_invA, "k_pixel_invA", where)
    array = np.asarray(data)
    if array.ndim != 4:
        raise ScanError(f"{where}: data must be 4D (Rx, Ry, Kx, Ky), got shape {array.shape}")
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(temporary, "w") as handle:
            handle.attrs["emd_group_type"] = "file"
            handle.attrs["version_major"] = 1
            handle.attrs["version_minor"] = 0
            handle.attrs["authoring_program"] = "deepstem"
            root = handle.create_group(name)
            root.attrs["emd_group_type"] = "root"
            node = root.create_group(name)
            node.attrs["emd_group_type"] = "array"
            node.attrs["name"] = name
            node.attrs["units"] = "pixel intensity"
            node.attrs["python_class"] = "DataCube"
            node.create_dataset("data", data=array, chunks=(1, 1, *array.shape[2:]))
            for i, (n, scale, units, label) in enumerate(
                zip(
                    array.shape,
                    (*step, *k_pixel),
                    ("A", "A", "A^-1", "A^-1"),
                    ("Rx", "Ry", "Qx", "Qy"),
                    strict=True,
                )
            ):
                dim = node.create_dataset(f"dim{i + 1}", data=np.arange(n) * scale)
                dim.attrs["name"] = label
                dim.attrs["units"] = units
            bundle = root.create_group("metadatabundle")
            calibration = bundle.create_group("calibration")
            calibration.attrs["emd_group_type"] = "metadata"
            for key, value in {
                "R_pixel_size": step[0],
                "R_pixel_units": "A",
                "Q_pixel_size": k_pixel[0],
                "Q_pixel_units": "A^-1",
                "QR_rotation_degrees": float(scan_rotation_deg),
                "QR_flip": bool(scan_transpose),
                "probe_semiangle": float(semiangle_mrad),
                "energy": float(energy_eV),
            }.items():
                calibration.attrs[key] = value
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


# --------------------------------------------------------------------------------------------------
# RosettaSciIO (.mib, Velox .emd, .blo)


def _load_rsciio(path: Path, overrides: Mapping[str, Any]) -> Scan4D:
    suffix = path.suffix.lower()
    try:
        if suffix == ".mib":
            from rsciio.quantumdetector import file_reader
        elif suffix == ".blo":
            from rsciio.blockfile import file_reader
        else:
            from rsciio.emd import file_reader
    except ImportError:
        raise ScanError(
            f"{path}: reading {suffix} files needs RosettaSciIO, which is not installed: "
            "pip install rosettasciio"
        ) from None
    try:
        signals = file_reader(str(path), lazy=True)
    except Exception as err:  # rsciio raises many kinds
        raise ScanError(f"{path}: RosettaSciIO could not read it: {str(err).splitlines()[0]}") from None
    signals = [s for s in signals if np.ndim(s["data"]) == 4 or len(getattr(s["data"], "shape", ())) == 4]
    if not signals:
        raise ScanError(f"{path}: no 4D dataset in the file")
    signal = signals[0]
    axes = signal.get("axes", [])
    values: dict[str, Any] = {}
    navigation = [a for a in axes if a.get("navigate", False)]
    detector = [a for a in axes if not a.get("navigate", True)]
    if len(navigation) == 2 and all(str(a.get("units", "")).lower() in _LENGTH_TO_A for a in navigation):
        values["scan_step_A"] = [
            float(a["scale"]) * _LENGTH_TO_A[str(a["units"]).lower()] for a in navigation
        ]
    if len(detector) == 2:
        units = str(detector[0].get("units", "")).lower()
        scales = [float(a["scale"]) for a in detector]
        if units in _INVERSE_LENGTH_TO_INVA:
            values["k_pixel_invA"] = [s * _INVERSE_LENGTH_TO_INVA[units] for s in scales]
        elif units == "mrad":
            values["k_pixel_mrad"] = scales
    tem = signal.get("metadata", {}).get("Acquisition_instrument", {}).get("TEM", {})
    if "beam_energy" in tem:
        values["energy_eV"] = float(tem["beam_energy"]) * 1e3  # keV in HyperSpy metadata
    if "convergence_angle" in tem:
        values["semiangle_mrad"] = float(tem["convergence_angle"])
    values.update(overrides)
    return _calibrated_scan(signal["data"], values, str(path), f"RosettaSciIO {suffix}", path=path)


# --------------------------------------------------------------------------------------------------
# formats read through LiberTEM


def _shape_value(value: Any, key: str, where: str) -> tuple[int, int]:
    """``value`` as two positive integers (a ``raw_*_shape`` YAML value)."""
    try:
        values = [float(m) for m in value]
        shape = tuple(int(m) for m in values)
        ok = len(shape) == 2 and all(n > 0 and n == m for n, m in zip(shape, values, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ScanError(f"{where}: {key} must be two positive integers, got {value!r}")
    return shape  # type: ignore[return-value]


class LiberTEMArray:
    """A 4D-STEM file read through a LiberTEM reader, as a lazy array ``(Rx, Ry, Kx, Ky)``.

    ``kind`` is the LiberTEM reader (``ctx.load(kind, path=path, **options)``). Indexing (``data[i0:i1]``,
    ``data[i, j]``, any int / slice / 1D index of the two scan axes, then of the two detector axes) reads
    exactly the selected scan positions with LiberTEM's ``PickUDF`` and an ROI on an inline context, in the
    file's own dtype. :func:`evaluation.engines.libertem.load_dataset` opens the file itself instead (on
    the workers of a distributed run). Pickles as (path, kind, options); reopens on first use.
    """

    def __init__(self, path: Path, kind: str, options: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.kind = str(kind)
        self.options: dict[str, Any] = dict(options)
        self._ctx: Any = None
        self._dataset: Any = None
        self._open()

    @classmethod
    def open(cls, path: Path, kind: str, raw: Mapping[str, Any]) -> LiberTEMArray:
        """Open ``path`` with the LiberTEM reader ``kind``; ``raw``: the ``raw_*`` calibration-YAML keys
        (:data:`RAW_KEYS`). A missing or wrong key, a file size that does not fit, a reader error or a scan
        that is not 2D is one :class:`ScanError` naming the file."""
        where = str(path)
        options: dict[str, Any] = {}
        if kind == "raw":
            for key, meaning in RAW_KEYS.items():
                if key not in raw:
                    raise ScanError(
                        f"{where}: missing {key!r} ({meaning}) in the calibration YAML: a headerless .raw "
                        f"file needs {', '.join(RAW_KEYS)}"
                    )
            nav = _shape_value(raw["raw_nav_shape"], "raw_nav_shape", where)
            sig = _shape_value(raw["raw_sig_shape"], "raw_sig_shape", where)
            try:
                dtype = np.dtype(str(raw["raw_dtype"]))
            except TypeError:
                raise ScanError(f"{where}: raw_dtype {raw['raw_dtype']!r} is not a NumPy data type") from None
            expected = int(np.prod(nav)) * int(np.prod(sig)) * dtype.itemsize
            size = path.stat().st_size
            if size != expected:
                raise ScanError(
                    f"{where}: the file has {size} bytes, but raw_nav_shape {list(nav)} x raw_sig_shape "
                    f"{list(sig)} of {dtype.str} needs {expected}"
                )
            options = {"nav_shape": nav, "sig_shape": sig, "dtype": dtype.str}
        else:
            unused = sorted(set(raw) - {"raw_nav_shape"})
            if unused:
                raise ScanError(f"{where}: {', '.join(unused)} only apply to .raw files (LiberTEM {kind})")
            if "raw_nav_shape" in raw:
                options["nav_shape"] = _shape_value(raw["raw_nav_shape"], "raw_nav_shape", where)
        return cls(path, kind, options)

    def _open(self) -> None:
        try:
            from libertem.api import Context
        except ImportError:
            raise ScanError(
                f"{self.path}: reading {self.path.suffix} files needs LiberTEM, which is not installed: "
                "pip install -e '.[libertem]'"
            ) from None
        ctx = Context.make_with("inline")
        try:
            dataset = ctx.load(self.kind, path=str(self.path), **self.options)
        except Exception as err:  # LiberTEM's readers raise many kinds
            ctx.close()
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ScanError(
                f"{self.path}: LiberTEM's {self.kind} reader could not read it: {first}"
            ) from None
        nav, sig = tuple(dataset.shape.nav), tuple(dataset.shape.sig)
        if len(nav) != 2 or len(sig) != 2:
            ctx.close()
            raise ScanError(
                f"{self.path}: LiberTEM's {self.kind} reader gives scan {nav} x pattern {sig}; a 4D-STEM "
                "scan needs 2 scan and 2 detector axes (give raw_nav_shape: [Rx, Ry] in the calibration YAML)"
            )
        self._ctx, self._dataset = ctx, dataset
        self.shape: tuple[int, int, int, int] = (*map(int, nav), *map(int, sig))  # type: ignore[assignment]
        self.dtype = np.dtype(dataset.dtype)

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if self._ctx is None:
            self._open()
        from libertem.udf.raw import PickUDF

        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key) or len(key) > 4:
            raise IndexError(f"LiberTEMArray index {key!r}: give at most 4 int / slice / 1D indices")
        key = key + (slice(None),) * (4 - len(key))
        rx, ry = self.shape[:2]
        picked = [np.arange(n)[k] for n, k in zip((rx, ry), key[:2], strict=True)]  # IndexError as NumPy's
        rows, cols = (np.atleast_1d(p).astype(np.intp) for p in picked)
        sig = self.shape[2:]
        if rows.size == 0 or cols.size == 0:
            block = np.zeros((rows.size, cols.size, *sig), self.dtype)
        else:
            roi = np.zeros((rx, ry), dtype=bool)
            roi[np.ix_(rows, cols)] = True
            result = self._ctx.run_udf(dataset=self._dataset, udf=PickUDF(), roi=roi)
            frames = np.asarray(result["intensity"].data)  # ROI positions in C order
            urows, ucols = np.unique(rows), np.unique(cols)
            frames = frames.reshape(urows.size, ucols.size, *sig)
            block = frames[np.searchsorted(urows, rows)][:, np.searchsorted(ucols, cols)]
        index = tuple(0 if np.ndim(p) == 0 else slice(None) for p in picked)
        return block[index][(Ellipsis, *key[2:])]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[:]
        return data if dtype is None else data.astype(dtype, copy=False)

    def close(self) -> None:
        """Close the inline LiberTEM context (reopened on the next read)."""
        if self._ctx is not None:
            self._ctx.close()
        self._ctx = self._dataset = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "options": self.options, "shape": self.shape,
                "dtype": self.dtype}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ctx = self._dataset = None

    def __repr__(self) -> str:
        return (
            f"LiberTEMArray({str(self.path)!r}, kind={self.kind!r}, shape={self.shape}, dtype={self.dtype})"
        )


# --------------------------------------------------------------------------------------------------


def load_4dstem(
    path: str | os.PathLike,
    calibration: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    validate: bool = True,
    progress: bool = True,
    **overrides: Any,
) -> Scan4D:
    """Open a 4D-STEM scan lazily with its calibration (see the module docstring for formats and keys).

    ``calibration`` is a YAML file or a mapping of calibration keys; ``overrides`` (e.g.
    ``semiangle_mrad=20``) take precedence over everything. With ``validate`` the data are checked block by
    block (:func:`check_scan`). Errors are :class:`ScanError` with one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ScanError(f"{path}: no such file")
    extra: dict[str, Any] = {}
    if isinstance(calibration, Mapping):
        extra.update(calibration)
    elif calibration is not None:
        extra.update(_read_yaml_calibration(Path(calibration)))
    extra.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(extra) - set(CALIBRATION_KEYS) - set(_OPTIONAL) - {"k_pixel_mrad"} - set(RAW_KEYS)
    if unknown:
        raise ScanError(
            f"{path}: unknown calibration key(s) {sorted(unknown)}; known: "
            f"{[*CALIBRATION_KEYS, 'k_pixel_mrad', *_OPTIONAL, *RAW_KEYS]}"
        )
    suffix = path.suffix.lower()
    scan: Scan4D
    if suffix == ".npy" or suffix in LIBERTEM_SUFFIXES:
        values: dict[str, Any] = {}
        if calibration is None:
            candidates = [path.with_suffix(".yaml"), path.with_suffix(".yml")]
            found = [c for c in candidates if c.is_file()]
            if not found and not all(
                k in extra or (k == "k_pixel_invA" and "k_pixel_mrad" in extra) for k in CALIBRATION_KEYS
            ):
                raise ScanError(
                    f"{path}: no calibration; write {candidates[0].name} beside it or pass "
                    f"calibration=FILE.yaml (keys: {', '.join(CALIBRATION_KEYS)})"
                )
            if found:
                values.update(_read_yaml_calibration(found[0]))
        values.update(extra)
        if suffix == ".npy":
            try:
                data = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise ScanError(f"{path}: not a readable .npy file: {str(err).splitlines()[0]}") from None
            scan = _calibrated_scan(data, values, str(path), ".npy", path=path)
        else:
            raw = {key: values.pop(key) for key in RAW_KEYS if key in values}
            data = LiberTEMArray.open(path, LIBERTEM_SUFFIXES[suffix], raw)
            try:
                scan = _calibrated_scan(
                    data, values, str(path), f"LiberTEM {data.kind}", path=path, _handle=data
                )
            except BaseException:
                data.close()
                raise
    elif suffix in (".mib", ".blo"):
        scan = _load_rsciio(path, extra)
    elif suffix in (".h5", ".hdf5", ".emd", ".hdf"):
        try:
            handle = h5py.File(path, "r")
        except OSError as err:
            raise ScanError(f"{path}: not a readable HDF5 file: {str(err).splitlines()[0]}") from None
        schema = _attr(handle.attrs.get("schema"))
        if schema is not None:
            handle.close()
            scan = _load_deepstem(path, extra)
        elif _is_emd1(handle):
            try:
                scan = _load_emd1(path, handle, extra)
            except BaseException:
                handle.close()
                raise
        else:
            handle.close()
            if suffix == ".emd":
                scan = _load_rsciio(path, extra)  # Velox EMD
            else:
                raise ScanError(f"{path}: neither a deepstem.4dstem/1 nor an EMD 1.0 file")
    else:
        raise ScanError(
            f"{path}: unknown format {suffix!r}; readable: .h5 (deepstem.4dstem/1 or EMD 1.0), .emd, .mib, "
            f".blo, .npy + calibration YAML; through LiberTEM: {', '.join(LIBERTEM_SUFFIXES)}"
        )
    if validate:
        try:
            check_scan(scan, progress=progress)
        except BaseException:
            scan.close()
            raise
    return scan
