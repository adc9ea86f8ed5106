"""Caches at fsspec URLs: written by extract, read by stage two as a local cache is."""

import json

import fsspec
import pytest
from test_resume import InterruptAfter, assert_same_store, small_shard_spec
from typer.testing import CliRunner

import sidetune
from cli.main import app
from conftest import config, extract_tiny
from sidetune.errors import Interrupted


@pytest.fixture
def memory_url():
    url = "memory://sidetune-tests/digits"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists("/sidetune-tests"):
        fs.rm("/sidetune-tests", recursive=True)


def test_a_cache_written_to_a_memory_url_equals_a_local_one_and_trains_the_same(memory_url, tmp_path):
    extract_tiny("digits", memory_url, splits=["val200", "test"], limit=48)
    extract_tiny("digits", tmp_path / "local", splits=["val200", "test"], limit=48)
    assert_same_store(memory_url, tmp_path / "local")
    remote = sidetune.open_cache(memory_url)
    assert memory_url not in json.dumps(remote.manifest)  # where a cache lives is not part of what it is
    trained = [sidetune.train(cache, config("linear", epochs=2), train_split="val200", eval_split="test",
                              out=tmp_path / name)[1] for name, cache in (("a", memory_url), ("b", tmp_path / "local"))]
    assert trained[0].top1 == trained[1].top1 and trained[0].epoch_losses == trained[1].epoch_losses


def test_an_interrupted_extract_to_a_url_resumes_there(memory_url, tmp_path):
    spec = str(small_shard_spec(tmp_path))
    with pytest.raises(Interrupted):
        extract_tiny("digits", memory_url, splits=["val200"], limit=32, spec=spec, progress=InterruptAfter(images=20))
    assert not sidetune.open_cache(memory_url).split("val200").complete
    reports = extract_tiny("digits", memory_url, splits=["val200"], limit=32, spec=spec)
    assert reports[0].complete and reports[0].shards_skipped >= 2
    extract_tiny("digits", tmp_path / "local", splits=["val200"], limit=32, spec=spec)
    assert_same_store(memory_url, tmp_path / "local")


def test_extract_and_info_take_a_file_url(tmp_path):
    url = f"file://{tmp_path}/cache"
    extract_tiny("digits", url, splits=["val200"], limit=16)
    result = CliRunner().invoke(app, ["info", url])
    assert result.exit_code == 0, result.output
    assert "val200" in result.output and "complete" in result.output
    assert sidetune.open_cache(tmp_path / "cache").split("val200").complete


def test_a_url_without_an_installed_backend_names_what_to_install():
    with pytest.raises(sidetune.SidetuneError, match="install the fsspec backend for nosuch://"):
        extract_tiny("digits", "nosuch://bucket/cache")
