"""The plan cache (`dstack.store.plans`): written without syncs, so a file a crash broke is made anew."""

from __future__ import annotations

from dstack.store.plans import _path, read_plan, write_plan


def test_a_broken_cache_file_is_removed_and_made_anew(dstack_home):
    write_plan("fp1", '{"plan": 1}')
    assert read_plan("fp1") == '{"plan": 1}'
    _path().write_bytes(b"not a database, half written" * 200)
    assert read_plan("fp1") is None  # worked out again
    assert not _path().exists()
    write_plan("fp2", '{"plan": 2}')
    assert read_plan("fp2") == '{"plan": 2}'
