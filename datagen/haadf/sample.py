"""The sample maker of ``simulation=haadf``: :class:`HaadfSampleMaker` turns a global index into an image
record (draw, specimen, render; :mod:`datagen.haadf`)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from datagen.haadf.abtem_image import simulate_abtem
from datagen.haadf.config import HaadfDraw, HaadfSpace
from datagen.haadf.incoherent import render_incoherent
from datagen.haadf.optics import ImageGeometry, plan_geometry
from datagen.haadf.specimens import (
    add_point_defects,
    crystal_specimen,
    grain_boundary_specimen,
    nanoparticle_specimen,
)
from datagen.parameters import ConfigError, sample_rng

__all__ = [
    "HaadfSampleMaker",
]


class HaadfSampleMaker:
    """Makes the image of a global index: draws, builds the specimen, renders (one per process)."""

    def __init__(self, simulation_cfg: Mapping[str, Any], structures: Sequence[Any], seed: int) -> None:
        self.space = HaadfSpace(simulation_cfg)
        try:
            self.max_attempts = int(simulation_cfg.get("max_attempts", 20))
        except (TypeError, ValueError):
            raise ConfigError("simulation.max_attempts", "must be an integer") from None
        if self.max_attempts < 1:
            raise ConfigError("simulation.max_attempts", f"must be >= 1, got {self.max_attempts}")
        self.structures = list(structures)
        self.seed = int(seed)

    def geometry(self, draw: HaadfDraw) -> ImageGeometry:
        margin = self.space.margin_A
        return plan_geometry(self.space.pixels, draw.pixel_size_A, margin)

    def specimen(self, draw: HaadfDraw, geometry: ImageGeometry) -> tuple[Any, dict[str, Any]]:
        """The specimen cell and its metadata (``source_id``, ``formula``, ``description``)."""
        rng = np.random.default_rng(draw.seed)
        box = geometry.box_A
        extra = draw.extra
        if draw.kind == "nanoparticle":
            centre = [geometry.origin_A + f * geometry.field_A for f in extra["centre_fraction"]]
            atoms = nanoparticle_specimen(
                rng,
                box,
                extra["element"],
                extra["shape"],
                extra["diameter_A"],
                extra["np_zone_axis"],
                draw.rotation_deg,
                extra["tilt_deg"],
                centre,
                extra["support"],
                extra["support_thickness_A"],
            )
            support = (
                f" on {extra['support_thickness_A']:.0f} A amorphous {extra['support']}"
                if extra["support"]
                else ""
            )
            meta = {
                "source_id": f"cluster:{extra['element']}",
                "formula": extra["element"],
                "description": f"{extra['shape']} {extra['element']} d~{extra['diameter_A']:.0f} A "
                f"[{' '.join(map(str, extra['np_zone_axis']))}] tilt {extra['tilt_deg']:.1f} deg{support}",
                "zone_axis": extra["np_zone_axis"],
                "thickness_A": float(np.ptp(atoms.positions[:, 2])) if len(atoms) else 0.0,
            }
            return atoms, meta
        record = self.structures[draw.structure_index]
        if draw.kind == "crystal":
            atoms = crystal_specimen(
                record.atoms, draw.zone_axis, draw.rotation_deg, draw.thickness_A, box, self.space.max_strain
            )
            description = f"{record.formula} [{' '.join(map(str, draw.zone_axis))}]"
        else:
            point = [geometry.origin_A + f * geometry.field_A for f in extra["point_fraction"]]
            atoms = grain_boundary_specimen(
                record.atoms,
                (draw.zone_axis, extra["zone_axis_2"]),
                (draw.rotation_deg, draw.rotation_deg + extra["misorientation_deg"]),
                draw.thickness_A,
                box,
                point,
                extra["normal_deg"],
                self.space.gb_min_distance,
                self.space.max_strain,
            )
            description = (
                f"{record.formula} grain boundary [{' '.join(map(str, draw.zone_axis))}]/"
                f"[{' '.join(map(str, extra['zone_axis_2']))}] "
                f"misorientation {extra['misorientation_deg']:.1f} deg"
            )
        area_nm2 = (geometry.field_A / 10.0) ** 2
        o, f = geometry.origin_A, geometry.field_A
        atoms = add_point_defects(
            atoms,
            rng,
            (o, o + f, o, o + f),
            column_vacancies=int(rng.poisson(extra["vacancies_per_nm2"] * area_nm2)),
            column_substitutions=int(rng.poisson(extra["substitutions_per_nm2"] * area_nm2)),
            substitution_elements=self.space.substitution_elements,
            atom_vacancy_fraction=extra["atom_vacancy_fraction"],
            dopant_fraction=extra["dopant_fraction"],
        )
        meta = {
            "source_id": record.source_id,
            "formula": record.formula,
            "description": description,
            "zone_axis": draw.zone_axis,
            "thickness_A": float(draw.thickness_A),
        }
        return atoms, meta

    def render(self, draw: HaadfDraw, atoms: Any, geometry: ImageGeometry) -> np.ndarray:
        if draw.model == "abtem":
            return simulate_abtem(atoms, draw.optics, geometry, self.space.abtem, draw.seed)
        return render_incoherent(
            atoms.positions[:, :2], atoms.numbers, draw.optics, geometry, draw.z_exponent, draw.atom_sigma_A
        )

    def __call__(self, index: int, rejected: Counter | None = None) -> dict[str, Any]:
        """The record of image ``index``; rejected specimens are redrawn (then ``SampleFailed``)."""
        from datagen.cli import SampleFailed, rejection_reason
        from datagen.specimen import SpecimenRejected

        rng = sample_rng(self.seed, index)
        last = "no attempt"
        for _ in range(self.max_attempts):
            draw = self.space.draw(rng, len(self.structures))
            geometry = self.geometry(draw)
            try:
                atoms, meta = self.specimen(draw, geometry)
            except SpecimenRejected as err:
                last = str(getattr(err, "reason", "") or rejection_reason(err))
                if rejected is not None:
                    rejected[last] += 1
                continue
            image = self.render(draw, atoms, geometry)
            return self.record(index, draw, atoms, meta, image)
        raise SampleFailed(f"all {self.max_attempts} draws rejected (last: {last})")

    def record(
        self, index: int, draw: HaadfDraw, atoms: Any, meta: Mapping[str, Any], image: np.ndarray
    ) -> dict:
        o = draw.optics
        incoherent = draw.model == "incoherent"
        return {
            "image": image.astype(np.float32),
            "pixel_size_A": draw.pixel_size_A,
            "model": draw.model,
            "energy_eV": o.energy_eV,
            "semiangle_mrad": o.semiangle_mrad,
            "Cs_A": o.Cs_A,
            "C5_A": o.C5_A,
            "defocus_A": o.defocus_A,
            "detector_inner_mrad": o.detector_inner_mrad,
            "detector_outer_mrad": o.detector_outer_mrad,
            "source_size_A": o.source_fwhm_A,
            "z_exponent": draw.z_exponent if incoherent else math.nan,
            "atom_sigma_A": draw.atom_sigma_A if incoherent else math.nan,
            "num_phonons": 0 if incoherent else int(self.space.abtem.num_phonons),
            "thickness_A": float(meta["thickness_A"]),
            "zone_axis": np.asarray(meta["zone_axis"], dtype=np.int32),
            "rotation_deg": draw.rotation_deg,
            "num_atoms": len(atoms),
            "seed": draw.seed,
            "sample_index": int(index),
            "specimen_kind": draw.kind,
            "source_id": meta["source_id"],
            "formula": meta["formula"],
            "description": meta["description"],
        }
