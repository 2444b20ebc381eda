"""Loading and saving: formats, laziness, atomic writes, sharding, dtypes, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rebasin.checkpoint import load_checkpoint, parse_size, save_checkpoint
from rebasin.core.errors import CheckpointError, ConfigError

STATE = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "a.bias": torch.ones(3, dtype=torch.bfloat16),
    "b.weight": torch.full((2, 3), 0.5, dtype=torch.float16),
    "bn.num_batches_tracked": torch.tensor(7),
    "scale": torch.tensor(2.0, dtype=torch.float64),
}


def same(a: dict[str, torch.Tensor], b: object) -> None:
    assert set(a) == set(b)  # type: ignore[arg-type]
    for k, v in a.items():
        got = b[k]  # type: ignore[index]
        assert got.dtype == v.dtype, k
        assert torch.equal(got, v), k


def test_round_trip_preserves_values_and_dtypes(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    files = save_checkpoint(STATE, out, {"k": "v"})
    assert files == [out]
    ck = load_checkpoint(out)
    same(STATE, ck.state)
    assert ck.metadata == {"k": "v"}
    assert ck.format == "safetensors"
    assert ck.num_parameters() == 12 + 3 + 6 + 1  # floating point only
    assert ck.num_parameters(floating=False) == 1  # num_batches_tracked
    same(STATE, load_file(out))  # readable by the reference reader


def test_writer_is_deterministic_and_matches_reference_reader(tmp_path: Path) -> None:
    p1, p2 = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    save_checkpoint(STATE, p1, {"b": "2", "a": "1"})
    save_checkpoint(dict(reversed(list(STATE.items()))), p2, {"a": "1", "b": "2"})
    assert p1.read_bytes() == p2.read_bytes()


def test_sharding_writes_index_and_loads_back(tmp_path: Path) -> None:
    out = tmp_path / "big.safetensors"
    files = save_checkpoint(STATE, out, {"m": "1"}, shard_size=50)
    index = tmp_path / "big.safetensors.index.json"
    assert files[0] == index
    assert len(files) > 2
    data = json.loads(index.read_text())
    assert data["metadata"]["total_size"] == str(sum(v.numel() * v.element_size() for v in STATE.values()))
    same(STATE, load_checkpoint(index).state)
    assert load_checkpoint(index).metadata["m"] == "1"


def test_directory_of_shards_and_directory_output(tmp_path: Path) -> None:
    d = tmp_path / "model"
    save_checkpoint(STATE, d, shard_size=40)
    assert (d / "model.safetensors.index.json").exists()
    same(STATE, load_checkpoint(d).state)
    d2 = tmp_path / "plain"
    save_checkpoint(STATE, d2)
    assert (d2 / "model.safetensors").exists()
    # a directory of shards without an index also loads
    d3 = tmp_path / "noindex"
    d3.mkdir()
    save_file({"x": torch.ones(2)}, str(d3 / "p1.safetensors"))
    save_file({"y": torch.zeros(3)}, str(d3 / "p2.safetensors"))
    assert set(load_checkpoint(d3).state) == {"x", "y"}


def test_duplicate_tensor_across_shards_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "dup"
    d.mkdir()
    save_file({"x": torch.ones(2)}, str(d / "p1.safetensors"))
    save_file({"x": torch.zeros(2)}, str(d / "p2.safetensors"))
    with pytest.raises(CheckpointError, match="tensor 'x' appears in more than one shard"):
        load_checkpoint(d)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    out = tmp_path / "big.safetensors"
    files = save_checkpoint(STATE, out, shard_size=50)
    files[1].unlink()
    with pytest.raises(CheckpointError, match=f"shard '{files[1].name}' listed in the index is missing"):
        load_checkpoint(files[0])


def test_torch_files_load_with_weights_only(tmp_path: Path) -> None:
    sd = {"w": torch.randn(3, 2), "b": torch.randn(3)}
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"model_state_dict": sd, "step": 10}, tmp_path / "wrapped.bin")
    for name in ("plain.pt", "wrapped.bin"):
        ck = load_checkpoint(tmp_path / name)
        same(sd, ck.state)
        assert ck.order == ["w", "b"]
    torch.save({"step": 10, "lr": 0.1}, tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError, match=r"no state dict found \(top-level keys: 'step', 'lr'\)"):
        load_checkpoint(tmp_path / "nostate.pt")


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    class Boom(dict):  # type: ignore[type-arg]
        def __getitem__(self, key: str) -> torch.Tensor:
            if key == "z":
                raise RuntimeError("boom")
            return super().__getitem__(key)

    state = Boom({"a": torch.ones(2), "z": torch.ones(2)})
    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(state, tmp_path / "o.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", ["o.safetensors", "folder", "sharded.safetensors"])
def test_a_refusing_gate_leaves_the_old_output(tmp_path: Path, out: str) -> None:
    """The gate runs after every tensor is written and before anything is put in place."""
    target = tmp_path / out
    first = save_checkpoint(STATE, target, shard_size=64)
    before = {f: f.read_bytes() for f in first}
    seen: list[set[str]] = []

    def gate() -> None:
        seen.append({f.name for f in tmp_path.rglob("*")})
        raise CheckpointError("refused")

    with pytest.raises(CheckpointError, match="refused"):
        save_checkpoint({k: v + 1 for k, v in STATE.items()}, target, shard_size=64, gate=gate)
    assert any(".rebasin-tmp-" in n for n in seen[0])  # it ran with the new tensors written
    assert {f: f.read_bytes() for f in first} == before
    assert not [f for f in tmp_path.rglob("*") if ".rebasin-" in f.name]


def test_lazy_loading_reads_on_access(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    save_checkpoint(STATE, out)
    ck = load_checkpoint(out)
    assert ck.shapes["a.weight"] == (3, 4)
    assert ck.dtypes["a.bias"] == torch.bfloat16
    assert "a.weight" in ck.state and "nope" not in ck.state
    with pytest.raises(KeyError):
        ck.state["nope"]


@pytest.mark.parametrize(
    ("text", "size"),
    [("500MB", 500_000_000), ("2GB", 2_000_000_000), ("1GiB", 2**30), ("1024", 1024), ("1.5KB", 1500)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_rejects_nonsense() -> None:
    with pytest.raises(ConfigError, match=r"invalid size 'lots' \(use e.g. 500MB, 2GB, 1GiB\)"):
        parse_size("lots")
