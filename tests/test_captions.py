"""stages/captions.py: sidecar > captioner model > template; model captions cached by (image, captioner)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from assets_pipeline.concept import ConceptSpec
from assets_pipeline.stages.captions import CaptionConfig, caption_images
from assets_pipeline.stages.ingest import ingest_concept
from assets_pipeline.store import ItemCache
from helpers import encode, photo, write_concept

SPEC = ConceptSpec(name="rusty", token="sks", class_noun="dog", methods=("lora",))


class FakeCaptioner:
    """Stands in for BLIP: records what it was asked to caption."""

    def __init__(self, fingerprint: str = "fake-v1", text: str = "a dog on grass"):
        self.fingerprint = fingerprint
        self.text = text
        self.calls: list[int] = []

    def caption(self, images: list) -> list[str]:
        self.calls.append(len(images))
        return [f"{self.text} {im.width}px" if self.text else "" for im in images]


@pytest.fixture
def manifest(tmp_path) -> pd.DataFrame:
    rows = []
    for i, (name, sidecar) in enumerate([("a", "my own words about sks dog"), ("b", None), ("c", None)]):
        path = tmp_path / f"{name}.png"
        photo("chelsea", (40 + i, 40)).save(path)
        rows.append({"image_sha256": f"{i:064x}", "source_path": f"{name}.png", "decoded_path": str(path),
                     "sidecar_caption": sidecar})
    return pd.DataFrame(rows)


def test_sidecar_beats_model_beats_template(manifest, tmp_path):
    cap = FakeCaptioner()
    df = caption_images(manifest, SPEC, ItemCache(tmp_path, "captions", ".txt"), cap).set_index("source_path")
    assert df.loc["a.png", "caption"] == "my own words about sks dog"
    assert df.loc["a.png", "caption_source"] == "sidecar"
    assert df.loc["b.png", "caption"] == "a photo of sks dog, a dog on grass 41px"
    assert df.loc["c.png", "caption"] == "a photo of sks dog, a dog on grass 42px"
    assert set(df.loc[["b.png", "c.png"], "caption_source"]) == {"model"}
    assert sum(cap.calls) == 2  # the photo with a sidecar is never sent to the model
    assert df["has_token"].all()


def test_template_without_captioner(manifest, tmp_path):
    cache = ItemCache(tmp_path, "captions", ".txt")
    for captioner, cfg in [(None, CaptionConfig()), (FakeCaptioner(), CaptionConfig(use_captioner=False))]:
        df = caption_images(manifest, SPEC, cache, captioner, cfg).set_index("source_path")
        assert df.loc["b.png", "caption"] == "a photo of sks dog"
        assert list(df["caption_source"]) == ["sidecar", "template", "template"]
    assert cache.counts() == {"items_computed": 0, "items_cached": 0}


def test_empty_model_caption_falls_back_to_template(manifest, tmp_path):
    df = caption_images(manifest, SPEC, ItemCache(tmp_path, "captions", ".txt"), FakeCaptioner(text=""))
    assert df.set_index("source_path").loc["b.png", "caption"] == "a photo of sks dog"


def test_has_token_flags_sidecars_without_the_token(manifest, tmp_path):
    manifest.loc[0, "sidecar_caption"] = "a photo of my dog"
    df = caption_images(manifest, SPEC, ItemCache(tmp_path, "captions", ".txt")).set_index("source_path")
    assert not df.loc["a.png", "has_token"]
    assert df.loc["b.png", "has_token"]


def test_model_captions_are_cached_per_captioner(manifest, tmp_path):
    cache = ItemCache(tmp_path, "captions", ".txt")
    first = caption_images(manifest, SPEC, cache, FakeCaptioner(), CaptionConfig(batch_size=1))
    assert cache.counts() == {"items_computed": 2, "items_cached": 0}

    again_cache = ItemCache(tmp_path, "captions", ".txt")
    again_model = FakeCaptioner()
    again = caption_images(manifest, SPEC, again_cache, again_model)
    assert again_model.calls == []
    assert again_cache.counts() == {"items_computed": 0, "items_cached": 2}
    assert again["caption"].equals(first["caption"])

    other_cache = ItemCache(tmp_path, "captions", ".txt")
    other = caption_images(manifest, SPEC, other_cache, FakeCaptioner("fake-v2", "a puppy"))
    assert other_cache.counts() == {"items_computed": 2, "items_cached": 0}  # new model: no stale hit
    assert other.set_index("source_path").loc["b.png", "caption"].endswith("a puppy 41px")


def test_undecodable_sidecar_is_reported_and_photo_gets_template(data_root, tmp_path):
    folder = write_concept(data_root, "rusty", {
        "a.png": encode(photo("coffee", (64, 64)), "PNG"), "a.txt": b"sks dog \xff\xfe bad bytes",
        "b.png": encode(photo("astronaut", (64, 64)), "PNG"), "b.txt": "a photo of sks dog, naïve".encode(),
    })
    res = ingest_concept(folder, data_root, ItemCache(tmp_path / "art", "images", ".png"))
    assert dict(zip(res.rejects["source_path"], res.rejects["code"])) == {"a.txt": "unreadable_caption"}
    df = caption_images(res.manifest, SPEC, ItemCache(tmp_path / "art", "captions", ".txt")).set_index("source_path")
    assert df.loc["a.png", ["caption", "caption_source"]].tolist() == ["a photo of sks dog", "template"]
    assert df.loc["b.png", ["caption", "caption_source"]].tolist() == ["a photo of sks dog, naïve", "sidecar"]


# ---- the real captioner path: a tiny random BLIP built in code ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A BLIP captioner folder as ``save_pretrained`` writes it, with random weights and a 17-word vocabulary.

    The LM head's bias is pushed towards 'dog' so greedy decoding says something checkable (random weights alone
    tend to stop at once, which would leave the model's contribution empty).
    """
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder = tmp_path_factory.mktemp("tiny_blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "dog", "cat", "red",
             "blue", "on", "the", "grass", "sofa"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        text_config={"vocab_size": len(words), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 64, "encoder_hidden_size": 32,
                     "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
                     "sep_token_id": tokenizer.sep_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[words.index("dog")] = 50.0
    model.save_pretrained(folder / "blip")
    processor.save_pretrained(folder / "blip")
    return folder / "blip"


def test_blip_captioner_resource_captions_and_caches(tiny_blip, manifest, tmp_path):
    from assets_pipeline.resources import CaptionerResource

    assert CaptionerResource().load(tmp_path, "cpu") is None  # unset: no model, template captions
    captioner = CaptionerResource(model_path=str(tiny_blip)).load(tmp_path, "cpu")
    assert type(captioner).__name__ == "BlipCaptioner"

    cache = ItemCache(tmp_path, "captions", ".txt")
    df = caption_images(manifest, SPEC, cache, captioner, CaptionConfig(max_new_tokens=5))
    model_rows = df[df["caption_source"] == "model"]
    assert list(model_rows["source_path"]) == ["b.png", "c.png"]
    for caption in model_rows["caption"]:
        prefix, model_text = caption.split(", ", 1)
        assert prefix == "a photo of sks dog"
        assert "dog" in model_text.split()
    assert cache.counts() == {"items_computed": 2, "items_cached": 0}

    again = ItemCache(tmp_path, "captions", ".txt")
    df2 = caption_images(manifest, SPEC, again, captioner)
    assert again.counts() == {"items_computed": 0, "items_cached": 2}
    assert df2["caption"].equals(df["caption"])


# ---- captions longer than the text encoder reads --------------------------------------------------------------

# 120 words, each one CLIP token: 122 tokens with the start and end tokens, 45 words past SD's 77.
LONG_WORDS = ("a photo of sks dog sitting on the green grass under a tall oak tree in warm evening light".split()
              * 7)[:120]


def test_overlong_captions_counts_with_the_base_models_tokenizer(built_models):
    from assets_pipeline.models.load import load_tokenizers
    from assets_pipeline.models.resolve import resolve_base_model
    from assets_pipeline.stages.captions import overlong_captions

    tokenizer = load_tokenizers(resolve_base_model("embedded", built_models))[0]
    assert tokenizer.model_max_length == 77
    captions = pd.DataFrame({"source_path": ["long.png", "short.png", "edge.png"],
                             "caption_source": ["sidecar", "template", "sidecar"],
                             "caption": [" ".join(LONG_WORDS), "a photo of sks dog", " ".join(LONG_WORDS[:75])]})
    long = overlong_captions(captions, tokenizer)
    # 75 words + start + end = 77 exactly: read whole, not truncated.
    assert long.to_dict("records") == [{"source_path": "long.png", "caption_source": "sidecar", "tokens": 122,
                                        "cut": " ".join(LONG_WORDS[75:])}]
    assert overlong_captions(captions.iloc[:0], tokenizer).empty  # every photo rejected: nothing to count


def test_captioned_images_warns_per_truncated_caption_and_counts_them(storage, data_root):
    import logging

    import dagster as dg

    from assets_pipeline.definitions import ASSETS, default_resources

    write_concept(data_root, "rusty", {
        "long.png": encode(photo("coffee", (64, 64)), "PNG"), "long.txt": " ".join(LONG_WORDS).encode(),
        "short.png": encode(photo("astronaut", (64, 64)), "PNG"), "short.txt": b"a photo of sks dog",
    })
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["rusty"])
        res = dg.materialize(ASSETS, selection=["raw_images", "captioned_images"], partition_key="rusty",
                             instance=instance, resources={**default_resources(), "storage": storage})
        assert res.success
        warnings = [e.user_message for e in instance.all_logs(res.run_id) if e.level == logging.WARNING]
        # Again, nothing changed: the count comes from the caption_lengths cache (no tokenizer loaded), the same.
        again = dg.materialize(ASSETS, selection=["captioned_images"], partition_key="rusty", instance=instance,
                               resources={**default_resources(), "storage": storage})
        warnings_again = [e.user_message for e in instance.all_logs(again.run_id) if e.level == logging.WARNING]
    for run, logged in ((res, warnings), (again, warnings_again)):
        [mat] = [e.materialization for e in run.get_asset_materialization_events()
                 if e.materialization.asset_key.to_user_string() == "captioned_images"]
        assert mat.metadata["captions_truncated"].value == 1
        assert mat.metadata["caption_token_limit"].value == 77
        truncated = [w for w in logged if "tokens, over the text encoder's" in w]
        assert len(truncated) == 1
        assert "sidecar caption of long.png is 122 tokens, over the text encoder's 77" in truncated[0]
        assert "never seeing 'light a photo of sks dog" in truncated[0]
    assert len(list((storage.layout().root / "cache" / "caption_lengths").rglob("*.json"))) == 1
