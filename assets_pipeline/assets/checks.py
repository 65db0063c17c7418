"""Asset checks on every trained output: finite weights, a visible change versus the base model, and a
lineage manifest that lists exactly the images the output was trained on."""

import inspect
import json
from pathlib import Path

import dagster as dg

from assets_pipeline.display import shown
from assets_pipeline.lineage import read_manifest
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.resources import AcceleratorResource, BaseModelResource, PipelineStorage
from assets_pipeline.training.methods import get_method, method_names
from assets_pipeline.training.plan import training_rows
from assets_pipeline.training.reuse import current_output, record_failed_check


CHANGE_CHECK_VERSION = 2  # bump when changes_base_output measures differently (2: DPM-Solver++ renders)


def change_result(change: float, measured_before: bool) -> dg.AssetCheckResult:
    """changes_base_output's result: passed on the measured change (above 0), shown rounded, with what its
    metadata means."""
    return dg.AssetCheckResult(passed=change > 0, description=change_description(measured_before), metadata={
        "mean_abs_change": shown(change), "measured_before": measured_before})


def change_description(measured_before: bool) -> str:
    """What changes_base_output's metadata means, shown with each of its results."""
    return ("mean_abs_change: the mean absolute pixel difference (0 to 1) between what the base model and this "
            "output render for the same validation prompt and seed; passed when above 0. measured_before: "
            + ("true: these same weights (their SHA256SUMS), base model, prompt, conditioning images and device "
               "were measured by an earlier check, and that measurement was read from the check_results cache "
               "instead of rendering again." if measured_before else
               "false: rendered and measured by this check (the result is cached under check_results, so a later "
               "check of the same weights reads it instead of rendering again)."))


def current(storage: PipelineStorage, method, concept: str) -> Path:
    out = current_output(storage.layout(), concept, method.asset_name)
    if out is None or not out.is_dir():
        raise FileNotFoundError(f"{method.asset_name} has no current output for concept {concept!r}")
    return out


def weights_finite(storage: PipelineStorage, base_model: BaseModelResource | None,
                   accelerator: AcceleratorResource | None, method, concept: str, run_id: str) -> dg.AssetCheckResult:
    """Every tensor of every weights file is finite (no NaN or inf): a diverged training (learning rate too
    high, fp16 overflow) fails here before anyone loads the output. Blocking."""
    from assets_pipeline.training.verify import nonfinite_tensors

    out = current(storage, method, concept)
    counts = nonfinite_tensors(out)
    bad = {k: v for k, v in counts.items() if v}
    metadata = {"files_checked": len(counts), "nonfinite_values": json.dumps(bad)}
    if bad:  # never reused: the next build trains again
        record_failed_check(out, "weights_finite", run_id, metadata)
    return dg.AssetCheckResult(passed=not bad, metadata=metadata)


def changes_base_output(storage: PipelineStorage, base_model: BaseModelResource, accelerator: AcceleratorResource,
                        method, concept: str, run_id: str) -> dg.AssetCheckResult:
    """The output changes what the base model renders for the same prompt and seed (mean absolute pixel
    change > 0): an adapter that loads but does nothing (zero LoRA weights, a token never trained, a
    ControlNet with zero-convolutions still zero) fails here."""
    from dataclasses import asdict

    from assets_pipeline.hashing import digest, sha256_file
    from assets_pipeline.training.plan import render_context
    from assets_pipeline.training.render import BaseRenders
    from assets_pipeline.training.reuse import SUMS_FILE
    from assets_pipeline.training.verify import change_versus_base

    out = current(storage, method, concept)
    layout = storage.layout()
    spec = layout.spec(concept)
    ref = base_model.resolve(layout.root, spec)
    manifest = read_manifest(out)
    ctx = render_context(layout, spec, manifest["base_model"], control=method.name == "controlnet",
                         holdout=manifest["method_config"].get("validation_holdout", 0))
    controls = ctx.extra["control_paths"]
    device = accelerator.torch_device()
    # The measurement is a function of the output's weight bytes, the base model, the prompt, the
    # conditioning images and the device: measured once per such combination (a reused output, rechecked by
    # every later build, is not re-rendered).
    results = layout.cache("check_results", ".json")
    key = digest("changes_base_output", CHANGE_CHECK_VERSION, (out / SUMS_FILE).read_text(), ref.fingerprint,
                 method.name, {k: v for k, v in asdict(ctx).items() if k not in ("extra", "family")},
                 [sha256_file(p) for p in controls],
                 "cuda" if device.startswith("cuda") else device)
    renders = BaseRenders(ref, device, BaseRenders.cache_for(layout.root))
    path = results.get_or_create(key, lambda tmp: tmp.write_text(json.dumps({
        "mean_abs_change": change_versus_base(method, ref, out, ctx, device=device,
                                              base_renders=renders)})))
    return change_result(json.loads(path.read_text())["mean_abs_change"], measured_before=results.cached > 0)


def manifest_lists_training_images(storage: PipelineStorage, base_model: BaseModelResource | None,
                                   accelerator: AcceleratorResource | None, method, concept: str,
                                   run_id: str) -> dg.AssetCheckResult:
    """The output's lineage.json lists exactly the images (concept, sha256, role, caption) its training rows
    have now (with datasets: those of each concept trained in): none missing, none extra, so the audit from
    this output back to its photos is exact. Blocking."""
    from dataclasses import asdict

    from assets_pipeline.training.verify import manifest_difference

    out = current(storage, method, concept)
    manifest = read_manifest(out)
    cfg = method.config_cls(**manifest["method_config"])
    layout = storage.layout()
    expected = [{**asdict(r), "concept": concept}  # ControlNet: the photos that have a conditioning image
                for r in training_rows(layout, concept, method.batch_roles(cfg), control=method.name == "controlnet",
                                       holdout=getattr(cfg, "validation_holdout", 0))]
    for d in getattr(cfg, "datasets", ()):  # the other concepts trained in (LoRA's datasets): their photos now
        expected += [{**asdict(r), "concept": d["concept"]}
                     for r in training_rows(layout, d["concept"], ("instance",), control=False)]
    extra, missing = manifest_difference(out, expected)
    metadata = {"images_listed": len(manifest["training_images"]), "unexpected": len(extra),
                "missing": len(missing)}
    if extra or missing:  # never reused: the next build trains again
        record_failed_check(out, "manifest_lists_training_images", run_id, metadata)
    return dg.AssetCheckResult(passed=not extra and not missing, metadata=metadata)


# The checks of every model asset, in the order a pack run evaluates them (assets/packs.py): (function, blocking,
# the resources it reads besides storage). Each function takes (storage, base_model, accelerator, method, concept,
# run_id) and returns what its asset check returns; its name is the check's, its docstring the description.
MODEL_CHECK_FUNCTIONS = ((weights_finite, True, ()), (changes_base_output, False, ("base_model", "accelerator")),
                         (manifest_lists_training_images, True, ()))


def build_checks(method_name: str) -> list[dg.AssetChecksDefinition]:
    method = get_method(method_name)
    asset = dg.AssetKey(method.asset_name)

    def check(fn, blocking: bool, resource_names: tuple[str, ...]) -> dg.AssetChecksDefinition:
        @dg.asset_check(asset=asset, name=fn.__name__, blocking=blocking, partitions_def=concepts_partitions,
                        description=inspect.cleandoc(fn.__doc__), required_resource_keys={"storage", *resource_names})
        def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
            r = context.resources
            return fn(r.storage, getattr(r, "base_model", None), getattr(r, "accelerator", None), method,
                      context.partition_key, context.run.run_id)

        return _check

    return [check(*spec) for spec in MODEL_CHECK_FUNCTIONS]


MODEL_CHECKS = [check for name in method_names() for check in build_checks(name)]
