"""Model references and the tiny-model cache."""

import pytest
import torch

from proxytune.backends import tiny_cache
from proxytune.errors import ProxytuneError


def test_materialize_builds_once_and_leaves_the_callers_rng_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("PROXYTUNE_HOME", str(tmp_path))
    calls = []

    def build(folder):
        torch.manual_seed(0)  # builders seed; that must not leak into training runs that build lazily
        torch.randn(3)
        (folder / "weights.bin").write_bytes(b"x")
        calls.append(folder)

    torch.manual_seed(1234)
    expected = torch.randn(4)
    torch.manual_seed(1234)
    path = tiny_cache.materialize("thing-v1", build)
    assert torch.equal(torch.randn(4), expected)
    assert tiny_cache.materialize("thing-v1", build) == path and len(calls) == 1
    assert tiny_cache.is_random_init(path) and (path / "weights.bin").exists()
    assert not any(p.name.startswith(".thing") for p in tmp_path.joinpath("tiny").iterdir())


def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PROXYTUNE_HOME", str(tmp_path))

    def broken(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        tiny_cache.materialize("broken-v1", broken)
    assert list((tmp_path / "tiny").iterdir()) == []


def test_resolve(tmp_path):
    builtins = {"tiny-x": lambda: tmp_path}
    assert tiny_cache.resolve("tiny-x", builtins, what="model") == str(tmp_path)
    assert tiny_cache.resolve(str(tmp_path), builtins, what="model") == str(tmp_path.resolve())
    assert tiny_cache.resolve("org/name", builtins, what="model") == "org/name"
    with pytest.raises(ProxytuneError, match="unknown model 'gpt-17'"):
        tiny_cache.resolve("gpt-17", builtins, what="model")
    with pytest.raises(ProxytuneError, match="no such local directory"):
        tiny_cache.resolve("./missing/dir", builtins, what="model")
