"""resources/: the trainer resource's command (one process, or accelerate launch for several)."""

from __future__ import annotations


def test_trainer_launch_command_uses_accelerate_for_several_gpus(tmp_path):
    import sys

    from assets_pipeline.resources import TrainerLauncher

    job = tmp_path / "job.json"
    assert TrainerLauncher().command(job) == [sys.executable, "-m", "assets_pipeline.training", "--job", str(job)]
    multi = TrainerLauncher(num_processes=4, accelerate_config_file="acc.yaml").command(job)
    assert multi[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "4"]
    assert multi[5:7] == ["--config_file", "acc.yaml"]
    assert multi[7:] == ["-m", "assets_pipeline.training", "--job", str(job)]  # accelerate's --module form
