"""stages/scoring.py: the quality subset (threshold, top fraction, min_keep) and cached CLIP scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from assets_pipeline.stages.scoring import LAION_THRESHOLD, ScoringConfig, score_images, select_subset
from assets_pipeline.store import ItemCache
from helpers import photo

SCORES = np.array([0.10, 0.35, 0.27, 0.31, 0.20])


def test_threshold_keeps_scores_at_or_above_it():
    keep, reasons = select_subset(SCORES, ScoringConfig(min_score=0.27), scorer_is_random=False)
    assert keep == [False, True, True, True, False]
    assert reasons[0] == "CLIP score 0.100 < 0.27"
    assert reasons[1] == ""


def test_top_fraction_keeps_the_best_rounded_up():
    keep, reasons = select_subset(SCORES, ScoringConfig(top_fraction=0.5), scorer_is_random=False)
    assert keep == [False, True, True, True, False]  # ceil(0.5 * 5) = 3: 0.35, 0.31, 0.27
    assert reasons[4] == "rank 4 outside the top 50% (3 of 5)"


def test_top_fraction_counts():
    for fraction, expected in [(0.2, 1), (0.5, 3), (0.6, 3), (1.0, 5)]:
        keep, _ = select_subset(SCORES, ScoringConfig(top_fraction=fraction), scorer_is_random=False)
        assert sum(keep) == expected, fraction
        kept_scores = SCORES[np.array(keep)]
        assert kept_scores.min() >= SCORES[~np.array(keep)].max(initial=-1)  # the best ones, not any ones


def test_min_keep_saves_the_best_few():
    keep, reasons = select_subset(SCORES, ScoringConfig(min_score=0.9, min_keep=2), scorer_is_random=False)
    assert keep == [False, True, False, True, False]
    assert reasons[1] == "" and reasons[3] == ""


def test_default_threshold_depends_on_whether_scorer_is_random():
    keep_random, _ = select_subset(SCORES, ScoringConfig(), scorer_is_random=True)
    assert all(keep_random)  # random weights: scores carry no meaning, nothing dropped
    keep_real, reasons = select_subset(SCORES, ScoringConfig(), scorer_is_random=False)
    assert keep_real == [bool(s >= LAION_THRESHOLD) for s in SCORES]
    assert reasons[2] == f"CLIP score 0.270 < {LAION_THRESHOLD}"


def test_explicit_settings_apply_to_random_scorer_too():
    keep, _ = select_subset(SCORES, ScoringConfig(min_score=0.3), scorer_is_random=True)
    assert keep == [False, True, False, True, False]


def test_empty_input():
    assert select_subset(np.array([]), ScoringConfig(top_fraction=0.5), scorer_is_random=False) == ([], [])


@pytest.mark.parametrize("kwargs", [{"top_fraction": 0}, {"top_fraction": 1.5}, {"min_score": 2}])
def test_scoring_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        ScoringConfig(**kwargs)


def test_score_images_with_embedded_clip_scores_kept_photos_and_caches(artifact_root, tmp_path):
    from assets_pipeline.resources import ClipScorerResource

    scorer = ClipScorerResource().load(artifact_root, "cpu")
    assert scorer.is_random
    rows = []
    for i, name in enumerate(["astronaut", "coffee", "rocket"]):
        path = tmp_path / f"{name}.png"
        photo(name, (80, 64)).save(path)
        rows.append({"image_sha256": f"{i:064x}", "source_path": f"{name}.png", "decoded_path": str(path),
                     "caption": f"a photo of sks {name}", "kept": name != "rocket", "reason": ""})
    filtered = pd.DataFrame(rows)
    cache = ItemCache(artifact_root, "clip_scores", ".json")
    df = score_images(filtered, scorer, cache, ScoringConfig(batch_size=1))
    assert list(df["source_path"]) == ["astronaut.png", "coffee.png"]  # dropped photos are not scored
    assert df["clip_score"].between(-1, 1).all()
    assert df["in_subset"].all()
    assert cache.counts() == {"items_computed": 2, "items_cached": 0}

    again = ItemCache(artifact_root, "clip_scores", ".json")
    df2 = score_images(filtered, scorer, again, ScoringConfig())
    assert again.counts() == {"items_computed": 0, "items_cached": 2}
    assert df2["clip_score"].tolist() == df["clip_score"].tolist()

    filtered.loc[0, "caption"] = "a different caption"
    third = ItemCache(artifact_root, "clip_scores", ".json")
    score_images(filtered, scorer, third, ScoringConfig())
    assert third.counts() == {"items_computed": 1, "items_cached": 1}  # the score depends on the caption
