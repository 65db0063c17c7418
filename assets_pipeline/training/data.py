"""Training data from the vae_latents bundle: latent distributions, cached text embeddings, captions and
(for ControlNet) conditioning images, all keyed by image sha256. Batches are a pure function of
(seed, step, micro-batch, process), so a resumed run sees exactly the batches an uninterrupted run would."""

from __future__ import annotations

from pathlib import Path

from assets_pipeline.hashing import digest
from assets_pipeline.training.methods.base import Batch


def seeded_generator(*parts):
    import torch

    return torch.Generator().manual_seed(int(digest(*parts)[:15], 16))


class TrainingData:
    """Rows of cached tensors (CPU) with their roles and captions; ``batch`` draws from them."""

    def __init__(self, mean, std, embeds, roles: list[str], captions: list[str], control=None,
                 flip_mean=None, flip_std=None):
        self.mean, self.std, self.embeds = mean, std, embeds
        self.flip_mean, self.flip_std = flip_mean, flip_std
        self.roles, self.captions, self.control = roles, captions, control
        self.by_role = {role: [i for i, r in enumerate(roles) if r == role] for role in set(roles)}
        self._perms: dict = {}

    @classmethod
    def from_bundle(cls, latents_dir: Path, rows: list[dict], caption_fn, control: bool, resolution: int):
        """The job's rows (in order) from the vae_latents bundle, matched by (image sha256, role)."""
        import numpy as np
        import torch
        from PIL import Image

        from assets_pipeline.stages.latents import load_latent_bundle

        tensors, shas, roles, _ = load_latent_bundle(latents_dir / "latents.safetensors")
        position = {(s, r): i for i, (s, r) in enumerate(zip(shas, roles))}
        idx = [position[(r["image_sha256"], r["role"])] for r in rows]  # KeyError = bundle/job mismatch
        images = None
        if control:
            imgs = []
            for r in rows:
                if r["role"] != "instance":
                    imgs.append(torch.zeros(3, resolution, resolution))
                    continue
                arr = np.asarray(Image.open(r["control_path"]).convert("RGB"), dtype=np.float32) / 255.0
                imgs.append(torch.from_numpy(arr).permute(2, 0, 1))  # [0, 1], as train_controlnet.py
            images = torch.stack(imgs)
        flip = "flip_latent_mean" in tensors
        return cls(
            tensors["latent_mean"][idx], tensors["latent_std"][idx], tensors["prompt_embeds"][idx],
            [r["role"] for r in rows], [caption_fn(r["caption"]) for r in rows], images,
            tensors["flip_latent_mean"][idx] if flip else None, tensors["flip_latent_std"][idx] if flip else None,
        )

    def count(self, role: str) -> int:
        return len(self.by_role.get(role, []))

    def _pick(self, role: str, position: int, seed: int) -> int:
        import torch

        rows = self.by_role[role]
        epoch, i = divmod(position, len(rows))
        key = (role, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[1] >= epoch - 1}
            self._perms[key] = torch.randperm(len(rows), generator=seeded_generator("order", seed, role, epoch))
        return rows[int(self._perms[key][i])]

    def batch(self, roles: tuple[str, ...], batch_size: int, sample_index: int, seed: int,
              scaling_factor: float, random_flip: bool) -> Batch:
        """Rows for samples ``sample_index .. + batch_size`` of each role; latents sampled from their cached
        distribution (``latent_dist.sample()`` in diffusers' scripts) and scaled for the U-Net."""
        import torch

        idx = [self._pick(role, sample_index + j, seed) for role in roles for j in range(batch_size)]
        g = seeded_generator("latent-noise", seed, sample_index)
        mean, std = self.mean[idx], self.std[idx]
        if random_flip and self.flip_mean is not None:
            flip = torch.rand(len(idx), generator=g) < 0.5
            mean = torch.where(flip[:, None, None, None], self.flip_mean[idx], mean)
            std = torch.where(flip[:, None, None, None], self.flip_std[idx], std)
        else:
            flip = torch.zeros(len(idx), dtype=torch.bool)
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * scaling_factor
        control = None
        if self.control is not None:  # a flipped latent needs its conditioning image flipped with it
            control = torch.where(flip[:, None, None, None], self.control[idx].flip(-1), self.control[idx])
        return Batch(
            latents=latents,
            prompt_embeds=self.embeds[idx],
            captions=[self.captions[i] for i in idx],
            roles=[self.roles[i] for i in idx],
            control=control,
        )
