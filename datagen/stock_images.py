"""Training data of the Chang U-Net (paper 001): phase objects made from ordinary images.

Geometry (all in config, see ``conf/simulation/stock_images.yaml``)::

    detector: diffraction_px x diffraction_px pixels covering -k_det .. +k_det,
              k_det = collection_ratio * alpha / lambda       (1/Angstrom)
    simulation grid: sim_px = diffraction_px * bin_factor pixels of dx = 1 / (2 k_det), so that its FFT
                     spans exactly the detector; bin_factor x bin_factor blocks of the FFT are summed
                     into one detector pixel
    label window: the central diffraction_px x diffraction_px pixels of the sim grid (same dx), centred on
                  the probe; the illuminated area is the disc about the probe centre that holds the
                  fraction `illuminated_fraction` of the probe intensity in the window (a filled disc,
                  also for defocused probes whose centre is dark)

Forward model (paper 001 eq. 1): ``I(k) = |F[P(r) exp(i phi(r))]|^2``, a fraction of the incident electrons
per detector pixel (sums to 1 up to what leaves the detector); Poisson noise and the square root that
forms the network input are applied by the data loader, so one stored set serves every dose. The label is
``phi`` on the label window, zero outside the illuminated area, with its mean over the illuminated area
removed (a constant phase is invisible in the diffraction pattern; stitching restores offsets).

The probe has the 7 aberration parameters of paper 001 (C10; C12, C21, C23 as magnitude and angle) drawn
per sample, and uses :func:`physics.probe` (the one probe implementation). Everything after the probe runs
batch-wise in torch on the device of the model.

Fixed sets (``python datagen.py simulation=stock_images``, :func:`run`): sample ``i`` is
``forward(1, generator_i)`` with ``generator_i`` seeded by :func:`sample_seed` from ``(seed, i)``, so a set
is the same whatever the sharding and batching; samples are computed ``batch_size`` at a time (one FFT
batch) and written as ``deepstem.stock_images/1`` shards (:data:`datagen.store.STOCK`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from physics import Grid, probe, wavelength

__all__ = [
    "ABERRATION_KEYS",
    "ChangForwardModel",
    "StockImageBank",
    "forward_model_from_config",
    "procedural_textures",
    "run",
    "sample_seed",
    "stock_layout",
]

ABERRATION_KEYS = ("C10", "C12", "phi12", "C21", "phi21", "C23", "phi23")
#: key of the per-sample aperture edge width (mrad) in a draw, present when ``aperture_edge_mrad`` is a range
APERTURE_EDGE_KEY = "aperture_edge_mrad"

# photographs scikit-image ships inside its wheel (no download at run time)
SKIMAGE_PHOTOGRAPHS = (
    "astronaut", "brick", "camera", "cat", "cell", "clock", "coffee", "coins", "grass", "gravel", "horse",
    "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket",
    "shepp_logan_phantom", "text", "colorwheel", "logo",
)  # fmt: skip


def _to_gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        image = image[..., :3].mean(axis=-1)
    span = image.max() - image.min()
    return (image - image.min()) / span if span > 0 else np.zeros_like(image)


def procedural_textures(count: int, size_px: int, seed: int) -> np.ndarray:
    """``count`` grey-level textures in [0, 1]: band-limited noise at several correlation lengths,
    random Gaussian blobs ("atoms") and Voronoi cells. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(size_px)
    f2 = f[:, None] ** 2 + f[None, :] ** 2
    yy, xx = np.mgrid[0:size_px, 0:size_px]
    textures = []
    for i in range(count):
        kind = i % 3
        if kind == 0:  # Gaussian-filtered noise, correlation length 1 .. 30 px
            corr = np.exp(rng.uniform(0, math.log(30)))
            noise = np.fft.ifft2(
                np.fft.fft2(rng.normal(size=(size_px, size_px))) * np.exp(-2 * (np.pi * corr) ** 2 * f2)
            )
            image = noise.real
        elif kind == 1:  # random blobs of random widths and weights
            image = np.zeros((size_px, size_px))
            for _ in range(rng.integers(20, 200)):
                cx, cy = rng.uniform(0, size_px, 2)
                width = rng.uniform(1.5, 12)
                image += rng.uniform(0.2, 1) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))
        else:  # Voronoi cells with random grey levels
            seeds = rng.uniform(0, size_px, (rng.integers(10, 80), 2))
            levels = rng.uniform(0, 1, len(seeds))
            distance = (xx[..., None] - seeds[:, 0]) ** 2 + (yy[..., None] - seeds[:, 1]) ** 2
            image = levels[np.argmin(distance, axis=-1)]
        textures.append(_to_gray(image))
    return np.stack(textures).astype(np.float32)


@dataclass
class StockImageBank:
    """Grey-level source images in [0, 1] resampled to ``size_px`` squares: one tensor (M, 1, S, S)."""

    images: torch.Tensor
    names: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        photographs: Sequence[str] | None = SKIMAGE_PHOTOGRAPHS,
        faces: int = 50,
        textures: int = 60,
        size_px: int = 256,
        seed: int = 0,
    ) -> StockImageBank:
        """Photographs and faces that scikit-image ships, plus ``textures`` procedural textures.

        ``photographs``: names of scikit-image's bundled photographs; ``None`` means all of
        :data:`SKIMAGE_PHOTOGRAPHS` (``photographs: null`` in the configs), ``[]`` none.
        """
        import skimage.data

        if photographs is None:
            photographs = SKIMAGE_PHOTOGRAPHS

        images, names = [], []
        for name in photographs:
            loader = getattr(skimage.data, name, None)
            if loader is None:
                raise ValueError(f"stock images: scikit-image has no bundled image {name!r}")
            images.append(_resize(_to_gray(loader()), size_px))
            names.append(name)
        if faces:
            for i, face in enumerate(skimage.data.lfw_subset()[:faces]):
                images.append(_resize(_to_gray(face), size_px))
                names.append(f"lfw_{i}")
        if textures:
            images.extend(torch.from_numpy(procedural_textures(textures, size_px, seed)))
            names.extend(f"texture_{i}" for i in range(textures))
        if not images:
            raise ValueError("stock images: the image bank is empty (no photographs, faces or textures)")
        return cls(torch.stack(images)[:, None], names)

    def __len__(self) -> int:
        return self.images.shape[0]


def _resize(image: np.ndarray, size_px: int) -> torch.Tensor:
    tensor = torch.from_numpy(image.astype(np.float32))[None, None]
    return F.interpolate(
        tensor, size=(size_px, size_px), mode="bilinear", antialias=True, align_corners=False
    )[0, 0]


class ChangForwardModel(torch.nn.Module):
    """Draws (diffraction intensity, phase patch, mask) triples batch-wise; see the module docstring.

    Parameters (units in the names): ``energy_eV``, ``semiangle_mrad``; ``diffraction_px`` (32) and
    ``bin_factor`` (2); ``collection_ratio`` (detector half-width / aperture radius); aberration ranges as
    ``(low, high)`` in Angstrom (``C10_A``: by default -200 .. -80 A, i.e. 80-200 A defocus, a
    ptychography-style probe illuminating a few Angstrom; magnitudes ``C12_A``, ``C21_A``, ``C23_A``;
    angles uniform); ``phase_max_rad`` range of the object's phase span; ``crop_fraction``
    range of the source image width a crop covers; ``illuminated_fraction`` of the probe intensity inside
    the label mask; ``atom_fraction`` the share of samples whose object is a random atom lattice
    (:meth:`atom_lattices`, spacings ``atom_spacing_A`` and Gaussian widths ``atom_sigma_A``) instead of
    a stock-image crop (0: paper 001's recipe); ``aperture_edge_mrad`` range of the width of the aperture
    edge (a linear ramp,
    :func:`physics.optics.aperture`; drawn per sample; ``(0, 0)``: a hard edge). An abTEM scan's bright-field
    disc has a soft rim (its anti-aliased aperture, ~1 mrad at 300 kV on a 20 A cell) and a measured one a
    softer one (partial spatial coherence, the detector's point spread); with a hard edge in training that
    rim is a fixed difference between every measured pattern and every training pattern (on the held-out
    hBN scan: 3x the specimen's own position-varying signal, docs/results_chang.md).
    """

    def __init__(
        self,
        energy_eV: float = 300e3,
        semiangle_mrad: float = 17.1,
        diffraction_px: int = 32,
        bin_factor: int = 2,
        collection_ratio: float = 2.0,
        C10_A: Sequence[float] = (-200.0, -80.0),
        C12_A: Sequence[float] = (0.0, 20.0),
        C21_A: Sequence[float] = (0.0, 300.0),
        C23_A: Sequence[float] = (0.0, 300.0),
        Cs_A: float = 0.0,
        phase_max_rad: Sequence[float] = (0.1, math.pi),
        crop_fraction: Sequence[float] = (0.1, 0.6),
        illuminated_fraction: float = 0.9,
        aperture_edge_mrad: Sequence[float] = (0.0, 0.0),
        atom_fraction: float = 0.0,
        atom_spacing_A: Sequence[float] = (1.2, 5.0),
        atom_sigma_A: Sequence[float] = (0.25, 0.7),
        bank: StockImageBank | None = None,
    ) -> None:
        super().__init__()
        if collection_ratio <= 1.0:
            raise ValueError(
                f"collection_ratio must exceed 1 (the detector must hold the disc), got {collection_ratio}"
            )
        if diffraction_px < 4 or bin_factor < 1:
            raise ValueError(
                f"diffraction_px >= 4 and bin_factor >= 1 required, got {diffraction_px}, {bin_factor}"
            )
        for name, bounds in (("C10_A", C10_A), ("C12_A", C12_A), ("C21_A", C21_A), ("C23_A", C23_A),
                             ("phase_max_rad", phase_max_rad), ("crop_fraction", crop_fraction),
                             ("aperture_edge_mrad", aperture_edge_mrad), ("atom_spacing_A", atom_spacing_A),
                             ("atom_sigma_A", atom_sigma_A)):  # fmt: skip
            if len(bounds) != 2 or bounds[0] > bounds[1]:
                raise ValueError(f"{name} must be a range (low, high) with low <= high, got {list(bounds)}")
        if not (0 < crop_fraction[0] and crop_fraction[1] <= 1):
            raise ValueError(f"crop_fraction must lie in (0, 1], got {list(crop_fraction)}")
        self.energy_eV, self.semiangle_mrad = float(energy_eV), float(semiangle_mrad)
        self.diffraction_px, self.bin_factor = int(diffraction_px), int(bin_factor)
        self.sim_px = self.diffraction_px * self.bin_factor
        self.k_detector_invA = collection_ratio * self.semiangle_mrad * 1e-3 / wavelength(self.energy_eV)
        self.grid = Grid.from_gmax(self.k_detector_invA, self.sim_px)
        self.ranges = {"C10": C10_A, "C12": C12_A, "C21": C21_A, "C23": C23_A}
        self.Cs_A = float(Cs_A)
        self.phase_max_rad, self.crop_fraction = tuple(phase_max_rad), tuple(crop_fraction)
        if not 0 < illuminated_fraction <= 1:
            raise ValueError(f"illuminated_fraction must lie in (0, 1], got {illuminated_fraction}")
        self.illuminated_fraction = float(illuminated_fraction)
        if aperture_edge_mrad[0] < 0:
            raise ValueError(f"aperture_edge_mrad must be >= 0, got {list(aperture_edge_mrad)}")
        self.aperture_edge_mrad = (float(aperture_edge_mrad[0]), float(aperture_edge_mrad[1]))
        if not 0 <= atom_fraction <= 1:
            raise ValueError(f"atom_fraction must lie in [0, 1], got {atom_fraction}")
        if atom_spacing_A[0] <= 0 or atom_sigma_A[0] <= 0:
            raise ValueError(
                f"atom_spacing_A and atom_sigma_A must be > 0, "
                f"got {list(atom_spacing_A)}, {list(atom_sigma_A)}"
            )
        self.atom_fraction = float(atom_fraction)
        self.atom_spacing_A = (float(atom_spacing_A[0]), float(atom_spacing_A[1]))
        self.atom_sigma_A = (float(atom_sigma_A[0]), float(atom_sigma_A[1]))
        offsets = torch.arange(self.diffraction_px) - self.diffraction_px // 2
        radius = torch.hypot(offsets[:, None].double(), offsets[None, :].double())
        self.register_buffer("_window_radius_px", radius, persistent=False)
        self.bank = bank if bank is not None else StockImageBank.build()
        self.register_buffer("images", self.bank.images, persistent=False)

    @property
    def pixel_size_A(self) -> float:
        """Real-space pixel of the simulation grid and of the label patch."""
        return self.grid.sampling_A[0]

    def draw_aberrations(self, batch: int, generator: torch.Generator) -> dict[str, np.ndarray]:
        """Per-sample polar aberrations (Angstrom, rad) drawn uniformly from the configured ranges."""
        u = torch.rand(batch, 7, generator=generator, dtype=torch.float64).numpy()
        low_high = [self.ranges[k] for k in ("C10", "C12", "C21", "C23")]
        values = {
            "C10": low_high[0][0] + u[:, 0] * (low_high[0][1] - low_high[0][0]),
            "C12": low_high[1][0] + u[:, 1] * (low_high[1][1] - low_high[1][0]),
            "phi12": u[:, 2] * 2 * np.pi,
            "C21": low_high[2][0] + u[:, 3] * (low_high[2][1] - low_high[2][0]),
            "phi21": u[:, 4] * 2 * np.pi,
            "C23": low_high[3][0] + u[:, 5] * (low_high[3][1] - low_high[3][0]),
            "phi23": u[:, 6] * 2 * np.pi,
        }
        low, high = self.aperture_edge_mrad
        if high > 0:  # drawn after the aberrations, so a hard-edged model keeps its random stream
            w = torch.rand(batch, generator=generator, dtype=torch.float64).numpy()
            values[APERTURE_EDGE_KEY] = low + w * (high - low)
        return values

    def probes(self, aberrations: dict[str, np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
        """Probes (B, sim_px, sim_px) complex64 on the simulation grid, centred at pixel sim_px // 2."""
        aberrations = dict(aberrations)
        edge_mrad = aberrations.pop(APERTURE_EDGE_KEY, 0.0)
        waves = probe(
            self.energy_eV,
            self.semiangle_mrad,
            self.sim_px,
            sampling_A=self.pixel_size_A,
            Cs_A=self.Cs_A,
            aberrations=aberrations,
            aperture_edge_invA=np.asarray(edge_mrad, dtype=np.float64) * 1e-3 / wavelength(self.energy_eV),
        )
        return torch.from_numpy(waves).to(device)

    def phase_objects(
        self, batch: int, generator: torch.Generator, device: torch.device | str
    ) -> torch.Tensor:
        """Random crops of the image bank as phases (B, sim_px, sim_px) in [0, phase_max] radians.

        Each crop has a random source image, width fraction, rotation, flip, position, contrast (gamma),
        optional inversion and phase span.
        """
        u = torch.rand(batch, 9, generator=generator, dtype=torch.float64)
        index = (u[:, 0] * len(self.bank)).long().clamp(max=len(self.bank) - 1)
        width = self.crop_fraction[0] + u[:, 1] * (self.crop_fraction[1] - self.crop_fraction[0])
        angle = u[:, 2] * 2 * math.pi
        flip = torch.where(u[:, 3] < 0.5, -1.0, 1.0).double()
        # keep the rotated crop inside the source: its half-diagonal is width / sqrt(2) * sqrt(2)
        room = (1 - width * math.sqrt(2)).clamp(min=0)
        shift_x, shift_y = (u[:, 4] * 2 - 1) * room, (u[:, 5] * 2 - 1) * room
        gamma = torch.exp((u[:, 6] * 2 - 1) * math.log(2.0))
        invert = u[:, 7] < 0.5
        span = self.phase_max_rad[0] + u[:, 8] * (self.phase_max_rad[1] - self.phase_max_rad[0])
        cos, sin = torch.cos(angle) * width, torch.sin(angle) * width
        theta = torch.stack(
            [torch.stack([cos * flip, -sin, shift_x], -1), torch.stack([sin * flip, cos, shift_y], -1)], 1
        ).float()
        grid = F.affine_grid(theta.to(device), (batch, 1, self.sim_px, self.sim_px), align_corners=False)
        crops = F.grid_sample(
            self.images.to(device)[index.to(device)],
            grid,
            mode="bilinear",
            padding_mode="reflection",
            align_corners=False,
        )[:, 0]
        low = crops.amin(dim=(-2, -1), keepdim=True)
        high = crops.amax(dim=(-2, -1), keepdim=True)
        crops = (crops - low) / (high - low).clamp(min=1e-6)
        crops = crops ** gamma.to(device, crops.dtype)[:, None, None]
        crops = torch.where(invert.to(device)[:, None, None], 1 - crops, crops)
        if self.atom_fraction > 0:  # drawn after the crops, so a stock-only model keeps its random stream
            is_lattice = torch.rand(batch, generator=generator, dtype=torch.float64) < self.atom_fraction
            lattices = self.atom_lattices(int(is_lattice.sum()), generator, device)
            crops = crops.clone()
            crops[is_lattice.to(device)] = lattices.to(crops.dtype)
        return crops * span.to(device, crops.dtype)[:, None, None]

    def atom_lattices(
        self, batch: int, generator: torch.Generator, device: torch.device | str
    ) -> torch.Tensor:
        """Random crystal-like objects (B, sim_px, sim_px) in [0, 1]: Gaussian "atoms" on a 2D lattice.

        Natural images put little power at the scale of atomic columns (1-2 A, a few label pixels), and a
        model trained on them alone returns nearly flat patches for a lattice of 2.5 A spacing even in its own
        forward model (docs/results_chang.md, session 13). Each object: lattice vectors of lengths
        ``a`` (``atom_spacing_A``, uniform) and ``a * [1, 1.5]``, at 60-120 deg to each other, random
        rotation and origin; a basis of 1-3 atoms at random fractional positions with weights 0.3-1; one
        Gaussian width (``atom_sigma_A``) per object; each site left empty with a probability of 0-20 %
        (vacancies) and moved by up to 0.1 A (disorder). Min-max normalised like the crops; the caller
        scales by the phase span. No specific crystal is drawn: lattice, basis and widths are continuous.
        """
        n, pixel_A = self.sim_px, self.pixel_size_A
        coords = (torch.arange(n, dtype=torch.float64) - n // 2) * pixel_A  # Angstrom, probe centre at 0
        out = torch.empty(batch, n, n, dtype=torch.float64)
        for b in range(batch):
            u = torch.rand(15, generator=generator, dtype=torch.float64)
            a = self.atom_spacing_A[0] + u[0] * (self.atom_spacing_A[1] - self.atom_spacing_A[0])
            sigma = self.atom_sigma_A[0] + u[1] * (self.atom_sigma_A[1] - self.atom_sigma_A[0])
            rotation, opening = u[2] * 2 * math.pi, math.radians(60.0) + u[3] * math.radians(60.0)
            a1 = a * torch.stack([torch.cos(rotation), torch.sin(rotation)])
            a2 = (
                a
                * (1 + 0.5 * u[4])
                * torch.stack([torch.cos(rotation + opening), torch.sin(rotation + opening)])
            )
            n_basis = 1 + int(u[5] * 3 - 1e-12)
            basis = torch.cat([torch.zeros(1, 2, dtype=torch.float64), u[6:10].reshape(2, 2)])[:n_basis]
            weights = torch.cat([torch.ones(1, dtype=torch.float64), 0.3 + 0.7 * u[10:12]])[:n_basis]
            vacancy, origin = 0.2 * u[12], u[13] * a1 + u[14] * a2
            reach = 0.5 * n * pixel_A * math.sqrt(2) + 4 * float(sigma)
            cells = math.ceil(reach / (float(a) * math.sin(float(opening)))) + 1
            index = torch.arange(-cells, cells + 1.0, dtype=torch.float64)
            i, j = torch.meshgrid(index, index, indexing="ij")
            frac = torch.stack([i.flatten(), j.flatten()], -1)[:, None, :] + basis[None]  # (cells, basis, 2)
            sites = (frac[..., :1] * a1 + frac[..., 1:] * a2 + origin).reshape(-1, 2)
            site_weight = weights.repeat(frac.shape[0])
            keep = torch.rand(sites.shape[0], generator=generator, dtype=torch.float64) >= vacancy
            shift = (torch.rand(sites.shape[0], 2, generator=generator, dtype=torch.float64) * 2 - 1) * 0.1
            sites, site_weight = (sites + shift)[keep], site_weight[keep]
            near = (sites.abs() <= 0.5 * n * pixel_A + 4 * float(sigma)).all(-1)
            sites, site_weight = sites[near], site_weight[near]
            # a 2D Gaussian is the product of two 1D ones: sum_a w_a g(x_i - x_a) g(y_j - y_a) is one matrix
            # product of (atoms, n) factors instead of an exp over every pixel-atom pair
            along_x = torch.exp(-((coords[None, :] - sites[:, :1]) ** 2) / (2 * sigma**2))
            along_y = torch.exp(-((coords[None, :] - sites[:, 1:]) ** 2) / (2 * sigma**2))
            out[b] = (along_x * site_weight[:, None]).T @ along_y
        low = out.amin(dim=(-2, -1), keepdim=True)
        high = out.amax(dim=(-2, -1), keepdim=True)
        return ((out - low) / (high - low).clamp(min=1e-12)).float().to(device)

    def diffraction(self, probes: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """``|F[P exp(i phi)]|^2`` binned to (B, diffraction_px, diffraction_px), zero frequency centred."""
        exit_wave = probes * torch.polar(torch.ones_like(phase), phase)
        intensity = torch.fft.fftshift(torch.fft.fft2(exit_wave, norm="ortho").abs() ** 2, dim=(-2, -1))
        b = self.bin_factor
        n = self.diffraction_px
        return intensity.reshape(-1, n, b, n, b).sum(dim=(2, 4))

    def label_window(self, array: torch.Tensor) -> torch.Tensor:
        """The central diffraction_px x diffraction_px pixels of a sim-grid array (the label patch)."""
        start = self.sim_px // 2 - self.diffraction_px // 2
        return array[..., start : start + self.diffraction_px, start : start + self.diffraction_px]

    def illuminated_mask(self, probes: torch.Tensor) -> torch.Tensor:
        """(B, n, n) bool: the smallest disc about the window centre holding ``illuminated_fraction`` of
        the probe intensity in the label window."""
        intensity = self.label_window(probes.abs() ** 2).flatten(1).double()
        radius = self._window_radius_px.to(intensity.device).flatten()
        order = torch.argsort(radius)
        enclosed = torch.cumsum(intensity[:, order], dim=1) / intensity.sum(dim=1, keepdim=True)
        first = torch.searchsorted(enclosed, torch.full_like(enclosed[:, :1], self.illuminated_fraction))
        disc_radius = radius[order][first.clamp(max=radius.numel() - 1)]
        mask = radius[None, :] <= disc_radius
        return mask.reshape(-1, self.diffraction_px, self.diffraction_px)

    def forward(self, batch: int, generator: torch.Generator, device: torch.device | str = "cpu") -> dict:
        """A batch: ``diffraction``, ``phase``, ``mask`` (B, n, n) and ``aberrations`` (B, 7)."""
        aberrations = self.draw_aberrations(batch, generator)
        phase = self.phase_objects(batch, generator, device)
        return self._finish(aberrations, phase, device)

    def indexed(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> dict:
        """One sample per seed, each ``forward(1, torch.Generator().manual_seed(seed))``, computed as a
        batch (the probes, FFTs and masks of all seeds at once); same keys as :meth:`forward`."""
        draws = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(int(seed))
            draws.append((self.draw_aberrations(1, generator), self.phase_objects(1, generator, device)))
        aberrations = {key: np.concatenate([d[0][key] for d in draws]) for key in draws[0][0]}
        phase = torch.cat([d[1] for d in draws])
        return self._finish(aberrations, phase, device)

    def _finish(
        self, aberrations: dict[str, np.ndarray], phase: torch.Tensor, device: torch.device | str
    ) -> dict:
        probes = self.probes(aberrations, device)
        diffraction = self.diffraction(probes, phase)
        mask = self.illuminated_mask(probes)
        patch = self.label_window(phase)
        mean = (patch * mask).sum(dim=(-2, -1), keepdim=True) / mask.sum(dim=(-2, -1), keepdim=True)
        label = torch.where(mask, patch - mean, torch.zeros_like(patch))
        table = torch.from_numpy(np.stack([aberrations[k] for k in ABERRATION_KEYS], axis=-1)).float()
        return {
            "diffraction": diffraction.float(),
            "phase": label.float(),
            "mask": mask,
            "aberrations": table,
        }


# --------------------------------------------------------------------------------------------------
# fixed sets on disk (`python datagen.py simulation=stock_images`)

FORWARD_MODEL_RANGES = (
    "C10_A",
    "C12_A",
    "C21_A",
    "C23_A",
    "phase_max_rad",
    "crop_fraction",
    "aperture_edge_mrad",
    "atom_spacing_A",
    "atom_sigma_A",
)


def sample_seed(seed: int, index: int) -> int:
    """The torch seed of sample ``index`` of a fixed set (from ``numpy.random.default_rng([seed, index])``).

    Independent of sharding and batching: sample ``i`` is ``forward(1, Generator().manual_seed(seed))``.
    """
    from datagen.parameters import sample_rng

    return int(sample_rng(seed, index).integers(0, 2**63 - 1))


def forward_model_from_config(
    forward_model: dict | None, image_bank: dict | None, parameter: str = "simulation"
) -> ChangForwardModel:
    """:class:`ChangForwardModel` from the ``forward_model:`` and ``image_bank:`` sections (the keys of
    ``conf/data/stock_images.yaml``); a bad value is a one-line ``ConfigError`` naming the section."""
    from datagen.parameters import ConfigError

    options = dict(forward_model or {})
    bank_options = dict(image_bank or {})
    for key in FORWARD_MODEL_RANGES:
        if key in options and not isinstance(options[key], (list, tuple)):
            raise ConfigError(
                f"{parameter}.forward_model.{key}", f"must be a range [low, high], got {options[key]!r}"
            )
    try:
        bank = StockImageBank.build(
            **{k: (tuple(v) if isinstance(v, list) else v) for k, v in bank_options.items() if v is not None}
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{parameter}.image_bank", " ".join(str(err).split())) from None
    try:
        return ChangForwardModel(
            bank=bank, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items()}
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{parameter}.forward_model", " ".join(str(err).split())) from None


def stock_layout(diffraction_px: int):
    """The shard layout of ``deepstem.stock_images/1`` with ``diffraction_px``-square patterns."""
    from datagen import store
    from datagen.shards import ShardLayout

    n = int(diffraction_px)
    return ShardLayout(
        store.STOCK,
        store.STOCK_PER_SAMPLE,
        dtypes={
            "diffraction": np.float32,
            "phase": np.float32,
            "mask": np.bool_,
            "aberrations": np.float32,
            "seed": np.int64,
            "sample_index": np.int64,
        },
        empty_shapes={
            "diffraction": (n, n),
            "phase": (n, n),
            "mask": (n, n),
            "aberrations": (len(ABERRATION_KEYS),),
        },
        chunked=("diffraction", "phase", "mask"),
    )


def run(cfg) -> object:
    """``python datagen.py simulation=stock_images``: compute (or resume, or skip) one shard of a fixed set.

    Sharding, checkpoints, resume, progress bar and closing summary are those of every runner
    (:func:`datagen.cli.run_shard`); ``simulation.batch_size`` samples go through the forward model at a
    time on ``device`` (cpu, or gpu = CUDA). Returns the :class:`datagen.cli.RunSummary`.
    """
    from collections import Counter

    from datagen.cli import plain_config, run_shard, validate_root
    from datagen.parameters import ConfigError

    container = plain_config(cfg)
    seed, _, _, _ = validate_root(container)
    simulation = container.get("simulation") or {}
    batch_size = simulation.get("batch_size", 64)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("simulation.batch_size", f"must be an integer >= 1, got {batch_size!r}")
    device = "cuda" if container.get("device", "cpu") == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "device=gpu but torch sees no CUDA device")
    model = forward_model_from_config(simulation.get("forward_model"), simulation.get("image_bank"))
    model = model.to(device)

    def results(todo: Sequence[int]) -> Iterator[tuple]:
        for start in range(0, len(todo), batch_size):
            indices = list(todo[start : start + batch_size])
            seeds = [sample_seed(seed, i) for i in indices]
            try:
                with torch.no_grad():
                    batch = model.indexed(seeds, device)
            except Exception as err:  # reported per sample, the shard goes on
                for index in indices:
                    yield index, None, Counter(), f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"
                continue
            arrays = {key: value.cpu().numpy() for key, value in batch.items()}
            for row, index in enumerate(indices):
                record = {key: arrays[key][row] for key in ("diffraction", "phase", "mask", "aberrations")}
                record.update(seed=seeds[row], sample_index=index)
                yield index, record, Counter(), None

    attrs = {
        "energy_eV": model.energy_eV,
        "semiangle_mrad": model.semiangle_mrad,
        "pixel_size_A": model.pixel_size_A,
        "k_detector_invA": model.k_detector_invA,
        "aberration_keys": ",".join(ABERRATION_KEYS),
        "aberration_units": "C10, C12, C21, C23 in Angstrom; phi12, phi21, phi23 in rad",
        "intensity_unit": "fraction of incident electrons per detector pixel, noise free (dose at load time)",
        "label": "phase (rad) on the label window, zero outside mask, mean over mask removed",
        "seed_rule": "sample i: forward(1, torch.Generator().manual_seed(seed)), "
        "seed = numpy.random.default_rng([global_seed, i]).integers(0, 2**63 - 1)",
        "image_bank": ",".join(model.bank.names),
    }
    return run_shard(cfg, stock_layout(model.diffraction_px), lambda: results, attrs)
