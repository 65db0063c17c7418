"""Train an output again from its manifest alone and compare the weights (``assets-pipeline reproduce``). Pure: no
Dagster.

Every input the manifest (``lineage.json``) names is fetched into a scratch folder and verified by its digest, and
the output is trained again through the pipeline's own code:

- photos by sha256: from the data root (``<concept>/<source_path>``, copied, then hashed), else their decoded copy
  from the store (the image cache entry the manifest names, checked against its recorded digest); class images
  (by sha256) and ControlNet conditioning images (by their recorded digest) from the store;
- the training bundle re-derived from them: ingest's decoding, :func:`compute_latents` at the recorded [latents]
  and [quality] settings (each row's latent and text cache keys must be the recorded ones) and
  :func:`write_latent_bundle`;
- the base model from its recorded source (or ``--base-model``), its fingerprint the recorded one;
- the job rebuilt from the recorded method config, rows and settings (its identity must be the recorded one) and
  run by the trainer process, ``python -m assets_pipeline.training``, on the CPU;
- the code: package version, source digest, library versions (and the git commit) compared with the recorded ones
  first; a difference refuses the reproduction unless ``allow_code_change``.

Then each weights file's tensors are compared with the original's, bit for bit. Writes go only under the scratch
folder (a new folder inside ``scratch_parent``, by default the artifact root), removed afterwards unless ``keep``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from assets_pipeline import lineage
from assets_pipeline.hashing import sha256_file
from assets_pipeline.lineage import LINEAGE_FILE
from assets_pipeline.models.resolve import BaseModelRef
from assets_pipeline.store import UnreadableFile, check_file, link_or_copy

log = logging.getLogger(__name__)

# What the manifest must hold, with what each is for (an older manifest lacks the last five).
REQUIRED = {
    "concept": "the concept trained", "method": "the method", "method_config": "the resolved method config",
    "job_identity": "the job's identity", "training_images": "the training rows", "weights": "the weights' digests",
    "preprocessing": "the [latents] and [quality] settings each training bundle was made with",
    "reproduction.base_model": "the base model as resolved (source, location, fingerprint)",
    "reproduction.job": "the job's settings outside the method config (token, class noun, precision, validation)",
    "reproduction.rows": "each row's decoded image and latent and text cache keys",
    "reproduction.code": "the package version, source digest and library versions that trained it",
}


class ReproductionError(Exception):
    """The output cannot be trained again: an input is missing or changed, the code differs, or the manifest lacks
    what reproduction needs. ``problems``: one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TensorDiff:
    file: str
    tensor: str
    max_abs_diff: float | None  # None: not comparable (see ``why``)
    why: str = ""


@dataclass
class Report:
    output: Path
    identical: bool
    tensors: int  # tensors compared
    differences: list[TensorDiff] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the caller should know besides the verdict
    scratch: Path | None = None  # the kept scratch folder (``keep``)


# -- the manifest ------------------------------------------------------------------------------------------------


def read_manifest(output: Path) -> dict[str, Any]:
    """The output's manifest, refused with every missing part named when it lacks what reproduction needs."""
    from assets_pipeline.training.output import REPRODUCTION_FORMAT

    path = Path(output) / LINEAGE_FILE
    if not path.is_file():
        raise ReproductionError([f"{output} is not a trained output: no {LINEAGE_FILE} in it (give a version folder "
                                 "under <artifact root>/concepts/<concept>/<asset>/)"])
    try:
        manifest = lineage.read_manifest(Path(output))
    except UnreadableFile as e:  # damaged, not JSON, the audit's keys missing
        raise ReproductionError([str(e)]) from e
    missing = []
    for key, what in REQUIRED.items():
        node: Any = manifest
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            missing.append(f"{key} ({what})")
    if missing:
        raise ReproductionError([f"{path} lacks what reproduction needs: {'; '.join(missing)}. It was written before "
                                 "outputs recorded it: train the output again (run tag assets_pipeline/force_retrain="
                                 "true) for a manifest that records it"])
    fmt = manifest["reproduction"].get("format")
    if fmt != REPRODUCTION_FORMAT:
        raise ReproductionError([f"{path}: reproduction format {fmt!r}, and this version reads {REPRODUCTION_FORMAT}: "
                                 "reproduce with the version of assets_pipeline that trained it"])
    if len(manifest["reproduction"]["rows"]) != len(manifest["training_images"]) or any(
            a["image_sha256"] != b["image_sha256"]
            for a, b in zip(manifest["reproduction"]["rows"], manifest["training_images"])):
        raise ReproductionError([f"{path}: reproduction.rows do not match training_images row for row (the manifest "
                                 "was edited)"])
    return manifest


def code_differences(manifest: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(differences that change what trains, differences that do not) between the code that trained the output
    and this one. The package's source digest decides: another git commit with the same sources (a commit of docs
    or tests) is only a note."""
    from assets_pipeline.training.plan import CODE_VERSION, code_identity, git_commit

    then, now = manifest["reproduction"]["code"], code_identity()
    changes = []
    if manifest.get("code_version") != CODE_VERSION:
        changes.append(f"model assets' code version {manifest.get('code_version')!r} when trained, {CODE_VERSION!r} "
                       "now")
    if then.get("package_version") != now["package_version"]:
        changes.append(f"assets-pipeline {then.get('package_version')} when trained, {now['package_version']} now")
    if then.get("source_sha256") != now["source_sha256"]:
        changes.append(f"assets_pipeline's sources differ (sha256 {str(then.get('source_sha256'))[:12]} when "
                       f"trained, {now['source_sha256'][:12]} now)")
    libraries = {**then.get("libraries", {}), **now["libraries"]}
    for name in sorted(libraries):
        a, b = then.get("libraries", {}).get(name), now["libraries"].get(name)
        if a != b:
            changes.append(f"{name} {a} when trained, {b} now")
    notes = []
    commit = git_commit()
    if manifest.get("git_commit") and commit and manifest["git_commit"] != commit:
        (changes if changes else notes).append(f"git commit {manifest['git_commit'][:12]} when trained, "
                                               f"{commit[:12]} now")
    return changes, notes


# -- inputs ------------------------------------------------------------------------------------------------------


def _relative(path: str, what: str) -> PurePosixPath:
    """A path the manifest records inside a root: relative, with no '..' (a manifest never leads a write or a read
    out of its root)."""
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ReproductionError([f"{what}: {path!r} is not a path inside its root (the manifest was edited)"])
    return p


def _place(src: Path, dst: Path) -> None:
    """``src`` at ``dst`` in the scratch folder: a hard link where the filesystem allows, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_models(artifact_root: Path, scratch: Path, names: list[str]) -> None:
    """The artifact root's built models (the embedded base model, the embedded CLIP) that the job names, linked
    into the scratch root, so nothing is built or fingerprinted into the artifact root; what is absent there is
    built in the scratch root."""
    for name in names:
        src = artifact_root / "base_models" / name
        if src.is_dir():
            shutil.copytree(src, scratch / "base_models" / name, copy_function=lambda s, d: _place(Path(s), Path(d)))


def base_model(recorded: dict[str, Any], scratch: Path, override: str | None) -> BaseModelRef:
    """The recorded base model, at its recorded place (an embedded one built or linked into the scratch root), or
    at ``override``; its fingerprint must be the recorded one."""
    from assets_pipeline.models.embedded import EMBEDDED_MODELS, ensure_embedded
    from assets_pipeline.models.resolve import cached_fingerprint

    try:
        ref = BaseModelRef(**recorded)
    except TypeError as e:  # a field this code does not have, or lacks
        raise ReproductionError([f"reproduction.base_model cannot be read by this code: {e}"]) from e
    if override:
        location = Path(override).expanduser().resolve()
    elif ref.kind == "embedded":
        if ref.source not in EMBEDDED_MODELS:
            raise ReproductionError([f"base model {ref.source!r}: no longer an embedded model of this code "
                                     f"({sorted(EMBEDDED_MODELS)})"])
        location = ensure_embedded(scratch / "base_models", ref.source)
    else:
        location = Path(ref.location)
    if not location.exists():
        raise ReproductionError([f"base model {ref.source!r}: not found at {location}, where it was when trained; "
                                 f"give --base-model a copy of it (fingerprint {ref.fingerprint[:16]})"])
    fingerprint = cached_fingerprint(location, scratch / "base_models" / ".fingerprints")
    if fingerprint != ref.fingerprint:
        raise ReproductionError([f"base model {ref.source!r} at {location} has fingerprint {fingerprint[:16]}, and "
                                 f"the output was trained on fingerprint {ref.fingerprint[:16]}: its weights or "
                                 "configs changed since; restore it, or give --base-model a copy with that "
                                 "fingerprint"])
    return replace(ref, location=str(location))


@dataclass
class Row:
    """A manifest row with its reproduction record and where its image is in the scratch folder."""

    concept: str
    image: dict[str, Any]  # the training_images entry
    record: dict[str, Any]  # the reproduction.rows entry
    decoded: Path | None = None
    control: Path | None = None

    @property
    def name(self) -> str:
        img = self.image
        kind = "photo" if img["role"] == "instance" else f"{img['role']} image"
        return f"{kind} {self.concept}/{img.get('source_path')} (sha256 {img['image_sha256'][:16]})"


def fetch_inputs(rows: list[Row], data_root: Path, artifact_root: Path, scratch: Path) -> list[str]:
    """Each row's image into the scratch folder, verified by its digest: a photo copied from the data root (into
    ``scratch/data``, for ingest to decode) from its recorded path or, moved since, from wherever in its concept
    folder a file has its sha256; else its decoded copy from the store. Class and conditioning images from the
    store. Returns notes; :class:`ReproductionError` names every input missing or changed."""
    from assets_pipeline.stages.ingest import IMAGE_SUFFIXES

    problems, notes = [], []
    contents: dict[str, dict[str, Path]] = {}  # per concept folder: sha256 -> a photo in it with those bytes

    def by_content(concept: str, sha: str) -> Path | None:
        if concept not in contents:
            folder, root = data_root / concept, data_root.resolve()
            photos = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                      and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                      and p.resolve().is_relative_to(root)] if folder.is_dir() else []
            contents[concept] = {sha256_file(p): p for p in photos}
        return contents[concept].get(sha)

    def copy_photo(src: Path, dst: Path, sha: str) -> str:
        """``src`` copied to ``dst``, then hashed (what ingest decodes is what was verified): its sha256, and
        the copy removed again when that is not ``sha``."""
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        now = sha256_file(dst)
        if now != sha:
            dst.unlink()
        return now

    def from_store(rel: str | None, what: str, sha: str | None = None) -> tuple[Path | None, str]:
        if not rel:
            return None, "not recorded"
        src = artifact_root / _relative(rel, what)
        if not src.is_file():
            return None, f"not in the store ({src})"
        why = check_file(src) if sha is None else (
            None if sha256_file(src) == sha else "its sha256 differs from the recorded one")
        if why is not None:
            return None, f"damaged in the store ({src}: {why})"
        dst = scratch / _relative(rel, what)
        link_or_copy(src, dst, verify=False)
        return dst, ""

    for row in rows:
        img, rec = row.image, row.record
        if img["role"] == "instance":
            sha, rel = img["image_sha256"], _relative(img["source_path"], row.name)
            photo, copy = data_root / row.concept / rel, scratch / "data" / row.concept / rel
            why = f"missing from the data root ({photo})"
            if photo.is_file() and (now := copy_photo(photo, copy, sha)) != sha:
                why = f"changed in the data root since training ({photo} has sha256 {now[:16]} now)"
            elif photo.is_file():
                why = ""
            if why and (moved := by_content(row.concept, sha)) is not None and copy_photo(moved, copy, sha) == sha:
                notes.append(f"{row.name}: {why}; found by its sha256 at {moved}")
                why = ""
            if why:
                row.decoded, store_why = from_store(rec.get("decoded"), row.name)
                if row.decoded is None:
                    problems.append(f"{row.name}: {why}, and its decoded copy is {store_why}")
                else:
                    notes.append(f"{row.name}: {why}; its decoded copy came from the store")
        else:
            row.decoded, why = from_store(rec.get("decoded"), row.name, img["image_sha256"])
            if row.decoded is None:
                problems.append(f"{row.name}: {why}; class images come from the base model: rematerialize "
                                f"class_images for concept {row.concept!r} at the settings it was trained with")
        if rec.get("control"):
            row.control, why = from_store(rec["control"], f"the conditioning image of {row.name}")
            if row.control is None:
                problems.append(f"the conditioning image of {row.name}: {why}; rematerialize control_images for "
                                f"concept {row.concept!r} at the [control] settings it was trained with")
    if problems:
        raise ReproductionError(problems)
    return notes


def decode_photos(rows: list[Row], scratch: Path) -> list[str]:
    """Ingest's decoding of the photos copied into ``scratch/data``; each must decode to the image cache entry the
    manifest names (its key covers the photo's sha256 and the decoder's version). Returns those that do not."""
    from assets_pipeline.stages.ingest import ingest_concept
    from assets_pipeline.store import ItemCache

    cache = ItemCache(scratch, "images", ".png")
    problems = []
    for concept in dict.fromkeys(r.concept for r in rows if r.decoded is None and r.image["role"] == "instance"):
        result = ingest_concept(scratch / "data" / concept, scratch / "data", cache)
        decoded = dict(zip(result.manifest["image_sha256"], result.manifest["decoded_path"]))
        rejected = dict(zip(result.rejects["source_path"], result.rejects["reason"]))
        for row in rows:
            if row.concept != concept or row.decoded is not None or row.image["role"] != "instance":
                continue
            path = decoded.get(row.image["image_sha256"])
            if path is None:
                problems.append(f"{row.name}: ingest rejects it now ({rejected.get(row.image['source_path'])})")
                continue
            row.decoded = Path(path)
            if row.record.get("decoded") and row.decoded.name != PurePosixPath(row.record["decoded"]).name:
                problems.append(f"{row.name}: decodes to cache entry {row.decoded.name} now, "
                                f"{PurePosixPath(row.record['decoded']).name} when trained (ingest's decoder "
                                "version changed)")
    return problems


def build_bundles(rows: list[Row], manifest: dict, ref: BaseModelRef, scratch: Path,
                  artifact_root: Path) -> tuple[list[str], list[str]]:
    """Each concept's training bundle re-derived from the decoded images at its recorded settings, into
    ``scratch/concepts/<concept>/vae_latents/``. Returns (rows whose cache keys differ from the recorded ones,
    notes); each row's record gets the keys computed now."""
    import pandas as pd

    from assets_pipeline.stages.bundle import write_latent_bundle
    from assets_pipeline.stages.latents import LatentConfig, bundle_header, compute_latents, load_encoders
    from assets_pipeline.store import ArtifactLayout

    layout = ArtifactLayout(scratch)
    enc = load_encoders(ref, scratch, "cpu")
    caches = layout.cache("latents", ".safetensors"), layout.cache("text_embeds", ".safetensors")
    problems, notes = [], []
    for concept in dict.fromkeys(r.concept for r in rows):
        prep = manifest["preprocessing"].get(concept)
        try:
            cfg = LatentConfig(**prep["latents"])
            max_aspect = float(prep["max_aspect_ratio"])
        except (TypeError, KeyError, ValueError) as e:  # no entry, or a setting this code no longer has
            raise ReproductionError([f"preprocessing of concept {concept!r} cannot be read by this code: "
                                     f"{type(e).__name__}: {e}"]) from e
        resolution = cfg.resolution or ref.resolution
        mine = [r for r in rows if r.concept == concept]
        items = pd.DataFrame([{"image_sha256": r.image["image_sha256"], "decoded_path": str(r.decoded),
                               "caption": r.image["caption"], "role": r.image["role"]} for r in mine])
        index = compute_latents(items, enc, resolution, cfg, *caches, max_aspect)
        for row, now in zip(mine, index.itertuples()):
            for key, what in (("latent_key", "latent (its crop, bucket, VAE, [latents] settings)"),
                              ("text_key", "caption's text embedding (its text encoders, [latents] settings)")):
                if getattr(now, key) != row.record[key]:
                    problems.append(f"{row.name}: its {what} is keyed {getattr(now, key)[:16]} now, "
                                    f"{str(row.record[key])[:16]} when trained")
                row.record = {**row.record, key: getattr(now, key)}
        bundle = layout.asset_dir(concept, "vae_latents") / "latents.safetensors"
        write_latent_bundle(index, *caches, bundle, bundle_header(enc, ref, cfg, resolution), enc.family,
                            center_crop=cfg.center_crop)
        trained_on = artifact_root / "concepts" / concept / "vae_latents" / "latents.safetensors"
        if prep.get("bundle_sha256") and trained_on.is_file() and check_file(trained_on) is None \
                and sha256_file(trained_on) == prep["bundle_sha256"]:
            how = compare_bundles(trained_on, bundle)
            notes.append(f"concept {concept!r}: the latents and text embeddings re-derived from the photos are, bit "
                         "for bit, those of the bundle the output was trained on (still in the store)" if how is None
                         else f"concept {concept!r}: the latents and text embeddings re-derived from the photos differ "
                         f"from those of the bundle the output was trained on (still in the store): {how}")
    return problems, notes


def compare_bundles(trained_on: Path, rebuilt: Path) -> str | None:
    """None when each row of a re-derived bundle has, bit for bit, the tensors its row in the bundle trained on has
    (latents and their flips, text embeddings, SDXL's time ids; the bundle trained on may hold more rows, e.g. class
    images another method trains on), at the same bucket, and the fingerprints in the headers agree; else how they
    differ."""
    from assets_pipeline.stages.bundle import bundle_meta, load_latent_bundle

    a, b = load_latent_bundle(trained_on), load_latent_bundle(rebuilt)
    if bundle_meta(trained_on) != bundle_meta(rebuilt):
        return f"its header differs ({bundle_meta(trained_on)} trained on, {bundle_meta(rebuilt)} now)"
    where = {row: i for i, row in enumerate(zip(a.image_sha256, a.roles))}
    pos_a, pos_b = a.positions(), b.positions()
    differ: dict[str, float | None] = {}
    for i, row in enumerate(zip(b.image_sha256, b.roles)):
        j = where.get(row)
        if j is None or a.buckets[j] != b.buckets[i]:
            return f"its row {row[1]} {row[0][:16]} is {'not there' if j is None else 'in another bucket'}"
        latents = [n for n in ("latent_mean", "latent_std", "flip_latent_mean", "flip_latent_std") if b.has(n)]
        texts = [n for n in ("prompt_embeds", "pooled_prompt_embeds") if n in b.tensors]
        times = [n for n in ("add_time_ids", "flip_add_time_ids") if n in b.tensors]
        differ.update({n: None for n in latents if not a.has(n)})
        differ.update({n: None for n in texts + times if n not in a.tensors})
        pairs = [(n, a.latents(n, a.buckets[j])[pos_a[j]], b.latents(n, b.buckets[i])[pos_b[i]])
                 for n in latents if a.has(n)]
        pairs += [(n, a.per_row(n)[j], b.per_row(n)[i]) for n in texts if n in a.tensors]
        pairs += [(n, a.tensors[n][j], b.tensors[n][i]) for n in times if n in a.tensors]
        for name, x, y in pairs:
            if x.shape != y.shape or x.dtype != y.dtype:
                differ[name] = None
            elif not _bits(x).equal(_bits(y)):
                differ[name] = max(differ.get(name) or 0.0, float((x.double() - y.double()).abs().max()))
    for name in ("empty_prompt_embeds", "empty_pooled_prompt_embeds"):
        if name in b.tensors and not (name in a.tensors and a.tensors[name].shape == b.tensors[name].shape
                                      and _bits(a.tensors[name]).equal(_bits(b.tensors[name]))):
            differ[name] = None
    return ", ".join(f"{k} {'not comparable' if d is None else f'by up to {d:.3g}'}" for k, d in differ.items()) \
        if differ else None


# -- the job and the trainer -------------------------------------------------------------------------------------


def rebuild_job(manifest: dict, rows: list[Row], ref: BaseModelRef, scratch: Path, output_name: str):
    """The job the pipeline would hand its trainer, from the manifest: its files in the scratch folder, on the
    CPU."""
    from assets_pipeline.store import ArtifactLayout
    from assets_pipeline.training.job import JOB_FORMAT, TrainingRow, TrainJob
    from assets_pipeline.training.methods import get_method

    layout = ArtifactLayout(scratch)
    concept, settings = manifest["concept"], manifest["reproduction"]["job"]
    try:  # a method, config field or setting this code no longer has, a bad value: named, not a traceback
        asset_dir = layout.asset_dir(concept, get_method(manifest["method"]).asset_name)
        training = [TrainingRow(
            image_sha256=r.image["image_sha256"], role=r.image["role"], caption=r.image["caption"],
            latent_key=r.record["latent_key"], text_key=r.record["text_key"],
            source_path=r.image.get("source_path", ""), decoded_path=str(r.decoded),
            clip_score=r.image.get("clip_score"), blur_variance=r.image.get("blur_variance"),
            control_path=str(r.control) if r.control else None,
            concept=r.image.get("concept"), repeats=r.image.get("repeats")).to_json() for r in rows]
        raw = {
            "format_version": JOB_FORMAT, "concept": concept, "method": manifest["method"],
            "config": manifest["method_config"], "base_model": asdict(ref),
            "latents_dir": str(layout.asset_dir(concept, "vae_latents")), "output_dir": str(asset_dir / output_name),
            "checkpoint_dir": str(asset_dir / ".checkpoints"), "token": settings["token"],
            "class_noun": settings["class_noun"], "training_images": training,
            "lineage": {**{k: manifest.get(k) for k in ("asset", "code_version", "run_id", "git_commit",
                                                        "input_data_versions", "created_at", "preprocessing")},
                        "reproduction_of": manifest.get("run_id")},
            "scorer": {**settings["scorer"], "artifact_root": str(scratch)},
            "device": "cpu", "mixed_precision": settings["mixed_precision"],
            "validation_inference_steps": settings["validation_inference_steps"],
            "validation_seeds": settings["validation_seeds"], "performance": settings["performance"],
            "cache_dir": str(scratch / "cache"), "log_with": "",
            "datasets": [{**d, "latents_dir": str(layout.asset_dir(d["concept"], "vae_latents"))}
                         for d in manifest.get("datasets", [])],
        }
        return TrainJob.from_json(raw, where=f"the job rebuilt from {LINEAGE_FILE}")
    except (TypeError, ValueError, KeyError) as e:
        raise ReproductionError([f"the recorded job cannot be rebuilt by this code: {type(e).__name__}: {e}"]) from e


def run_trainer(job_path: Path, progress: Callable[[str], None], cache_dir: str) -> None:
    """The trainer process as the trainer resource starts it for one process (TrainerLauncher.command), its output
    passed to ``progress`` line by line. The compilers' caches go to ``cache_dir`` (the scratch folder's): this
    process imported torch._dynamo to re-derive the bundle, which set ``TORCHINDUCTOR_CACHE_DIR`` to /tmp."""
    from assets_pipeline.training import TRAINER, TRAINER_ENV
    from assets_pipeline.training.runtime.compilation import compile_cache_env

    cmd = [*TRAINER, "--job", str(job_path)]
    env = {**os.environ, **TRAINER_ENV, **compile_cache_env(cache_dir)}
    tail: deque[str] = deque(maxlen=30)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            progress(line.rstrip())
    if proc.returncode != 0:
        raise ReproductionError([f"the trainer failed (exit {proc.returncode}); its last lines:", *tail])


# -- the comparison ----------------------------------------------------------------------------------------------


def _bits(t):
    import torch

    return t.contiguous().view(-1).view(torch.uint8)


def compare_weights(original: Path, reproduced: Path, manifest: dict) -> tuple[int, list[TensorDiff], list[str]]:
    """(tensors compared, those that differ, notes): each weights file the manifest lists, tensor by tensor, bit for
    bit; a difference is the largest absolute one. An original whose weights were pruned is compared through the
    recorded digest of its tensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from assets_pipeline.training.output import tensors_digest

    count, diffs, notes = 0, [], []
    manifest_sha = sha256_file(original / LINEAGE_FILE)
    for rel, recorded in sorted(manifest["weights"].items()):
        mine = reproduced / rel
        if not mine.is_file():
            count += 1
            diffs.append(TensorDiff(rel, "*", None, "the reproduction wrote no such file"))
            continue
        again = tensors_digest(mine) == recorded["tensors_sha256"]
        if not (original / rel).is_file():
            count += 1
            if again:
                notes.append(f"{rel}: pruned from the output; the reproduced tensors have the recorded digest")
            else:
                diffs.append(TensorDiff(rel, "*", None, "pruned from the output, and the reproduced tensors' digest "
                                                        "differs from the recorded one"))
            continue
        if tensors_digest(original / rel) != recorded["tensors_sha256"]:
            notes.append(f"{rel}: the output's file no longer has the tensors its manifest records (changed after "
                         "training)" + ("; the reproduction has them" if again else ""))
        with safe_open(str(original / rel), framework="pt") as f:
            stamped = (f.metadata() or {}).get("lineage_sha256")
        if stamped and stamped != manifest_sha and not any(LINEAGE_FILE + " was edited" in n for n in notes):
            notes.append(f"{LINEAGE_FILE} was edited after training: the weights were stamped with its sha256 "
                         f"{stamped[:16]}, and it has sha256 {manifest_sha[:16]} now")
        a, b = load_file(str(original / rel)), load_file(str(mine))
        for name in sorted(set(a) | set(b)):
            count += 1
            if name not in b or name not in a:
                diffs.append(TensorDiff(rel, name, None, f"only in the {'original' if name in a else 'reproduction'}"))
            elif a[name].shape != b[name].shape or a[name].dtype != b[name].dtype:
                diffs.append(TensorDiff(rel, name, None, f"{a[name].dtype} {tuple(a[name].shape)} in the original, "
                                                         f"{b[name].dtype} {tuple(b[name].shape)} reproduced"))
            elif not _bits(a[name]).equal(_bits(b[name])):
                diffs.append(TensorDiff(rel, name, float((a[name].double() - b[name].double()).abs().max())))
    return count, diffs, notes


# -- the whole ---------------------------------------------------------------------------------------------------


def reproduce(output: Path, data_root: Path, artifact_root: Path, *, scratch_parent: Path | None = None,
              keep: bool = False, allow_code_change: bool = False, base_model_source: str | None = None,
              progress: Callable[[str], None] = log.info) -> Report:
    """Train ``output`` again from its manifest into a scratch folder and compare the weights (module docstring).
    :class:`ReproductionError` when it cannot: an input missing or changed, the code changed (unless
    ``allow_code_change``), or a manifest without the reproduction record."""
    from assets_pipeline.concept import validate_concept_key
    from assets_pipeline.models.embedded import EMBEDDED_MODELS
    from assets_pipeline.stages.scoring import EMBEDDED_CLIP_NAME

    output = Path(output).resolve()
    manifest = read_manifest(output)
    changes, notes = code_differences(manifest)
    if changes and not allow_code_change:
        raise ReproductionError(["the code differs from the code that trained the output:", *changes,
                                 "check out the code (and libraries) that trained it, or pass --allow-code-change to "
                                 "see what the change does to the weights"])
    notes += [f"code changed: {c}" for c in changes]
    trained_on = manifest["reproduction"]["job"].get("trained_on")
    if trained_on and trained_on != "cpu":
        notes.append(f"trained on {trained_on}, reproduced on the CPU: floating point differs between devices, so "
                     "expect small differences")
    if manifest.get("num_processes", 1) > 1:
        notes.append(f"trained by {manifest['num_processes']} processes, reproduced by one: gradients are averaged "
                     "in another order, so expect differences in the last bits")
    try:
        rows = [Row(validate_concept_key(img.get("concept", manifest["concept"])), img, rec)
                for img, rec in zip(manifest["training_images"], manifest["reproduction"]["rows"])]
    except ValueError as e:  # ConceptSpecError: a concept name no folder can have (the manifest was edited)
        raise ReproductionError([f"{output / LINEAGE_FILE}: {e}"]) from e
    parent = Path(scratch_parent) if scratch_parent else Path(artifact_root)
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".reproduce-", dir=parent))
    try:
        recorded = manifest["reproduction"]["base_model"]
        scorer = manifest["reproduction"]["job"]["scorer"].get("model_name")
        link_models(Path(artifact_root), scratch,
                    ([EMBEDDED_MODELS[recorded["source"]][0]] if recorded["source"] in EMBEDDED_MODELS else [])
                    + ([EMBEDDED_CLIP_NAME] if scorer == "embedded" else []))
        ref = base_model(recorded, scratch, base_model_source)
        notes += fetch_inputs(rows, Path(data_root), Path(artifact_root), scratch)
        problems = decode_photos(rows, scratch)
        if problems:
            raise ReproductionError(problems)
        progress("re-deriving the training bundle from the photos")
        key_changes, bundle_notes = build_bundles(rows, manifest, ref, scratch, Path(artifact_root))
        notes += bundle_notes
        job = rebuild_job(manifest, rows, ref, scratch, output.name)
        if job.identity() != manifest["job_identity"]:
            key_changes.append(f"the rebuilt job's identity is {job.identity()[:16]}, the recorded one "
                               f"{manifest['job_identity'][:16]}")
        if key_changes and not allow_code_change:
            raise ReproductionError(["the recorded inputs no longer make the recorded job:", *key_changes,
                                     "the code that makes them changed (pass --allow-code-change to train anyway)"])
        notes += [f"code changed: {c}" for c in key_changes]
        job_path = Path(job.output_dir).parent / ".job-reproduce.json"
        job_path.parent.mkdir(parents=True, exist_ok=True)
        job.save(job_path)
        progress(f"training {job.method} for {job.concept!r} again in {scratch}")
        run_trainer(job_path, progress, job.cache_dir)
        count, diffs, weight_notes = compare_weights(output, Path(job.output_dir), manifest)
        return Report(output, not diffs, count, diffs, notes + weight_notes, scratch if keep else None)
    except ReproductionError as e:
        if keep:
            e.problems.append(f"(the scratch folder is kept: {scratch})")
        raise
    finally:
        if not keep:
            shutil.rmtree(scratch)
