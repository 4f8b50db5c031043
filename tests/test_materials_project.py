"""Materials Project source: the real mp-api client against a local fake server on 127.0.0.1.

The fake speaks the API's JSON (``/heartbeat``, ``/materials/summary/`` with paging), checks the
``X-API-KEY`` header and records the query parameters, so the tests prove the config's filters reach the
request, the cache is filled once and read offline, and the key never leaves the environment variable.
"""

from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from omegaconf import OmegaConf
from pymatgen.core import Lattice, Structure

from datagen.provenance import config_yaml
from datagen.sources import MaterialsProjectUnavailable, StructureSourceError, load_structures
from datagen.sources.materials_project import cache_path, fetch_materials_project, main

KEY = "0123456789abcdefSECRETmpKEY01234"  # 32 characters, as mp-api requires
CONF = Path(__file__).resolve().parents[1] / "conf" / "source" / "materials_project.yaml"


def _doc(material_id: str, structure: Structure, number: int | None = None, e_hull: float = 0.0) -> dict:
    doc = {
        "material_id": material_id,
        "formula_pretty": structure.composition.reduced_formula,
        "structure": structure.as_dict(),
        "energy_above_hull": e_hull,
    }
    if number is not None:
        doc["symmetry"] = {"number": number}
    return doc


def _documents() -> list[dict]:
    # primitive cells, as the database stores many structures
    si = Structure(
        Lattice.from_parameters(3.8396, 3.8396, 3.8396, 60, 60, 60), ["Si", "Si"], [[0, 0, 0], [0.25] * 3]
    )
    gaas = Structure(
        Lattice.from_parameters(3.9975, 3.9975, 3.9975, 60, 60, 60), ["Ga", "As"], [[0, 0, 0], [0.25] * 3]
    )
    disordered = Structure(Lattice.cubic(3.6), [{"Cu": 0.5, "Au": 0.5}], [[0, 0, 0]])
    return [
        _doc("mp-2534", gaas, 216),
        _doc("mp-149", si, 227),
        _doc("mp-99999", disordered, 225, 0.02),
    ]


class FakeMaterialsProject:
    """A threaded HTTP server answering like the Materials Project API."""

    def __init__(self, documents: list[dict]) -> None:
        self.documents = documents
        self.requests: list[tuple[str, dict, str | None]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                key = self.headers.get("X-API-KEY")
                fake.requests.append((url.path, query, key))
                if url.path.rstrip("/") == "/heartbeat":
                    self._send(
                        200,
                        {"db_version": "2025.09.25", "access_controlled_batch_ids": [], "version": "0.87.3"},
                    )
                elif url.path.rstrip("/") == "/materials/summary":
                    if key != KEY:
                        self._send(401, {"detail": "invalid API key"})
                        return
                    skip = int(query.get("_skip", ["0"])[0])
                    limit = int(query.get("_limit", ["1000"])[0])
                    page = fake.documents[skip : skip + limit]
                    self._send(
                        200, {"data": page, "meta": {"total_doc": len(fake.documents), "max_limit": 1000}}
                    )
                else:
                    self._send(404, {"detail": "not found"})

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def summary_requests(self) -> list[tuple[str, dict, str | None]]:
        return [r for r in self.requests if r[0].rstrip("/") == "/materials/summary"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeMaterialsProject(_documents())
    yield server
    server.close()


def make_cfg(tmp_path: Path, endpoint: str, **overrides):
    cfg = OmegaConf.load(CONF)
    cfg.merge_with(
        {
            "endpoint": endpoint,
            "cache_dir": str(tmp_path / "mp-cache"),
            "elements": ["Si"],
            "exclude_elements": ["O", "H"],
            "num_elements": [1, 2],
            "num_sites": [1, 20],
            "energy_above_hull": [0.0, 0.05],
            "theoretical": False,
            **overrides,
        }
    )
    return cfg


def test_fetch_sends_key_and_filters_then_load_reads_the_cache(tmp_path, fake, monkeypatch, caplog):
    monkeypatch.setenv("MP_API_KEY", KEY)
    cfg = make_cfg(tmp_path, fake.endpoint)
    caplog.set_level(logging.DEBUG)
    path = fetch_materials_project(cfg, progress=False)
    assert path == cache_path(cfg) and path.exists() and path.parent == tmp_path / "mp-cache"

    (request,) = fake.summary_requests()
    _, query, key = request
    assert key == KEY  # the key travels in the header only
    assert query["elements"] == ["Si"]
    assert query["exclude_elements"] == ["O,H"] or sorted(query["exclude_elements"]) == ["H", "O"]
    assert (query["nelements_min"], query["nelements_max"]) == (["1"], ["2"])
    assert (query["nsites_min"], query["nsites_max"]) == (["1"], ["20"])
    assert (
        float(query["energy_above_hull_min"][0]) == 0.0 and float(query["energy_above_hull_max"][0]) == 0.05
    )
    assert query["theoretical"] == ["False"] and query["deprecated"] == ["False"]
    assert "gnome" in query["batch_id_not_eq"][0]  # include_gnome: false
    assert {"material_id", "structure"} <= set(query["_fields"][0].split(","))

    n_queries = len(fake.requests)
    records = load_structures(cfg)
    assert len(fake.requests) == n_queries  # loading reads the cache, never the API
    assert [r.source_id for r in records] == ["mp-149", "mp-2534"]  # sorted by id, disordered one skipped
    si, gaas = records
    assert (si.formula, gaas.formula) == ("Si", "GaAs")
    # conventional standard cells: the 2-atom primitive cells become 8-atom cubic cells, density unchanged
    assert len(si.atoms) == 8 and si.atoms.cell.cellpar() == pytest.approx(
        [5.43, 5.43, 5.43, 90, 90, 90], abs=1e-3
    )
    assert len(si.atoms) / si.atoms.get_volume() == pytest.approx(2 / (3.8396**3 / np.sqrt(2)), rel=1e-4)
    assert sorted(gaas.atoms.get_chemical_symbols()) == ["As"] * 4 + ["Ga"] * 4
    assert si.atoms.pbc.all() and si.atoms.info["spacegroup"] == 227

    # the key reaches neither the cache, nor the config written next to outputs, nor the logs
    raw = gzip.decompress(path.read_bytes()).decode()
    document = json.loads(raw)
    assert document["format"] == "deepstem.mp_cache/1" and document["db_version"] == "2025.09.25"
    assert document["skipped_disordered"] == 1
    assert KEY not in raw and KEY not in path.name
    assert KEY not in config_yaml(cfg) and KEY not in caplog.text

    # a second fetch keeps the cache; another query gets its own file
    assert fetch_materials_project(cfg) == path and len(fake.requests) == n_queries
    assert cache_path(make_cfg(tmp_path, fake.endpoint, num_sites=[1, 10])) != path


def test_missing_cache_without_key_gives_one_clear_error(tmp_path, fake, monkeypatch):
    monkeypatch.delenv("MP_API_KEY", raising=False)
    cfg = make_cfg(tmp_path, fake.endpoint)
    with pytest.raises(MaterialsProjectUnavailable) as info:
        load_structures(cfg)
    message = str(info.value)
    assert "MP_API_KEY is not set" in message and "export MP_API_KEY" in message
    assert "fetch_materials_project" in message and "source=bundled" in message
    assert isinstance(info.value, StructureSourceError)
    # with a key but no cache, a plain load still does not query (cluster jobs never hit the API)
    monkeypatch.setenv("MP_API_KEY", KEY)
    with pytest.raises(MaterialsProjectUnavailable, match="no Materials Project structures are cached"):
        load_structures(cfg)
    assert fake.requests == []
    with pytest.raises(MaterialsProjectUnavailable, match="MP_API_KEY is not set"):
        monkeypatch.delenv("MP_API_KEY")
        fetch_materials_project(cfg)


def test_fetch_if_missing_fetches_once_then_reads(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("MP_API_KEY", KEY)
    cfg = make_cfg(tmp_path, fake.endpoint, fetch_if_missing=True, cell="as_is")
    records = load_structures(cfg)
    assert [len(r.atoms) for r in records] == [2, 2]  # as stored in the database
    assert len(fake.summary_requests()) == 1
    load_structures(cfg)
    assert len(fake.summary_requests()) == 1


def test_unreachable_server_and_refused_key_never_echo_the_key(tmp_path, fake, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    monkeypatch.setenv("MP_API_KEY", KEY)
    with pytest.raises(MaterialsProjectUnavailable, match=r"query to http://127\.0\.0\.1") as info:
        fetch_materials_project(make_cfg(tmp_path, closed))
    assert KEY not in str(info.value) and info.value.__cause__ is None and "source=bundled" in str(info.value)

    monkeypatch.setenv("MP_API_KEY", "wrong-" + KEY)
    with pytest.raises(MaterialsProjectUnavailable) as info:
        fetch_materials_project(make_cfg(tmp_path, fake.endpoint))
    assert KEY not in str(info.value) and "wrong-" not in str(info.value)
    assert not any(cache_path(make_cfg(tmp_path, fake.endpoint)).parent.glob("*"))  # nothing half-written


def test_all_pages_are_fetched(tmp_path, monkeypatch):
    base = Structure(Lattice.cubic(3.0), ["Po"], [[0, 0, 0]])
    server = FakeMaterialsProject([_doc(f"mp-{i}", base) for i in range(1, 1206)])
    try:
        monkeypatch.setenv("MP_API_KEY", KEY)
        records = load_structures(make_cfg(tmp_path, server.endpoint, cell="as_is", fetch_if_missing=True))
    finally:
        server.close()
    assert len(server.summary_requests()) == 2  # 1000 + 205
    assert [r.source_id for r in records] == [f"mp-{i}" for i in range(1, 1206)]  # numeric order


def test_command_line_fetch(tmp_path, fake, monkeypatch, capsys):
    cache = tmp_path / "cli-cache"
    args = [
        f"source.endpoint={fake.endpoint}",
        f"source.cache_dir={cache}",
        "source.elements=[Si]",
        "num_sites=[1,20]",
    ]
    monkeypatch.delenv("MP_API_KEY", raising=False)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MP_API_KEY" in err
    monkeypatch.setenv("MP_API_KEY", KEY)
    assert main(args) == 0
    assert "2 structures cached in" in capsys.readouterr().out
    (_, query, _) = fake.summary_requests()[0]
    assert query["elements"] == ["Si"] and query["nsites_max"] == ["20"]
    cfg = OmegaConf.merge(
        OmegaConf.load(CONF),
        {"endpoint": fake.endpoint, "cache_dir": str(cache), "elements": ["Si"], "num_sites": [1, 20]},
    )
    assert [r.source_id for r in load_structures(cfg)] == ["mp-149", "mp-2534"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"elements": ["Si", "Xx"]}, r"source\.elements: unknown element 'Xx'"),
        ({"energy_above_hull": [0.1, 0.0]}, r"source\.energy_above_hull"),
        ({"num_sites": [1, "many"]}, r"source\.num_sites"),
        ({"cell": "niggli"}, r"source\.cell"),
        ({"endpoint": "ftp://example.org"}, r"source\.endpoint"),
        ({"api_key": KEY}, r"source\.api_key: do not put"),
        ({"theoretical": "no"}, r"source\.theoretical"),
    ],
)
def test_bad_configuration_names_the_parameter(tmp_path, override, message):
    cfg = OmegaConf.to_container(make_cfg(tmp_path, "http://127.0.0.1:9/"), resolve=True)
    cfg.update(override)
    with pytest.raises(ValueError, match=message) as info:
        load_structures(cfg)
    assert KEY not in str(info.value)


def test_loading_needs_neither_mp_api_nor_network():
    """Array jobs import the source without the heavy client: only the fetch step imports mp-api."""
    import subprocess
    import sys

    code = "import sys, datagen.sources; sys.exit(int('mp_api' in sys.modules or 'abtem' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=120).returncode == 0
