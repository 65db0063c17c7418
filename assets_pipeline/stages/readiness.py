"""Is a concept's quality subset fit to train on? The rules the dataset checks and the retraining schedule share.

At least 3 photos (below that no method trains; the trainers refuse too), and 5 or more recommended: the usual
DreamBooth advice is 5-10 diverse, sharp photos (Ruiz et al. 2022 used 3-5; diffusers' guide suggests 5-10).
Every photo of the subset must have a caption, since training pairs each latent with its text embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from assets_pipeline.concept import MIN_IMAGES

RECOMMENDED_IMAGES = 5


@dataclass(frozen=True)
class Readiness:
    subset_size: int
    uncaptioned: list[str]

    @property
    def enough(self) -> bool:
        return self.subset_size >= MIN_IMAGES

    @property
    def recommended(self) -> bool:
        return self.subset_size >= RECOMMENDED_IMAGES

    @property
    def ready(self) -> bool:
        return self.enough and not self.uncaptioned

    def problems(self) -> list[str]:
        out = []
        if not self.enough:
            out.append(f"only {self.subset_size} photos in the quality subset; at least {MIN_IMAGES} are needed")
        if self.uncaptioned:
            out.append(f"{len(self.uncaptioned)} photos without a caption: {self.uncaptioned[:5]}")
        return out


def readiness(scores: pd.DataFrame) -> Readiness:
    subset = scores[scores["in_subset"]]
    caption_ok = subset["caption"].fillna("").str.strip().astype(bool)
    return Readiness(subset_size=len(subset), uncaptioned=list(subset.loc[~caption_ok, "source_path"]))
