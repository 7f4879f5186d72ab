"""Test fixtures: the real ComfyUI in-process (CPU, one thread) and as a server with the pack loaded."""

from __future__ import annotations

import pathlib

import pytest
import torch

from harness.families import FamilyFiles
from harness.host import import_comfyui_in_process
from harness.outbound import OutboundRecorder
from harness.redis_server import RedisServer
from harness.server import ComfyServer

torch.set_num_threads(1)
COMFYUI_ROOT = import_comfyui_in_process()
import folder_paths  # noqa: E402  (importable once ComfyUI is on the path)

BROKEN_PACK_SOURCE = 'raise RuntimeError("deliberately broken pack: the import-failure check must see this")\n'
BROKEN_PACK_NAME = "shield_selftest_broken_pack"
FAMILY_TEST_NODES = pathlib.Path(__file__).parent / "harness" / "family_nodes"


@pytest.fixture(scope="session")
def outbound() -> OutboundRecorder:
    """Records every network attempt of the session's server (it is the server's HTTP(S) proxy)."""
    recorder = OutboundRecorder()
    try:
        yield recorder
    finally:
        recorder.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory, outbound) -> ComfyServer:
    """One real ComfyUI server for the session, with the pack and a deliberately broken pack beside it.

    Graphs sample real models without weight files through the pack's own Shield Memorizer Model and
    Shield Memorizer Conditioning nodes (items written with `server.write_input_latent`).
    The broken pack proves that `import_failures()` sees a pack whose import raised (ComfyUI only
    logs it), so the tests that assert our pack has no import failure can fail. The family test nodes
    (harness/family_nodes) fabricate conditioning for the random-weight family checkpoints. The server's
    HTTP(S) proxy is the `outbound` recorder, so a test can assert that the server tried no network access.
    """
    base_dir = tmp_path_factory.mktemp("comfy-base")
    broken = base_dir / "custom_nodes" / BROKEN_PACK_NAME
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(BROKEN_PACK_SOURCE)
    (base_dir / "custom_nodes" / "shield_family_test_nodes").symlink_to(FAMILY_TEST_NODES, target_is_directory=True)
    comfy_server = ComfyServer(base_dir, extra_env=outbound.env())
    try:
        comfy_server.start()
        yield comfy_server
    finally:
        comfy_server.stop()


@pytest.fixture(scope="session")
def family_files(tmp_path_factory) -> FamilyFiles:
    """Random-weight checkpoints of the real families (harness/families.py), written once per session
    on first use; `family_files.link_into(server.base_dir / "models", name)` puts one in a server."""
    return FamilyFiles(tmp_path_factory.mktemp("family-models"))


@pytest.fixture(scope="session")
def memorizer_items() -> torch.Tensor:
    """Six well-separated latents [6, 4, 8, 8] at roughly SD-latent scale (entries ~ N(0, 1))."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(6, 4, 8, 8, generator=generator)


@pytest.fixture
def tmp_dir(tmp_path) -> pathlib.Path:
    return tmp_path


@pytest.fixture(autouse=True)
def previews_in_tmp(tmp_path, monkeypatch):
    """Node previews (ui images) of in-process tests go to the test's folder, not the host's ComfyUI/temp."""
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "comfy-temp"))


@pytest.fixture
def shield_folder(tmp_path, monkeypatch) -> pathlib.Path:
    """An empty models/shield_sets for in-process Save/Load Shield Set."""
    folder = tmp_path / "models" / "shield_sets"
    folder.mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "shield_sets", ([str(folder)], {".safetensors"}))
    return folder


@pytest.fixture
def input_folder(tmp_path, monkeypatch) -> pathlib.Path:
    """An empty ComfyUI input directory for in-process folder inputs."""
    root = tmp_path / "input"
    root.mkdir()
    monkeypatch.setattr(folder_paths, "input_directory", str(root))
    return root


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server for the session (loopback, bounded memory, stopped in finally)."""
    if not RedisServer.available():
        pytest.skip("redis-server is not installed: scripts/bootstrap.sh installs Debian's package when run as root")
    store = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        store.start()
        yield store
    finally:
        store.stop()
