"""Clean (HA)ADF-STEM images for restoration training (``simulation=haadf``, CGRDN data; issue 4 section 2).

Two imaging models write the same kind of image, ``deepstem.image/1`` (ARCHITECTURE.md contract 2):

* ``incoherent`` (volume): the incoherent-imaging model ``I(r) = [P_eff * S](r)`` with ``P_eff`` the
  probe intensity ``|psi|^2`` of :func:`physics.probe` blurred by a Gaussian source and ``S`` a column
  model: every atom contributes a normalised 2D Gaussian of standard deviation ``atom_sigma_A`` (thermal
  vibration plus the extent of high-angle scattering) weighted by its ADF cross-section
  ``sigma(Z) = c Z^n``. The exponent ``n`` is configured (1.6-2); the prefactor ``c`` is fitted (with ``n``
  fixed, least squares in log space over Z = 3..83) to the kinematic cross-sections
  ``int |f_e(q)|^2 dOmega`` over the detector annulus, with abTEM's Lobato electron scattering factors
  ``f_e`` (relativistically scaled). The convolution is done in Fourier space: the atoms are spread on a
  grid ``s`` times finer than the image (fine enough that the Gaussians do not alias inside the probe's
  band ``2 alpha / lambda``), Fourier-cropped to the image grid and multiplied by the probe-intensity
  spectrum, so sub-pixel positions are exact.
* ``abtem`` (accuracy): frozen-phonon multislice (or PRISM, ``abtem.SMatrix``) with Lobato potentials
  and an ``abtem.AnnularDetector``, scanned on a grid at or below the Nyquist step of the image band
  ``2 alpha / lambda`` and Fourier-interpolated to the image pixel (an ADF image is exactly band-limited
  to ``2 alpha / lambda``, so this is exact on the periodic cell), then blurred by the same source.

Conventions (units: eV, mrad, Angstrom):

* Image pixel ``(i, j)`` is the probe position ``(i, j) * pixel_size_A`` along ``(x, y)`` from the
  field's origin; arrays are indexed ``[x, y]``. The field is ``pixels * pixel_size_A`` wide.
* Specimens are built in an orthogonal periodic cell of side ``box = (pixels + 2 margin_px) * pixel``:
  the field is the central square, field origin at ``(margin_px * pixel, margin_px * pixel)`` in the cell.
  Seams of the rotated crystals and the cell's periodic wrap lie in the margin, which is cut away; the
  margin (``margin_A``, >= the probe's reach) keeps the wrap-around of the convolution out of the field.
* Intensity: the fraction of the incident electrons that reach the detector for a probe at that pixel
  (abTEM's normalisation of ``AnnularDetector``; the incoherent model uses the same absolute scale via
  ``sigma(Z)``), so the distortion models' shot noise is ``lambda = I * dose * dx * dy``. The
  probe-integrated cross-section of a column, ``sum(I) * pixel^2`` over its peak, is ``sum sigma(Z)`` in
  A^2 for the incoherent model.
* The source size is a FWHM (thesis table 2.1: 0.7 A): a normalised Gaussian of that FWHM blurs the image.

Reproducibility: sample ``i`` is a pure function of ``(seed, i)``: everything is drawn from
``numpy.random.default_rng([seed, i])`` (:func:`datagen.parameters.sample_rng`); the stored ``seed`` seeds
the specimen's randomness and abTEM's frozen phonons. Shards, checkpoints and resume follow the kernel
pipeline (:mod:`datagen.shards`, :mod:`datagen.cli`).

Layout (one module per concept; this package re-exports every public name, so ``from datagen.haadf import
...`` and the configs' ``runner: datagen.haadf:run`` are unchanged):

* :mod:`datagen.haadf.optics`: :class:`HaadfOptics`, :class:`ImageGeometry`, :func:`plan_geometry`;
* :mod:`datagen.haadf.incoherent`: cross-sections and the incoherent renderer :func:`render_incoherent`;
* :mod:`datagen.haadf.abtem_image`: the abTEM path, :class:`AbtemSettings`, :func:`simulate_abtem`;
* :mod:`datagen.haadf.specimens`: crystals, grain boundaries, nanoparticles, amorphous supports, defects;
* :mod:`datagen.haadf.config`: configuration parsing and drawing, :class:`HaadfSpace`, :class:`HaadfDraw`;
* :mod:`datagen.haadf.sample`: the sample maker :class:`HaadfSampleMaker`;
* :mod:`datagen.haadf.layout`: the ``deepstem.image/1`` shard layout, :data:`IMAGE_LAYOUT`;
* :mod:`datagen.haadf.runner`: :func:`run` (``python datagen.py simulation=haadf``) and its worker processes.
"""

from __future__ import annotations

from datagen.haadf.abtem_image import AbtemSettings, simulate_abtem
from datagen.haadf.config import SPECIMEN_KINDS as SPECIMEN_KINDS
from datagen.haadf.config import HaadfDraw as HaadfDraw
from datagen.haadf.config import HaadfSpace
from datagen.haadf.incoherent import (
    cross_sections_A2,
    electron_scattering_factor_A,
    kinematic_cross_section_A2,
    power_law_prefactor_A2,
    render_incoherent,
)
from datagen.haadf.incoherent import (
    probe_psf_spectrum as probe_psf_spectrum,
)
from datagen.haadf.layout import IMAGE_LAYOUT, image_layout, write_image_index
from datagen.haadf.layout import IMAGE_NUMERIC_FIELDS as IMAGE_NUMERIC_FIELDS
from datagen.haadf.layout import IMAGE_STRING_FIELDS as IMAGE_STRING_FIELDS
from datagen.haadf.optics import FWHM_PER_SIGMA as FWHM_PER_SIGMA
from datagen.haadf.optics import HaadfOptics, ImageGeometry, plan_geometry
from datagen.haadf.runner import _init_worker as _init_worker
from datagen.haadf.runner import _results as _results
from datagen.haadf.runner import _work as _work
from datagen.haadf.runner import log as log
from datagen.haadf.runner import run
from datagen.haadf.sample import HaadfSampleMaker
from datagen.haadf.specimens import AMORPHOUS_MATERIALS as AMORPHOUS_MATERIALS
from datagen.haadf.specimens import NANOPARTICLE_SHAPES as NANOPARTICLE_SHAPES
from datagen.haadf.specimens import (
    add_point_defects,
    amorphous_slab,
    crystal_specimen,
    grain_boundary_specimen,
    nanoparticle_specimen,
)

__all__ = [
    "IMAGE_LAYOUT",
    "AbtemSettings",
    "HaadfOptics",
    "HaadfSampleMaker",
    "HaadfSpace",
    "ImageGeometry",
    "add_point_defects",
    "amorphous_slab",
    "cross_sections_A2",
    "crystal_specimen",
    "electron_scattering_factor_A",
    "grain_boundary_specimen",
    "image_layout",
    "kinematic_cross_section_A2",
    "nanoparticle_specimen",
    "plan_geometry",
    "power_law_prefactor_A2",
    "render_incoherent",
    "run",
    "simulate_abtem",
    "write_image_index",
]
