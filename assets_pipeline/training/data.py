"""Training data from the vae_latents bundle: latent distributions, cached text embeddings, captions and
(for ControlNet) conditioning images, all keyed by image sha256 and grouped by aspect-ratio bucket.

Everything is moved to the training device once (``to``); a batch is then gathered on the device with an
index tensor, and all its randomness (flips, latent sampling, diffusion noise, timesteps) comes from one seeded
generator on that device. Which rows a batch holds is a pure function of (seed, sample index), and the
generator's seed too, so a resumed run sees exactly the batches and noise an uninterrupted run would.

Buckets (stages/buckets.py): latents of different buckets have different shapes, so a batch must come from one
bucket. Each role's rows are drawn in *groups* of ``group`` samples (the effective batch of an optimizer step,
which the micro-batches of that step split): per epoch the role's rows get a seeded permutation (the one they
had before buckets), each bucket's rows in that order are cut into groups, a bucket's last group is filled up
with the bucket's first rows again (kohya-ss fills nothing and lets the last batch be smaller; equal sizes keep
every micro-batch one shape per bucket, one compiled graph per bucket, and the row index one rectangular
tensor), and the groups are taken in the order of their first row in the permutation, so each bucket's batches
spread over the epoch in proportion to its size. A role whose rows share one bucket (every role when
``buckets = false``, class images always) needs no groups and draws exactly as before buckets. DreamBooth's
instance and class parts are separate roles: when their buckets differ, ``draw`` returns one part per bucket and
the loop runs one forward per part.

Caption recipes (TrainConfig): ``caption_dropout`` replaces a seeded share of a batch's rows' conditioning with the
empty caption's, drawn on the device from the step's generator (the bundle's ``empty_prompt_embeds`` with cached
embeddings; the token ids of "" when the text encoder runs); ``shuffle_caption`` permutes each caption's tags
(:func:`shuffle_tags`) on the host, where captions are strings, with a generator seeded by (seed, sample) like the
step's: no device-to-host sync, and a resumed run shuffles as an uninterrupted one.
"""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path

from assets_pipeline.hashing import digest
from assets_pipeline.training.job import TrainingRow
from assets_pipeline.training.methods.base import Batch, TrainingInputError


def seeded_generator(*parts, device="cpu"):
    import torch

    return torch.Generator(device=device).manual_seed(int(digest(*parts)[:15], 16))


def shuffle_tags(caption: str, keep_tokens: int, generator) -> str:
    """kohya-ss sd-scripts' --shuffle_caption/--keep_tokens: split on ",", keep the first ``keep_tokens`` tags in
    place, shuffle the rest (a permutation from ``generator``), join with ", "."""
    import torch

    tags = [t.strip() for t in caption.strip().split(",")]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    return ", ".join(head + [tail[int(i)] for i in torch.randperm(len(tail), generator=generator)])


class TrainingData:
    """Rows of cached tensors with their roles, captions and buckets; ``indices`` picks rows, ``draw`` gathers them.

    ``sizes[b]`` is bucket b's (width, height) in px; ``mean[b]``/``std[b]`` (and the flips, and ``control[b]``)
    hold the rows whose ``row_bucket`` is b, in row order. ``embeds`` (and a family's ``pooled`` embeddings) hold
    each distinct caption's embedding once; row i's is ``embeds[text_row[i]]`` (default: one per row, in row
    order). The per-row lists are in row order, and so are SDXL's ``time_ids`` (``flip_time_ids``: those of the
    mirrored crops). ``repeats[i]``: how often row i is drawn per epoch (default once).
    ``empty_embeds`` [1, 77, dim] (``empty_pooled`` [1, dim]): the empty caption's, for caption dropout.
    ``max_lengths``: the tokens each text encoder read when the bundle was made (a T5 encoder's
    max_sequence_length; empty = each tokenizer's own), what :meth:`tokenize` reads too."""

    def __init__(self, sizes: list[tuple[int, int]], mean: list, std: list, row_bucket: list[int], embeds,
                 roles: list[str], captions: list[str], control: list | None = None,
                 flip_mean: list | None = None, flip_std: list | None = None, pooled=None, time_ids=None,
                 flip_time_ids=None, empty_embeds=None, empty_pooled=None, repeats: list[int] | None = None,
                 text_row=None, max_lengths=()):
        import torch

        self.sizes, self.row_bucket = sizes, row_bucket
        self.mean, self.std, self.embeds = mean, std, embeds
        self.flip_mean, self.flip_std = flip_mean, flip_std
        self.pooled, self.time_ids, self.flip_time_ids = pooled, time_ids, flip_time_ids
        self.empty_embeds, self.empty_pooled = empty_embeds, empty_pooled
        self.roles, self.captions = roles, captions
        self.text_row = torch.arange(len(roles)) if text_row is None else text_row
        self.max_lengths = tuple(max_lengths)
        # Conditioning images as uint8 ([0, 255]): a quarter of the memory on the device, exact.
        self.control = None if control is None else [(c * 255).round().to(torch.uint8) for c in control]
        # Conditioning latents instead (encode_control): per bucket, of each image and of its mirror.
        self.control_latents: list | None = None
        self.flip_control_latents: list | None = None
        self.is_class = torch.tensor([r == "class" for r in roles])
        # Each row's place in its bucket's tensors, so a batch gathers on the device from the row index alone.
        seen: dict[int, int] = {}
        positions = []
        for b in row_bucket:
            positions.append(seen.get(b, 0))
            seen[b] = positions[-1] + 1
        self.position = torch.tensor(positions, dtype=torch.long)
        # Per tokenizer: every caption's token ids, and those of "" (caption dropout when the encoders run).
        self.token_ids: tuple | None = None
        self.empty_ids: tuple | None = None
        self.tokenizers: tuple = ()
        # Each row as often as its repeats (kohya-ss' per-folder repeats): an epoch draws every entry once.
        repeats = repeats or [1] * len(roles)
        self.by_role = {role: [i for i, r in enumerate(roles) if r == role for _ in range(repeats[i])]
                        for role in set(roles)}
        self.role_buckets = {role: sorted({row_bucket[i] for i in rows}) for role, rows in self.by_role.items()}
        self._orders: dict = {}
        self._lengths: dict = {}

    @classmethod
    def from_bundle(cls, latents_dir: Path, rows: list[TrainingRow], caption_fn, control: bool,
                    datasets: dict[str, Path] | None = None):
        """The job's rows (in order) from the vae_latents bundle, matched by (image sha256, role). ``datasets``:
        the vae_latents folders of other concepts trained in, by concept; a row whose ``concept`` names one is
        read from that bundle. A row's ``repeats`` (default 1) is how often it is drawn per epoch. Where a bundle
        has no flipped latents (made without [latents] random_flip), its rows are never flipped."""
        import torch
        from PIL import Image

        from assets_pipeline.stages.buckets import bucket_label
        from assets_pipeline.stages.bundle import load_latent_bundle

        datasets = datasets or {}
        bundles = {None: load_latent_bundle(Path(latents_dir) / "latents.safetensors")}
        bundles.update({c: load_latent_bundle(Path(d) / "latents.safetensors") for c, d in datasets.items()})
        where = {c: {(s, r): i for i, (s, r) in enumerate(zip(b.image_sha256, b.roles))} for c, b in bundles.items()}
        positions = {c: b.positions() for c, b in bundles.items()}
        src = [r.concept if r.concept in datasets else None for r in rows]
        idx = [where[c][(r.image_sha256, r.role)] for c, r in zip(src, rows)]  # KeyError = bundle/job mismatch
        buckets = [bundles[c].buckets[i] for c, i in zip(src, idx)]
        sizes = sorted(set(buckets))
        row_bucket = [sizes.index(b) for b in buckets]
        flip = any(b.has("flip_latent_mean") for b in bundles.values())

        def gather(name: str) -> list:  # per bucket, its rows' tensors from each row's own bundle
            return [torch.stack([bundles[c].latents(name if bundles[c].has(name) else name.removeprefix("flip_"),
                                                    size)[positions[c][i]]
                                 for c, i, b in zip(src, idx, row_bucket) if b == k])
                    for k, size in enumerate(sizes)]

        def control_image(row: TrainingRow, size: tuple[int, int]):
            import numpy as np

            if row.role != "instance":
                return torch.zeros(3, size[1], size[0])
            with Image.open(row.control_path) as img:
                if img.size != size:
                    raise ValueError(
                        f"control image {row.control_path} is {bucket_label(img.size)} px, but its photo's latent "
                        f"is in bucket {bucket_label(size)}: the two were made with other [latents] settings; "
                        "rematerialize control_images (and vae_latents) for this concept")
                arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            return torch.from_numpy(arr).permute(2, 0, 1)  # [0, 1], as train_controlnet.py

        images = None
        if control:
            images = [torch.stack([control_image(r, size) for r, b in zip(rows, row_bucket) if b == k])
                      for k, size in enumerate(sizes)]

        # Each distinct text embedding of the job's rows once (bundles store each caption once: text_rows), and each
        # row's index into them: a hundred class images share one embedding on the device too.
        text_rows = {c: b.text_rows().tolist() for c, b in bundles.items()}
        texts = list(dict.fromkeys((c, text_rows[c][i]) for c, i in zip(src, idx)))
        where_text = {t: k for k, t in enumerate(texts)}
        text_row = torch.tensor([where_text[c, text_rows[c][i]] for c, i in zip(src, idx)], dtype=torch.long)
        lengths = {c: b.meta.get("text_max_lengths") for c, b in bundles.items()}
        if len({json.dumps(v) for v in lengths.values()}) > 1:
            raise TrainingInputError(
                f"the concepts trained together encoded their captions at different T5 lengths "
                f"({ {c or 'this concept': v for c, v in lengths.items()} }): set the same [latents] "
                "max_sequence_length in each one's concept.toml and rematerialize their vae_latents")

        def texts_of(name: str):  # the distinct embeddings, in the order of ``texts``
            if not any(name in b.tensors for b in bundles.values()):
                return None
            return torch.stack([bundles[c].tensors[name][j] for c, j in texts])

        def rows_of(name: str, fallback: str | None = None):  # per-row tensors (SDXL's time ids), in row order
            if not any(name in b.tensors for b in bundles.values()):
                return None
            return torch.stack([bundles[c].tensors[name if name in bundles[c].tensors else fallback][i]
                                for c, i in zip(src, idx)])

        main = bundles[None].tensors
        return cls(
            sizes, gather("latent_mean"), gather("latent_std"), row_bucket, texts_of("prompt_embeds"),
            [r.role for r in rows], [caption_fn(r.caption) for r in rows], images,
            gather("flip_latent_mean") if flip else None, gather("flip_latent_std") if flip else None,
            texts_of("pooled_prompt_embeds"), rows_of("add_time_ids"), rows_of("flip_add_time_ids", "add_time_ids"),
            main.get("empty_prompt_embeds"), main.get("empty_pooled_prompt_embeds"),
            repeats=[r.repeats or 1 for r in rows], text_row=text_row, max_lengths=lengths[None] or (),
        )

    @property
    def device(self):
        return self.embeds.device

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Every bucket's latent shape [C, h, w]: what compiled graphs and the micro-batch probe depend on."""
        return tuple(tuple(m.shape[1:]) for m in self.mean)

    def to(self, device) -> TrainingData:
        """Move every tensor to ``device`` once: no step copies data from the host afterwards."""
        for name in ("mean", "std", "flip_mean", "flip_std", "control", "control_latents", "flip_control_latents"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, [t.to(device) for t in value])
        for name in ("embeds", "is_class", "position", "pooled", "time_ids", "flip_time_ids", "empty_embeds",
                     "empty_pooled", "text_row"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        for name in ("token_ids", "empty_ids"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(t.to(device) for t in value))
        return self

    def encode_control(self, vae, scaling_factor: float, shift_factor: float | None, batch_size: int = 8) -> None:
        """Replace the conditioning images by their VAE latents (the latent distribution's mean), shifted and scaled
        as training latents are: what a latent-conditioned ControlNet (SD 3.x, Flux) takes (train_controlnet_sd3.py
        encodes ``conditioning_pixel_values`` in [-1, 1] the same way). With flipped latents in the bundle the
        mirrored images are encoded too, so a flipped row's conditioning is its mirrored image's latent."""
        import torch

        def encode(images) -> torch.Tensor:
            out = []
            with torch.inference_mode():
                for s in range(0, len(images), batch_size):
                    x = images[s : s + batch_size].to(vae.device, vae.dtype) / 127.5 - 1.0
                    mean = vae.encode(x).latent_dist.mean.float()
                    out.append((mean if shift_factor is None else mean - shift_factor) * scaling_factor)
            return torch.cat(out).to(self.device)

        self.control_latents = [encode(c) for c in self.control]
        if self.flip_mean is not None:
            self.flip_control_latents = [encode(c.flip(-1)) for c in self.control]
        self.control = None

    def tokenize(self, tokenizers) -> None:
        """Token ids of every caption and of "" (caption dropout), once per tokenizer (the family's order), for
        runs that encode text each step. The tokenizers are kept for :meth:`shuffled_ids`."""
        from assets_pipeline.models.text import tokenize

        self.tokenizers = tuple(tokenizers)
        ids = tokenize(self.tokenizers, [*self.captions, ""], self.max_lengths)
        self.token_ids = tuple(t[:-1].to(self.device) for t in ids)
        self.empty_ids = tuple(t[-1:].to(self.device) for t in ids)

    def shuffled_ids(self, rows: list[int], keep_tokens: int, generator) -> list:
        """Token ids [len(rows), 77] (per tokenizer) of ``rows``' captions with their tags shuffled
        (:func:`shuffle_tags`, one permutation per row from the host ``generator``), on the device: what
        ``draw`` takes as ``token_ids``. Needs :meth:`tokenize` first."""
        from assets_pipeline.models.text import tokenize

        captions = [shuffle_tags(self.captions[r], keep_tokens, generator) for r in rows]
        return [ids.to(self.device, non_blocking=True)
                for ids in tokenize(self.tokenizers, captions, self.max_lengths)]

    def check_caption_dropout(self, caption_dropout: float) -> None:
        """Caption dropout needs the empty caption: its token ids (:meth:`tokenize`) or the bundle's embedding."""
        if caption_dropout and self.token_ids is None and self.empty_embeds is None:
            raise TrainingInputError(
                f"caption_dropout = {caption_dropout} needs the empty caption's embedding, and this concept's latents "
                "bundle has none (made before it was added): rematerialize vae_latents for this concept, or set "
                "caption_dropout = 0")

    def count(self, role: str) -> int:
        return len(self.by_role.get(role, []))

    def _epoch_order(self, role: str, epoch: int, seed: int, group: int) -> list[int]:
        """The role's rows in sample order for one epoch (see the module docstring)."""
        import torch

        rows = self.by_role[role]
        perm = torch.randperm(len(rows), generator=seeded_generator("order", seed, role, epoch))
        order = [rows[int(i)] for i in perm]
        if len(self.role_buckets[role]) == 1:
            return order
        groups = []  # (where the group's first row is in `order`, its rows)
        for b in self.role_buckets[role]:
            seq = [(k, r) for k, r in enumerate(order) if self.row_bucket[r] == b]
            for s in range(0, len(seq), group):
                part = [r for _, r in seq[s : s + group]]
                groups.append((seq[s][0], part + [seq[j % len(seq)][1] for j in range(group - len(part))]))
        return [r for _, part in sorted(groups) for r in part]

    def _epoch_length(self, role: str, group: int) -> int:
        """Samples per epoch: the role's rows, plus the fill of each bucket's last group."""
        if (role, group) not in self._lengths:
            rows = self.by_role[role]
            counts = [sum(self.row_bucket[r] == b for r in rows) for b in self.role_buckets[role]]
            self._lengths[role, group] = len(rows) if len(counts) == 1 else sum(-(-n // group) * group for n in counts)
        return self._lengths[role, group]

    def _pick(self, role: str, position: int, seed: int, group: int) -> int:
        epoch, i = divmod(position, self._epoch_length(role, group))
        key = (role, group, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[2] >= epoch - 1}
            self._orders[key] = self._epoch_order(role, epoch, seed, group)
        return self._orders[key][i]

    def indices(self, roles: tuple[str, ...], batch_size: int, sample_index: int, seed: int, group: int) -> list[int]:
        """Rows for samples ``sample_index .. + batch_size`` of each role: each role's part from one bucket.

        ``group`` is the number of consecutive samples drawn from one bucket (the effective batch of an
        optimizer step); a micro-batch must lie inside one group."""
        if group % batch_size or sample_index % batch_size:
            raise ValueError(f"a micro-batch of {batch_size} from sample {sample_index} would cross a bucket group "
                             f"of {group} samples: the group must be a multiple of the micro-batch, and the "
                             "micro-batch start a multiple of its size")
        return [self._pick(role, sample_index + j, seed, group) for role in roles for j in range(batch_size)]

    def schedule(self, roles: tuple[str, ...], start: int, steps: int, micro: int, accumulation: int,
                 processes: int, rank: int, seed: int, group: int):
        """Every remaining micro-batch of process ``rank``, decided up front on the host: (each one's first sample
        index, its rows, the rows as one device tensor moved once). A step covers samples step x effective ..
        +effective of each role; process ``rank`` takes every ``processes``-th micro-batch of them, so with the
        accumulation split the processes together run one process's micro-batches. A step's samples of a role come
        from one aspect-ratio bucket (``group`` is the configured effective batch, whatever the micro-batch, the
        probe or the number of processes). Each bucket is its own shape: compiled modules (dynamic=False) compile
        once per bucket, on its first step."""
        import torch

        samples = [((step * accumulation + m) * processes + rank) * micro
                   for step in range(start, steps) for m in range(accumulation)]
        rows = [self.indices(roles, micro, s, seed, group) for s in samples]
        return samples, rows, torch.tensor(rows, device=self.device) if rows else None

    def largest_indices(self, roles: tuple[str, ...], batch_size: int) -> list[int]:
        """Rows for the most memory-hungry micro-batch: each role's rows from its largest-area bucket (repeated
        if it has fewer), for the micro-batch probe."""
        out = []
        for role in roles:
            b = max(self.role_buckets[role], key=lambda k: (self.sizes[k][0] * self.sizes[k][1], k))
            rows = [r for r in self.by_role[role] if self.row_bucket[r] == b]
            out += [rows[j % len(rows)] for j in range(batch_size)]
        return out

    def draw(self, rows: list[int], generator, scaling_factor: float, random_flip: bool, index=None,
             caption_dropout: float = 0.0, token_ids: list | None = None,
             shift_factor: float | None = None) -> list[Batch]:
        """Gather ``rows`` on the device (``index``: the same rows as a device tensor, when the caller made it
        already), one :class:`Batch` per run of rows in the same bucket (one shape, one forward); latents are
        sampled from their cached distribution (``latent_dist.sample()`` in diffusers' scripts) and scaled for
        the denoiser as the family's pipeline scales them: ``(sample - shift_factor) x scaling_factor`` for a
        VAE with a shift (SD 3.x, Flux: train_dreambooth_lora_sd3.py), else ``sample x scaling_factor``. ``token_ids``: the rows' token ids to use instead of the tokenized captions (shuffled ones,
        :meth:`shuffled_ids`). ``caption_dropout``: each row's chance of the empty caption's conditioning (a
        draw from ``generator`` after the latents' only when > 0, so the draws are unchanged without it)."""
        import torch

        self.check_caption_dropout(caption_dropout)
        idx = torch.tensor(rows, device=self.device) if index is None else index
        parts, start = [], 0
        for b, run in groupby(self.row_bucket[r] for r in rows):
            n = len(list(run))
            sel = idx[start : start + n]
            start += n
            pos = self.position[sel]
            mean, std = self.mean[b][pos], self.std[b][pos]
            if random_flip and self.flip_mean is not None:
                flip = torch.rand(n, generator=generator, device=self.device) < 0.5
                mean = torch.where(flip[:, None, None, None], self.flip_mean[b][pos], mean)
                std = torch.where(flip[:, None, None, None], self.flip_std[b][pos], std)
            else:
                flip = None
            time_ids = None if self.time_ids is None else self.time_ids[sel]
            if flip is not None and self.flip_time_ids is not None:  # a mirrored crop's own crop offset
                time_ids = torch.where(flip[:, None], self.flip_time_ids[sel], time_ids)
            eps = torch.randn(mean.shape, generator=generator, device=self.device, dtype=mean.dtype)
            latents = mean + std * eps
            latents = (latents if shift_factor is None else latents - shift_factor) * scaling_factor
            control = None
            if self.control_latents is not None:  # a flipped latent takes its mirrored image's latent
                control = self.control_latents[b][pos]
                if flip is not None:
                    control = torch.where(flip[:, None, None, None], self.flip_control_latents[b][pos], control)
            if self.control is not None:  # a flipped latent needs its conditioning image flipped with it
                control = self.control[b][pos]
                if flip is not None:
                    control = torch.where(flip[:, None, None, None], control.flip(-1), control)
                control = control.float() / 255.0
            if token_ids is not None:  # given per row of ``rows``: this part's are the same slice as ``sel``
                ids = tuple(t[start - n : start] for t in token_ids)
            else:
                ids = None if self.token_ids is None else tuple(t[sel] for t in self.token_ids)
            text = self.text_row[sel]
            embeds = self.embeds[text]
            pooled = None if self.pooled is None else self.pooled[text]
            if caption_dropout:
                drop = torch.rand(n, generator=generator, device=self.device) < caption_dropout
                if ids is not None:  # the text encoders run: they encode "" for the dropped rows
                    ids = tuple(torch.where(drop[:, None], empty, t) for t, empty in zip(ids, self.empty_ids))
                else:
                    embeds = torch.where(drop[:, None, None], self.empty_embeds.to(embeds.dtype), embeds)
                    if pooled is not None:
                        pooled = torch.where(drop[:, None], self.empty_pooled.to(pooled.dtype), pooled)
            parts.append(Batch(
                latents=latents,
                prompt_embeds=embeds,
                control=control,
                is_class=self.is_class[sel],
                token_ids=ids,
                pooled_embeds=pooled,
                time_ids=time_ids,
            ))
        return parts
