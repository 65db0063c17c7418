"""Class images: content-addressed, reused across concepts with the same class noun and base model."""

from __future__ import annotations

import pytest

from assets_pipeline.stages.class_images import ClassImageConfig, class_image_keys


def test_keys_cover_everything_that_determines_the_image():
    cfg = ClassImageConfig()
    base = class_image_keys("fp", "a photo of a dog", 3, 64, cfg, quick=True)
    assert len({k for _, k in base}) == 3
    variants = [
        class_image_keys("other-model", "a photo of a dog", 3, 64, cfg, quick=True),
        class_image_keys("fp", "a photo of a cat", 3, 64, cfg, quick=True),
        class_image_keys("fp", "a photo of a dog", 3, 128, cfg, quick=True),
        class_image_keys("fp", "a photo of a dog", 3, 64, ClassImageConfig(guidance_scale=5.0), quick=True),
        class_image_keys("fp", "a photo of a dog", 3, 64, ClassImageConfig(num_inference_steps=20), quick=True),
        class_image_keys("fp", "a photo of a dog", 3, 64, ClassImageConfig(scheduler="DDIMScheduler"), quick=True),
        class_image_keys("fp", "a photo of a dog", 3, 64, ClassImageConfig(seed=7), quick=True),
    ]
    for v in variants:
        assert not {k for _, k in v} & {k for _, k in base}
    # raising the count keeps the first keys: only the new ones are generated
    assert class_image_keys("fp", "a photo of a dog", 5, 64, cfg, quick=True)[:3] == base


@pytest.mark.slow
def test_second_concept_with_same_class_reuses_images_and_more_only_adds(tmp_path, storage, data_root):
    import shutil

    import dagster as dg

    from assets_pipeline.definitions import ASSETS, default_resources
    from assets_pipeline.demo_data import write_demo_concept

    demo = write_demo_concept(data_root, "source")
    spec = ('token = "{t}"\nclass_noun = "dog"\nmethods = ["dreambooth"]\n'
            '[dreambooth]\nnum_class_images = {n}\n[class_images]\nnum_inference_steps = 2\n')
    for name, token in (("rex", "sks"), ("fido", "zwx")):
        folder = data_root / name
        folder.mkdir()
        shutil.copy(demo / "astronaut.png", folder / "a.png")
        (folder / "concept.toml").write_text(spec.format(t=token, n=3))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("concepts", ["rex", "fido"])
    resources = {**default_resources(), "storage": storage}

    def build(concept):
        res = dg.materialize(ASSETS, selection=["raw_images", "class_images"], partition_key=concept,
                             instance=instance, resources=resources)
        mat = [e.materialization for e in res.get_asset_materialization_events()
               if e.materialization.asset_key.to_user_string() == "class_images"][0]
        return mat.metadata["items_computed"].value, mat.metadata["items_cached"].value, mat

    assert build("rex")[:2] == (3, 0)
    computed, cached, mat = build("fido")
    assert (computed, cached) == (0, 3)
    assert mat.metadata["dagster/row_count"].value == 3
    (data_root / "fido" / "concept.toml").write_text(spec.format(t="zwx", n=5))
    assert build("fido")[:2] == (2, 3)
