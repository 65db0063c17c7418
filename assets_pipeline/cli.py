"""Command line: ``assets-pipeline demo`` builds the demo concept end to end through Dagster;
``assets-pipeline lineage output|image TARGET`` audits lineage in either direction;
``assets-pipeline concept remove NAME`` removes a concept whose folder is gone;
``assets-pipeline slots [free RUN_ID]`` says who holds the pool slots, and frees a dead run's;
``assets-pipeline reproduce OUTPUT_DIR`` trains an output again from its manifest and compares the weights."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from assets_pipeline.display import printable
from assets_pipeline.paths import project_root

def _printable_table(table):
    """Every text cell of ``table`` passed through :func:`printable`."""
    return table.map(lambda v: printable(v) if isinstance(v, str) else v)


def _json_records(table) -> str:
    """``table`` as JSON records. pandas escapes every control character but DEL; that one too, so the JSON
    printed holds none (the value read back is the same)."""
    return table.to_json(orient="records").replace("\x7f", "\\u007f")


class _Warnings:
    """Prints each warning of a command to stderr, one line each, and counts them: a command that had to skip a
    damaged record says so in its exit status (1)."""

    def __init__(self, command: str):
        self.command = command
        self.count = 0

    def __call__(self, message: str) -> None:
        self.count += 1
        print(f"assets-pipeline {self.command}: warning: {printable(message)}", file=sys.stderr)


def _instance():
    import dagster as dg

    os.environ.setdefault("DAGSTER_HOME", str(project_root() / "dagster_home"))
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.get()


# Step-by-step DEBUG events go to the run's event log (the UI shows them); the terminal gets warnings only.
_QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


# The job the demo's runs are: its name, not Dagster's `__ephemeral_asset_job__` (what `dagster.materialize` runs),
# is what the UI's run list shows, with the concept's partition and the assets each run materialized.
DEMO_JOB = "train_concept"


def build_concepts(concepts: list[str], asset_selection=None) -> list[tuple[str, object]]:
    """Register ``concepts`` as partitions on the local instance and run the ``train_concept`` job for each: every
    asset and check (``asset_selection``: those asset keys only), in this process."""
    from assets_pipeline.definitions import defs
    from assets_pipeline.partitions.definitions import concepts_partitions

    instance = _instance()
    instance.add_dynamic_partitions(concepts_partitions.name, concepts)
    job = defs.resolve_job_def(DEMO_JOB)
    return [(concept, job.execute_in_process(partition_key=concept, instance=instance, run_config=_QUIET,
                                             asset_selection=asset_selection)) for concept in concepts]


def _summary(res) -> list[str]:
    lines = []
    for event in res.get_asset_materialization_events():
        mat = event.materialization
        md = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        counts = ""
        if "items_computed" in md:
            counts = f"  computed {md['items_computed']}, cached {md['items_cached']}" + (
                f", not cached {md['items_not_cached']}" if "items_not_cached" in md else "")
        lines.append(f"  {mat.asset_key.to_user_string():<28} rows {md.get('dagster/row_count', '-'):>3}"
                     f"{counts}\n      -> {md.get('path')}")
    for check in res.get_asset_check_evaluations():
        lines.append(f"  check {check.asset_key.to_user_string()}.{check.check_name}: "
                     f"{'passed' if check.passed else 'FAILED'}")
    return lines


def cmd_demo(args: argparse.Namespace) -> int:
    from assets_pipeline.demo_data import demo_concepts, write_demo_concept
    from assets_pipeline.partitions.concept_spec import load_concept_spec
    from assets_pipeline.resources import BaseModelResource, PipelineStorage

    storage = PipelineStorage()
    t0 = time.time()
    concepts = demo_concepts(args.sd1_only)
    for concept, files in concepts.items():
        folder = write_demo_concept(storage.data_path(), concept, files)
        ref = BaseModelResource().resolve(storage.artifact_path(), load_concept_spec(folder))
        print(f"demo concept written: {folder}\n  base model {ref.family}: {ref.kind} at {ref.location}, "
              f"fingerprint {ref.fingerprint[:16]}")
    for concept, res in build_concepts(list(concepts)):
        run = _instance().get_run_stats(res.run_id)
        took = f" in {run.end_time - run.start_time:.0f} s" if run.start_time and run.end_time else ""
        print(f"\nmaterialized for concept {concept!r}{took} (run {res.run_id}):")
        print("\n".join(_summary(res)))
        if not res.success:
            return 1
    print(f"\nbuilt in {time.time() - t0:.0f} s. Artifacts: {storage.artifact_path()}")
    print("Open the UI (lineage, metadata, previews, re-materialize):\n"
          f"  DAGSTER_HOME={os.environ['DAGSTER_HOME']} {Path(sys.executable).parent}/dagster dev -h 127.0.0.1 -p 3000\n"
          "  then browse http://127.0.0.1:3000")
    return 0


def _pack_of(manifest: dict) -> list[str] | None:
    """The concepts an output trained with in a pack (its lineage.json's ``pack``), or None: trained alone."""
    pack = manifest.get("pack")
    return list(pack["concepts"]) if isinstance(pack, dict) and pack.get("concepts") else None


def cmd_lineage(args: argparse.Namespace) -> int:
    """Exit status 0: answered; 1: answered, but a damaged record was skipped (a warning names it), so the answer
    may be incomplete; 2: no answer (the one-line error says why)."""
    import pandas as pd

    from assets_pipeline.hashing import sha256_file
    from assets_pipeline.lineage import audit_output, is_sha256, outputs_trained_on, read_manifest, source_of
    from assets_pipeline.resources import PipelineStorage
    from assets_pipeline.retention import human_bytes, pruned_record
    from assets_pipeline.store import UnreadableFile

    storage = PipelineStorage()
    warn = _Warnings("lineage")
    pd.set_option("display.width", 200)
    pd.set_option("display.max_colwidth", 80)
    if args.direction == "output":
        try:
            table = audit_output(Path(args.target), storage.data_path())
        except (FileNotFoundError, UnreadableFile) as e:
            print(f"assets-pipeline lineage: {printable(e)}", file=sys.stderr)
            return 2
        # The concept of each photo, where the output was trained on several (LoRA's datasets).
        several = "concept" in table and table["concept"].nunique() > 1
        cols = [c for c in ("concept", "source_path", "image_sha256", "role", "status", "control_source",
                            "control_sha256", "control_status", "clip_score", "blur_variance", "caption")
                if c in table and (c != "concept" or several)]
        print(_printable_table(table[cols]).to_string(index=False) if args.format == "table"
              else _json_records(table))
        changed = table[table["status"].isin(["missing", "changed"])]
        if len(changed):
            print(f"\n{len(changed)} source photo(s) missing or changed since training", file=sys.stderr)
        if "control_status" in table and len(pairs := table[table["control_status"].isin(["missing", "changed"])]):
            print(f"\n{len(pairs)} conditioning image(s) missing or changed since training", file=sys.stderr)
        target = Path(args.target)
        folder = target if target.is_dir() else target.parent
        manifest = read_manifest(folder)  # audit_output has read it: it is readable
        if held := manifest.get("validation_pairs"):  # ControlNet: validated on, never trained on
            print(f"held out of training, the validation renders' conditioning images ({len(held)} pair(s)):\n"
                  + "\n".join(f"  {printable(p.get('source_path'))} + {printable(p.get('control_source'))} "
                               f"({printable(str(p.get('control_sha256'))[:12])})" for p in held), file=sys.stderr)
        if (pack := _pack_of(manifest)) is not None:  # how it was trained: with whom (training/pack_trainer.py)
            print(f"trained in a pack of {len(pack)} (one trainer process, each concept's own adapter and loss):\n"
                  + "\n".join(f"  {printable(c)}" for c in pack), file=sys.stderr)
        try:
            pruned = pruned_record(folder)
        except UnreadableFile as e:
            warn(f"{e}; whether this output's weights were pruned is unknown")
            pruned = None
        if pruned is not None:
            print(f"this output's weights were pruned on {printable(pruned['pruned_at'])} ({len(pruned['files'])} "
                  f"files, {human_bytes(pruned['bytes'])}); its lineage is kept", file=sys.stderr)
        return 1 if warn.count else 0
    # image: by its content (a file, or a sha256) and, for a path under the data root, by that path's history.
    path = Path(args.target)
    sha = sha256_file(path) if path.is_file() else args.target.lower() if is_sha256(args.target) else None
    source = None if is_sha256(args.target) else source_of(path, storage.data_path())
    if sha is None and source is None:
        print(f"assets-pipeline lineage: {printable(repr(args.target))} is neither an existing file, a sha256, nor a "
              f"path inside the data root {printable(storage.data_path())}", file=sys.stderr)
        return 2
    table = outputs_trained_on(storage.artifact_path(), sha, source, warn=warn)
    print(_printable_table(table).to_string(index=False) if args.format == "table" else _json_records(table))
    if table.empty:
        print("no trained output lists this image", file=sys.stderr)
    elif (table["match"] != "content").any():
        print(f"{printable(args.target)}: this path's content changed since some outputs were trained on it (rows "
              "whose match starts with 'path:')" if sha else f"{printable(args.target)} no longer exists; outputs "
              "trained on it are listed", file=sys.stderr)
    if warn.count:
        print(f"assets-pipeline lineage: {warn.count} damaged record(s) skipped (warnings above): outputs they "
              "describe may be missing from this answer", file=sys.stderr)
        return 1
    return 0


def _tree_size(path: Path) -> str:
    """Files and bytes under ``path`` (links not followed, hard-linked files counted at full size)."""
    files, size = 1, path.lstat().st_size
    if path.is_dir() and not path.is_symlink():
        files = size = 0
        for dirpath, _, filenames in os.walk(path):
            files += len(filenames)
            size += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in filenames)
    from assets_pipeline.retention import human_bytes

    return f"{files} file{'s' * (files != 1)}, {human_bytes(size)}"


def removal_plan(concept_dir: Path, with_trained_outputs: bool) -> list[tuple[Path, str | None]]:
    """Every entry of ``concepts/<concept>/`` with None (remove it) or why it is kept. Dataset assets and their
    temporaries go; trained outputs only when asked; anything this project did not write there stays."""
    from assets_pipeline.assets.models import MODEL_ASSETS
    from assets_pipeline.cleanup import is_temporary
    from assets_pipeline.definitions import ASSETS

    trained = {a.key.to_user_string() for a in MODEL_ASSETS}
    assets = [a.key.to_user_string() for a in ASSETS]
    plan = []
    for entry in sorted(concept_dir.iterdir()):
        owner = next((a for a in assets if entry.name == a or is_temporary(entry.name, owner=a)), None)
        if entry.is_symlink():
            why = "a symbolic link: not removed"
        elif owner is None:
            why = "not an output of this project's assets: not removed"
        elif owner in trained and not with_trained_outputs:
            why = f"trained output ({owner}); --with-trained-outputs removes it"
        else:
            why = None
        plan.append((entry, why))
    return plan


def cmd_concept_remove(args: argparse.Namespace) -> int:
    """Remove a concept whose folder is gone: its dataset artifacts, optionally its trained outputs, then its
    partition. Nothing outside ``<artifact root>/concepts/<name>/`` is touched; the shared caches stay."""
    import shutil

    import dagster as dg

    from assets_pipeline.concept import is_valid_concept_key
    from assets_pipeline.partitions.definitions import concepts_partitions
    from assets_pipeline.resources import PipelineStorage

    def fail(message: str) -> int:
        print(f"assets-pipeline concept remove: {message}", file=sys.stderr)
        return 2

    storage = PipelineStorage()
    layout = storage.layout()
    if not is_valid_concept_key(args.name):  # checked before any path is built from it
        return fail(f"{args.name!r} is not a valid concept name, so no concept has it")
    name = args.name
    try:
        concept_dir = layout.inside(layout.root / "concepts" / name)
    except ValueError as e:  # concepts/ or concepts/<name> links out of the artifact root
        return fail(str(e))
    folder = storage.data_path() / name
    if folder.exists():
        # While it exists the concept sensor registers it again and rebuilds it on its next tick.
        return fail(f"its folder {folder} still exists: move or delete it first, then remove the concept")
    if concept_dir.is_symlink():
        return fail(f"refusing {concept_dir}: a symbolic link, not a folder this project wrote")
    with _instance() as instance:
        registered = instance.has_dynamic_partition(concepts_partitions.name, name)
        if not registered and not concept_dir.is_dir():
            return fail(f"unknown concept {name!r}: not a registered partition and no folder {concept_dir}")
        active = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": name}, statuses=[
            dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
            dg.DagsterRunStatus.CANCELING]), limit=1)
        if active:
            return fail(f"run {active[0].run_id} of concept {name!r} is {active[0].status.value.lower()}: wait "
                        "for it or terminate it first")
        verb = "would remove" if args.dry_run else "removed"
        plan = removal_plan(concept_dir, args.with_trained_outputs) if concept_dir.is_dir() else []
        for path, why in plan:
            size = _tree_size(path)
            if why is None and not args.dry_run and path.is_dir():
                shutil.rmtree(layout.inside(path))
            elif why is None and not args.dry_run:
                layout.inside(path).unlink()
            print(f"{'kept' if why else verb:<12}  {printable(path)}  ({size}){f': {why}' if why else ''}")
        if concept_dir.is_dir() and all(why is None for _, why in plan):
            if not args.dry_run:
                concept_dir.rmdir()
            print(f"{verb:<12}  {concept_dir}  (then empty)")
        if registered:
            if not args.dry_run:
                instance.delete_dynamic_partition(concepts_partitions.name, name)
            print(f"{verb:<12}  partition {name!r} of {concepts_partitions.name!r} (its run history stays)")
    if (layout.root / "cache").is_dir():
        print(f"{'kept':<12}  {layout.root / 'cache'}: content-addressed caches are shared between concepts")
    for other in listed_by(storage, name, _Warnings("concept remove")):
        print(f"note: concept {other!r} trains {name!r} into its LoRA ([[lora.datasets]] in {other}/concept.toml): "
              "its next training is refused until that entry is removed; its current output is kept",
              file=sys.stderr)
    if args.dry_run:
        print("dry run: nothing was removed")
    return 0


def listed_by(storage, name: str, warn) -> list[str]:
    """The concepts whose concept.toml, as their last ingest read it, lists ``name`` in [[lora.datasets]]; a
    damaged snapshot is skipped with a warning (``warn``) naming it."""
    from assets_pipeline.assets.common import spec_from_snapshot
    from assets_pipeline.store import SPEC_SNAPSHOT, UnreadableFile

    out = []
    for snapshot in sorted((storage.artifact_path() / "concepts").glob(f"*/raw_images/{SPEC_SNAPSHOT}")):
        other = snapshot.parent.parent.name
        try:
            datasets = spec_from_snapshot(storage, other).section("lora").get("datasets", [])
        except UnreadableFile as e:
            warn(f"{e}; whether concept {other!r} trains {name!r} into its LoRA is unknown")
            continue
        if any(isinstance(d, dict) and d.get("concept") == name for d in datasets):
            out.append(other)
    return out


def cmd_prune(args: argparse.Namespace) -> int:
    """Apply the retention policy to every model asset of every concept (what each training does for its own).
    Exit status 1 when a damaged record (a warning names it) kept some versions from being considered."""
    from assets_pipeline.lineage import current_version
    from assets_pipeline.resources import PipelineStorage
    from assets_pipeline.retention import human_bytes, prune_asset
    from assets_pipeline.store import UnreadableFile
    from assets_pipeline.training.methods import get_method, method_names

    storage = PipelineStorage()
    warn = _Warnings("prune")
    keep = args.keep if args.keep is not None else storage.keep_weight_versions
    if keep < 1:
        print(f"assets-pipeline prune: --keep {keep}: at least 1 (the current version is always kept)",
              file=sys.stderr)
        return 2
    concepts = storage.artifact_path() / "concepts"
    total = 0
    for concept in sorted(p.name for p in concepts.iterdir() if p.is_dir()) if concepts.is_dir() else []:
        for name in method_names():
            asset_dir = storage.layout().asset_dir(concept, get_method(name).asset_name)
            try:
                current = current_version(asset_dir)
            except UnreadableFile as e:  # which version must keep its weights is unknown: none is pruned
                warn(f"{e}; until then no version of {asset_dir} is pruned")
                continue
            for p in prune_asset(asset_dir, current, keep, dry_run=args.dry_run, warn=warn):
                total += p.bytes
                print(f"{'would prune' if args.dry_run else 'pruned'}  {printable(p.folder)}  ({len(p.files)} weights "
                      f"files, {human_bytes(p.bytes)})")
    print(f"{'would free' if args.dry_run else 'freed'} {human_bytes(total)}; newest {keep} version(s) of each "
          "output keep their weights, every version keeps its lineage")
    if warn.count:
        print(f"assets-pipeline prune: {warn.count} damaged record(s) skipped (warnings above)", file=sys.stderr)
        return 1
    return 0


def cmd_slots(args: argparse.Namespace) -> int:
    """Who holds the instance's pool slots (the gpu pool), since when, and how to free them; or free a run's."""
    from assets_pipeline.pools import free_run_slots, report, resolve_run_id

    with _instance() as instance:
        if args.action != "free":
            print("\n".join(report(instance, args.pool)))
            return 0
        try:
            run_id = resolve_run_id(instance, args.run_id)
            freed = free_run_slots(instance, run_id, force=args.force)
        except ValueError as e:
            print(f"assets-pipeline slots free: {e}", file=sys.stderr)
            return 2
        for h in freed:
            print(f"freed  pool {h.pool}: the slot of run {h.run_id}, step {h.step_key!r}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Train an output again from its manifest alone (training/reproduce.py): ``identical`` and 0, or the largest
    difference per tensor and 1; 2 with the reasons when an input is missing or changed."""
    from assets_pipeline.resources import PipelineStorage
    from assets_pipeline.training.reproduce import ReproductionError, reproduce

    storage = PipelineStorage()

    def progress(line: str) -> None:
        print(printable(line), file=sys.stderr, flush=True)

    try:
        report = reproduce(Path(args.output), storage.data_path(), storage.artifact_path(),
                           scratch_parent=Path(args.scratch) if args.scratch else None, keep=args.keep,
                           allow_code_change=args.allow_code_change, base_model_source=args.base_model,
                           progress=progress)
    except ReproductionError as e:  # paths, captions and names come from files: escaped for the terminal
        print(f"assets-pipeline reproduce: cannot reproduce {printable(args.output)}:", file=sys.stderr)
        print("\n".join(f"  {printable(p)}" for p in e.problems), file=sys.stderr)
        return 2
    for note in report.notes:
        print(f"note: {printable(note)}", file=sys.stderr)
    if report.scratch:
        print(f"kept the scratch folder {printable(report.scratch)}", file=sys.stderr)
    if report.identical:
        print("identical")
        return 0
    print(f"differs: {len(report.differences)} of {report.tensors} tensors (largest absolute difference per tensor)")
    for d in report.differences:
        print(printable(f"  {d.file}  {d.tensor}  " + (f"{d.max_abs_diff:.6g}" if d.max_abs_diff is not None
                                                         else d.why)))
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="assets-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write the demo concepts (SD 1.x and SDXL) and materialize every asset for them")
    demo.add_argument("--sd1-only", action="store_true",
                      help="only the SD 1.x demo concept (skip sample_sdxl and sample_flux)")
    lineage = sub.add_parser("lineage", help="audit lineage: an output's sources, or the outputs of an image")
    lineage.add_argument("direction", choices=["output", "image"],
                         help="output: list the source photos of an output; image: list outputs trained on it")
    lineage.add_argument("target", help="output folder or weights file / photo file or its sha256")
    lineage.add_argument("--format", choices=["table", "json"], default="table")
    concept = sub.add_parser("concept", help="manage concepts: remove one whose folder is gone")
    remove = concept.add_subparsers(dest="action", required=True).add_parser(
        "remove", help="remove a concept's partition and dataset artifacts (its folder must be gone already)")
    remove.add_argument("name", help="the concept (its former folder name)")
    remove.add_argument("--with-trained-outputs", action="store_true",
                        help="also remove its trained outputs (kept by default: they may be in use)")
    remove.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    prune = sub.add_parser("prune", help="delete the weights of replaced trained outputs beyond the newest N")
    prune.add_argument("--keep", type=int, default=None,
                       help="versions per output whose weights are kept (default: the storage resource's "
                            "keep_weight_versions, 2)")
    prune.add_argument("--dry-run", action="store_true", help="print what would be pruned; delete nothing")
    slots = sub.add_parser("slots", help="who holds the instance's pool slots (the gpu pool) and since when; "
                                         "free those of a run that is gone")
    slots.add_argument("--pool", action="append", help="only this pool (repeatable; default: every pool)")
    free = slots.add_subparsers(dest="action").add_parser(
        "free", help="free the slots of a run that ended, or (--force) of one still STARTED whose process is gone")
    free.add_argument("run_id", help="the run (its id, or the start of it as the UI shows it)")
    free.add_argument("--force", action="store_true",
                      help="the run is still STARTED but its process is gone: mark it failed, then free its slots")
    reproduce = sub.add_parser("reproduce", help="train a trained output again from its manifest alone and compare "
                               "the weights: 'identical' (exit 0) or the largest difference per tensor (exit 1)")
    reproduce.add_argument("output", help="the output's version folder (it holds lineage.json)")
    reproduce.add_argument("--scratch", default=None,
                           help="folder to work in (a new folder inside it; default: inside the artifact root)")
    reproduce.add_argument("--keep", action="store_true", help="keep the scratch folder (default: removed)")
    reproduce.add_argument("--allow-code-change", action="store_true",
                           help="train even though the code or libraries differ from those that trained the output")
    reproduce.add_argument("--base-model", default=None,
                           help="the base model's folder or file, if it moved since (its fingerprint must match)")
    args = parser.parse_args(argv)
    from assets_pipeline.store import UnreadableFile

    try:
        return {"demo": cmd_demo, "lineage": cmd_lineage, "concept": cmd_concept_remove,
                "prune": cmd_prune, "slots": cmd_slots, "reproduce": cmd_reproduce}[args.command](args)
    except UnreadableFile as e:  # a project file the command needs: one line naming it and what to do
        print(f"assets-pipeline {args.command}: {printable(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
