"""Packed LoRA training (training/pack.py, issue 26): several concepts' LoRAs trained in one process over one frozen
base equal the LoRAs each concept trains alone (loop.train) with the same seeds and batches, on the CPU in fp32 with
deterministic algorithms, within 1e-5; a concept that diverges fails alone; a packed concept's output is a solo
output that stock diffusers loads; and packable() says which jobs cannot share a pack, and why."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_job, write_synthetic_bundle

from tests.conftest import link_models

TOL = 1e-5
# Each concept its own recipe: seeds, learning rates and schedules, steps (4, 6, 8: they leave the pack at different
# steps), photos (3, 4, 5; one photo repeated), batch and accumulation, alpha, recipes, EMA.
CONCEPTS = {
    "ann": (3, {"max_train_steps": 4, "seed": 1, "learning_rate": 1.5e-3, "train_batch_size": 2}),
    "bob": (4, {"max_train_steps": 6, "seed": 2, "learning_rate": 5e-4, "alpha": 8, "lr_scheduler": "linear",
                "lr_warmup_steps": 2, "noise_offset": 0.05, "snr_gamma": 5.0}),
    "cat": (5, {"max_train_steps": 8, "seed": 3, "learning_rate": 1e-3, "gradient_accumulation_steps": 2,
                "use_ema": True, "ema_decay": 0.9}),
}


@pytest.fixture(scope="module")
def deterministic():
    """fp32 on the CPU, deterministic algorithms, one thread (a batched op's float rounding then depends on the
    batch alone, not on how threads split it)."""
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def world(built_models, tmp_path_factory):
    """An artifact root with the embedded models, and a job factory: each concept its own latents bundle (its own
    photos: random latents and embeddings), rows with decoded photos for validation's CLIP-I."""
    from PIL import Image

    from assets_pipeline.models.resolve import resolve_base_model

    root = tmp_path_factory.mktemp("pack")
    artifacts = link_models(built_models, root / "artifacts")
    ref = resolve_base_model("embedded", artifacts)

    def job(concept: str, n: int, config: dict, bucket=(64, 64), name: str | None = None, method: str = "lora",
            **fields):
        folder = root / (name or concept)
        folder.mkdir(exist_ok=True)
        write_synthetic_bundle(folder, seed=sum(map(ord, concept)), n=n, bucket=bucket)
        rows = []
        for i, s in enumerate("abcdefgh"[:n]):
            photo = folder / f"{s}.png"
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
            rows.append({"image_sha256": s, "role": "instance", "caption": f"a photo of {concept} dog",
                         "decoded_path": str(photo), "source_path": str(photo),
                         **({"repeats": 2} if concept == "bob" and s == "a" else {})})
        return make_job(method, config, rows=rows, base_model=ref, concept=concept, latents_dir=str(folder),
                        output_dir=str(folder / "out"), checkpoint_dir=str(folder / "ckpt"), device="cpu",
                        mixed_precision="no", validation_inference_steps=2, validation_seeds=(0,),
                        scorer={"model_name": "embedded", "artifact_root": str(artifacts)}, **fields)

    return job


def adapter(state) -> dict:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(state.models.denoiser).items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def trained(world, deterministic):
    """The three concepts trained alone, one after another, and as one pack."""
    from assets_pipeline.training import loop
    from assets_pipeline.training.pack import train_pack

    jobs = [world(c, n, cfg) for c, (n, cfg) in CONCEPTS.items()]
    solo = [loop.train(job, progress=lambda m: None) for job in jobs]
    log: list[str] = []
    handed: dict[str, dict] = {}

    def on_done(i, state):  # as the pack trainer writes each output: when its concept leaves the pack
        log.append(f"on_done {jobs[i].concept}")
        handed[jobs[i].concept] = adapter(state)

    packed = train_pack(jobs, progress=log.append, on_done=on_done)
    return jobs, solo, packed, log, handed


def test_each_packed_concept_equals_its_solo_training(trained):
    jobs, solo, packed, log, handed = trained
    assert all(not isinstance(p, BaseException) for p in packed), packed
    diffs = {}
    for job, s, p in zip(jobs, solo, packed):
        steps = job.config.max_train_steps
        assert s.steps == p.steps == steps and len(s.losses) == len(p.losses) == steps
        np.testing.assert_allclose(p.losses, s.losses, rtol=0, atol=TOL)
        diffs[job.concept] = max_diff(adapter(s), adapter(p))
        assert diffs[job.concept] <= TOL, diffs
        # Not two untrained adapters agreeing: lora_B starts at zero (gaussian init) and has moved far past TOL.
        assert max(float(v.abs().max()) for k, v in adapter(p).items() if "lora_B" in k) > 100 * TOL
        assert p.stats["packed"] and p.stats["pack_size"] == 3
    # Each concept its own adapter: a mix-up of concepts would break the equality above by far more than TOL.
    states = [adapter(p) for p in packed]
    assert min(max_diff(states[i], states[j]) for i in range(3) for j in range(i + 1, 3)) > 1e-2
    # Each left the pack at its own step count while the others went on (a concept stepped after it left would
    # not equal its solo training: AdamW moves weights on zero gradients).
    assert [line for line in log if "leaves the pack" in line or line.startswith("on_done")] == [
        line for c, n in (("ann", 4), ("bob", 6), ("cat", 8))
        for line in (f"pack: {c!r} trained its {n} steps and leaves the pack", f"on_done {c}")]
    # ... and its result was handed on then (its output written while the others trained on), the one returned
    for job, p in zip(jobs, packed):
        assert max_diff(handed[job.concept], adapter(p)) == 0
    print(f"max |packed - solo| of the adapters: {diffs}")


def test_a_diverging_concept_fails_alone_and_the_others_still_equal_solo(world, trained, deterministic):
    from assets_pipeline.training.loop import DivergedTraining
    from assets_pipeline.training.pack import train_pack

    jobs, solo, *_ = trained
    wild = world("wild", 3, {"max_train_steps": 6, "seed": 4, "learning_rate": 1e30})
    log: list[str] = []
    ann, failed, cat = train_pack([jobs[0], wild, jobs[2]], progress=log.append)
    assert isinstance(failed, DivergedTraining)
    message = str(failed)
    assert "lora training of concept 'wild' diverged: step" in message and "learning rate 1e+30" in message
    assert any("'wild' leaves the pack" in line for line in log)
    for s, p in ((solo[0], ann), (solo[2], cat)):
        assert max_diff(adapter(s), adapter(p)) <= TOL
        np.testing.assert_allclose(p.losses, s.losses, rtol=0, atol=TOL)


def test_parts_of_other_shapes_run_their_own_forwards_with_gradient_checkpointing(world, deterministic):
    """Concepts whose batches have other latent shapes (aspect buckets) run one forward each; with gradient
    checkpointing each forward's blocks are recomputed in the backward under that forward's row index (steps 1-2:
    two forwards; step 3, once the wide concept has left: one)."""
    from assets_pipeline.training import loop
    from assets_pipeline.training.pack import train_pack

    common = {"gradient_checkpointing": True, "learning_rate": 1e-3}
    jobs = [world("square", 3, {**common, "max_train_steps": 3, "seed": 5}),
            world("wide", 3, {**common, "max_train_steps": 2, "seed": 6, "train_batch_size": 2}, bucket=(64, 32))]
    solo = [loop.train(job, progress=lambda m: None) for job in jobs]
    packed = train_pack(jobs, progress=lambda m: None)
    for s, p in zip(solo, packed):
        assert max_diff(adapter(s), adapter(p)) <= TOL
        np.testing.assert_allclose(p.losses, s.losses, rtol=0, atol=TOL)


def test_a_packed_concepts_output_is_a_solo_output_that_stock_diffusers_loads(trained, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from assets_pipeline.training.methods.lora import DIFFUSERS_FILE, KOHYA_FILE
    from assets_pipeline.training.output import write_output

    jobs, solo, packed, *_ = trained
    outs = {}
    for kind, state in (("solo", solo[0]), ("packed", packed[0])):
        job = replace(jobs[0], output_dir=str(tmp_path / kind))
        result = write_output(job, state, "cpu")
        outs[kind] = Path(job.output_dir)
        assert result["steps"] == 4 and result["final_loss"] == pytest.approx(state.losses[-1])
    files = {kind: sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
             for kind, out in outs.items()}
    assert files["packed"] == files["solo"] and {DIFFUSERS_FILE, KOHYA_FILE} <= set(files["packed"])
    for name in (DIFFUSERS_FILE, KOHYA_FILE):
        assert max_diff(load_file(str(outs["solo"] / name)), load_file(str(outs["packed"] / name))) <= TOL

    pipe = StableDiffusionPipeline.from_pretrained(jobs[0].base_model.location, local_files_only=True)
    pipe.load_lora_weights(str(outs["packed"]))  # what a diffusers user does: nothing from this project
    (name,) = pipe.unet.peft_config
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=name)
    assert max_diff(loaded, adapter(packed[0])) == 0


# -- packable ---------------------------------------------------------------------------------------------------------

def _job(concept="c", config=None, **fields):
    return make_job("lora", config, concept=concept, **fields)


@pytest.mark.parametrize("config,fields,says", [
    ({"variant": "dora"}, {}, "[lora] variant = 'dora'"),
    ({"conv_rank": 2}, {}, "[lora] conv_rank = 2"),
    ({"dropout": 0.1}, {}, "[lora] dropout = 0.1"),
    ({"train_text_encoder": True}, {}, "[lora] train_text_encoder = True"),
    ({"base_quantization": "int8"}, {}, "[lora] base_quantization = 'int8'"),
    ({"datasets": [{"concept": "other"}]}, {}, "[lora] datasets = "),
    ({"shuffle_caption": True}, {}, "[lora] shuffle_caption = True"),
    ({"validation_steps": 2}, {}, "[lora] validation_steps = 2"),
    ({}, {"mixed_precision": "fp16"}, "mixed_precision = 'fp16'"),
    ({}, {"log_with": "tensorboard"}, "log_with = 'tensorboard'"),
])
def test_each_unpackable_setting_is_refused_naming_the_concept_and_the_key(config, fields, says):
    from assets_pipeline.training.pack import packable

    ok, bad = _job("ok"), _job("odd", config, **fields)
    groups, refused = packable([ok, bad])
    assert groups == [[ok]]
    assert [r.job for r in refused] == [bad]
    assert str(refused[0]).startswith(f"concept 'odd' trains alone: {says}")


def test_other_methods_and_an_interrupted_training_with_a_checkpoint_are_refused(tmp_path):
    from assets_pipeline.training.checkpoints import checkpoint_root
    from assets_pipeline.training.pack import packable

    dreambooth = make_job("dreambooth", concept="db")
    resumable = _job("half", checkpoint_dir=str(tmp_path))
    (checkpoint_root(resumable) / "step-4").mkdir(parents=True)
    (checkpoint_root(resumable) / "step-4" / "losses.json").write_text("[]")
    groups, refused = packable([dreambooth, resumable, _job("fresh")])
    assert [g[0].concept for g in groups] == ["fresh"]
    assert [str(r) for r in refused] == [
        "concept 'db' trains alone: method 'dreambooth' (a pack trains LoRA adapters or textual-inversion tokens only)",
        ("concept 'half' trains alone: it has a checkpoint at step 4 of an interrupted training, which resumes alone "
         "(a pack neither resumes nor writes checkpoints)")]


def test_packs_group_what_they_share_and_a_pack_refuses_jobs_that_cannot_share_it():
    from assets_pipeline.models.resolve import BaseModelRef
    from assets_pipeline.training.pack import packable, train_pack

    other = BaseModelRef(source="other", kind="embedded", location="", fingerprint="0" * 64, resolution=64,
                         family="sd1", prediction_type="epsilon")
    a, b = _job("a", {"learning_rate": 1e-3, "seed": 1, "alpha": 8}), _job("b", {"max_train_steps": 9})
    wide = _job("wide", {"rank": 8})
    targets = _job("targets", {"target_modules": ["to_q", "to_v"]})
    base, gpu, ckpt = _job("base", base_model=other), _job("gpu", device="cuda"), _job("ckpt", {
        "gradient_checkpointing": True})
    same_targets = _job("same", {"target_modules": ["to_v", "to_q"]})
    groups, refused = packable([a, wide, b, targets, base, gpu, ckpt, same_targets])
    assert not refused
    assert [[j.concept for j in g] for g in groups] == [["a", "b"], ["wide"], ["targets", "same"], ["base"],
                                                        ["gpu"], ["ckpt"]]
    with pytest.raises(ValueError, match=r"these 2 jobs cannot train as one pack: they differ in base model, rank"):
        train_pack([a, wide])
    with pytest.raises(ValueError, match=r"cannot train as one pack: concept 'odd' trains alone: \[lora\] variant"):
        train_pack([a, _job("odd", {"variant": "loha"})])


def test_a_pack_run_trains_packable_jobs_in_packs_of_pack_size_then_each_other_job_alone():
    """training/pack_trainer.units: the order a ``--pack`` trainer trains its jobs, and why each one trains alone."""
    from dataclasses import replace

    from assets_pipeline.training.pack_trainer import units

    jobs = [_job(c, {"seed": i}) for i, c in enumerate("abcde")]
    dora, db = _job("dora", {"variant": "dora"}), make_job("dreambooth", concept="db")
    twin = replace(jobs[0], concept="twin")  # a copied folder: the same job as a's
    said = []
    got = units([jobs[0], dora, *jobs[1:3], twin, db, *jobs[3:]], 2, said.append)
    assert [[j.concept for j in u] for u in got] == [["a", "b"], ["c", "d"], ["e"], ["dora"], ["db"], ["twin"]]
    assert [line.split(":")[0] for line in said] == ["concept 'dora' trains alone", "concept 'db' trains alone",
                                                     "concept 'twin' trains alone"]
    assert "same as another concept's" in said[2]
    assert [[j.concept for j in u] for u in units(jobs, 0, said.append)] == [list("abcde")]  # 0: one pack
    assert [len(u) for u in units(jobs, 1, said.append)] == [1] * 5


# -- textual inversion ------------------------------------------------------------------------------------------------

# Each concept its own token (one shares another's word as its initializer), seed, learning rate and schedule, steps
# (3, 5, 4), photos, batch and accumulation, weight decay, clipping that bites (max_grad_norm tiny), EMA.
TI_CONCEPTS = {
    "ann": (3, {"max_train_steps": 3, "seed": 1, "learning_rate": 5e-3, "train_batch_size": 2}),
    "bob": (4, {"max_train_steps": 5, "seed": 2, "learning_rate": 2e-3, "lr_scheduler": "linear",
                "lr_warmup_steps": 2, "adam_weight_decay": 0.5, "max_grad_norm": 1e-4, "initializer_token": "cat",
                "caption_dropout": 0.3}),
    "cat": (5, {"max_train_steps": 4, "seed": 3, "learning_rate": 1e-2, "gradient_accumulation_steps": 2,
                "use_ema": True, "ema_decay": 0.5, "noise_offset": 0.05}),
}


def token_row(state) -> torch.Tensor:
    """The learned row (the one textual_inversion.save writes) of the state's one text encoder."""
    name = state.models.family.text_encoder_names[0]
    return state.method._learned(state.models, name)


@pytest.fixture(scope="module")
def ti_trained(world, deterministic):
    """The textual-inversion concepts trained alone, one after another, and as one pack."""
    from assets_pipeline.training import loop
    from assets_pipeline.training.pack import train_pack

    jobs = [world(c, n, cfg, name=f"ti-{c}", method="textual_inversion", token=f"tok{c}")
            for c, (n, cfg) in TI_CONCEPTS.items()]
    solo = []
    for job in jobs:  # the method is one object: read each solo's row before the next solo training overwrites it
        state = loop.train(job, progress=lambda m: None)
        solo.append((state, token_row(state), list(state.losses)))
    log: list[str] = []
    handed: dict[str, dict] = {}

    def on_done(i, state):  # as the pack trainer writes each output: when its concept leaves the pack
        log.append(f"on_done {jobs[i].concept}")
        handed[jobs[i].concept] = token_row(state).detach().clone()

    packed = train_pack(jobs, progress=log.append, on_done=on_done)
    return jobs, solo, packed, log, handed


def test_each_packed_token_equals_its_solo_training(ti_trained):
    jobs, solo, packed, log, handed = ti_trained
    assert all(not isinstance(p, BaseException) for p in packed), packed
    diffs, rows = {}, []
    for job, (s, solo_row, solo_losses), p in zip(jobs, solo, packed):
        steps = job.config.max_train_steps
        assert p.steps == steps and len(p.losses) == len(solo_losses) == steps
        np.testing.assert_allclose(p.losses, solo_losses, rtol=0, atol=TOL)
        row = token_row(p)
        rows.append(row)
        diffs[job.concept] = float((row - solo_row).abs().max())
        assert diffs[job.concept] <= TOL, diffs
        assert p.stats["packed"] and p.stats["pack_size"] == 3
        # Not two untrained rows agreeing: the row moved from where solo's prepare starts it.
        emb = p.models.text_encoders[0].get_input_embeddings().weight
        tok = p.models.tokenizers[0]
        init = emb[tok.encode(job.config.initializer_token or job.class_noun or "photo",
                              add_special_tokens=False)].mean(0).detach()
        assert float((row[0] - init).abs().max()) > 100 * TOL
        # Solo's shape: its tokenizer has its own token only, at solo's id.
        assert len(tok) == len(s.models.tokenizers[0]) and tok.convert_tokens_to_ids(f"<tok{job.concept}>") == \
            p.method.placeholder_ids["text_encoder"]
    # Each concept its own row: a mix-up would break the equality above by far more than TOL.
    assert min(float((rows[i] - rows[j]).abs().max()) for i in range(3) for j in range(i + 1, 3)) > 1e-3
    assert [line for line in log if "leaves the pack" in line or line.startswith("on_done")] == [
        line for c, n in (("ann", 3), ("cat", 4), ("bob", 5))
        for line in (f"pack: {c!r} trained its {n} steps and leaves the pack", f"on_done {c}")]
    for job, p in zip(jobs, packed):  # handed on as it left the pack: the row returned
        assert torch.equal(handed[job.concept], token_row(p))
    print(f"max |packed - solo| of the learned rows: {diffs}")


def test_a_packed_token_is_written_as_solo_writes_it_and_stock_diffusers_loads_it(ti_trained, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from assets_pipeline.training.methods.textual_inversion import DIFFUSERS_FILE
    from assets_pipeline.training.output import write_output

    jobs, solo, packed, *_ = ti_trained
    outs = {}
    # The solo state's method is shared by every solo training: train ann alone again so its state is current.
    from assets_pipeline.training import loop

    for kind, state in (("solo", loop.train(jobs[0], progress=lambda m: None)), ("packed", packed[0])):
        job = replace(jobs[0], output_dir=str(tmp_path / kind))
        write_output(job, state, "cpu")
        outs[kind] = Path(job.output_dir)
    files = {kind: sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
             for kind, out in outs.items()}
    assert files["packed"] == files["solo"] and {DIFFUSERS_FILE, "ann.safetensors"} <= set(files["packed"])
    for name in (DIFFUSERS_FILE, "ann.safetensors"):
        assert max_diff(load_file(str(outs["solo"] / name)), load_file(str(outs["packed"] / name))) <= TOL

    pipe = StableDiffusionPipeline.from_pretrained(jobs[0].base_model.location, local_files_only=True)
    pipe.load_textual_inversion(str(outs["packed"] / DIFFUSERS_FILE))  # stock diffusers: the token from the file
    token_id = pipe.tokenizer.convert_tokens_to_ids("<tokann>")
    loaded = pipe.text_encoder.get_input_embeddings().weight[token_id].detach()
    assert float((loaded - token_row(packed[0])[0]).abs().max()) == 0


def test_packable_puts_lora_and_textual_inversion_in_separate_packs_and_refuses_unpackable_tokens():
    from assets_pipeline.training.pack import packable, train_pack

    lora_a, lora_b = _job("la"), _job("lb", {"learning_rate": 1e-3})
    ti_a = make_job("textual_inversion", {"seed": 3}, concept="ta")
    ti_b = make_job("textual_inversion", {"learning_rate": 1e-3, "initializer_token": "dog"}, concept="tb")
    odd = {key: make_job("textual_inversion", config, concept=key, **fields) for key, config, fields in (
        ("opt", {"optimizer": "prodigy"}, {}), ("shuf", {"shuffle_caption": True}, {}),
        ("val", {"validation_steps": 2}, {}), ("half", {}, {"mixed_precision": "fp16"}))}
    groups, refused = packable([lora_a, ti_a, *odd.values(), lora_b, ti_b])
    assert [[j.concept for j in g] for g in groups] == [["la", "lb"], ["ta", "tb"]]
    assert [str(r) for r in refused] == [
        "concept 'opt' trains alone: [textual_inversion] optimizer = 'prodigy': a packed token's row is stepped "
        "alone, which equals solo's step of the whole embedding only for AdamW (per element); 8-bit AdamW, Adafactor "
        "and Prodigy see the other rows too",
        "concept 'shuf' trains alone: [textual_inversion] shuffle_caption = True: a pack tokenizes each concept's "
        "captions once",
        "concept 'val' trains alone: [textual_inversion] validation_steps = 2: a pack does not validate during "
        "training (yet)",
        "concept 'half' trains alone: mixed_precision = 'fp16': fp16 needs a gradient scaler, which one backward "
        "over several concepts would share; train in bf16 or fp32"]
    with pytest.raises(ValueError, match=r"these 2 jobs cannot train as one pack"):
        train_pack([lora_a, ti_a])


def test_a_diverging_token_fails_alone_and_concepts_with_one_placeholder_each_train_their_own_row(world, ti_trained,
                                                                                               deterministic):
    """'wild' has ann's token (<tokann>) and a learning rate that overflows its row: it fails alone, and ann, whose
    captions hold the same placeholder, still equals its solo training (each concept's captions are tokenized with
    its own tokenizer and mapped to its own row)."""
    from assets_pipeline.training.loop import DivergedTraining
    from assets_pipeline.training.pack import train_pack

    jobs, solo, *_ = ti_trained
    wild = world("wild", 3, {"max_train_steps": 4, "seed": 4, "learning_rate": 1e30}, name="ti-wild",
                 method="textual_inversion", token="tokann")
    log: list[str] = []
    ann, failed, cat = train_pack([jobs[0], wild, jobs[2]], progress=log.append)
    assert isinstance(failed, DivergedTraining), failed
    assert "textual_inversion training of concept 'wild'" in str(failed)
    assert any("'wild' leaves the pack" in line for line in log)
    for (_, solo_row, solo_losses), p in ((solo[0], ann), (solo[2], cat)):
        assert float((token_row(p) - solo_row).abs().max()) <= TOL
        np.testing.assert_allclose(p.losses, solo_losses, rtol=0, atol=TOL)
