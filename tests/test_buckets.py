"""The shared bucket format: layout, bit-exact round trips for every dtype, and named errors for bad input."""

from __future__ import annotations

import msgpack
import pytest
import torch

from protocol.buckets import ALIGN, Assembler, Manifest, bucket_views, checksum, pack, plan, unpack
from protocol.errors import WeightTransferError


def mixed_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(300, 16, generator=gen),  # 19200 bytes: bigger than a 4 KiB bucket, gets its own
        "norm": torch.randn(16, generator=gen),
        "half": torch.randn(3, 5, generator=gen).bfloat16(),
        "fp16": torch.randn(7, generator=gen).half(),
        "steps": torch.tensor(12345678901, dtype=torch.int64),  # 0-d
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "bytes": torch.arange(11, dtype=torch.uint8),
    }


def packed(state: dict[str, torch.Tensor], bucket_bytes: int, kind: str = "xxh3") -> tuple[Manifest, list[torch.Tensor]]:
    manifest = plan(state, bucket_bytes, version=3, checksum=kind)
    flat = torch.zeros(manifest.total_bytes, dtype=torch.uint8)
    buckets = bucket_views(flat, manifest)
    pack(state, manifest, buckets)
    return manifest, buckets


def test_layout_keeps_tensors_whole_aligned_and_within_their_bucket():
    state = mixed_state()
    manifest, _ = packed(state, bucket_bytes=4096)
    assert len(manifest.bucket_sizes) == 2
    by_name = {t.name: t for t in manifest.tensors}
    assert by_name["embed"].bucket == 0 and by_name["embed"].offset == 0  # the first tensor opens bucket 0 alone
    assert manifest.bucket_sizes[0] == 19200
    assert all(t.bucket == 1 for t in manifest.tensors if t.name != "embed")  # the small ones share one bucket
    for t in manifest.tensors:
        assert t.offset % ALIGN == 0 and t.offset + t.nbytes <= manifest.bucket_sizes[t.bucket]
    assert all(size % ALIGN == 0 for size in manifest.bucket_sizes)
    assert manifest.bucket_offsets == [0, 19200]


@pytest.mark.parametrize("kind", ["xxh3", "sum64"])
@pytest.mark.parametrize("bucket_bytes", [64, 4096, 1 << 20])
def test_round_trip_is_bit_exact_for_every_dtype(kind, bucket_bytes):
    state = mixed_state()
    manifest, buckets = packed(state, bucket_bytes, kind)
    wire = msgpack.unpackb(msgpack.packb(manifest.to_wire()))  # what a receiver actually parses
    assembler = Assembler(Manifest.from_wire(wire))
    for i, bucket in enumerate(buckets):
        assembler.add(i, bucket.clone())
    restored = assembler.state_dict()
    assert list(restored) == list(state)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape
        assert torch.equal(restored[name], tensor), name


def test_a_flipped_bit_a_short_bucket_and_a_missing_bucket_are_named_errors():
    manifest, buckets = packed(mixed_state(), 4096)
    corrupted = buckets[1].clone()
    corrupted[5] ^= 1
    assembler = Assembler(manifest)
    with pytest.raises(WeightTransferError) as err:
        assembler.add(1, corrupted)
    assert err.value.reason == "checksum"
    with pytest.raises(WeightTransferError) as err:
        assembler.add(1, buckets[1][:-64])
    assert err.value.reason == "size"
    assembler.add(0, buckets[0])
    with pytest.raises(WeightTransferError) as err:
        assembler.state_dict()
    assert err.value.reason == "incomplete"
    with pytest.raises(WeightTransferError) as err:
        assembler.add(7, buckets[0])
    assert err.value.reason == "bad_bucket"


def test_sum64_catches_swapped_words_and_does_not_depend_on_summation_order():
    bucket = torch.arange(64, dtype=torch.uint8)
    swapped = bucket.view(torch.int64)[[1, 0, 2, 3, 4, 5, 6, 7]].view(torch.uint8)
    assert checksum("sum64", bucket) != checksum("sum64", swapped)
    words = bucket.view(torch.int64)
    by_hand = sum(int(w) * (i + 1) for i, w in enumerate(words.tolist())) & (2**64 - 1)
    assert checksum("sum64", bucket) == by_hand


@pytest.mark.parametrize(
    "edit",
    [
        lambda w: w.pop("checksums"),
        lambda w: w.update(checksum="md5"),
        lambda w: w["tensors"][0].__setitem__(1, "complex64"),
        lambda w: w["tensors"][0].__setitem__(2, [301, 16]),  # shape no longer matches nbytes
        lambda w: w["tensors"][1].__setitem__(4, 10**9),  # offset outside its bucket
        lambda w: w["tensors"][1].__setitem__(3, 9),  # no such bucket
        lambda w: w.update(tensors="nope"),
        lambda w: w["bucket_sizes"].__setitem__(-1, w["bucket_sizes"][-1] + 4),  # sum64 reads 64-bit words
        lambda w: w["tensors"][0].__setitem__(2, [-d for d in w["tensors"][0][2]]),  # negative dims, their product right
        lambda w: (w["tensors"][0].__setitem__(2, [2**32, 2**32]), w["tensors"][0].__setitem__(5, 0)),  # int64 product 0
    ],
)
def test_inconsistent_manifests_are_rejected(edit):
    manifest, _ = packed(mixed_state(), 4096)
    wire = manifest.to_wire()
    edit(wire)
    with pytest.raises(WeightTransferError) as err:
        Manifest.from_wire(wire)
    assert err.value.reason == "bad_manifest"


def test_unpack_views_the_buckets_without_copying():
    manifest, buckets = packed({"w": torch.ones(4)}, 4096)
    restored = unpack(manifest, buckets)
    assert restored["w"].data_ptr() == buckets[0].data_ptr()


def test_a_manifest_without_checksums_takes_each_buckets_own():
    """A stream that starts before packing ends sends the manifest without checksums; each bucket brings its own."""
    manifest, buckets = packed(mixed_state(), 4096)
    sums, manifest.checksums = manifest.checksums, []
    manifest = Manifest.from_wire(manifest.to_wire())  # valid on the wire with no checksums
    assembler = Assembler(manifest)
    with pytest.raises(WeightTransferError) as err:
        assembler.add(0, buckets[0])
    assert err.value.reason == "bad_bucket" and "without a checksum" in str(err.value)
    with pytest.raises(WeightTransferError) as err:
        assembler.add(0, buckets[0], sums[0] ^ 1)
    assert err.value.reason == "checksum"
    for index, bucket in enumerate(buckets):
        assembler.add(index, bucket, sums[index])
    assert assembler.complete


def test_add_all_trusts_the_receivers_own_sums_and_names_a_mismatch():
    manifest, buckets = packed(mixed_state(), 4096, "sum64")
    assembler = Assembler(manifest)
    assembler.add_all(buckets, list(manifest.checksums))
    assert assembler.complete
    wrong = [*manifest.checksums[:-1], manifest.checksums[-1] ^ 1]
    with pytest.raises(WeightTransferError) as err:
        Assembler(manifest).add_all(buckets, wrong)
    assert err.value.reason == "checksum"
    with pytest.raises(ValueError):  # one sum per bucket, no fewer
        Assembler(manifest).add_all(buckets, manifest.checksums[:-1])
    xxh3_manifest, xxh3_buckets = packed(mixed_state(), 4096, "xxh3")
    with pytest.raises(WeightTransferError) as err:  # sums of another kind would all look "corrupted"
        Assembler(xxh3_manifest).add_all(xxh3_buckets, list(xxh3_manifest.checksums))
    assert err.value.reason == "bad_manifest" and "sum64" in str(err.value)
