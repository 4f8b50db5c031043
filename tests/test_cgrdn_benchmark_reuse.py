"""restoration_benchmark.py --reuse-bm3d: the BM3D rows of an earlier run of the same images and noise."""

from __future__ import annotations

import json

import pytest

from tests.test_restoration_benchmark import _script

ARGS = ["--images", "1", "--pixels", "32", "--doses", "5e3", "--skip-bm3d"]


def _earlier(tmp_path) -> dict:
    """A first run without BM3D; its oracle rows relabelled as 'bm3d' stand in for an earlier BM3D run."""
    assert _script().main([*ARGS, "--out", str(tmp_path / "first")]) == 0
    first = json.loads((tmp_path / "first" / "restoration_benchmark.json").read_text())
    fake = [
        {**row, "method": "bm3d", "psnr_db": 99.0}
        for row in first["rows"]
        if row["method"] == "gaussian_oracle"
    ]
    return {**first, "rows": first["rows"] + fake}


def test_reused_bm3d_rows_join_the_table_only_for_the_same_images_and_noise(tmp_path, capsys):
    earlier = _earlier(tmp_path)
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    assert _script().main([*ARGS, "--reuse-bm3d", str(path), "--out", str(tmp_path / "second")]) == 0
    second = json.loads((tmp_path / "second" / "restoration_benchmark.json").read_text())
    bm3d = [row for row in second["table"] if row["method"] == "bm3d"]
    assert len(bm3d) == 1 and bm3d[0]["psnr_db"] == 99.0 and second["bm3d_reused_from"] == str(path)
    # other noise (a noisy-input score differs): refused
    changed = {**earlier, "rows": [{**r, "psnr_db": r["psnr_db"] + 0.5} if r["method"] == "noisy" else r
                                   for r in earlier["rows"]]}  # fmt: skip
    path.write_text(json.dumps(changed))
    assert _script().main([*ARGS, "--reuse-bm3d", str(path), "--out", str(tmp_path / "third")]) == 2
    assert "noisy-input scores differ" in capsys.readouterr().err
    # another seed: refused before anything is computed
    path.write_text(json.dumps({**earlier, "seed": 1}))
    with pytest.raises(SystemExit):
        _script().main([*ARGS, "--reuse-bm3d", str(path), "--out", str(tmp_path / "fourth")])
    assert "seed is 1, this run 16016" in capsys.readouterr().err
