"""The ``deepstem.image/1`` shard layout of the HAADF images: :data:`IMAGE_LAYOUT`, :func:`image_layout`,
:func:`write_image_index`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from datagen import store
from datagen.shards import ShardLayout, write_index

__all__ = [
    "IMAGE_LAYOUT",
    "IMAGE_NUMERIC_FIELDS",
    "IMAGE_STRING_FIELDS",
    "image_layout",
    "write_image_index",
]


IMAGE_STRING_FIELDS = ("model", "specimen_kind", "source_id", "formula", "description")
IMAGE_NUMERIC_FIELDS = (
    "image",
    "pixel_size_A",
    "energy_eV",
    "semiangle_mrad",
    "Cs_A",
    "C5_A",
    "defocus_A",
    "detector_inner_mrad",
    "detector_outer_mrad",
    "source_size_A",
    "z_exponent",
    "atom_sigma_A",
    "num_phonons",
    "thickness_A",
    "zone_axis",
    "rotation_deg",
    "num_atoms",
    "seed",
    "sample_index",
)
_DTYPES = {
    "image": np.float32,
    "zone_axis": np.int32,
    "num_phonons": np.int32,
    "num_atoms": np.int64,
    "seed": np.int64,
    "sample_index": np.int64,
}


IMAGE_LAYOUT = ShardLayout(
    store.IMAGE,
    IMAGE_NUMERIC_FIELDS,
    IMAGE_STRING_FIELDS,
    dtypes=_DTYPES,
    empty_shapes={"zone_axis": (3,)},
    chunked=("image",),
)

"""Image shards (``deepstem.image/1``); :func:`image_layout` adds the image size of a config."""


def image_layout(pixels: int) -> ShardLayout:
    """:data:`IMAGE_LAYOUT` with ``pixels x pixels`` images (the shape of a shard without images)."""
    return replace(IMAGE_LAYOUT, empty_shapes={**IMAGE_LAYOUT.empty_shapes, "image": (pixels, pixels)})


def write_image_index(out_dir: str | Path) -> Path:
    """``index.json`` over the finished image shards of a folder (:func:`datagen.shards.write_index`)."""
    return write_index(out_dir, IMAGE_LAYOUT)
