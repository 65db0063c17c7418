"""How the retraining schedule groups due concepts into pack runs (issue 26, point 5): pure planning, no training
(tests/test_pack_runs.py runs them)."""

from __future__ import annotations


def test_due_concepts_are_packed_into_runs_of_up_to_pack_size_and_the_others_run_alone_saying_why():
    """Issue 26, point 5: the schedule's runs for 16 (then 17) due LoRA concepts that can share a pack, a DoRA one
    and a DreamBooth one. Pure planning: no training."""
    from assets_pipeline.schedules import RetrainDecision, pack_runs

    def due(concept, method="lora", key=("lora", "base", 4), unpacked=""):
        return RetrainDecision(concept, method, "x", True, "training inputs changed", concept, key, unpacked)

    sixteen = [due(f"c{i:02d}") for i in range(16)]
    odd = [due("dora", key=None, unpacked="concept 'dora' trains alone: [lora] variant = 'dora': ..."),
           due("db", "dreambooth", key=None, unpacked="concept 'db' trains alone: method 'dreambooth' ..."),
           RetrainDecision("fresh", "lora", "x", False, "up to date")]
    runs = pack_runs([*sixteen, *odd], 16)
    assert [(r.method, len(r.concepts)) for r in runs] == [("lora", 1), ("dreambooth", 1), ("lora", 16)]
    assert runs[2].concepts == [d.concept for d in sixteen] and runs[0].unpacked.startswith("concept 'dora'")
    assert [len(r.concepts) for r in pack_runs([*sixteen, due("c16")], 16)] == [16, 1]
    other_rank = due("r8", key=("lora", "base", 8))  # another adapter shape: another pack
    assert [r.concepts for r in pack_runs([sixteen[0], other_rank, sixteen[1]], 16)] == [["c00", "c01"], ["r8"]]
    alone = pack_runs(sixteen, 1)  # pack_size 1: packing off, each its own run, saying so
    assert len(alone) == 16 and {r.unpacked for r in alone} == {"the trainer's pack_size is 1"}
