"""Training data from the vae_latents bundle: latent distributions, cached text embeddings, captions and
(for ControlNet) conditioning images, all keyed by image sha256.

Everything is moved to the training device once (``to``); a batch is then gathered on the device with an
index tensor, and all its randomness (flips, latent sampling, diffusion noise, timesteps) comes from one seeded
generator on that device. Which rows a batch holds is a pure function of (seed, sample index), and the
generator's seed too, so a resumed run sees exactly the batches and noise an uninterrupted run would.
"""

from __future__ import annotations

from pathlib import Path

from assets_pipeline.hashing import digest
from assets_pipeline.training.methods.base import Batch


def seeded_generator(*parts, device="cpu"):
    import torch

    return torch.Generator(device=device).manual_seed(int(digest(*parts)[:15], 16))


class TrainingData:
    """Rows of cached tensors with their roles and captions; ``indices`` picks rows, ``draw`` gathers them."""

    def __init__(self, mean, std, embeds, roles: list[str], captions: list[str], control=None,
                 flip_mean=None, flip_std=None):
        import torch

        self.mean, self.std, self.embeds = mean, std, embeds
        self.flip_mean, self.flip_std = flip_mean, flip_std
        self.roles, self.captions = roles, captions
        # Conditioning images as uint8 ([0, 255]): a quarter of the memory on the device, exact.
        self.control = None if control is None else (control * 255).round().to(torch.uint8)
        self.is_class = torch.tensor([r == "class" for r in roles])
        self.input_ids = None
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

    @property
    def device(self):
        return self.mean.device

    def to(self, device) -> TrainingData:
        """Move every tensor to ``device`` once: no step copies data from the host afterwards."""
        for name in ("mean", "std", "embeds", "flip_mean", "flip_std", "control", "is_class", "input_ids"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def tokenize(self, tokenizer) -> None:
        """Token ids of every caption, once (for methods that run the text encoder each step)."""
        self.input_ids = tokenizer(self.captions, padding="max_length", max_length=tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids.to(self.device)

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

    def indices(self, roles: tuple[str, ...], batch_size: int, sample_index: int, seed: int) -> list[int]:
        """Rows for samples ``sample_index .. + batch_size`` of each role (each role's rows in a seeded order
        per epoch)."""
        return [self._pick(role, sample_index + j, seed) for role in roles for j in range(batch_size)]

    def draw(self, rows: list[int], generator, scaling_factor: float, random_flip: bool, index=None) -> Batch:
        """Gather ``rows`` on the device (``index``: the same rows as a device tensor, when the caller made it
        already); latents are sampled from their cached distribution (``latent_dist.sample()`` in diffusers'
        scripts) and scaled for the U-Net."""
        import torch

        idx = torch.tensor(rows, device=self.device) if index is None else index
        mean, std = self.mean[idx], self.std[idx]
        if random_flip and self.flip_mean is not None:
            flip = torch.rand(len(idx), generator=generator, device=self.device) < 0.5
            mean = torch.where(flip[:, None, None, None], self.flip_mean[idx], mean)
            std = torch.where(flip[:, None, None, None], self.flip_std[idx], std)
        else:
            flip = None
        eps = torch.randn(mean.shape, generator=generator, device=self.device, dtype=mean.dtype)
        latents = (mean + std * eps) * scaling_factor
        control = None
        if self.control is not None:  # a flipped latent needs its conditioning image flipped with it
            control = self.control[idx]
            if flip is not None:
                control = torch.where(flip[:, None, None, None], control.flip(-1), control)
            control = control.float() / 255.0
        return Batch(
            latents=latents,
            prompt_embeds=self.embeds[idx],
            control=control,
            is_class=self.is_class[idx],
            input_ids=None if self.input_ids is None else self.input_ids[idx],
        )
