"""The write-ahead log on its own: records round-trip, torn tails are cut, segments are deleted oldest first."""

from __future__ import annotations

import errno
import os
import select
import threading
import time
import zlib

import pytest
import xxhash

from broker import wal as wal_module
from broker.wal import CONSUMED, HEADER, SAMPLES, SNAPSHOT, LogFormatError, LogWriteError, WriteAheadLog, split_frames

MARKER_BYTES = HEADER.size + len(wal_module.MARKER_PAYLOAD)  # the record every segment begins with


def fresh(tmp_path, segment_bytes: int = 1 << 20) -> WriteAheadLog:
    wal = WriteAheadLog(tmp_path, segment_bytes)
    wal.start_segment(b"snap")
    return wal


def contents(tmp_path) -> list[tuple[int, bytes, bytes]]:
    wal = WriteAheadLog(tmp_path)
    records = [(seg, kind, bytes(payload)) for seg, kind, payload in wal.records()]
    wal.close()
    return records


def test_records_round_trip_in_order_and_frames_split_back(tmp_path):
    wal = fresh(tmp_path)
    wal.append_frames([b"header", memoryview(b"\x01\x02\x03"), b""], [("a", "i", 0)])
    wal.append(CONSUMED, [b"x", b"yz"])
    wal.close()
    records = contents(tmp_path)
    assert [(k, p) for _, k, p in records[::2]] == [(SNAPSHOT, b"snap"), (CONSUMED, b"xyz")]
    assert records[1][1] == SAMPLES
    assert [bytes(f) for f in split_frames(memoryview(records[1][2]))] == [b"header", b"\x01\x02\x03", b""]


def crc32_record(kind: bytes, payload: bytes) -> bytes:
    """A record as logs written before 2026-11-27 held it: upper-case type, CRC-32 over type and payload."""
    return HEADER.pack(len(payload), zlib.crc32(payload, zlib.crc32(kind)), kind[0]) + payload


def xxh3_record(kind: bytes, payload: bytes) -> bytes:
    """A record as logs written on 2026-11-27 held it: lower-case type, unseeded xxh3 over type and payload."""
    marked = kind.lower()
    return HEADER.pack(len(payload), xxhash.xxh3_64_intdigest(marked + payload) & 0xFFFFFFFF, marked[0]) + payload


def test_records_are_written_with_an_xxh3_checksum_seeded_with_the_segment_and_a_marked_type(tmp_path):
    wal = fresh(tmp_path)
    wal.start_segment(b"snap")
    wal.append(CONSUMED, [b"x", b"yz"])
    wal.close()
    data = (tmp_path / "wal-00000001.log").read_bytes()
    size, checksum, kind = HEADER.unpack_from(data, MARKER_BYTES + HEADER.size + 4)  # after the marker and the snapshot b"snap"
    assert (size, kind, data[-3:]) == (3, ord("c") | wal_module.SEEDED, b"xyz")
    assert checksum == xxhash.xxh3_64_intdigest(bytes([kind]) + b"xyz", seed=1) & 0xFFFFFFFF


@pytest.mark.parametrize("damage", [None, "flipped_byte"])
@pytest.mark.parametrize("record", [crc32_record, xxh3_record])
def test_a_log_written_with_older_records_is_still_read(tmp_path, damage, record):
    """Upgrading keeps an existing log: its CRC-32 or unseeded records replay (and a corrupt one still ends the log), new ones follow."""
    old = [record(SNAPSHOT, b"snap"), record(CONSUMED, b"one"), record(CONSUMED, b"two")]
    data = bytearray(b"".join(old))
    if damage:
        data[-1] ^= 0xFF
    (tmp_path / "wal-00000001.log").write_bytes(bytes(data))
    wal = WriteAheadLog(tmp_path)
    assert [(k, bytes(p)) for _, k, p in wal.records()] == [(SNAPSHOT, b"snap"), (CONSUMED, b"one"), *([(CONSUMED, b"two")] if not damage else [])]
    assert wal.truncated_bytes == (len(old[-1]) if damage else 0)
    wal.start_segment(b"snap2")
    wal.append(CONSUMED, [b"three"])
    wal.close()
    assert [p for _, k, p in contents(tmp_path) if k == CONSUMED][-1] == b"three"


@pytest.mark.parametrize("damage", ["cut_mid_record", "garbage_tail", "flipped_byte"])
def test_a_torn_or_corrupt_tail_is_cut_and_the_log_goes_on(tmp_path, damage):
    wal = fresh(tmp_path)
    for i in range(5):
        wal.append(CONSUMED, [bytes([i]) * 100])
    wal.close()
    path = next(tmp_path.glob("wal-*.log"))
    size = path.stat().st_size
    data = bytearray(path.read_bytes())
    if damage == "cut_mid_record":
        data = data[: size - 37]
    elif damage == "garbage_tail":
        data += os.urandom(50)
    else:
        data[size - 10] ^= 0xFF
    path.write_bytes(bytes(data))
    reopened = WriteAheadLog(tmp_path)
    expected = 4 if damage != "garbage_tail" else 5
    assert [bytes(p) for _, _, p in reopened.records()][1:] == [bytes([i]) * 100 for i in range(expected)]
    assert reopened.truncated_bytes == len(data) - path.stat().st_size > 0
    reopened.start_segment(b"snap2")  # appending after a repair works and is read back
    reopened.append(CONSUMED, [b"after"])
    reopened.close()
    assert contents(tmp_path)[-1][2] == b"after"


def test_segments_are_deleted_oldest_first_once_nothing_in_them_is_live(tmp_path):
    wal = fresh(tmp_path, segment_bytes=200)
    keys = []
    for i in range(3):  # one live key per segment: 0, 1, 2 (3 is the active one)
        keys.append(("a", "i", i))
        wal.append_frames([b"x" * 200], [keys[-1]])
        wal.start_segment(b"snap")
    assert len(list(tmp_path.glob("wal-*.log"))) == 4
    wal.retire([keys[1]])
    wal.collect()
    assert wal.segments == [0, 1, 2, 3]  # segment 0 still holds a live key: nothing after it goes either
    wal.retire([keys[0]])
    wal.collect()
    assert wal.segments == [2, 3] and wal.segments_deleted == 2
    wal.retire([keys[2]])
    wal.collect()
    assert wal.segments == [3]  # never the active segment
    assert sorted(p.name for p in tmp_path.glob("wal-*.log")) == ["wal-00000003.log"]


def filled_and_retired(tmp_path, records: int = 20) -> WriteAheadLog:
    """Segment 0 filled with equal records of live keys, consumed and retired: it is now the spare."""
    wal = fresh(tmp_path, segment_bytes=records * 64)
    keys = [("a", "i", i) for i in range(records)]
    for key in keys:
        wal.append_frames([b"o" * 51], [key])  # 64 bytes a record, as its successors will be
    wal.start_segment(b"snap")
    wal.retire(keys)
    wal.collect()
    return wal


def test_a_retired_segment_is_kept_as_the_spare_and_the_next_segment_overwrites_it(tmp_path):
    wal = filled_and_retired(tmp_path)
    spare = tmp_path / "spare-00000000.wal"
    assert wal.segments == [1] and spare.stat().st_size == MARKER_BYTES + 13 + 20 * 64  # kept whole: cut only once reused
    inode = spare.stat().st_ino
    wal.start_segment(b"snap")
    assert (tmp_path / "wal-00000002.log").stat().st_ino == inode and not spare.exists()
    wal.append_frames([b"n" * 51], [("a", "i", 100)])
    wal.close()  # cuts the retired file's old bytes off
    assert (tmp_path / "wal-00000002.log").stat().st_size == wal.sizes[2]
    reopened = WriteAheadLog(tmp_path)
    assert reopened.truncated_bytes == 0 and reopened.stats()["log_segments_recycled"] == 0
    assert [(seg, kind, bytes(p)[-1:]) for seg, kind, p in reopened.records()][-2:] == [(2, SNAPSHOT, b"p"), (2, SAMPLES, b"n")]
    reopened.close()
    assert wal.stats()["log_segments_recycled"] == 1


def test_after_a_crash_a_recycled_segment_yields_only_its_new_records_never_the_old_ones_behind(tmp_path):
    """The new records end exactly where an intact old record begins (records of equal size): only the
    segment number seeded into the checksums tells the old one apart."""
    wal = filled_and_retired(tmp_path)
    wal.start_segment(b"snap")  # the same snapshot as segment 0's: its records line up with the old ones
    wal.append_frames([b"n" * 51], [("a", "i", 100)])
    assert wal.sizes[2] == MARKER_BYTES + 13 + 64 and (tmp_path / "wal-00000002.log").stat().st_size == 20 * 64
    wal.sync()
    wal.file.close()  # killed: no close, the old bytes stay behind the new
    wal.lock.close()
    reopened = WriteAheadLog(tmp_path)
    assert reopened.truncated_bytes == 20 * 64 - wal.sizes[2]  # the old records, cut like a torn tail
    new = [(seg, kind) for seg, kind, _ in reopened.records() if seg == 2]
    assert new == [(2, SNAPSHOT), (2, SAMPLES)]
    reopened.close()


def test_segments_written_before_checksums_were_seeded_are_deleted_not_recycled(tmp_path):
    (tmp_path / "wal-00000000.log").write_bytes(xxh3_record(SNAPSHOT, b"snap") + xxh3_record(CONSUMED, b"x" * 100))
    wal = WriteAheadLog(tmp_path, 100)
    wal.start_segment(b"snap")
    wal.collect()  # nothing live in segment 0
    assert wal.segments == [1] and not (tmp_path / "wal-00000000.log").exists() and not list(tmp_path.glob("spare-*"))
    wal.close()


def test_a_crash_while_a_segment_is_retired_leaves_it_whole(tmp_path, monkeypatch):
    """Killed at the rename to the spare: the segment must still hold every record, here the batch record past
    one segment's size whose keys the consumed record (in the next segment) retires; cut first, the batch came back."""
    wal = fresh(tmp_path, segment_bytes=300)
    wal.append_frames([b"x" * 200], [("a", "i", 0)])
    wal.append(wal_module.SERVED, [b"batch 1 past the segment size"], [("", "batch", 1)])
    wal.start_segment(b"snap")
    wal.append(CONSUMED, [b"batch 1"])
    wal.retire([("a", "i", 0), ("", "batch", 1)])
    before = (tmp_path / "wal-00000000.log").read_bytes()
    monkeypatch.setattr(os, "rename", lambda *_: (_ for _ in ()).throw(OSError(errno.EIO, "killed here")))
    with pytest.raises(LogWriteError):
        wal.collect()
    assert (tmp_path / "wal-00000000.log").read_bytes() == before
    wal.file.close()
    wal.lock.close()
    monkeypatch.undo()
    reopened = WriteAheadLog(tmp_path, 300)
    assert [k for s, k, _ in reopened.records() if s == 0] == [SNAPSHOT, SAMPLES, wal_module.SERVED]
    assert reopened.stats()["log_corrupt_bytes"] == 0
    reopened.close()


def test_a_reader_from_before_seeding_refuses_the_log_instead_of_cutting_it(tmp_path, monkeypatch):
    """The previous version checked every lower-case record unseeded and knew no marker: emulated, it stops at
    every segment's first record by name, and the log is left as it was."""
    wal = fresh(tmp_path)
    wal.append_frames([b"an acknowledged sample"], [("a", "i", 0)])
    wal.close()
    before = (tmp_path / "wal-00000000.log").read_bytes()
    monkeypatch.setattr(wal_module, "SEEDED", 0)
    monkeypatch.setattr(wal_module, "SEEDED_TYPES", set())
    monkeypatch.setattr(wal_module, "XXH3_TYPES", {kind + 32 for kind in wal_module.CRC32_TYPES})
    with pytest.raises(LogFormatError, match="unknown type b'v'"):
        WriteAheadLog(tmp_path)
    assert (tmp_path / "wal-00000000.log").read_bytes() == before


def test_a_spare_from_a_run_with_larger_segments_is_cut_to_the_new_size(tmp_path):
    wal = filled_and_retired(tmp_path, records=40)
    wal.close()
    wal = WriteAheadLog(tmp_path, 20 * 64)  # segment_mb lowered between runs
    wal.start_segment(b"snap")
    for i in range(20):
        wal.append_frames([b"n" * 51], [("a", "j", i)])
    wal.start_segment(b"snap")  # rolls past the new size: every byte of the recycled segment is new
    wal.close()
    reopened = WriteAheadLog(tmp_path, 20 * 64)
    assert sum(1 for s, k, _ in reopened.records() if s == 2 and k == SAMPLES) == 20
    assert reopened.stats()["log_corrupt_bytes"] == 0
    reopened.close()


def test_a_spare_left_where_the_segments_were_moved_away_is_not_reused(tmp_path):
    """Numbering restarts at 0 without segments, and a spare of segment 0 would repeat its seed."""
    wal = filled_and_retired(tmp_path)
    wal.close()
    for path in tmp_path.glob("wal-*.log"):
        path.unlink()
    wal = fresh(tmp_path, segment_bytes=20 * 64)
    assert wal.segments_recycled == 0 and not list(tmp_path.glob("spare-*"))
    wal.close()


def test_sync_is_timed_and_stats_add_up(tmp_path):
    wal = fresh(tmp_path)
    wal.append(CONSUMED, [b"x" * 1000])
    wal.sync()
    wal.sync()  # nothing new: no second fsync
    stats = wal.stats()
    assert stats["fsyncs"] == 2 and stats["fsync_ms_p99"] >= stats["fsync_ms_p50"] > 0  # the snapshot's, then the record's
    assert stats["log_bytes"] == stats["log_bytes_written"] == MARKER_BYTES + 9 + 4 + 9 + 1000


def test_opening_a_log_makes_every_segment_durable_before_anything_is_replayed(tmp_path, monkeypatch):
    """A killed broker's last appends may sit unsynced in the page cache: the next one syncs them before
    building on them (it would otherwise acknowledge resends of them as duplicates)."""
    wal = fresh(tmp_path, segment_bytes=64)
    wal.append(CONSUMED, [b"x" * 100])
    wal.start_segment(b"snap2")
    wal.append(CONSUMED, [b"not synced"])
    wal.failed = OSError("killed")  # close as a crash would: nothing more synced
    wal.close()
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    reopened = WriteAheadLog(tmp_path)
    assert set(synced) == {str(tmp_path / "wal-00000000.log"), str(tmp_path / "wal-00000001.log"), str(tmp_path)}
    reopened.close()


def test_a_new_segment_is_durable_before_older_ones_can_be_deleted(tmp_path):
    wal = fresh(tmp_path)
    wal.append(CONSUMED, [b"x"])
    wal.start_segment(b"snapshot of the dedupe windows")
    assert not wal.dirty  # the snapshot is synced: deleting segment 0 loses no dedupe state, even on power loss
    wal.close()


def test_a_corrupt_record_in_an_older_segment_is_reported_and_counted(tmp_path, caplog):
    wal = fresh(tmp_path, segment_bytes=64)
    wal.append(CONSUMED, [b"a" * 50])
    wal.append(CONSUMED, [b"b" * 50])
    wal.start_segment(b"snap2")
    wal.close()
    path = tmp_path / "wal-00000000.log"
    data = bytearray(path.read_bytes())
    data[-10] ^= 1  # the second record of segment 0 (power loss could do this; a kill cannot)
    path.write_bytes(bytes(data))
    reopened = WriteAheadLog(tmp_path)
    assert [bytes(p) for _, _, p in reopened.records()] == [b"snap", b"a" * 50, b"snap2"]
    assert reopened.stats()["log_corrupt_bytes"] == HEADER.size + 50 and "corrupt record" in caplog.text
    reopened.close()


def test_an_intact_record_of_an_unknown_type_refuses_the_log_and_is_not_cut(tmp_path):
    wal = fresh(tmp_path)
    wal.append(CONSUMED, [b"x"])
    wal.close()
    path = tmp_path / "wal-00000000.log"
    payload = b"from a newer version"
    kind = ord("q") | wal_module.SEEDED  # seeded, as a newer version would write it after our seeded records
    newer = HEADER.pack(len(payload), xxhash.xxh3_64_intdigest(bytes([kind]) + payload, seed=0) & 0xFFFFFFFF, kind) + payload
    path.write_bytes(path.read_bytes() + newer)
    before = path.read_bytes()
    with pytest.raises(LogFormatError, match=r"unknown type b'\\xf1'"):
        WriteAheadLog(tmp_path)
    assert path.read_bytes() == before
    with pytest.raises(LogFormatError):  # refused again by name, not as "another broker is using" it: the lock is free
        WriteAheadLog(tmp_path)


def test_a_disk_failing_as_a_segment_begins_is_a_log_write_error(tmp_path, monkeypatch):
    wal = fresh(tmp_path)

    def broken_disk(_directory):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(wal_module, "fsync_path", broken_disk)
    with pytest.raises(LogWriteError, match="Input/output error"):
        wal.start_segment(b"snap2")
    with pytest.raises(LogWriteError, match="failed earlier"):  # the broker stops; nothing more is taken
        wal.append(CONSUMED, [b"x"])
    wal.close()


def test_a_record_the_disk_takes_only_part_of_is_a_log_write_error(tmp_path, monkeypatch):
    """writev on a full disk may write part of a record and return the count: appending after it would put
    acknowledged records behind a torn one, where replay never reads."""
    wal = fresh(tmp_path)
    real_writev = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, parts: real_writev(fd, parts[:1]))  # the header only
    with pytest.raises(LogWriteError, match="wrote 9 of a 109-byte record"):
        wal.append(CONSUMED, [b"x" * 100])
    monkeypatch.undo()
    with pytest.raises(LogWriteError, match="failed earlier"):
        wal.append(CONSUMED, [b"y"])
    wal.close()


def test_a_second_broker_on_the_same_log_is_refused(tmp_path):
    wal = fresh(tmp_path)
    with pytest.raises(RuntimeError, match="another broker"):
        WriteAheadLog(tmp_path)
    wal.close()
    WriteAheadLog(tmp_path).close()  # free again once the first one closed


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_sync_on_the_thread_covers_what_was_appended_before_it_started(tmp_path, monkeypatch):
    wal = fresh(tmp_path)
    wal.sync()
    release = threading.Event()
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (release.wait(5), real_fdatasync(fd)))  # a disk that takes its time
    wal.append(CONSUMED, [b"a" * 100])
    first = wal.bytes_written
    wal.start_sync()
    wal.append(CONSUMED, [b"b" * 100])  # while that sync runs
    wal.start_sync()  # one at a time: this does nothing
    wal.finish_sync()
    assert wal.running is not None and wal.durable_bytes < first and not readable(wal.wakeup_fd)
    release.set()
    assert select.select([wal.wakeup_fd], [], [], 5)[0], "the end of the sync is signalled"
    wal.finish_sync()
    assert wal.durable_bytes == first < wal.bytes_written and wal.dirty
    assert not readable(wal.wakeup_fd), "finish_sync empties the pipe, so a poll on it does not spin"
    wal.start_sync()
    wal.finish_sync(wait=True)
    assert wal.durable_bytes == wal.bytes_written and not wal.dirty and wal.stats()["fsyncs"] == 3
    wal.close()
    assert [kind for _, kind, _ in WriteAheadLog(tmp_path).records()] == [SNAPSHOT, CONSUMED, CONSUMED]


def test_a_sync_that_fails_on_the_thread_is_a_log_write_error_and_the_log_takes_nothing_more(tmp_path, monkeypatch):
    wal = fresh(tmp_path)

    def broken_disk(_fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken_disk)
    wal.append(CONSUMED, [b"x"])
    wal.start_sync()
    with pytest.raises(LogWriteError, match="Input/output error"):
        wal.finish_sync(wait=True)
    assert wal.dirty and wal.durable_bytes == MARKER_BYTES + HEADER.size + len(b"snap")  # only the snapshot, synced as the segment began
    with pytest.raises(LogWriteError, match="failed earlier"):
        wal.append(CONSUMED, [b"y"])
    with pytest.raises(LogWriteError, match="failed earlier"):
        wal.start_sync()
    wal.close()  # closes without syncing a failed log


def test_fsync_percentiles_follow_the_window_a_64th_at_a_time(tmp_path):
    wal = fresh(tmp_path)  # one real fsync (the snapshot's) of a few ms at most
    for _ in range(4095):
        wal._synced(0, 0.001)
    assert wal.stats()["fsync_ms_p50"] == 1.0 and wal.stats()["fsync_ms_p99"] == 1.0
    for _ in range(63):
        wal._synced(0, 0.5)
    assert wal.stats()["fsync_ms_p99"] == 1.0  # 63 new of 4096: the last percentiles stand (sorting 4096 on every batch served cost a tenth of the broker)
    wal._synced(0, 0.5)
    assert wal.stats()["fsync_ms_p99"] == 500.0 and wal.stats()["fsync_ms_p50"] == 1.0  # the 64th: recomputed over the window
    wal.close()


def test_a_sync_on_the_thread_is_timed_on_the_thread_not_when_the_loop_notices(tmp_path):
    wal = fresh(tmp_path)
    wal.append(CONSUMED, [b"x" * 1000])
    wal.start_sync()
    time.sleep(0.3)  # the broker busy with other messages
    wal.finish_sync()
    assert wal.durable_bytes == wal.bytes_written and wal.stats()["fsync_ms_p99"] < 250
    wal.close()


def test_a_log_whose_last_sync_fails_still_releases_its_lock(tmp_path, monkeypatch):
    wal = fresh(tmp_path)
    wal.append(CONSUMED, [b"x"])

    def broken_disk(_fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken_disk)
    with pytest.raises(LogWriteError):
        wal.close()
    monkeypatch.undo()
    WriteAheadLog(tmp_path).close()  # not "another broker is using the write-ahead log"
