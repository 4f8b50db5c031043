"""LightningDataModules: one stored dataset serves every dose, because noise is applied in the loader.

Every module hands raw (noise-free) batches to the device and applies its physics-based augmentation in
``on_after_batch_transfer``, i.e. on the GPU when training on one. Training noise comes from a seeded
generator; validation and test noise is seeded by the sample index, so a sample always gets the same
noise, whatever the batch size. The batches follow the contracts of :mod:`models.lightning`.

Exact resume (``ckpt_path=...``): the noise generators are saved in checkpoints (``state_dict``), every
DataLoader draws its worker seeds from its own generator (never from the global torch stream that
dropout uses), and the training loaders of the shard modules and of the ePIE-label module
(:class:`training.datasets.ResumableDataLoader`) save their epoch and batch position, so a resumed run
sees the batches and noise of the uninterrupted one, also after a stop in the middle of an epoch.

* :class:`MultisliceDataModule` (``data=multislice``): kernel shards; ``view="airpi"`` gives the 11-channel
  AIRPI input and the exit-wave label, ``view="ptychonn"`` the centre CBED and the object patch
  (amplitude, phase) of the phase-object approximation.
* :class:`StockImagesDataModule` (``data=stock_images``): the Chang forward model drawing fresh samples
  on the device; Poisson noise, square root.
* :class:`HaadfDataModule` (``data=haadf``): clean image shards and (distorted, clean) pairs with the
  STEM distortion models drawn per sample.
* :class:`EpieLabelsDataModule` (``data=epie_labels``): PtychoNN as paper 004 trained it, on one 4D-STEM
  scan with its ePIE reconstruction as labels, split by scan lines.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datagen import store
from training.augment import AirpiAugmentation, apply_dose
from training.datasets import (
    ChunkBatchSampler,
    EpochBatchSampler,
    ImageDataset,
    KernelDataset,
    ResumableDataLoader,
    ShardIndex,
    collate_batched,
    split_by_structure,
)
from training.distortions import (
    SeededModule,
    StemDistortion,
    make_generator,
    per_sample_generators,
    uniform_range,
)

__all__ = [
    "EpieLabelsDataModule",
    "HaadfDataModule",
    "MultisliceDataModule",
    "StockImagesDataModule",
    "kernel_training_ranges",
    "ptychonn_view",
]


def _plain(mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    if mapping is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(mapping, DictConfig):
            return OmegaConf.to_container(mapping, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(mapping).items()}


def _ranges_as_tuples(options: dict[str, Any]) -> dict[str, Any]:
    """Config lists of ``*_range`` parameters as the tuples the augmentation classes expect."""
    return {k: (tuple(v) if k.endswith("_range") and v is not None else v) for k, v in options.items()}


def _stage(trainer: Any) -> str:
    """'train' while fitting a training batch, else 'eval' (validation, test, predict, sanity check,
    and calls outside a Trainer), which selects the deterministic per-index noise."""
    if (
        trainer is not None
        and getattr(trainer, "training", False)
        and not getattr(trainer, "sanity_checking", False)
    ):
        return "train"
    return "eval"


def _loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator: its worker base seeds then leave the global torch stream alone."""
    return torch.Generator().manual_seed(int(seed))


class _TrainLoaderPosition:
    """The training loader's position (epoch and batches trained), also carried in the data module's own
    checkpoint state.

    Lightning restores the loader states of a checkpoint only if it sets up the training loader after it
    restored the loops; a model whose ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``
    (PtychoNN's cyclic schedule) makes it set the loader up before, and the states are dropped
    (Lightning issue #20550), so a run resumed mid-epoch would start that epoch again. The data module's
    state is restored before either, and :meth:`attach` hands it to the next training loader.
    """

    def __init__(self) -> None:
        self.loader: ResumableDataLoader | None = None
        self.pending: dict[str, int] | None = None

    def attach(self, loader: ResumableDataLoader) -> ResumableDataLoader:
        if self.pending is not None:
            loader.load_state_dict(self.pending)
            self.pending = None
        self.loader = loader
        return loader

    def state_dict(self) -> dict[str, int] | None:
        return None if self.loader is None else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        self.pending = None if state is None else {key: int(value) for key, value in state.items()}


class _ShardDataModule(L.LightningDataModule):
    """Shared plumbing: shard index, splits by structure, chunk-aligned loaders with workers.

    ``check_data``: read every shard once when the data are set up and stop with a
    :class:`training.datasets.DataError` naming shard and sample at the first NaN or inf value.
    """

    dataset_class: type = KernelDataset
    schema: store.Schema = store.KERNEL

    def __init__(
        self,
        data_dir: str | Sequence[str],
        batch_size: int = 64,
        num_workers: int = 0,
        split: Sequence[float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        block_size: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        check_data: bool = True,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.check_data = bool(check_data)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.split, self.seed = tuple(split), int(seed)
        self.block_size, self.pin_memory = block_size, pin_memory
        self.persistent_workers = persistent_workers and self.num_workers > 0
        self.index: ShardIndex | None = None
        self.datasets: dict[str, Dataset] = {}
        self._train_position = _TrainLoaderPosition()

    def setup(self, stage: str | None = None) -> None:
        if self.index is not None:
            return
        self.index = ShardIndex.open(self.data_dir, self.schema, check=self.check_data)
        splits = split_by_structure(self.index.source_ids, self.split, self.seed)
        self.datasets = {name: self.dataset_class(self.index, np.sort(idx)) for name, idx in splits.items()}

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.setup()
        dataset = self.datasets[name]
        trainer = getattr(self, "trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        replicas = trainer.world_size if trainer is not None else 1
        sampler = ChunkBatchSampler(
            dataset,
            self.batch_size,
            block_size=self.block_size,
            shuffle=shuffle,
            seed=self.seed,
            rank=rank,
            num_replicas=replicas,
            repeats=self._train_repeats() if name == "train" else None,
        )
        return ResumableDataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_batched,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            multiprocessing_context="fork" if self.num_workers > 0 and os.name == "posix" else None,
            generator=_loader_generator(self.seed),
        )

    def _train_repeats(self) -> np.ndarray | None:
        """How often each training sample appears in an epoch (None: once each); see
        :class:`training.datasets.ChunkBatchSampler`."""
        return None

    def train_dataloader(self) -> DataLoader:
        return self._train_position.attach(self._loader("train", shuffle=True))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (see :class:`_TrainLoaderPosition`)."""
        return {"train_loader": self._train_position.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._train_position.load_state_dict(state.get("train_loader"))


def _weak_phase_option(option: Mapping[str, Any] | None) -> dict[str, float] | None:
    """``data.oversample_weak_phase`` checked: null, or ``{spread_below_rad: > 0, repeats: integer >= 1}``."""
    if option is None:
        return None
    option = _plain(option)
    if not isinstance(option, Mapping) or set(option) != {"spread_below_rad", "repeats"}:
        raise ValueError(
            "data.oversample_weak_phase must be null or {spread_below_rad: RAD, repeats: N}, got "
            f"{option!r}"
        )
    below, repeats = float(option["spread_below_rad"]), option["repeats"]
    if not below > 0 or int(repeats) != repeats or int(repeats) < 1:
        raise ValueError(
            "data.oversample_weak_phase: spread_below_rad must be > 0 and repeats an integer >= 1, got "
            f"{option!r}"
        )
    return {"spread_below_rad": below, "repeats": int(repeats)}


def ptychonn_view(
    batch: Mapping[str, torch.Tensor], counts: torch.Tensor, mask_threshold: float = 0.1
) -> dict:
    """PtychoNN's single-CBED view of a kernel batch.

    ``diffraction`` (B, 1, K, K): the centre CBED's counts divided by their maximum (no log, paper 004);
    ``amplitude`` and ``phase`` (B, 1, K, K): the phase-object approximation ``T = psi_out / psi_in``
    where ``|psi_in|^2 > mask_threshold * max`` (amplitude clipped to [0, 1]), vacuum (1, 0) elsewhere.
    """
    from models.losses import illuminated_mask

    wave, probe = batch["wave"], batch["probe"]
    mask = illuminated_mask(probe, mask_threshold) > 0
    ratio = wave / torch.where(mask, probe, torch.ones_like(probe))
    amplitude = torch.where(mask, ratio.abs().clamp(0, 1), torch.ones_like(ratio.real))
    phase = torch.where(mask, torch.angle(ratio), torch.zeros_like(ratio.real))
    centre = counts[:, 4]
    peak = centre.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return {
        "diffraction": (centre / peak)[:, None].float(),
        "amplitude": amplitude[:, None].float(),
        "phase": phase[:, None].float(),
        "mask": mask[:, None],
        "index": batch["index"],
    }


#: kernel-shard columns -> the ``trained_for`` quantity they give
#: (:data:`evaluation.networks.checkpoints.TRAINED_FOR_UNITS`)
KERNEL_RANGE_COLUMNS = {
    "energy_eV": "energy_eV",
    "semiangle_mrad": "semiangle_mrad",
    "Cs_A": "Cs_A",
    "defocus_A": "defocus_A",
    "step_A": "scan_step_A",
}


def kernel_sample_optics(
    index: ShardIndex, indices: np.ndarray, extra_columns: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """Per-sample optics of the kernel samples ``indices`` (global), in that order: the columns of
    :data:`KERNEL_RANGE_COLUMNS` and ``extra_columns`` (per-sample scalars such as ``thickness_A``) that
    any shard holds (NaN for samples of shards that lack one) and ``alpha_over_gmax``, the aperture
    ``semiangle / wavelength`` over the CBED's ``gmax_invA``."""
    from physics.optics import wavelength

    indices = np.asarray(indices, dtype=np.int64)
    shard_of, local = index.locate(indices)
    values: dict[str, np.ndarray] = {}
    for shard in np.unique(shard_of):
        rows = shard_of == shard
        with h5py.File(index.paths[int(shard)], "r") as handle:
            for name in (*KERNEL_RANGE_COLUMNS, *extra_columns, "gmax_invA"):
                if name in handle:
                    column = values.setdefault(name, np.full(indices.size, np.nan))
                    column[rows] = np.asarray(handle[name][:], float)[local[rows]]
    gmax = values.pop("gmax_invA", None)
    if gmax is not None and "energy_eV" in values and "semiangle_mrad" in values:
        energy = values["energy_eV"]
        lam = np.array([wavelength(float(e)) if np.isfinite(e) else np.nan for e in energy])
        values["alpha_over_gmax"] = values["semiangle_mrad"] * 1e-3 / lam / gmax
    return values


def kernel_training_ranges(
    index: ShardIndex, indices: np.ndarray, scan_step: bool = True
) -> dict[str, list[float]]:
    """``{quantity: [low, high]}`` over the kernel samples ``indices`` (global) of ``index``: energy,
    semi-angle, Cs, defocus, scan step (when ``scan_step``) and ``alpha_over_gmax``
    (:func:`kernel_sample_optics`). Columns no shard holds are left out."""
    ranges = {}
    for name, v in kernel_sample_optics(index, indices).items():
        finite = v[np.isfinite(v)]
        if not finite.size or (name == "step_A" and not scan_step):
            continue
        ranges[KERNEL_RANGE_COLUMNS.get(name, name)] = [float(finite.min()), float(finite.max())]
    return ranges


class MultisliceDataModule(_ShardDataModule):
    """Kernel shards for AIRPI (``view="airpi"``) and PtychoNN (``view="ptychonn"``).

    ``augmentation``: keyword arguments of :class:`training.augment.AirpiAugmentation` (dose range in
    electrons per CBED, no-specimen probability, misalignment, detector noise, ...). The PtychoNN view
    uses its dose range for the centre CBED; ``label_weight="mask"`` adds the illuminated mask as the
    batch's loss ``weight`` (the outside is vacuum by construction, not predictable from the pattern), and
    :meth:`training_statistics` (``statistics_samples`` training samples) feeds PtychoNN's
    ``model.standardise_inputs`` / ``standardise_labels``. Checkpoints record the training optics
    (:meth:`checkpoint_info`).
    """

    dataset_class = KernelDataset
    schema = store.KERNEL

    def __init__(
        self,
        data_dir: str | Sequence[str],
        view: str = "airpi",
        augmentation: Mapping[str, Any] | None = None,
        label_weight: str | None = None,
        statistics_samples: int = 4096,
        oversample_weak_phase: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, **kwargs)
        self.oversample_weak_phase = _weak_phase_option(oversample_weak_phase)
        self._repeats: np.ndarray | None = None
        if view not in ("airpi", "ptychonn"):
            raise ValueError(f"data.view must be 'airpi' or 'ptychonn', got {view!r}")
        if label_weight not in (None, "mask"):
            raise ValueError(f"data.label_weight must be null or 'mask', got {label_weight!r}")
        if label_weight is not None and view != "ptychonn":
            raise ValueError("data.label_weight=mask applies to data.view=ptychonn only")
        self.view = view
        self.label_weight = label_weight
        self.statistics_samples = int(statistics_samples)
        options = _ranges_as_tuples(_plain(augmentation))
        options.setdefault("seed", self.seed)
        self.augmentation = AirpiAugmentation(**options)

    def checkpoint_info(self) -> dict[str, dict[str, Any]]:
        """What checkpoints record of this training (:class:`training.callbacks.ModelProvenance`): the
        ranges of the training split's optics as ``trained_for`` (:func:`kernel_training_ranges`; the
        scan step only for AIRPI, whose neighbour channels depend on it) plus the training dose range
        in electrons per CBED. A model trained on kernel shards then warns, in ``reconstruct.py``, for a
        scan outside them, and is resampled to the ``alpha / gmax`` it saw."""
        self.setup()
        trained_for = kernel_training_ranges(
            self.index, self.datasets["train"].indices, scan_step=self.view == "airpi"
        )
        dose = self.augmentation.dose_e_range
        if dose is not None:
            trained_for["dose_e_per_cbed"] = [float(min(dose)), float(max(dose))]
        return {"trained_for": trained_for}

    def _train_repeats(self) -> np.ndarray | None:
        """With ``oversample_weak_phase`` ``{spread_below_rad: S, repeats: R}``: each training sample whose
        true object phase varies by less than ``S`` rad (standard deviation over the illuminated disc,
        :func:`models.losses.object_phase_spread`) appears ``R`` times per epoch, each time with its own
        dose and dihedral draws; the others once. Computed once from the labels (noise free)."""
        if self.oversample_weak_phase is None:
            return None
        if self._repeats is None:
            spread = self.train_phase_spread_rad()
            weak = spread < self.oversample_weak_phase["spread_below_rad"]
            self._repeats = np.where(weak, self.oversample_weak_phase["repeats"], 1).astype(np.int64)
        return self._repeats

    def train_phase_spread_rad(self, batch_size: int = 256) -> np.ndarray:
        """Object-phase spread (rad) of every training sample, in the training dataset's order."""
        from models.losses import object_phase_spread

        self.setup()
        dataset = self.datasets["train"]
        parts = []
        for start in range(0, len(dataset), batch_size):
            positions = list(range(start, min(start + batch_size, len(dataset))))
            batch = collate_batched(dataset.__getitems__(positions))
            parts.append(object_phase_spread(batch["wave"], batch["probe"]).numpy())
        return np.concatenate(parts) if parts else np.empty(0)

    def training_statistics(self) -> dict[str, torch.Tensor]:
        """PtychoNN view of up to ``statistics_samples`` training samples (a seeded draw, noise free):
        ``diffraction`` (N, 1, K, K), ``amplitude`` and ``phase`` (1, 1, 1, M): the label pixels the loss
        sees (with ``label_weight="mask"`` the illuminated ones only), what
        :class:`models.ptychonn.PtychoNNStandardisation` is fitted on (``model.standardise_*``)."""
        if self.view != "ptychonn":
            raise ValueError("training_statistics() is the PtychoNN view's (data.view=ptychonn)")
        self.setup()
        dataset = self.datasets["train"]
        count = min(len(dataset), max(1, self.statistics_samples))
        rng = np.random.default_rng(self.seed)
        positions = np.sort(rng.choice(len(dataset), size=count, replace=False))
        parts: dict[str, list[torch.Tensor]] = {"diffraction": [], "amplitude": [], "phase": []}
        for start in range(0, count, 256):
            batch = collate_batched(dataset.__getitems__(positions[start : start + 256].tolist()))
            view = ptychonn_view(batch, batch["cbed"])
            parts["diffraction"].append(view["diffraction"])
            for key in ("amplitude", "phase"):
                # with the mask weights the loss sees the illuminated disc only (~0.3 % of a 64 px patch
                # here): label statistics of the whole patch, mostly vacuum, would make a typical
                # standardised error ~15 std (phase std 0.026 rad overall, 0.38 rad on the disc)
                label = view[key][view["mask"]] if self.label_weight == "mask" else view[key]
                parts[key].append(label.reshape(-1))
        stats = {key: torch.cat(values) for key, values in parts.items()}
        stats["amplitude"], stats["phase"] = (stats[k][None, None, None] for k in ("amplitude", "phase"))
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Training-noise generator states and the training loader's position, saved in checkpoints so
        that a resumed run continues exactly."""
        return {**super().state_dict(), "generators": self.augmentation.generator_states()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.augmentation.restore_generators(state.get("generators", {}))

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict:
        deterministic = _stage(getattr(self, "trainer", None)) != "train"
        if self.view == "airpi":
            return self.augmentation(batch, deterministic=deterministic)
        # PtychoNN: dose on the kernel (centre used), the label is the POA object
        if deterministic:
            generator = per_sample_generators(
                batch["index"], self.augmentation.eval_seed, batch["cbed"].device
            )
        else:
            generator = self.augmentation.generator_for(batch["cbed"].device)
        counts = batch["cbed"]
        if self.augmentation.dose_e_range is not None:
            dose = uniform_range(generator, counts.shape[0], *self.augmentation.dose_e_range, log=True,
                                 device=counts.device, dtype=torch.float64)  # fmt: skip
            counts = apply_dose(counts, dose, generator)
        view = ptychonn_view(batch, counts)
        if self.label_weight == "mask":  # the loss on the illuminated object only (what is stitched)
            view["weight"] = view["mask"].float()
        return view


class HaadfDataModule(_ShardDataModule):
    """Clean (HA)ADF image shards -> (``distorted``, ``clean``) pairs, distortions drawn per sample.

    ``distortion``: keyword arguments of :class:`training.distortions.StemDistortion`. Images are split
    per image (they carry no structure id), reproducibly from the seed.

    ``crop_px``: None (default) = whole images; an even number of pixels = square crops of that side:
    random positions for training (from the module's own seeded generator, saved in checkpoints), the
    centre for validation and test, so validation scores stay fixed. The crop is cut from the clean image
    with ``crop_margin_px`` extra pixels on each side (as far as the image reaches), distorted, and the
    margin then cut away: the scan jitter of a pixel near the crop edge reads the true neighbouring
    pixels, as in the full field, and the fast-scan response has its lead-in along the line. The
    distortion works per pixel with the physical dose: counts = clean fraction x dose (e/A^2) x pixel area
    (A^2), the same in a crop as in the whole image, so the dose of a crop is that of the image.
    """

    dataset_class = ImageDataset
    schema = store.IMAGE

    def __init__(
        self,
        data_dir: str | Sequence[str],
        distortion: Mapping[str, Any] | None = None,
        crop_px: int | None = None,
        crop_margin_px: int = 8,
        **kwargs: Any,
    ):
        super().__init__(data_dir, **kwargs)
        if crop_px is not None and (int(crop_px) != crop_px or crop_px < 2 or int(crop_px) % 2):
            raise ValueError(
                f"crop_px must be None or an even integer >= 2 (the CGRDN's contract), got {crop_px!r}"
            )
        if int(crop_margin_px) != crop_margin_px or crop_margin_px < 0:
            raise ValueError(f"crop_margin_px must be an integer >= 0, got {crop_margin_px!r}")
        self.crop_px = None if crop_px is None else int(crop_px)
        self.crop_margin_px = int(crop_margin_px)
        options = _ranges_as_tuples(_plain(distortion))
        options.setdefault("seed", self.seed)
        self.distortion = StemDistortion(**options)
        self._crop_generators = SeededModule(self.seed + 1)  # crop positions (training), own stream

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "generators": self.distortion.generator_states(),
            "crop_generators": self._crop_generators.generator_states(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.distortion.restore_generators(state.get("generators", {}))
        self._crop_generators.restore_generators(state.get("crop_generators", {}))

    def crop(self, clean: torch.Tensor, random: bool) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Windows of ``clean`` (B, H, W) around ``crop_px`` crops, with margin: ``(windows, (t, l, b, r))``.

        ``windows`` (B, h, w) holds each sample's crop plus up to ``crop_margin_px`` pixels on each side
        (clipped at the image edge, the same margins for the whole batch); ``(t, l, b, r)`` are the
        margins to cut away afterwards (top, left, bottom, right). Random crop positions (uniform over
        the image) when ``random``, else the centre.
        """
        b, h, w = clean.shape
        c, m = self.crop_px, self.crop_margin_px
        if c is None:
            return clean, (0, 0, 0, 0)
        if c > h or c > w:
            raise ValueError(f"crop_px={c} is larger than the images ({h} x {w} px)")
        if random:
            g = self._crop_generators.generator_for(clean.device)
            top = torch.randint(0, h - c + 1, (b,), generator=g, device=clean.device)
            left = torch.randint(0, w - c + 1, (b,), generator=g, device=clean.device)
        else:
            top = torch.full((b,), (h - c) // 2, device=clean.device)
            left = torch.full((b,), (w - c) // 2, device=clean.device)
        # margins common to the batch: as much of crop_margin_px as every sample's window allows
        mt, ml = min(m, int(top.min())), min(m, int(left.min()))
        mb, mr = min(m, int((h - c - top).min())), min(m, int((w - c - left).min()))
        rows = (top - mt)[:, None] + torch.arange(c + mt + mb, device=clean.device)  # (B, h')
        cols = (left - ml)[:, None] + torch.arange(c + ml + mr, device=clean.device)  # (B, w')
        batch = torch.arange(b, device=clean.device)[:, None, None]
        return clean[batch, rows[:, :, None], cols[:, None, :]], (mt, ml, mb, mr)

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict:
        clean = batch["image"].float()
        pixel = batch["pixel_size_A"].float()
        training = _stage(getattr(self, "trainer", None)) == "train"
        window, (mt, ml, mb, mr) = self.crop(clean, random=training)
        if training:
            distorted = self.distortion(window, pixel)  # the module's own seeded generator
        else:
            distorted = self.distortion(window, pixel, indices=batch["index"])
        h, w = window.shape[-2:]
        inner = (slice(None), slice(mt, h - mb), slice(ml, w - mr))
        return {
            "distorted": distorted[inner][:, None].contiguous(),
            "clean": window[inner][:, None].contiguous(),
            "index": batch["index"],
        }


class _SeedDataset(Dataset):
    """Sample indices only: the samples themselves are drawn on the device from them."""

    def __init__(self, start: int, length: int) -> None:
        self.start, self.length = int(start), int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int) -> int:
        return self.start + int(position)


class StockImagesDataModule(L.LightningDataModule):
    """On-the-fly Chang U-Net data (:class:`datagen.stock_images.ChangForwardModel`).

    Each epoch draws ``train_samples`` fresh samples; validation and test sets are fixed (every sample
    is seeded by its own index, so they do not depend on the batch size). The network input is
    ``sqrt(counts / total)`` of a Poisson pattern with a dose drawn log-uniformly in ``dose_e_range``
    electrons per pattern (``None``: noise free), ``phase`` the label patch and ``mask`` the
    illuminated area.
    """

    def __init__(
        self,
        forward_model: Mapping[str, Any] | None = None,
        dose_e_range: Sequence[float] | None = (1e3, 1e6),
        batch_size: int = 16,
        train_samples: int = 25_000,
        val_samples: int = 1_000,
        test_samples: int = 1_000,
        seed: int = 0,
        eval_seed: int = 4321,
        image_bank: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.forward_options = _plain(forward_model)
        self.bank_options = _plain(image_bank)
        if dose_e_range is not None and not 0 < dose_e_range[0] <= dose_e_range[1]:
            raise ValueError(f"data.dose_e_range must be positive and ordered, got {list(dose_e_range)}")
        self.dose_e_range = None if dose_e_range is None else (float(dose_e_range[0]), float(dose_e_range[1]))
        self.batch_size = int(batch_size)
        self.sizes = {"train": int(train_samples), "val": int(val_samples), "test": int(test_samples)}
        self.seed, self.eval_seed = int(seed), int(eval_seed)
        self.model = None
        self._train_generator: torch.Generator | None = None
        self._epoch_batches = 0

    def setup(self, stage: str | None = None) -> None:
        if self.model is not None:
            return
        from datagen.stock_images import ChangForwardModel, StockImageBank

        options = dict(self.forward_options)
        for key, value in list(options.items()):
            if isinstance(value, list):
                options[key] = tuple(value)
        bank = StockImageBank.build(
            **{k: (tuple(v) if isinstance(v, list) else v) for k, v in self.bank_options.items()}
        )
        self.model = ChangForwardModel(bank=bank, **options)

    def _loader(self, name: str) -> DataLoader:
        self.setup()
        offsets = {"train": 0, "val": 10**9, "test": 2 * 10**9}
        return DataLoader(
            _SeedDataset(offsets[name], self.sizes[name]),
            batch_size=self.batch_size,
            generator=_loader_generator(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def draw(self, indices: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A batch for ``indices`` on their device, random numbers from ``generator`` (CPU)."""
        self.setup()
        device = indices.device
        self.model.to(device)
        sample = self.model(indices.numel(), generator, device)
        intensity = sample["diffraction"].to(device)
        if self.dose_e_range is not None:
            low, high = (math.log(v) for v in self.dose_e_range)
            dose = torch.exp(
                low + (high - low) * torch.rand(indices.numel(), generator=generator, dtype=torch.float64)
            )
            noise_generator = make_generator(int(torch.randint(0, 2**62, (1,), generator=generator)), device)
            counts = apply_dose(intensity, dose.to(device), noise_generator)
        else:
            counts = intensity
        total = counts.flatten(1).sum(1).clamp_min(1e-12)[:, None, None]
        return {
            "diffraction": torch.sqrt(counts / total)[:, None].float(),
            "phase": sample["phase"].to(device)[:, None],
            "mask": sample["mask"].to(device)[:, None].float(),
            "index": indices,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"generator": None if self._train_generator is None else self._train_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("generator") is not None:
            self._train_generator = torch.Generator()
            self._train_generator.set_state(state["generator"])

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> dict:
        indices = batch
        if _stage(getattr(self, "trainer", None)) == "train":
            if self._train_generator is None:
                self._train_generator = torch.Generator().manual_seed(self.seed)
            generator = self._train_generator
            return self.draw(indices, generator)
        return self.draw_fixed(indices)

    def draw_fixed(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The validation/test batch of ``indices``: every sample drawn from its own generator, seeded
        by ``(eval_seed, index)``, so that a sample is the same in any batch."""
        seeds = [self.eval_seed * 1_000_003 + index for index in indices.tolist()]
        samples = [
            self.draw(indices[i : i + 1], torch.Generator().manual_seed(seed)) for i, seed in enumerate(seeds)
        ]
        return {key: torch.cat([sample[key] for sample in samples]) for key in samples[0]}


class _ScanPatchDataset(Dataset):
    """Patterns of a 4D-STEM scan at given positions with the object patches centred on them."""

    def __init__(self, module: EpieLabelsDataModule, positions: np.ndarray) -> None:
        self.module, self.positions = module, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        i, j = (int(v) for v in self.positions[item])
        return self.module.sample(i, j)


class EpieLabelsDataModule(L.LightningDataModule):
    """PtychoNN trained as in paper 004: a scan and its ePIE reconstruction (``deepstem.recon/1``).

    Samples are the diffraction patterns at scan positions ``(i, j)`` (``i`` = scan line, the first index
    of ``data[Rx, Ry]``), resized to ``patch_px`` (area average or bilinear) and divided by their maximum,
    with labels the amplitude and phase of the reconstructed object in a ``patch_px`` window of the
    reconstruction's pixels centred on the probe position (bilinear interpolation of the complex object,
    so sub-pixel positions are honoured). The first ``train_fraction`` of the scan lines train (the last
    ``val_fraction`` of those validate), the remaining lines test: paper 004 used 100 of 161 lines.
    ``dose_e_range`` optionally adds Poisson noise to noise-free simulated patterns: training noise from
    one generator per device seeded by ``seed`` (saved in checkpoints), validation and test noise seeded
    by ``(seed + 1, index)``. The training order is shuffled per epoch from ``(seed, epoch)``
    (:class:`training.datasets.EpochBatchSampler`); loaders are :class:`ResumableDataLoader`, so that a
    run resumed from any checkpoint trains on the batches and noise of the uninterrupted one.

    ``label_weight="probe"`` adds ``weight`` (B, 1, patch_px, patch_px) to every batch: the probe intensity
    ``|psi_in|^2 / max`` on the label window (the ePIE pixel; the scan's energy, semi-angle, defocus, Cs)
    where it exceeds ``weight_threshold``, 0 elsewhere: the weights with which a reconstruction stitches
    the patches. A pattern sees only the illuminated object (a 0.6 A probe radius against a window of
    ``patch_px`` ePIE pixels, ~8 A for 32 px of 0.25 A): the rest of the window cannot be predicted from it,
    and with uniform weights it is ~99 % of the loss (issue #15). ``"uniform"`` (default): no weight.
    :meth:`training_statistics` gives the training split's (noise-free) inputs and labels, from which a
    PtychoNN with ``standardise_inputs`` / ``standardise_labels`` fits its standardisation.
    """

    def __init__(
        self,
        scan_path: str,
        recon_path: str,
        patch_px: int = 64,
        train_fraction: float = 100 / 161,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        dose_e_range: Sequence[float] | None = None,
        seed: int = 0,
        label_weight: str = "uniform",
        weight_threshold: float = 0.1,
    ) -> None:
        super().__init__()
        if label_weight not in ("uniform", "probe"):
            raise ValueError(f"data.label_weight must be 'uniform' or 'probe', got {label_weight!r}")
        self.label_weight, self.weight_threshold = label_weight, float(weight_threshold)
        self.weight: torch.Tensor | None = None
        if not 0 < train_fraction < 1 or not 0 <= val_fraction < 1:
            raise ValueError(f"data.train_fraction in (0, 1) and val_fraction in [0, 1) required, got "
                             f"{train_fraction}, {val_fraction}")  # fmt: skip
        self.scan_path, self.recon_path = scan_path, recon_path
        self.patch_px, self.batch_size, self.num_workers = int(patch_px), int(batch_size), int(num_workers)
        self.train_fraction, self.val_fraction = float(train_fraction), float(val_fraction)
        self.dose_e_range = None if dose_e_range is None else tuple(float(v) for v in dose_e_range)
        self.seed = int(seed)
        self.scan = None
        self._noise = SeededModule(self.seed)  # training dose noise, one generator per device
        self._train_position = _TrainLoaderPosition()

    def setup(self, stage: str | None = None) -> None:
        if self.scan is not None:
            return
        from evaluation.io import load_4dstem

        self.scan = load_4dstem(self.scan_path)
        with store.open_checked(self.recon_path, store.RECON) as handle:
            phase = handle["phase"][()].astype(np.float64)
            amplitude = (
                handle["amplitude"][()].astype(np.float64) if "amplitude" in handle else np.ones_like(phase)
            )
            self.pixel_size_A = np.broadcast_to(np.asarray(handle.attrs["pixel_size_A"], float), (2,))
            self.origin_A = np.broadcast_to(np.asarray(handle.attrs["origin_A"], float), (2,))
        self.object = amplitude * np.exp(1j * phase)
        rx, ry = self.scan.data.shape[:2]
        train_lines = max(1, round(self.train_fraction * rx))
        val_lines = round(self.val_fraction * train_lines)
        if train_lines - val_lines < 1 or train_lines >= rx:
            raise ValueError(f"{self.scan_path}: {rx} scan lines cannot be split with train_fraction="
                             f"{self.train_fraction}, val_fraction={self.val_fraction}")  # fmt: skip
        first_val = train_lines - val_lines
        lines = {
            "train": range(first_val),
            "val": range(first_val, train_lines),
            "test": range(train_lines, rx),
        }
        self.positions = {
            name: np.array([(i, j) for i in rows for j in range(ry)], dtype=np.int64).reshape(-1, 2)
            for name, rows in lines.items()
        }
        if self.label_weight == "probe":
            self.weight = self.probe_weight()

    def checkpoint_info(self) -> dict[str, dict[str, Any]]:
        """What checkpoints record of this training (:class:`training.callbacks.ModelProvenance`): the input
        geometry (each whole ``N x N`` detector resized to ``patch_px``; read by
        :func:`evaluation.networks.checkpoints.ptychonn_geometry_params`) and the scan's optics as
        ``trained_for`` ranges of one value (:data:`evaluation.networks.checkpoints.TRAINED_FOR_UNITS`)."""
        if self.scan is None:
            return {}
        scan = self.scan
        steps = [float(v) for v in np.broadcast_to(np.asarray(scan.scan_step_A, float), (2,))]
        trained_for = {
            "energy_eV": [float(scan.energy_eV)] * 2,
            "semiangle_mrad": [float(scan.semiangle_mrad)] * 2,
            "scan_step_A": [min(steps), max(steps)],
            "Cs_A": [float(getattr(scan, "Cs_A", 0.0) or 0.0)] * 2,
            "defocus_A": [float(getattr(scan, "defocus_A", 0.0) or 0.0)] * 2,
        }
        if self.dose_e_range is not None:
            trained_for["dose_e_per_cbed"] = [min(self.dose_e_range), max(self.dose_e_range)]
        geometry = {
            "network_px": float(self.patch_px),
            "detector_px": float(self.scan.data.shape[-1]),
            "whole_detector": 1.0,
        }
        if self.label_weight == "probe":  # the loss footprint: the stitching should use the same
            geometry["weight_threshold"] = float(self.weight_threshold)
        return {"geometry": geometry, "trained_for": trained_for}

    def probe_weight(self) -> torch.Tensor:
        """The probe intensity on the label window (1, patch_px, patch_px), max 1, 0 below the threshold."""
        from physics import probe

        pixel_A = float(self.pixel_size_A[0])
        if not np.isclose(self.pixel_size_A[1], pixel_A, rtol=1e-6):
            raise ValueError(f"{self.recon_path}: label_weight=probe needs square pixels, "
                             f"got {self.pixel_size_A}")  # fmt: skip
        scan = self.scan
        psi = probe(
            float(scan.energy_eV), float(scan.semiangle_mrad), self.patch_px, sampling_A=pixel_A,
            defocus_A=float(getattr(scan, "defocus_A", 0.0) or 0.0),
            Cs_A=float(getattr(scan, "Cs_A", 0.0) or 0.0),
        )  # fmt: skip
        intensity = np.abs(psi) ** 2
        intensity = intensity / intensity.max()
        weight = np.where(intensity > self.weight_threshold, intensity, 0.0)
        return torch.from_numpy(weight.astype(np.float32))[None]

    def training_statistics(self) -> dict[str, torch.Tensor]:
        """The training split stacked: ``diffraction`` (N, 1, K, K), each pattern over its maximum (no dose
        noise), ``amplitude`` and ``phase`` (N, 1, K, K): what a standardisation is fitted on."""
        self.setup()
        samples = [self.sample(int(i), int(j)) for i, j in self.positions["train"]]
        patterns = torch.stack([s["pattern"] for s in samples])[:, None]
        patterns = patterns / patterns.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
        return {
            "diffraction": patterns.float(),
            "amplitude": torch.stack([s["amplitude"] for s in samples]),
            "phase": torch.stack([s["phase"] for s in samples]),
        }

    def label(self, i: int, j: int) -> np.ndarray:
        """The complex object in a ``patch_px`` window centred on scan position ``(i, j)``."""
        from scipy.ndimage import map_coordinates

        step = np.broadcast_to(np.asarray(self.scan.scan_step_A, float), (2,))
        centre_px = (np.array([i, j]) * step - self.origin_A) / self.pixel_size_A
        offsets = np.arange(self.patch_px) - self.patch_px // 2
        coordinates = np.stack(np.meshgrid(centre_px[0] + offsets, centre_px[1] + offsets, indexing="ij"))
        real = map_coordinates(self.object.real, coordinates, order=1, mode="nearest")
        imag = map_coordinates(self.object.imag, coordinates, order=1, mode="nearest")
        return real + 1j * imag

    def pattern(self, i: int, j: int) -> torch.Tensor:
        """The pattern at ``(i, j)`` resized to ``patch_px`` x ``patch_px`` (sum preserved)."""
        pattern = torch.from_numpy(np.asarray(self.scan.data[i, j], dtype=np.float32))[None, None]
        k = pattern.shape[-1]
        if k != self.patch_px:
            total = pattern.sum()
            mode = "area" if k % self.patch_px == 0 else "bilinear"
            pattern = torch.nn.functional.interpolate(pattern, size=(self.patch_px, self.patch_px), mode=mode)
            pattern = pattern * total / pattern.sum().clamp_min(1e-30)
        return pattern[0, 0]

    def sample(self, i: int, j: int) -> dict[str, torch.Tensor]:
        obj = self.label(i, j)
        return {
            "pattern": self.pattern(i, j),
            "amplitude": torch.from_numpy(np.abs(obj).astype(np.float32))[None],
            "phase": torch.from_numpy(np.angle(obj).astype(np.float32))[None],
            "index": torch.tensor(i * self.scan.data.shape[1] + j),
        }

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.setup()
        trainer = getattr(self, "trainer", None)
        sampler = EpochBatchSampler.per_sample(
            len(self.positions[name]),
            self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            rank=trainer.global_rank if trainer is not None else 0,
            num_replicas=trainer.world_size if trainer is not None else 1,
        )
        return ResumableDataLoader(
            _ScanPatchDataset(self, self.positions[name]),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            generator=_loader_generator(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._train_position.attach(self._loader("train", shuffle=True))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        """Training-noise generator states and the training loader's position, saved in checkpoints so
        that a resumed run continues exactly."""
        return {
            "train_loader": self._train_position.state_dict(),
            "generators": self._noise.generator_states(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._train_position.load_state_dict(state.get("train_loader"))
        self._noise.restore_generators(state.get("generators", {}))

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict:
        counts = batch["pattern"]
        if self.dose_e_range is not None:
            if _stage(getattr(self, "trainer", None)) == "train":
                generator = self._noise.generator_for(counts.device)
            else:
                generator = per_sample_generators(batch["index"], self.seed + 1, counts.device)
            dose = uniform_range(
                generator,
                counts.shape[0],
                *self.dose_e_range,
                log=True,
                device=counts.device,
                dtype=torch.float64,
            )
            counts = apply_dose(counts, dose, generator)
        peak = counts.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        out = {
            "diffraction": (counts / peak)[:, None].float(),
            "amplitude": batch["amplitude"],
            "phase": batch["phase"],
            "index": batch["index"],
        }
        if self.weight is not None:
            out["weight"] = self.weight.to(counts.device)[None].expand(counts.shape[0], -1, -1, -1)
        return out
