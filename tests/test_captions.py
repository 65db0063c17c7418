"""stages/captions.py: sidecar > captioner model > template; model captions cached by (image, captioner)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from assets_pipeline.partitions.concept_spec import ConceptSpec
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
