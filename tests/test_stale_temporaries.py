"""cleanup.py and its callers: what a crashed writer left behind is removed by the next run that owns the
folder; a live writer's young temporary and every other file are left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest

from assets_pipeline.cleanup import GRACE_S, is_temporary, remove_stale_cache_temporaries, remove_stale_temporaries
from helpers import encode, photo, snapshot, write_concept

HEX = "0123456789abcdef" * 2  # a uuid4().hex-shaped token
TEMPORARIES = [  # one of each name this project gives a temporary (cleanup.py's module docstring)
    f".raw_images.{HEX}.tmp/",           # store.atomic_dir, being written
    f".raw_images.{HEX}.old/",           # store.atomic_dir, the replaced folder not yet removed
    f".abc{HEX[3:]}.png.{HEX}.tmp",      # store.atomic_path (ItemCache.put)
    ".current.json.k2_9xqzt.tmp",        # store.write_bytes_atomic (mkstemp's 8 random characters)
    ".20240101T000000Z-1a2b3c4d.tmp/",   # training/output.py: an output folder being written
    ".step-20.tmp/",                     # training/loop.py: a checkpoint being saved
    ".lora.safetensors.tmp",             # training/output.py: a weights file being stamped
    ".job-6f1c9a2e-1d7b-4c3e-9a55-0b3f2d1e4c6a.json",  # a model asset's trainer job
]
OTHERS = [  # outputs, bookkeeping and near misses: never ours to remove
    "current.json", "20240101T000000Z-1a2b3c4d/", "raw_images/", "x.png", "x.png.sha256", ".checkpoints/",
    "abcd.lock", ".tmp", "notes.tmp", ".x.old/", f".x.{HEX[:31]}.old/", "job-1.json", ".job-1.json.bak", ".hidden",
]


def make(folder: Path, name: str, age_s: float = 0.0) -> Path:
    """A file, or for a name ending in '/' a folder holding weights and a manifest (as an output folder), last
    changed ``age_s`` seconds ago."""
    path = folder / name.rstrip("/")
    if name.endswith("/"):
        path.mkdir()
        (path / "pytorch_lora_weights.safetensors").write_bytes(b"\0" * 64)
        (path / "lineage.json").write_text("{}")
    else:
        path.write_text("{}")
    age(path, age_s)
    return path


def age(path: Path, seconds: float) -> None:
    """Set the modification time of ``path`` and everything under it to ``seconds`` ago."""
    t = time.time() - seconds
    for p in sorted(path.rglob("*"), reverse=True) if path.is_dir() else []:
        os.utime(p, (t, t))
    os.utime(path, (t, t))


def test_names_are_recognised_exactly():
    assert [n for n in TEMPORARIES if not is_temporary(n.rstrip("/"))] == []
    assert [n for n in OTHERS if is_temporary(n.rstrip("/"))] == []
    assert is_temporary(f".raw_images.{HEX}.tmp", owner="raw_images")
    assert not is_temporary(f".raw_images.{HEX}.tmp", owner="raw")
    assert not is_temporary(f".captioned_images.{HEX}.old", owner="raw_images")


def test_stale_temporaries_go_young_ones_and_everything_else_stay(tmp_path):
    stale = {make(tmp_path, n, age_s=2 * GRACE_S) for n in TEMPORARIES}
    young_dir = tmp_path / "young"
    young_dir.mkdir()
    young = {make(young_dir, n, age_s=60) for n in TEMPORARIES}
    others = [make(tmp_path, n, age_s=10 * GRACE_S) for n in OTHERS]
    before = snapshot(tmp_path)

    assert set(remove_stale_temporaries(tmp_path)) == stale
    assert remove_stale_temporaries(young_dir) == []
    assert all(p.exists() for p in young | set(others)) and not any(p.exists() for p in stale)
    # Every other file, to the byte and the mtime (a folder of others, e.g. the young one, included).
    assert snapshot(tmp_path) == {k: v for k, v in before.items()
                                  if not any(k.split("/")[0] == p.name for p in stale)}
    assert remove_stale_temporaries(young_dir, older_than_s=0) and not any(p.exists() for p in young)


def test_a_folder_whose_writer_is_still_adding_files_stays_young(tmp_path):
    """The folder itself is old, but its writer just wrote a validation image into it."""
    out = make(tmp_path, ".20240101T000000Z-1a2b3c4d.tmp/", age_s=3 * GRACE_S)
    (out / "validation").mkdir()
    (out / "validation" / "p0_seed0.png").write_bytes(b"png")
    os.utime(out / "validation", (time.time() - 3 * GRACE_S,) * 2)
    os.utime(out, (time.time() - 3 * GRACE_S,) * 2)
    assert remove_stale_temporaries(tmp_path) == [] and out.exists()


def test_owner_limits_a_shared_folder_to_one_assets_temporaries(tmp_path):
    ours = make(tmp_path, f".raw_images.{HEX}.tmp/", age_s=2 * GRACE_S)
    theirs = make(tmp_path, f".captioned_images.{HEX}.tmp/", age_s=2 * GRACE_S)
    assert remove_stale_temporaries(tmp_path, owner="raw_images") == [ours]
    assert theirs.exists()


def test_cache_kind_is_cleaned_in_every_shard(tmp_path):
    kind = tmp_path / "cache" / "latents"
    entry = kind / "ab" / "abcd.safetensors"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"entry")
    stale = [make(kind / "ab", f".abcd.safetensors.{HEX}.tmp", age_s=2 * GRACE_S),
             make(kind / "ab", ".abcd.safetensors.sha256.k2_9xqzt.tmp", age_s=2 * GRACE_S),
             make(kind, ".flat.json.aaaaaaaa.tmp", age_s=2 * GRACE_S)]  # flat kinds (micro_batch) too
    young = make(kind / "ab", f".abce.safetensors.{HEX}.tmp", age_s=1)
    assert sorted(remove_stale_cache_temporaries(kind)) == sorted(stale)
    assert entry.read_bytes() == b"entry" and young.exists()


_CRASH = """
import os, sys
from pathlib import Path
from assets_pipeline.store import atomic_dir, write_bytes_atomic
target = Path(sys.argv[1])
write_bytes_atomic(target / "current.json", b"{}")
with atomic_dir(target / "out") as tmp:
    (tmp / "lineage.json").write_text("{}")
    (tmp / "weights.safetensors").write_bytes(b"w" * 1024)
    os.kill(os.getpid(), 9)  # a kill -9 / OOM kill: no finally runs, so the temporary stays
"""


def test_a_writer_killed_inside_atomic_dir_leaves_a_temporary_the_next_run_removes(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "lineage.json").write_text('{"the": "previous output"}')
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path)], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert (left / "weights.safetensors").is_file()
    assert remove_stale_temporaries(tmp_path, owner="out") == []  # just written: its writer might be alive
    age(left, 2 * GRACE_S)
    assert remove_stale_temporaries(tmp_path, owner="out") == [left]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.json", "out"]
    assert json.loads((tmp_path / "out" / "lineage.json").read_text()) == {"the": "previous output"}


# ---- the callers: each owning run cleans what is its own -----------------------------------------------------


def _log_messages(instance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id)]


def test_materializing_an_asset_cleans_its_folder_and_its_cache(storage, data_root):
    write_concept(data_root, "rusty", {"a.png": encode(photo("coffee", (64, 64)), "PNG")})
    layout = storage.layout()
    concept_dir = layout.root / "concepts" / "rusty"
    concept_dir.mkdir(parents=True)
    shard = layout.root / "cache" / "images" / "ab"
    shard.mkdir(parents=True)
    stale = [make(concept_dir, f".raw_images.{HEX}.tmp/", age_s=2 * GRACE_S),
             make(concept_dir, f".raw_images.{HEX[::-1]}.old/", age_s=2 * GRACE_S),
             make(shard, f".abcd.png.{HEX}.tmp", age_s=2 * GRACE_S)]
    kept = [make(concept_dir, f".captioned_images.{HEX}.tmp/", age_s=2 * GRACE_S),  # another asset's
            make(concept_dir, f".raw_images.{HEX[1:]}0.tmp/", age_s=10)]  # a concurrent run's, still young

    from assets_pipeline.definitions import ASSETS, default_resources

    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["rusty"])
        res = dg.materialize(ASSETS, selection="raw_images", partition_key="rusty", instance=instance,
                             resources={**default_resources(), "storage": storage})
        assert res.success
        messages = _log_messages(instance, res.run_id)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    for p in stale:
        assert any(f"removed stale temporary {p}" in m for m in messages), messages
    assert (concept_dir / "raw_images" / "manifest.parquet").is_file()


def test_a_model_assets_folder_loses_crashed_outputs_and_job_files_not_its_outputs(storage):
    """What a model asset calls before it launches its trainer (assets/common.py), on what a trainer killed
    while writing its output leaves: `.<version>.tmp/` with weights and lineage.json, and its job file."""
    from assets_pipeline.assets.common import clean_stale_temporaries
    from assets_pipeline.lineage import iter_manifests

    folder = storage.layout().asset_dir("rusty", "lora_adapter")
    folder.mkdir(parents=True)
    finished = make(folder, "20240101T000000Z-1a2b3c4d/", age_s=5 * GRACE_S)
    (folder / "current.json").write_text(json.dumps({"path": str(finished)}))
    checkpoints = folder / ".checkpoints" / "0123456789abcdef"
    checkpoints.mkdir(parents=True)
    make(checkpoints, ".step-10.tmp/", age_s=5 * GRACE_S)  # the trainer's, cleaned under its lock (below)
    crashed = [make(folder, ".20240102T000000Z-5e6f7a8b.tmp/", age_s=2 * GRACE_S),
               make(folder, f".job-{uuid.uuid4()}.json", age_s=2 * GRACE_S),
               make(folder, ".current.json.k2_9xqzt.tmp", age_s=2 * GRACE_S)]
    live = make(folder, f".job-{uuid.uuid4()}.json", age_s=30)
    before = snapshot(finished)

    removed = clean_stale_temporaries(dg.build_asset_context(), storage, "rusty", "lora_adapter")
    assert sorted(removed) == sorted(crashed)
    assert live.exists() and (checkpoints / ".step-10.tmp").exists() and snapshot(finished) == before
    assert [f for f, _ in iter_manifests(storage.layout().root)] == [finished]


def _job(tmp_path: Path):
    from helpers import make_job

    return make_job("lora", {"rank": 4}, rows=({"image_sha256": "1" * 64, "role": "instance", "caption": "a photo"},),
                    concept="rusty", latents_dir=str(tmp_path / "latents"), output_dir=str(tmp_path / "lora" / "v1"),
                    checkpoint_dir=str(tmp_path / "lora" / ".checkpoints"), cache_dir=str(tmp_path / "cache"))


def test_the_trainer_holding_its_lock_removes_half_saved_checkpoints_at_any_age(tmp_path):
    from assets_pipeline.training.checkpoints import checkpoint_root, job_lock

    job = _job(tmp_path)
    root = checkpoint_root(job)
    root.mkdir(parents=True)
    saved = make(root, "step-10/")
    (saved / "losses.json").write_text("[1.0]")
    half = make(root, ".step-20.tmp/", age_s=1)  # seconds old: no other trainer of this job can be writing it
    other_job = make(root.parent, ".step-20.tmp/", age_s=1)  # not this job's folder
    probe = tmp_path / "cache" / "micro_batch"
    probe.mkdir(parents=True)
    stale_probe = make(probe, ".abc.json.aaaaaaaa.tmp", age_s=2 * GRACE_S)
    live_probe = make(probe, ".abd.json.bbbbbbbb.tmp", age_s=1)  # another job's trainer is writing it

    messages = []
    with job_lock(job, messages.append):
        assert not half.exists() and not stale_probe.exists()
    assert saved.exists() and (saved / "losses.json").read_text() == "[1.0]"
    assert other_job.exists() and live_probe.exists()
    assert sorted(messages) == sorted(f"removed stale temporary {p}: left half-written by a trainer that did not "
                                      "finish" for p in (half, stale_probe))


@pytest.mark.parametrize("name", ["step-10/", "current.json"])
def test_missing_folder_or_non_temporary_is_a_no_op(tmp_path, name):
    assert remove_stale_temporaries(tmp_path / "absent") == []
    path = make(tmp_path, name, age_s=10 * GRACE_S)
    assert remove_stale_temporaries(tmp_path, older_than_s=0) == [] and path.exists()
