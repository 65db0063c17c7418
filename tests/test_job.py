"""training/job.py: a job's typed parts survive the job file the trainer reads, its identity is what decides
reuse, and a job file of another format is refused with what to do."""

from __future__ import annotations

import json

import pytest

from helpers import make_job


def job_with_everything():
    return make_job("lora", {"rank": 8, "datasets": ({"concept": "tabby", "repeats": 2},)}, rows=[
        {"image_sha256": "a", "role": "instance", "caption": "a photo of sks dog", "clip_score": 0.3,
         "blur_variance": 120.5, "concept": "rusty", "repeats": 1},
        {"image_sha256": "b", "role": "instance", "caption": "zwx cat", "concept": "tabby", "repeats": 2}],
        performance={"compile": "full", "log_every": 50}, validation_seeds=(0, 1))


def test_a_job_round_trips_through_its_file_with_its_typed_parts(tmp_path):
    import dataclasses

    from assets_pipeline.training.job import JOB_FORMAT, DatasetSource, TrainJob

    job = dataclasses.replace(job_with_everything(), datasets=(
        DatasetSource("tabby", "zwx", "cat", 2, "/art/concepts/tabby/vae_latents"),))
    job.save(tmp_path / "job.json")
    raw = json.loads((tmp_path / "job.json").read_text())
    assert raw["format_version"] == JOB_FORMAT
    assert "clip_score" not in raw["training_images"][1]  # a field a row does not have is not written
    back = TrainJob.load(tmp_path / "job.json")
    assert back == job and back.identity() == job.identity()
    assert type(back.config).__name__ == "LoraConfig" and back.config.datasets == ({"concept": "tabby", "repeats": 2},)
    assert back.performance.compile == "full" and back.base_model.fingerprint == "f" * 64


def test_the_identity_follows_what_is_learned_not_how_it_runs():
    import dataclasses

    job = job_with_everything()
    assert dataclasses.replace(job, device="cuda", cache_dir="/elsewhere").identity() == job.identity()
    assert dataclasses.replace(job, config=dataclasses.replace(job.config, rank=4)).identity() != job.identity()
    second = dataclasses.replace(job.training_images[1], caption="another caption")
    assert dataclasses.replace(job, training_images=(job.training_images[0], second)).identity() != job.identity()
    # A row of the job's own concept, seen once, enters as it did before datasets existed.
    alone = make_job("lora", rows=[{"image_sha256": "a", "role": "instance", "caption": "c"}])
    marked = make_job("lora", rows=[{"image_sha256": "a", "role": "instance", "caption": "c", "concept": "c",
                                     "repeats": 1}])
    assert alone.identity() == marked.identity()


@pytest.mark.parametrize("version", [None, 1, 99])
def test_a_job_file_of_another_format_is_refused_with_what_to_do(tmp_path, version):
    from assets_pipeline.training.job import JOB_FORMAT, TrainJob

    raw = make_job("lora").to_json()
    if version is None:  # the job files d663daf and before wrote had no version
        del raw["format_version"]
    else:
        raw["format_version"] = version
    (tmp_path / "job.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=rf"job.json: job format version {version or 1}, and this trainer reads "
                                         rf"version {JOB_FORMAT}.*Materialize the model asset again"):
        TrainJob.load(tmp_path / "job.json")
