"""The shared mechanisms behind issue #23: run locks, stale temporary names, bounded JSON, folder swaps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from heartcascade.utils import atomic, jsonio, run_lock, stale_temps
from heartcascade.utils.errors import HCError
from heartcascade.utils.processes import host_code, pid_alive, process_start, this_host


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    guarded = tmp_path / "fold_0"
    with run_lock.run_lock(guarded, "hc_train") as lock:
        assert lock == tmp_path / ".fold_0.lock"
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == this_host()
        # a live holder (this process) refuses a second taker, naming the pid
        with pytest.raises(HCError, match=f"pid {os.getpid()}"):
            run_lock.acquire(guarded, "hc_train")
        assert run_lock.live_holder(guarded)["pid"] == os.getpid()
    assert not lock.exists() and list(tmp_path.iterdir()) == []


def test_stale_locks_are_taken_over_and_other_hosts_are_not(tmp_path):
    guarded = tmp_path / "fold_0"
    lock = run_lock.lock_path(guarded)
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": this_host(), "command": "killed"}))
    assert run_lock.live_holder(guarded) is None
    with run_lock.run_lock(guarded, "hc_train"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    # a reused pid (this live process, another start time) is not the holder
    lock.write_text(json.dumps({"pid": os.getpid(), "host": this_host(), "start": (process_start(os.getpid()) or 0) + 1}))
    if process_start(os.getpid()) is not None:
        assert run_lock.live_holder(guarded) is None
    lock.write_text("{half")  # unreadable: stale
    run_lock.release(run_lock.acquire(guarded, "x"))
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "hc_train 1 0"}))
    with pytest.raises(HCError, match=f"remove {lock}"):
        run_lock.acquire(guarded, "hc_train")


def test_sweep_removes_only_dead_owners_files(tmp_path):
    dead = f"hc{_dead_pid()}-{host_code()}"
    live = f"hc{os.getpid()}-{host_code()}"
    other = f"hc{_dead_pid()}-{'0' * 6 if host_code() != '0' * 6 else '1' * 6}"
    names = {f".m.zip.{dead}.a.tmp.zip": False, f".m.zip.{live}.b.tmp.zip": True, f".m.zip.{other}.c.tmp.zip": True,
             ".m.zip.untagged.tmp.zip": True, "m.zip": True}
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".hc_install_{dead}_x" / "fold_0").mkdir(parents=True)
    stale_temps.sweep_temp_files_of(tmp_path / "m.zip")
    stale_temps.sweep(tmp_path, ".hc_install_")
    assert {p.name for p in tmp_path.iterdir()} == {n for n, keep in names.items() if keep}
    assert pid_alive(os.getpid()) and not pid_alive(_dead_pid())


def test_atomic_temp_names_carry_their_owner(tmp_path):
    with atomic.atomic_path(tmp_path / "out.json") as tmp:
        assert stale_temps.owner_of(tmp.name) == (os.getpid(), host_code())
        tmp.write_text("{}")


def test_replace_folder_and_restore_after_a_killed_swap(tmp_path):
    dest, new = tmp_path / "fold_0", tmp_path / "new"
    dest.mkdir()
    (dest / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    atomic.replace_folder(new, dest)
    assert (dest / "a").read_text() == "new" and not new.exists() and sorted(tmp_path.iterdir()) == [dest]
    aside = tmp_path / f".fold_0.old.hc{_dead_pid()}-{host_code()}"
    os.replace(dest, aside)  # killed between the two renames of the fallback
    atomic.restore_replaced_folders(tmp_path)
    assert (dest / "a").read_text() == "new" and not aside.exists()


def test_json_bounds(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(HCError, match="nested deeper"):
        jsonio.load_json(deep)
    deep.write_text("[" * 40 + "]" * 40)  # parses, but deeper than the bound
    with pytest.raises(HCError, match="nested deeper"):
        jsonio.load_json(deep)
    with pytest.raises(HCError, match="not valid JSON"):
        jsonio.parse_json(b"\xff", "x")
    assert jsonio.parse_json('{"a": [1, {"b": 2}]}', "x") == {"a": [1, {"b": 2}]}


def test_output_file_checks(tmp_path):
    with pytest.raises(HCError, match="is a folder"):
        atomic.ensure_writable_file(tmp_path, "overlay output", "case.png")
    with pytest.raises(HCError, match="not a folder"):
        atomic.ensure_writable_file(f"{tmp_path}/sub/", "overlay output", "case.png")
    assert atomic.ensure_writable_file(tmp_path / "sub" / "x.png") == Path(tmp_path / "sub" / "x.png")
