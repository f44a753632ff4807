"""The mask file: bit-packing, round trips, lazy thread-safe reads, refusals."""

import json
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dam_mergekit.errors import DamError
from dam_mergekit.masks import MaskFile, MaskSet, ModelRecord, write_mask_file
from dam_mergekit.masks.bits import pack_bits, unpack_bits

BASE = ModelRecord("base", "sha256:b")
EXPERTS = [ModelRecord("a", "sha256:1"), ModelRecord("b", "sha256:2")]
SHAPES = {"w": (37, 11), "bias": (11,), "scale": (3, 4)}


def _write(path, masks, **kw):
    return write_mask_file(
        path, masks, base=BASE, experts=EXPERTS, tensor_shapes=SHAPES, settings={"alpha": 0.1}, **kw
    )


@pytest.mark.parametrize("shape", [(1,), (8,), (9,), (37, 11), (2, 3, 5)])
def test_pack_unpack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, shape), mask)


def test_round_trip_binary_soft_shared_and_coefficients(tmp_path):
    gen = torch.Generator().manual_seed(1)
    m1 = torch.rand(37, 11, generator=gen) > 0.3
    soft = torch.rand(3, 4, generator=gen)
    rows = torch.tensor([[1.0], [0.0], [1.0]])
    masks = MaskSet(
        m1={"w": m1, "scale": soft},
        m2={"w": [None, torch.rand(37, 11, generator=gen) > 0.5], "scale": [rows, None]},
        coefficients={"w": torch.tensor([0.5, 1.5])},
    )
    mf = MaskFile(_write(tmp_path / "m.safetensors", masks))
    assert mf.names == list(SHAPES) and mf.experts == EXPERTS and mf.base == BASE
    assert mf.settings == {"alpha": 0.1}
    assert torch.equal(mf.m1("w"), m1)
    assert mf.m1("bias") is None and mf.m2("w", 0) is None
    torch.testing.assert_close(mf.m1("scale"), soft)
    assert torch.equal(mf.m2("scale", 0).float(), rows)
    assert torch.equal(mf.coefficients("w"), torch.tensor([0.5, 1.5]))
    assert torch.equal(mf.coefficients("bias"), torch.ones(2))
    assert mf.kept_fraction("w") == pytest.approx(m1.float().mean().item())


def test_binary_masks_take_at_most_one_bit_per_parameter(tmp_path):
    big = {"w": (1000, 1000)}
    mask = torch.rand(1000, 1000, generator=torch.Generator().manual_seed(2)) > 0.5
    path = write_mask_file(
        tmp_path / "big.safetensors",
        MaskSet(m1={"w": mask}),
        base=BASE,
        experts=EXPERTS,
        tensor_shapes=big,
    )
    assert path.stat().st_size < 1_000_000 / 8 + 4096
    assert torch.equal(MaskFile(path).m1("w"), mask)


def test_shared_m2(tmp_path):
    shared = torch.rand(37, 11, generator=torch.Generator().manual_seed(3)) > 0.5
    mf = MaskFile(_write(tmp_path / "s.safetensors", MaskSet(m2={"w": shared})))
    assert mf.header["m2_shared"] and torch.equal(mf.m2("w", 0), shared)
    assert torch.equal(mf.m2("w", 1), shared)


def test_concurrent_reads_agree(tmp_path):
    masks = MaskSet(
        m1={
            n: torch.rand(s, generator=torch.Generator().manual_seed(i)) > 0.5
            for i, (n, s) in enumerate(SHAPES.items())
        }
    )
    mf = MaskFile(_write(tmp_path / "t.safetensors", masks))
    errors = []

    def read():
        for _ in range(50):
            for name in SHAPES:
                if not torch.equal(mf.m1(name), masks.m1[name]):
                    errors.append(name)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize(
    "masks, message",
    [
        (MaskSet(m1={"w": torch.full((37, 11), float("nan"))}), "NaN or inf"),
        (MaskSet(m1={"w": torch.full((37, 11), 1.5)}), r"within \[0, 1\]|lie in \[0, 1\]"),
        (MaskSet(m1={"w": torch.ones(11, 37)}), "does not broadcast"),
        (MaskSet(m1={"nope": torch.ones(1)}), "not in tensor_shapes"),
        (MaskSet(m2={"w": [None]}), "1 m2 masks for 2 experts"),
        (MaskSet(coefficients={"w": torch.tensor([1.0, float("inf")])}), "NaN or inf"),
    ],
)
def test_writer_refuses_bad_masks_and_writes_nothing(tmp_path, masks, message):
    with pytest.raises(DamError, match=message):
        _write(tmp_path / "bad.safetensors", masks)
    assert list(tmp_path.iterdir()) == []


def test_reader_refuses_truncated_corrupt_and_foreign_files(tmp_path):
    good = _write(tmp_path / "g.safetensors", MaskSet(m1={"w": torch.zeros(37, 11)}))
    data = good.read_bytes()
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(data[: len(data) - 20])
    with pytest.raises(DamError, match="truncated or corrupt"):
        MaskFile(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(DamError, match="truncated or corrupt"):
        MaskFile(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.ones(2)}, foreign)
    with pytest.raises(DamError, match="not a dam-mergekit mask file"):
        MaskFile(foreign)
    with pytest.raises(DamError, match="mask file not found"):
        MaskFile(tmp_path / "missing.safetensors")


def _rewrite_header(path: Path, edit) -> None:
    """Edit the JSON metadata of a mask file in place (simulating a hand-edited or buggy file)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    header = json.loads(meta["dam_mergekit"])
    tensors = edit(header, tensors) or tensors
    save_file(tensors, path, metadata={"dam_mergekit": json.dumps(header)})


def test_reader_checks_header_against_stored_tensors(tmp_path):
    path = _write(tmp_path / "h.safetensors", MaskSet(m1={"w": torch.zeros(37, 11)}))
    _rewrite_header(path, lambda h, t: h.update(format_version=99))
    with pytest.raises(DamError, match="format version 99"):
        MaskFile(path)
    path = _write(tmp_path / "h2.safetensors", MaskSet(m1={"w": torch.zeros(37, 11)}))
    _rewrite_header(path, lambda h, t: {**t, "m1/stray": torch.ones(1)})
    with pytest.raises(DamError, match="not described in the header"):
        MaskFile(path)


def test_unknown_tensor_name_is_a_clear_error(tmp_path):
    mf = MaskFile(_write(tmp_path / "n.safetensors", MaskSet()))
    with pytest.raises(DamError, match="no masks for tensor 'other'"):
        mf.m1("other")


def test_header_is_plain_safetensors(tmp_path):
    path = _write(tmp_path / "p.safetensors", MaskSet(m1={"w": torch.zeros(37, 11)}))
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    meta = json.loads(header["__metadata__"]["dam_mergekit"])
    assert meta["format"] == "dam-mergekit-masks" and meta["tensors"]["w"]["m1"]["kind"] == "bits"
    assert header["m1/w"]["dtype"] == "U8"
