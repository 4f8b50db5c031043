"""Simulated 4D-STEM scans with ground truth (``simulation=scan4d``): the evaluation benchmarks.

A raster scan of a specimen with frozen-phonon multislice (abTEM 1.0.11), written as
``deepstem.4dstem/1`` with the ``truth`` group.

Conventions:

* Scan coordinates: the first probe position is (0, 0); position ``(i, j)`` is at
  ``(i * step, j * step)`` along (x, y); the scan is not rotated against the detector.
* ``data`` (Rx, Ry, K, K) float32 is the noise-free incoherent phonon mean of ``|psi(k)|^2``, a fraction
  of the incident electrons per detector pixel (sum-preserving rebinning onto K x K pixels covering
  ``-k_max .. +k_max``, ``k_max = detector_max_angle_mrad / lambda``); dose is applied at evaluation time.
* ``truth/phase`` is ``sigma * v_z`` of the phonon-averaged projected potential on the potential's
  grid (rad), ``truth/pixel_size_A`` its pixel and ``truth/origin_A`` the scan position of its pixel
  (0, 0), i.e. ``-scan_start``. For thick specimens this transmission-function phase is the POA object
  that phase-retrieval methods aim at, not an exact description of the exit wave.
* Twisted bilayers are cut from large monolayers into a square box: the box edges are not periodic,
  so the scan keeps ``edge_margin_A`` away from them.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from physics import interaction_parameter, scherzer_defocus, wavelength

__all__ = [
    "ScanJob",
    "ScanResult",
    "ScanSettings",
    "build_scan_specimen",
    "phonon_seed",
    "plan_scans",
    "run",
    "simulate_scan",
    "twisted_bilayer",
    "with_point_defect",
    "write_scan",
    "write_scan_index",
]


@dataclass(frozen=True)
class ScanSettings:
    """Optics, scan and detector of a simulated 4D-STEM scan (units in the names)."""

    energy_eV: float = 300e3
    semiangle_mrad: float = 20.0
    Cs_A: float = 0.0
    defocus_A: float | str = 0.0  # Angstrom, or "scherzer"
    scan_step_A: float = 0.2
    scan_gpts: tuple[int, int] = (32, 32)
    scan_start_A: tuple[float, float] | None = None  # default: the scan is centred in the cell
    detector_px: int = 64
    detector_max_angle_mrad: float = 40.0  # half-width of the detector
    sampling_A: float = 0.05  # potential / wave pixel
    slice_thickness_A: float = 1.0
    num_phonons: int = 4
    rms_displacement_A: float = 0.08  # 3D rms; abTEM's sigmas are per axis (divided by sqrt 3)
    seed: int = 0
    parametrization: str = "lobato"
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = {
            "energy_eV": self.energy_eV,
            "semiangle_mrad": self.semiangle_mrad,
            "scan_step_A": self.scan_step_A,
            "detector_max_angle_mrad": self.detector_max_angle_mrad,
            "sampling_A": self.sampling_A,
            "slice_thickness_A": self.slice_thickness_A,
        }
        for name, value in checks.items():
            if not float(value) > 0:
                raise ValueError(f"scan4d: {name} must be positive, got {value}")
        if len(self.scan_gpts) != 2 or min(self.scan_gpts) < 3:
            raise ValueError(f"scan4d: scan_gpts must be two integers >= 3, got {list(self.scan_gpts)}")
        if self.detector_px < 8:
            raise ValueError(f"scan4d: detector_px must be >= 8, got {self.detector_px}")
        if self.num_phonons < 0 or self.rms_displacement_A < 0:
            raise ValueError("scan4d: num_phonons and rms_displacement_A must be >= 0")
        cutoff_mrad = wavelength(self.energy_eV) / (3 * self.sampling_A) * 1e3
        if self.detector_max_angle_mrad > cutoff_mrad:
            raise ValueError(
                f"scan4d: detector_max_angle_mrad={self.detector_max_angle_mrad} exceeds the anti-aliased "
                f"limit {cutoff_mrad:.1f} mrad of sampling_A={self.sampling_A}; use a finer sampling_A"
            )

    @property
    def resolved_defocus_A(self) -> float:
        if isinstance(self.defocus_A, str):
            if self.defocus_A != "scherzer":
                raise ValueError(f"scan4d: defocus_A must be a number or 'scherzer', got {self.defocus_A!r}")
            return scherzer_defocus(self.Cs_A, self.energy_eV)
        return float(self.defocus_A)

    @property
    def k_pixel_invA(self) -> float:
        return 2 * self.detector_max_angle_mrad * 1e-3 / wavelength(self.energy_eV) / self.detector_px


@dataclass
class ScanResult:
    data: np.ndarray  # (Rx, Ry, K, K) float32
    truth_phase: np.ndarray  # (Nx, Ny) float32, rad
    truth_pixel_size_A: tuple[float, float]
    truth_origin_A: tuple[float, float]
    settings: ScanSettings
    scan_start_A: tuple[float, float]
    seconds: float


def _monolayer(material: str):
    from ase import Atoms
    from ase.build import graphene, mx2

    material = material.lower()
    if material == "graphene":
        return graphene(formula="C2", a=2.46, vacuum=None)
    if material == "hbn":
        layer = graphene(formula="C2", a=2.504, vacuum=None)
        layer.set_chemical_symbols(["B", "N"])
        return layer
    if material in ("mos2", "ws2", "mose2", "wse2"):
        lattice = {"mos2": 3.16, "ws2": 3.15, "mose2": 3.29, "wse2": 3.28}[material]
        formula = {"mos2": "MoS2", "ws2": "WS2", "mose2": "MoSe2", "wse2": "WSe2"}[material]
        layer = mx2(formula=formula, kind="2H", a=lattice, thickness=3.17, vacuum=None)
        layer.positions[:, 2] -= layer.positions[:, 2].min()
        return Atoms(layer)
    raise ValueError(
        f"scan4d: unknown 2D material {material!r}; known: graphene, hBN, MoS2, WS2, MoSe2, WSe2"
    )


def _square_cut(layer, size_A: float, angle_deg: float):
    """Atoms of a monolayer rotated by ``angle_deg`` about z, inside the square [0, size_A)^2."""
    cell = layer.cell
    reach = size_A * math.sqrt(2) + 2 * max(cell.lengths()[:2])
    sin_gamma = abs(math.sin(math.radians(cell.angles()[2])))
    repeats = [math.ceil(reach / (cell.lengths()[i] * sin_gamma)) for i in range(2)]
    big = layer.repeat((2 * repeats[0] + 1, 2 * repeats[1] + 1, 1))
    big.translate(-(repeats[0] * cell[0] + repeats[1] * cell[1]) - 0.5 * (cell[0] + cell[1]))
    big.rotate(angle_deg, "z")
    big.translate((size_A / 2, size_A / 2, 0))
    xy = big.positions[:, :2]
    inside = np.all((xy >= 0) & (xy < size_A), axis=1)
    return big[inside]


def twisted_bilayer(
    material: str = "MoS2",
    twist_deg: float = 5.0,
    size_A: float = 30.0,
    interlayer_A: float | None = None,
    vacuum_A: float = 2.0,
):
    """Two monolayers, the upper rotated by ``twist_deg`` about the box centre, in a square box.

    ``interlayer_A`` is the layer period (graphene 3.35, hBN 3.33, MX2 6.15 A by default).
    """
    from ase import Atoms

    if not size_A > 0 or not vacuum_A >= 0:
        raise ValueError(f"scan4d: size_A must be positive and vacuum_A >= 0, got {size_A}, {vacuum_A}")
    layer = _monolayer(material)
    if interlayer_A is None:
        interlayer_A = {"graphene": 3.35, "hbn": 3.33}.get(material.lower(), 6.15)
    bottom = _square_cut(layer, size_A, 0.0)
    top = _square_cut(layer, size_A, float(twist_deg))
    top.positions[:, 2] += interlayer_A
    both = bottom + top
    both.positions[:, 2] += vacuum_A - both.positions[:, 2].min()
    height = both.positions[:, 2].max() + vacuum_A
    return Atoms(both, cell=[size_A, size_A, height], pbc=True)


def with_point_defect(
    atoms,
    position_A: Sequence[float],
    kind: str = "vacancy",
    element: str | None = None,
):
    """Copy of ``atoms`` with the atom column nearest to ``position_A`` (x, y) emptied or substituted.

    ``kind="vacancy"`` removes every atom of that column (within 0.3 A laterally); ``kind="substitution"``
    replaces them by ``element``.
    """
    from ase.data import atomic_numbers

    atoms = atoms.copy()
    xy = atoms.positions[:, :2]
    distance = np.linalg.norm(xy - np.asarray(position_A, dtype=float)[:2], axis=1)
    column = np.flatnonzero(distance <= distance.min() + 0.3)
    if kind == "vacancy":
        del atoms[column.tolist()]
    elif kind == "substitution":
        if element not in atomic_numbers:
            raise ValueError(f"scan4d: substitution needs a valid element, got {element!r}")
        symbols = atoms.get_chemical_symbols()
        for index in column:
            symbols[index] = element
        atoms.set_chemical_symbols(symbols)
    else:
        raise ValueError(f"scan4d: defect kind must be 'vacancy' or 'substitution', got {kind!r}")
    return atoms


def simulate_scan(atoms, settings: ScanSettings, edge_margin_A: float = 0.0) -> ScanResult:
    """Simulate the scan; the scan window must stay ``edge_margin_A`` inside the cell."""
    import abtem

    from datagen.kernel import rebin_matrix
    from datagen.unitary_potential import UnitaryPotential

    start_time = time.perf_counter()
    abtem.config.set({"precision": "float32", "device": settings.device, "diagnostics.progress_bar": False})
    extent = np.asarray(atoms.cell.lengths()[:2], dtype=float)
    span = (np.asarray(settings.scan_gpts) - 1) * settings.scan_step_A
    start = (extent - span) / 2 if settings.scan_start_A is None else np.asarray(settings.scan_start_A, float)
    if np.any(start < edge_margin_A) or np.any(start + span > extent - edge_margin_A):
        raise ValueError(
            f"scan4d: the scan window {start.round(2).tolist()} + {span.round(2).tolist()} A leaves the cell "
            f"{extent.round(2).tolist()} A minus a margin of {edge_margin_A} A; "
            "enlarge the specimen or shrink the scan"
        )
    if settings.num_phonons > 0 and len(atoms):
        sigma = settings.rms_displacement_A / math.sqrt(3.0)
        specimen = abtem.FrozenPhonons(
            atoms, num_configs=int(settings.num_phonons), sigmas=float(sigma), seed=int(settings.seed)
        )
    else:
        specimen = atoms
    potential = UnitaryPotential(  # flux-conserving slices: no pattern holds more than the beam
        specimen,
        sampling=float(settings.sampling_A),
        slice_thickness=float(settings.slice_thickness_A),
        parametrization=settings.parametrization,
        projection="infinite",
    )
    beam = abtem.Probe(
        energy=float(settings.energy_eV),
        semiangle_cutoff=float(settings.semiangle_mrad),
        Cs=float(settings.Cs_A),
        defocus=float(settings.resolved_defocus_A),
    )
    scan = abtem.GridScan(
        start=tuple(float(s) for s in start),
        end=tuple(
            float(s + n * settings.scan_step_A) for s, n in zip(start, settings.scan_gpts, strict=True)
        ),
        gpts=tuple(int(n) for n in settings.scan_gpts),
        endpoint=False,
    )
    margin_mrad = settings.detector_max_angle_mrad * 1.05
    patterns = beam.multislice(potential, scan=scan, detectors=abtem.PixelatedDetector(max_angle=margin_mrad))
    projected = potential.build().project()
    computed = abtem.array.ComputableList([patterns, projected]).compute()
    pattern_array = _to_numpy(computed[0].array)
    v_z = _to_numpy(computed[1].array)
    if v_z.ndim == 3:
        v_z = v_z.mean(axis=0)  # phonon-averaged projected potential
    native_invA = np.asarray(computed[0].sampling, dtype=float)  # reciprocal pixel of the simulation
    k_pixel = settings.k_pixel_invA
    rebin_x = rebin_matrix(pattern_array.shape[-2], native_invA[0], settings.detector_px, k_pixel)
    rebin_y = rebin_matrix(pattern_array.shape[-1], native_invA[1], settings.detector_px, k_pixel)
    data = np.einsum("ij,abjk,lk->abil", rebin_x, pattern_array.astype(np.float64), rebin_y).astype(
        np.float32
    )
    return ScanResult(
        data=data,
        truth_phase=(interaction_parameter(settings.energy_eV) * v_z).astype(np.float32),
        truth_pixel_size_A=tuple(float(s) for s in computed[1].sampling),
        truth_origin_A=(-float(start[0]), -float(start[1])),
        settings=settings,
        scan_start_A=(float(start[0]), float(start[1])),
        seconds=time.perf_counter() - start_time,
    )


def write_scan(path: str | Path, result: ScanResult, config: Any = None, overwrite: bool = False) -> Path:
    """Write ``result`` as ``deepstem.4dstem/1`` with its ``truth`` group (atomic, datagen.scan_store)."""
    from datagen.scan_store import save_4dstem

    s = result.settings
    totals = np.asarray(result.data, dtype=np.float64).sum(axis=(-2, -1))
    if totals.size and totals.max() > 1.0 + 1e-5:
        i, j = np.unravel_index(int(np.argmax(totals)), totals.shape)
        raise ValueError(
            f"scan4d: {path}: the pattern at scan position ({i}, {j}) sums to {totals[i, j]:.6f} of the "
            "incident electrons (more than the beam)"
        )
    return save_4dstem(
        path,
        result.data,
        energy_eV=s.energy_eV,
        semiangle_mrad=s.semiangle_mrad,
        scan_step_A=s.scan_step_A,
        k_pixel_invA=s.k_pixel_invA,
        scan_rotation_deg=0.0,
        Cs_A=s.Cs_A,
        defocus_A=s.resolved_defocus_A,
        truth_phase=result.truth_phase,
        truth_pixel_size_A=result.truth_pixel_size_A,
        truth_origin_A=result.truth_origin_A,
        config=config,
        overwrite=overwrite,
    )


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "get"):  # CuPy
        array = array.get()
    return np.asarray(array)


# --------------------------------------------------------------------------------------------------
# `python datagen.py simulation=scan4d`

SPECIMEN_KINDS = ("twisted_bilayer", "crystal")
DEFECT_KINDS = ("vacancy", "substitution")
SCAN_SUFFIX = ".h5"


@dataclass(frozen=True)
class ScanJob:
    """One configured scan: its file name, specimen section, settings and scan-window margin (A)."""

    name: str
    position: int  # place in ``simulation.scans`` (the phonon seed's index)
    specimen: dict
    settings: ScanSettings
    edge_margin_A: float


def phonon_seed(seed: int, position: int) -> int:
    """Frozen-phonon seed of the scan at ``position`` in ``simulation.scans``: from
    ``numpy.random.default_rng([seed, position])`` (a ``settings.seed`` of the scan overrides it)."""
    from datagen.parameters import sample_rng

    return int(sample_rng(seed, position).integers(0, 2**31 - 1))


def plan_scans(simulation: dict, seed: int) -> list[ScanJob]:
    """The scans of ``simulation.scans`` (name -> section) with ``simulation.settings`` as their defaults.

    Every error is a one-line ``ConfigError`` naming the parameter (``simulation.scans.<name>....``).
    """
    from datagen.parameters import ConfigError

    scans = simulation.get("scans")
    if not isinstance(scans, dict) or not scans:
        raise ConfigError("simulation.scans", "give at least one scan (name: {specimen: ..., settings: ...})")
    common = dict(simulation.get("settings") or {})
    jobs = []
    for position, (name, entry) in enumerate(scans.items()):
        where = f"simulation.scans.{name}"
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise ConfigError(where, "scan names are file names: letters, digits, '_' and '-' only")
        entry = dict(entry or {})
        unknown = set(entry) - {"specimen", "settings", "edge_margin_A"}
        if unknown:
            raise ConfigError(
                f"{where}.{sorted(unknown)[0]}", "unknown key (specimen, settings, edge_margin_A)"
            )
        options = {**common, **dict(entry.get("settings") or {})}
        options.setdefault("seed", phonon_seed(seed, position))
        if "scan_gpts" in options:
            options["scan_gpts"] = tuple(int(n) for n in options["scan_gpts"])
        if options.get("scan_start_A") is not None:
            options["scan_start_A"] = tuple(float(v) for v in options["scan_start_A"])
        try:
            settings = ScanSettings(**options)
            settings.resolved_defocus_A  # noqa: B018 (checks the string form)
        except TypeError as err:
            raise ConfigError(f"{where}.settings", " ".join(str(err).split())) from None
        except ValueError as err:
            text = " ".join(str(err).split()).removeprefix("scan4d: ")
            key = re.match(r"\w*", text).group(0)
            raise ConfigError(
                f"{where}.settings.{key}"
                if key in ScanSettings.__dataclass_fields__
                else f"{where}.settings",
                text,
            ) from None
        specimen = dict(entry.get("specimen") or {})
        kind = specimen.get("kind")
        if kind not in SPECIMEN_KINDS:
            raise ConfigError(
                f"{where}.specimen.kind", f"must be one of {', '.join(SPECIMEN_KINDS)}, got {kind!r}"
            )
        defect = specimen.get("defect")
        if defect is not None:
            if not isinstance(defect, dict) or defect.get("kind") not in DEFECT_KINDS:
                raise ConfigError(
                    f"{where}.specimen.defect.kind", f"must be one of {', '.join(DEFECT_KINDS)}"
                )
            if defect["kind"] == "substitution" and not defect.get("element"):
                raise ConfigError(f"{where}.specimen.defect.element", "a substitution needs an element")
        margin = float(entry.get("edge_margin_A", 0.0))
        if margin < 0:
            raise ConfigError(f"{where}.edge_margin_A", f"must be >= 0, got {margin}")
        jobs.append(ScanJob(str(name), position, specimen, settings, margin))
    return jobs


def build_scan_specimen(job: ScanJob, structures: Any = None):
    """The atoms of ``job``: a twisted bilayer, or a crystal slab in zone axis from the structure source
    (``structure``: a source id or formula of the bundled set), with the configured point defect at the
    column nearest to the box centre (or to ``defect.position_A``)."""
    spec = {k: v for k, v in job.specimen.items() if k not in ("kind", "defect")}
    where = f"simulation.scans.{job.name}.specimen"
    from datagen.parameters import ConfigError

    try:
        if job.specimen["kind"] == "twisted_bilayer":
            atoms = twisted_bilayer(**spec)
        else:
            atoms = _crystal(spec, structures, where)
    except ConfigError:
        raise
    except TypeError as err:
        raise ConfigError(where, " ".join(str(err).split())) from None
    except ValueError as err:  # SpecimenRejected included
        raise ConfigError(where, " ".join(str(err).split()).removeprefix("scan4d: ")) from None
    defect = job.specimen.get("defect")
    if defect:
        centre = np.asarray(atoms.cell.lengths()[:2]) / 2
        position = defect.get("position_A") or centre
        atoms = with_point_defect(atoms, position, kind=defect["kind"], element=defect.get("element"))
    return atoms


def _crystal(spec: dict, structures: Any, where: str):
    from datagen.parameters import ConfigError
    from datagen.specimen import build_specimen

    wanted = str(spec.pop("structure", ""))
    records = structures if structures is not None else []
    record = next((r for r in records if wanted in (r.source_id, r.formula)), None)
    if record is None:
        from datagen.sources import load_structures

        try:
            found = load_structures({"name": "bundled", "ids": [wanted]}) if wanted else []
        except Exception:  # an unknown id: reported below
            found = []
        record = found[0] if found else None
    if record is None:
        raise ConfigError(f"{where}.structure", f"no structure {wanted!r} in the bundled source")
    options = {"rotation_deg": 0.0, **spec}
    options["zone_axis"] = tuple(int(v) for v in options.get("zone_axis", (0, 0, 1)))
    return build_specimen(record.atoms, **options).atoms


def check_scan_reuse(path: Path, job: ScanJob, container: dict) -> None:
    """Refuse to reuse a finished scan file made with another specimen, settings, seed or (for a crystal)
    structure source: one-line ``ConfigError`` naming the keys (:func:`datagen.cli.check_reuse`)."""
    import json
    from dataclasses import asdict

    import yaml

    from datagen.cli import check_reuse
    from datagen.store import read_config

    def made_with(provenance: dict) -> dict:
        settings = provenance.get("settings") or {}
        made = {
            "scan": provenance.get("scan"),
            "phonon_seed": provenance.get("phonon_seed"),
            "specimen": provenance.get("specimen"),
            "settings": {k: v for k, v in settings.items() if k not in ("extra", "device")},
            "edge_margin_A": provenance.get("edge_margin_A"),
        }
        if (made["specimen"] or {}).get("kind") == "crystal":
            made["source"] = (provenance.get("datagen") or {}).get("source")
        return json.loads(json.dumps(made, default=list))  # tuples as lists, as the stored YAML has them

    current = {
        "scan": job.name,
        "phonon_seed": job.settings.seed,
        "specimen": job.specimen,
        "settings": asdict(job.settings),
        "edge_margin_A": job.edge_margin_A,
        "datagen": container,
    }
    stored = yaml.safe_load(read_config(path)) or {}
    check_reuse(path, made_with(stored if isinstance(stored, dict) else {}), made_with(current))


def write_scan_index(out_dir: str | Path) -> Path:
    """``index.json`` listing the finished scans of ``out_dir`` (name, file, scan and detector shape)."""
    import json

    from datagen import store
    from datagen.shards import INDEX_NAME, atomic_write_text

    out_dir = Path(out_dir)
    entries = []
    for path in sorted(out_dir.glob(f"*{SCAN_SUFFIX}")):
        try:
            with store.open_checked(path, store.SCAN4D) as handle:
                entries.append(
                    {
                        "name": path.stem,
                        "file": path.name,
                        "shape": list(handle["data"].shape),
                        "truth": "truth" in handle,
                    }
                )
        except store.StoreError:
            continue  # not a scan (or another schema): not listed
    path = out_dir / INDEX_NAME
    atomic_write_text(path, json.dumps({"schema": store.SCAN4D.id, "scans": entries}, indent=1) + "\n")
    return path


def run(cfg: Any) -> Any:
    """``python datagen.py simulation=scan4d``: simulate the configured scans of this shard.

    Scan ``j`` of ``simulation.scans`` belongs to shard :func:`datagen.shards.shard_range` ``(n, i, N)``
    and is written (atomically) to ``out_dir/<name>.h5`` as ``deepstem.4dstem/1`` with its ``truth``
    group; a finished file is skipped (``overwrite=true`` recomputes it). Progress bar, closing summary
    and one-line :class:`~datagen.parameters.ConfigError` as the other runners; returns the
    :class:`datagen.cli.RunSummary`.
    """
    import logging
    from dataclasses import asdict, replace

    from datagen.cli import (
        RunSummary,
        log_summary,
        output_folder,
        plain_config,
        progress_bar,
        rejection_reason,
        structures_of,
        validate_root,
    )
    from datagen.shards import shard_range

    log = logging.getLogger("deepstem.datagen")
    started = time.perf_counter()
    container = plain_config(cfg)
    simulation = dict(container.get("simulation") or {})
    scans = simulation.get("scans")
    count = len(scans) if isinstance(scans, dict) else 0
    seed, num_shards, shard_index, _ = validate_root(
        {**container, "simulation": {**simulation, "num_samples": count}}
    )
    jobs = plan_scans(simulation, seed)
    device = str(container.get("device", "cpu"))
    jobs = [replace(j, settings=replace(j.settings, device=device)) for j in jobs]
    out_dir = output_folder(container)
    overwrite = bool(container.get("overwrite", False))
    mine = [jobs[j] for j in shard_range(len(jobs), shard_index, num_shards)]
    summary = RunSummary(
        shard=f"scan4d shard {shard_index + 1}/{num_shards}", noun="scans", resumed_label="already written"
    )
    todo = [j for j in mine if overwrite or not (out_dir / f"{j.name}{SCAN_SUFFIX}").is_file()]
    for job in (j for j in mine if j not in todo):  # reused only if made with this scan's settings
        check_scan_reuse(out_dir / f"{job.name}{SCAN_SUFFIX}", job, container)
    summary.resumed = len(mine) - len(todo)
    if mine and not todo:
        summary.skipped_existing = True
    crystals = any(j.specimen["kind"] == "crystal" for j in todo)
    structures = structures_of(container) if crystals and container.get("source") else None
    atoms = {j.name: build_scan_specimen(j, structures) for j in todo}  # config errors before any work
    log.info(
        "%s: %d of %d scans (%d to simulate, %d already written) -> %s",
        summary.shard,
        len(mine),
        len(jobs),
        len(todo),
        summary.resumed,
        out_dir,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = progress_bar(
        total=len(mine),
        initial=summary.resumed,
        description=summary.shard,
        enabled=container.get("progress", True),
        unit="scan",
    )
    positions = 0
    try:
        for job in todo:
            try:
                result = simulate_scan(atoms[job.name], job.settings, edge_margin_A=job.edge_margin_A)
                provenance = {
                    "scan": job.name,
                    "phonon_seed": job.settings.seed,
                    "specimen": job.specimen,
                    "settings": {k: v for k, v in asdict(job.settings).items() if k != "extra"},
                    "edge_margin_A": job.edge_margin_A,
                    "num_atoms": len(atoms[job.name]),
                    "datagen": container,
                }
                write_scan(out_dir / f"{job.name}{SCAN_SUFFIX}", result, config=provenance, overwrite=True)
                summary.written += 1
                positions += int(np.prod(job.settings.scan_gpts))
                log.info(
                    "%s: %d positions in %.1f s (%.3g positions/s)",
                    job.name,
                    int(np.prod(job.settings.scan_gpts)),
                    result.seconds,
                    np.prod(job.settings.scan_gpts) / result.seconds,
                )
            except Exception as err:  # reported per scan, the others go on
                summary.failed[job.position] = f"{job.name}: {type(err).__name__}: {rejection_reason(err)}"
                log.error("scan %s failed: %s", job.name, err)
            progress.update(1)
    finally:
        progress.close()
    write_scan_index(out_dir)
    summary.wall_s = time.perf_counter() - started
    log_summary(summary)
    if summary.written and summary.wall_s > 0:
        log.info("%d positions in all (%.3g positions/s)", positions, positions / summary.wall_s)
    return summary
