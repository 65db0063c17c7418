"""LoRA (Hu et al. 2021) and its PEFT variants on the U-Net attention projections; optional text-encoder adapters.

Defaults from diffusers' examples/dreambooth/train_dreambooth_lora.py: lr 1e-4, rank 4. ``variant`` picks the
adapter PEFT trains: ``lora``; ``dora`` (Liu et al. 2024, PEFT's ``use_dora``); ``loha`` (Hadamard product of two
low-rank products, Hyeon-Woo et al. 2022) or ``lokr`` (Kronecker product), PEFT's ports of LyCORIS' modules.
``conv_rank`` > 0 adds the U-Net ResNets' convolutions at that rank, kohya's LoCon (``conv_dim``/``conv_alpha``).

Saved: ``lora``/``dora`` with diffusers' LoRA saver (``pytorch_lora_weights.safetensors``, loads with
``pipe.load_lora_weights(dir)``); ``lora`` also in kohya format (``kohya_lora.safetensors``: A1111, ComfyUI, and
``load_lora_weights`` too; ``dora`` not: see ``_save_lora``). On an SDXL base model the same U-Net LoRA is saved with
``StableDiffusionXLPipeline.save_lora_weights`` (train_dreambooth_lora_sdxl.py); with ``train_text_encoder`` both of
SDXL's text encoders get a LoRA (that script's ``--train_text_encoder``), the prompts are re-encoded every step
with the pooled embedding (``base.encode_text``), and the file holds ``text_encoder.*`` and ``text_encoder_2.*``
(kohya: ``lora_te1_*`` and ``lora_te2_*``). ``loha``/``lokr``: diffusers has no loader for them, so only the
kohya/LyCORIS file (``training/lycoris.py``; A1111 and ComfyUI read it) plus ``peft_config.json``, the PEFT
configs that :meth:`LoraMethod.load_pipeline` injects before loading the file back.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from assets_pipeline.training.config import TrainConfig, added_field
from assets_pipeline.training.methods.registry import register
from assets_pipeline.training.methods.base import Method, Models, TrainContext, TrainingInputError

VARIANTS = ("lora", "dora", "loha", "lokr")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "kohya_lora.safetensors"
PEFT_CONFIG_FILE = "peft_config.json"  # loha/lokr: {network: PEFT config dict}, what load_pipeline injects


@dataclass(frozen=True)
class LoraConfig(TrainConfig):
    learning_rate: float = field(default=1e-4, metadata={"help": "diffusers' LoRA example default."})
    rank: int = field(default=4, metadata={"help": "LoRA rank r (diffusers' default 4); LoHa/LoKr: their r."})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; None = rank (scale 1)."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (lora/dora only)."})
    train_text_encoder: bool = field(default=False, metadata={
        "help": "Also train LoRA on the text encoder (SDXL: on both), as the scripts' --train_text_encoder."})
    variant: str = field(default="lora", metadata={
        "help": "The adapter, all through PEFT: lora (diffusers' default), dora (PEFT use_dora), loha or lokr "
                "(PEFT's ports of LyCORIS; saved in the LyCORIS format A1111/ComfyUI read, not by diffusers)."})
    conv_rank: int = field(default=0, metadata={
        "help": "Rank on the U-Net ResNets' conv1/conv2/conv_shortcut (LoCon, kohya's conv_dim); 0 = none."})
    conv_alpha: float | None = field(default=None, metadata={
        "help": "Alpha of the conv adapters (kohya's conv_alpha); None = conv_rank (scale 1)."})
    decompose_factor: int = field(default=-1, metadata={
        "help": "lokr: PEFT's/LyCORIS' Kronecker factor (-1 = the most balanced factorization, their default)."})
    # -- several concepts in one LoRA (kohya-ss sd-scripts' multi-folder datasets) --------------------------------
    repeats: int = field(default=1, metadata={"help": (
        "How often each of this concept's photos is seen per epoch (kohya-ss sd-scripts' '<repeats>_<name>' folder "
        "prefix): with datasets, the concepts' shares of the batches are photos x repeats.")})
    datasets: tuple[dict, ...] = field(default=(), metadata={"help": (
        "Other concepts trained into this LoRA with this concept's photos, each a table {concept = \"<name>\", "
        "repeats = N} ([[lora.datasets]] in concept.toml; kohya-ss sd-scripts' multi-folder training, SimpleTuner's "
        "multidatabackend). Each brings its quality subset with its own captions, so its own token (the one in "
        "its concept.toml), and is built by its own concept's dataset assets; its latents must come from the same "
        "base model. Lineage lists every photo with the concept it came from.")})
    target_modules: tuple[str, ...] = added_field((), (
        "The denoiser's modules LoRA adapts: PEFT target_modules (module names or name suffixes), e.g. Flux.1's "
        "single blocks' MLP and output too: ['attn.to_q', 'attn.to_k', 'attn.to_v', 'attn.to_out.0', 'proj_mlp', "
        "'proj_out'] (diffusers' --lora_layers). Empty = the family's default: the attention projections (SD 3.x; "
        "Flux.1 adds the feed-forward layers, as train_dreambooth_lora_flux.py; SD/SDXL: to_q/k/v/out)."))
    base_quantization: str | None = added_field(None, (
        "The frozen denoiser's linear weights quantized while the LoRA trains over them (QLoRA): 'float8' or "
        "'int8' (torchao weight-only, CPU or GPU), 'nf4' (bitsandbytes 4-bit, CUDA only). FLUX.1's 12 B transformer "
        "takes 24 GB in bf16, 12 in float8/int8, ~6.5 in nf4. Unset: the dtype of the run's precision. Variant "
        "'lora' only (PEFT's LoRA layers over quantized linears); training/quantization.py."))

    def __post_init__(self) -> None:
        super().__post_init__()
        from assets_pipeline.training.quantization import BASE_QUANTIZATIONS

        if self.base_quantization is not None and self.base_quantization not in BASE_QUANTIZATIONS:
            raise ValueError(f"base_quantization must be one of {', '.join(map(repr, BASE_QUANTIZATIONS))} or unset, "
                             f"got {self.base_quantization!r}")
        if self.base_quantization is not None and self.variant != "lora":
            raise ValueError(f"base_quantization = {self.base_quantization!r} works with variant 'lora' only (PEFT's "
                             f"LoRA layers over quantized linears), got variant {self.variant!r}")
        for key in ("rank", "conv_rank"):
            value, low = getattr(self, key), 1 if key == "rank" else 0
            if not low <= value <= MAX_RANK:
                raise ValueError(
                    f"{key} must be an integer in {low}..{MAX_RANK}, got {value}: a rank above a layer's width "
                    f"adds nothing, and {MAX_RANK} is the widest layer a LoRA adapts in any supported model (FLUX.1's "
                    "3072); the base model's own layers bound it further when a training is planned")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}, got {self.variant!r}")
        if self.dropout and self.variant in ("loha", "lokr"):
            raise ValueError(f"dropout = {self.dropout} applies to variant 'lora'/'dora' only: PEFT's LoHa/LoKr "
                             f"have no input dropout; set dropout = 0 for variant {self.variant!r}")
        if self.decompose_factor != -1 and self.decompose_factor < 1:
            raise ValueError(f"decompose_factor must be -1 or >= 1, got {self.decompose_factor}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1 (how often each photo is seen per epoch), got {self.repeats}")
        object.__setattr__(self, "datasets", tuple(check_datasets(self.datasets)))
        targets = self.target_modules
        if isinstance(targets, str) or not all(isinstance(t, str) and t.strip() for t in targets):
            raise ValueError(f"target_modules must be a list of module names, e.g. ['attn.to_q', 'proj_mlp'], "
                             f"got {targets!r}")
        object.__setattr__(self, "target_modules", tuple(targets))


MAX_RANK = 3072  # FLUX.1's hidden width: no supported denoiser has a wider layer to adapt (min of in and out)


@functools.lru_cache(maxsize=32)  # per base model and targets: the schedule asks for every concept
def narrowest_layer(ref, targets: tuple[str, ...], conv_targets: tuple[str, ...] = ()) -> tuple[str, int] | None:
    """(name, width) of the narrowest layer a LoRA on ``targets`` (linears; ``conv_targets``: convolutions) adapts
    in ``ref``'s denoiser, width = min(in, out) (a conv's input counts its kernel), found by building the denoiser
    from its config on the meta device (no weights read, no memory). None where no config is at hand (a single
    file without ``single_file_config``), or when no layer matches."""
    import torch

    from assets_pipeline.models.families import diffusers_class

    denoiser = ref.model_family.denoiser
    location = ref.single_file_config if ref.kind == "single_file" else ref.location
    if not location:
        return None
    cls = diffusers_class(denoiser.model_class)
    config = cls.load_config(location, subfolder=denoiser.component, local_files_only=True)
    with torch.device("meta"):
        model = cls.from_config(config)

    def matches(name, names):
        return any(name == t or name.endswith("." + t) for t in names)

    widths = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and matches(name, targets):
            widths.append((min(module.in_features, module.out_features), name))
        elif isinstance(module, torch.nn.Conv2d) and matches(name, conv_targets):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            widths.append((min(module.in_channels * kernel, module.out_channels), name))
    if not widths:
        return None
    width, name = min(widths)
    return name, width


DATASET_KEYS = {"concept": str, "repeats": int}


def check_datasets(datasets) -> list[dict]:
    """``[[lora.datasets]]`` entries, checked and completed: each {concept, repeats} (repeats default 1), every
    concept named once."""
    from assets_pipeline.concept import is_valid_concept_key

    out, seen = [], set()
    for i, entry in enumerate(datasets):
        where = f"datasets[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} = {entry!r}: expected a table {{concept = \"<name>\", repeats = N}}")
        unknown = sorted(set(entry) - set(DATASET_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(DATASET_KEYS)} (a listed concept's "
                             "token and captions are its own, set in its concept.toml)")
        concept, repeats = entry.get("concept"), entry.get("repeats", 1)
        if not isinstance(concept, str) or not is_valid_concept_key(concept):
            raise ValueError(f"{where}: concept = {concept!r} is not a concept name (a folder under the data root)")
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"{where}: repeats = {repeats!r} must be an integer >= 1")
        if concept in seen:
            raise ValueError(f"{where}: concept {concept!r} is listed twice")
        seen.add(concept)
        out.append({"concept": concept, "repeats": repeats})
    return out


def peft_config(cfg: LoraConfig, targets, conv_targets: tuple[str, ...] = ()):
    """The PEFT config of ``cfg.variant`` on modules named ``targets`` (plus ``conv_targets``, the denoiser's
    convolutions, at ``conv_rank``). ``lora`` without convs is exactly the config this method always trained."""
    import peft

    targets = list(targets)
    patterns = {}
    if conv_targets and cfg.conv_rank:
        targets += conv_targets
        patterns = {"rank_pattern": {t: cfg.conv_rank for t in conv_targets},
                    "alpha_pattern": {t: cfg.conv_alpha or cfg.conv_rank for t in conv_targets}}
    alpha = cfg.alpha or cfg.rank
    if cfg.variant in ("lora", "dora"):
        dora = {"use_dora": True} if cfg.variant == "dora" else {}
        return peft.LoraConfig(r=cfg.rank, lora_alpha=alpha, lora_dropout=cfg.dropout, init_lora_weights="gaussian",
                               target_modules=targets, **dora, **patterns)
    if cfg.variant == "loha":
        return peft.LoHaConfig(r=cfg.rank, alpha=alpha, target_modules=targets, **patterns)
    return peft.LoKrConfig(r=cfg.rank, alpha=alpha, target_modules=targets, decompose_factor=cfg.decompose_factor,
                           **patterns)


def module_scales(model) -> dict[str, tuple[float, int]]:
    """Each LoHa/LoKr module's ``(alpha, r)`` (rank_pattern/alpha_pattern resolved), by module name."""
    from peft.tuners.lycoris_utils import LycorisLayer

    return {name: (float(m.alpha["default"]), int(m.r["default"])) for name, m in model.named_modules()
            if isinstance(m, LycorisLayer)}


def kohya_prefixes(family) -> dict[str, str]:
    """Each network's prefix in kohya/LyCORIS files: the denoiser's (``lora_unet_``; a transformer's LyCORIS
    ``lycoris_``), the text encoders' ``lora_te_`` for a family with one, else ``lora_te1_``, ``lora_te2_``, ...
    (kohya-ss sd-scripts: SDXL's, SD 3.x's and Flux's)."""
    names = family.text_encoder_names
    te = {names[0]: "lora_te_"} if len(names) == 1 else {n: f"lora_te{i + 1}_" for i, n in enumerate(names)}
    return {family.denoiser.component: family.denoiser.kohya_prefix, **te}


def text_encoders_trained(family, cfg: LoraConfig) -> list:
    """The text encoders ``train_text_encoder`` puts a LoRA on: the family's CLIP encoders (SDXL's and SD 3.x's
    two, Flux's one); T5 stays frozen, as in diffusers' SD3/Flux LoRA scripts."""
    return [e for e in family.text_encoders if e.trains_lora] if cfg.train_text_encoder else []


class LoraMethod(Method):
    """A LoRA adapter (Hu et al. 2021) for the concept's token: small low-rank weights on the base model's
    denoiser attention (the U-Net's, or the transformer's), optionally on its text encoders too; DoRA, LoHa and
    LoKr through `[lora] variant`, and other concepts trained into the same adapter through `[[lora.datasets]]`.
    Output (a few MB): `pytorch_lora_weights.safetensors`, which loads with `pipe.load_lora_weights(folder)` into
    the base model's pipeline, and `kohya_lora.safetensors` for A1111 and ComfyUI (LoHa/LoKr: that file only,
    with `peft_config.json`)."""
    name = "lora"
    asset_name = "lora_adapter"
    config_cls = LoraConfig

    def needs_text_encoder(self, cfg: LoraConfig) -> bool:
        return cfg.train_text_encoder

    def check_model(self, ref, cfg: LoraConfig, concept: str) -> None:
        denoiser = ref.model_family.denoiser
        conv = denoiser.conv_targets if cfg.conv_rank else ()
        for key, targets, convs in (("rank", cfg.target_modules or denoiser.lora_targets, ()),
                                    ("conv_rank", (), conv)):
            value = getattr(cfg, key)
            narrowest = narrowest_layer(ref, tuple(targets), tuple(convs)) if value else None
            if narrowest is not None and value > narrowest[1]:
                raise TrainingInputError(
                    f"{concept}/concept.toml [lora]: {key} = {value} is wider than the narrowest layer it adapts in "
                    f"base model {ref.source!r} ({narrowest[0]}, width {narrowest[1]}): a rank above a layer's width "
                    f"adds nothing but memory; use {key} in 1..{narrowest[1]}")

    def prepare(self, models: Models, cfg: LoraConfig, ctx: TrainContext) -> list[str]:
        denoiser = models.family.denoiser
        models.denoiser.requires_grad_(False)
        targets = cfg.target_modules or denoiser.lora_targets
        try:
            models.denoiser.add_adapter(peft_config(cfg, targets, denoiser.conv_targets))
        except ValueError as e:
            if "not found in the base model" not in str(e):
                raise
            raise TrainingInputError(f"[lora] target_modules = {list(cfg.target_modules)}: {e} (the "
                                     f"{models.family.name} {denoiser.model_class}'s module names; unset for "
                                     f"{list(denoiser.lora_targets)})") from e
        trainable = [denoiser.component]
        for spec in text_encoders_trained(models.family, cfg):  # SDXL, SD 3.x: both CLIP encoders
            encoder = models.network(spec.component)
            encoder.requires_grad_(False)
            encoder.add_adapter(peft_config(cfg, spec.lora_targets))
            trainable.append(spec.component)
        return trainable

    def save(self, models: Models, load_base, out_dir: Path, cfg: LoraConfig, ctx: TrainContext):
        from peft.utils import get_peft_model_state_dict

        networks = [models.family.denoiser.component] + [e.component for e in text_encoders_trained(models.family, cfg)]
        sds = {n: get_peft_model_state_dict(models.network(n)) for n in networks}
        if cfg.variant in ("loha", "lokr"):
            return self._save_lycoris(models, out_dir, sds)
        return self._save_lora(models, out_dir, cfg, sds)

    def _save_lora(self, models: Models, out_dir: Path, cfg: LoraConfig, sds: dict):
        from diffusers.utils import convert_state_dict_to_diffusers
        from safetensors.torch import save_file

        from assets_pipeline.models.families import diffusers_class

        denoiser = models.family.denoiser
        te_kwargs = {}
        for name in [n for n in sds if n != denoiser.component]:  # text_encoder[_2]_lora_layers and its metadata
            layers = convert_state_dict_to_diffusers(sds[name])
            # A text encoder's DoRA magnitude under its parameter's own name: diffusers 0.42 hands the text
            # encoders' dict to transformers' load_adapter, which (v5) drops ``...lora_magnitude_vector`` silently.
            te_kwargs[f"{name}_lora_layers"] = {f"{k}.weight" if k.endswith("lora_magnitude_vector") else k: v
                                                for k, v in layers.items()}
            te_kwargs[f"{name}_lora_adapter_metadata"] = models.network(name).peft_config["default"].to_dict()
        # The family's pipeline class saves the file its own load_lora_weights reads (SDXL's has text_encoder_2).
        diffusers_class(models.family.pipeline_class).save_lora_weights(
            out_dir,
            safe_serialization=True,
            **{f"{denoiser.component}_lora_layers": convert_state_dict_to_diffusers(sds[denoiser.component])
               if denoiser.diffusers_lora_keys else sds[denoiser.component],
               f"{denoiser.component}_lora_adapter_metadata": models.denoiser.peft_config["default"].to_dict()},
            **te_kwargs,
        )
        writer = KOHYA_WRITERS.get(denoiser.kohya_lora)
        if cfg.variant == "dora" or writer is None:
            # No kohya file for DoRA: A1111's and ComfyUI's ``dora_scale`` normalizes the weight per input channel
            # (LyCORIS' convention, comfy/weight_adapter/base.py weight_decompose), PEFT's magnitude per output
            # channel; no file of theirs holds this DoRA, and diffusers drops kohya ``dora_scale`` keys anyway.
            # None for a family whose LoRAs those tools read in diffusers' layout (SD 3.x).
            return [out_dir / DIFFUSERS_FILE]
        kohya = writer(models, cfg, sds)
        save_file({k: v.contiguous() for k, v in kohya.items()}, str(out_dir / KOHYA_FILE))
        return [out_dir / DIFFUSERS_FILE, out_dir / KOHYA_FILE]

    def _save_lycoris(self, models: Models, out_dir: Path, sds: dict):
        from safetensors.torch import save_file

        from assets_pipeline.training.lycoris import peft_to_kohya

        scales = {n: module_scales(models.network(n)) for n in sds}
        configs = {n: models.network(n).peft_config["default"].to_dict() for n in sds}
        kohya = peft_to_kohya(sds, kohya_prefixes(models.family), scales)
        save_file(kohya, str(out_dir / KOHYA_FILE))
        (out_dir / PEFT_CONFIG_FILE).write_text(json.dumps(configs, indent=2, sort_keys=True, default=list))
        return [out_dir / KOHYA_FILE]

    def load_pipeline(self, load_base, out_dir: Path, ctx: TrainContext):
        """lora/dora: diffusers' ``load_lora_weights``. loha/lokr: diffusers has no loader for them; PEFT
        injects the saved configs and loads the LyCORIS file back (what a PEFT user would do)."""
        pipe = load_base()
        if not (out_dir / PEFT_CONFIG_FILE).is_file():
            pipe.load_lora_weights(str(out_dir), weight_name=DIFFUSERS_FILE)
            return pipe
        load_lycoris(pipe, out_dir)
        return pipe


def load_lycoris(pipe, out_dir: Path) -> None:
    """The LoHa/LoKr output in ``out_dir`` applied to ``pipe``'s networks with PEFT."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.config import PeftConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from assets_pipeline.models.families import family_of_pipeline
    from assets_pipeline.training.lycoris import kohya_to_peft

    configs = json.loads((out_dir / PEFT_CONFIG_FILE).read_text())
    for name, config in configs.items():
        inject_adapter_in_model(PeftConfig.from_peft_type(**config), getattr(pipe, name))
    scales = {name: module_scales(getattr(pipe, name)) for name in configs}
    sds = kohya_to_peft(load_file(str(out_dir / KOHYA_FILE)), kohya_prefixes(family_of_pipeline(pipe)), scales)
    for name, sd in sds.items():
        if missing := sorted(get_peft_model_state_dict(getattr(pipe, name)).keys() - sd.keys()):
            raise ValueError(f"{out_dir / KOHYA_FILE} lacks {len(missing)} of {name}'s adapter tensors, e.g. "
                             f"{missing[:3]}: not the file {PEFT_CONFIG_FILE} describes")
        result = set_peft_model_state_dict(getattr(pipe, name), sd)
        if result.unexpected_keys:
            raise ValueError(f"{out_dir / KOHYA_FILE}: {name} has no place for {result.unexpected_keys[:3]}")


def _kohya_sd(models: Models, cfg: LoraConfig, sds: dict) -> dict:
    """The kohya/A1111 file of a U-Net LoRA (and its text encoders'): diffusers' ``convert_state_dict_to_kohya``,
    text-encoder names as A1111/ComfyUI read them, and alphas as trained."""
    from diffusers.utils import convert_state_dict_to_kohya

    denoiser = models.family.denoiser
    peft_sd = {f"{name}.{k}": v for name, sd in sds.items() for k, v in sd.items()}
    kohya = {_kohya_te_key(k, kohya_prefixes(models.family)): v  # maps text_encoder_2. to lora_te2_
             for k, v in convert_state_dict_to_kohya(peft_sd).items()}
    for k in kohya:
        if k.endswith(".alpha"):  # the converter writes alpha = rank; ours may differ (convs: conv_alpha)
            conv = k.startswith("lora_unet_") and k.split(".")[0].endswith(denoiser.conv_targets)
            alpha = float((cfg.conv_alpha or cfg.conv_rank) if conv else (cfg.alpha or cfg.rank))
            kohya[k] = kohya[k].new_tensor(alpha, dtype=kohya[k].dtype if kohya[k].is_floating_point() else None)
    return kohya


def _kohya_flux(models: Models, cfg: LoraConfig, sds: dict) -> dict:
    """The kohya-ss layout of a Flux LoRA (``training/kohya_flux.py``) plus its CLIP encoder's (``lora_te1_``)."""
    import torch

    from assets_pipeline.training.kohya_flux import flux_lora_to_kohya

    name = models.family.denoiser.component
    out_features = {n.removesuffix(".base_layer"): m.out_features for n, m in models.denoiser.named_modules()
                    if isinstance(m, torch.nn.Linear)}
    scale = (cfg.alpha or cfg.rank) / cfg.rank
    kohya = flux_lora_to_kohya(sds[name], {m.rpartition(".lora_")[0]: scale for m in sds[name]}, out_features)
    if text := {n: sd for n, sd in sds.items() if n != name}:
        kohya.update(_kohya_sd(models, cfg, text))
    return kohya


# The kohya/A1111 LoRA file of each denoiser layout (``kohya_lora`` of models/unet.py's and models/mmdit.py's
# denoisers); a denoiser without one gets the diffusers file only.
KOHYA_WRITERS = {"sd": _kohya_sd, "flux": _kohya_flux}


def _kohya_te_key(key: str, prefixes: dict[str, str]) -> str:
    """diffusers' converter names text-encoder modules ``lora_te1_<module>`` (``lora_te2_`` for SDXL's second)
    with transformers 5's module names; A1111/ComfyUI read kohya's: ``lora_te_`` for SD 1.x/2.x's one encoder and
    transformers 4's ``text_model_encoder_layers_...`` (``training/lycoris.kohya_module``)."""
    for network, converted in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        if key.startswith(converted):
            module = key[len(converted):]
            return prefixes[network] + ("" if module.startswith("text_model_") else "text_model_") + module
    return key


register(LoraMethod())
