"""Command line: ``assets-pipeline demo`` builds the demo concept end to end through Dagster;
``assets-pipeline lineage output|image TARGET`` audits lineage in either direction."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from assets_pipeline.paths import project_root


def _instance():
    import dagster as dg

    os.environ.setdefault("DAGSTER_HOME", str(project_root() / "dagster_home"))
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.get()


# Step-by-step DEBUG events go to the run's event log (the UI shows them); the terminal gets warnings only.
_QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def build_concepts(concepts: list[str], selection=None) -> list[tuple[str, object]]:
    """Register ``concepts`` as partitions on the local instance and materialize the asset graph for each."""
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.partitions.definitions import concepts_partitions

    instance = _instance()
    instance.add_dynamic_partitions(concepts_partitions.name, concepts)
    results = []
    for concept in concepts:
        res = dg.materialize([*ASSETS, *CHECKS], selection=selection, partition_key=concept, instance=instance,
                             resources=default_resources(), run_config=_QUIET)
        results.append((concept, res))
    return results


def _summary(res) -> list[str]:
    lines = []
    for event in res.get_asset_materialization_events():
        mat = event.materialization
        md = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        counts = ""
        if "items_computed" in md:
            counts = f"  computed {md['items_computed']}, cached {md['items_cached']}"
        lines.append(f"  {mat.asset_key.to_user_string():<28} rows {md.get('dagster/row_count', '-'):>3}"
                     f"{counts}\n      -> {md.get('path')}")
    for check in res.get_asset_check_evaluations():
        lines.append(f"  check {check.asset_key.to_user_string()}.{check.check_name}: "
                     f"{'passed' if check.passed else 'FAILED'}")
    return lines


def cmd_demo(args: argparse.Namespace) -> int:
    from assets_pipeline.demo_data import DEMO_CONCEPT, write_demo_concept
    from assets_pipeline.resources import BaseModelResource, PipelineStorage

    storage = PipelineStorage()
    t0 = time.time()
    folder = write_demo_concept(storage.data_path())
    print(f"demo concept written: {folder}")
    ref = BaseModelResource().resolve(storage.artifact_path())
    print(f"base model: {ref.kind} at {ref.location}\n  fingerprint {ref.fingerprint[:16]}")
    for concept, res in build_concepts([DEMO_CONCEPT]):
        print(f"\nmaterialized for concept {concept!r} (run {res.run_id}):")
        print("\n".join(_summary(res)))
        if not res.success:
            return 1
    print(f"\nbuilt in {time.time() - t0:.0f} s. Artifacts: {storage.artifact_path()}")
    print("Open the UI (lineage, metadata, previews, re-materialize):\n"
          f"  DAGSTER_HOME={os.environ['DAGSTER_HOME']} {Path(sys.executable).parent}/dagster dev -h 127.0.0.1 -p 3000\n"
          "  then browse http://127.0.0.1:3000")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    import pandas as pd

    from assets_pipeline.hashing import sha256_file
    from assets_pipeline.lineage import audit_output, is_sha256, outputs_trained_on, source_of
    from assets_pipeline.resources import PipelineStorage

    storage = PipelineStorage()
    pd.set_option("display.width", 200)
    pd.set_option("display.max_colwidth", 80)
    if args.direction == "output":
        try:
            table = audit_output(Path(args.target), storage.data_path())
        except FileNotFoundError as e:
            print(f"assets-pipeline lineage: {e}", file=sys.stderr)
            return 2
        cols = [c for c in ("source_path", "image_sha256", "role", "status", "clip_score", "blur_variance",
                            "caption") if c in table]
        print(table[cols].to_string(index=False) if args.format == "table" else table.to_json(orient="records"))
        changed = table[table["status"].isin(["missing", "changed"])]
        if len(changed):
            print(f"\n{len(changed)} source photo(s) missing or changed since training", file=sys.stderr)
        return 0
    # image: by its content (a file, or a sha256) and, for a path under the data root, by that path's history.
    path = Path(args.target)
    sha = sha256_file(path) if path.is_file() else args.target.lower() if is_sha256(args.target) else None
    source = None if is_sha256(args.target) else source_of(path, storage.data_path())
    if sha is None and source is None:
        print(f"assets-pipeline lineage: {args.target!r} is neither an existing file, a sha256, nor a path inside "
              f"the data root {storage.data_path()}", file=sys.stderr)
        return 2
    table = outputs_trained_on(storage.artifact_path(), sha, source)
    print(table.to_string(index=False) if args.format == "table" else table.to_json(orient="records"))
    if table.empty:
        print("no trained output lists this image", file=sys.stderr)
    elif (table["match"] != "content").any():
        print(f"{args.target}: this path's content changed since some outputs were trained on it (rows whose "
              "match starts with 'path:')" if sha else f"{args.target} no longer exists; outputs trained on it "
              "are listed", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="assets-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="write the demo concept and materialize every asset for it")
    lineage = sub.add_parser("lineage", help="audit lineage: an output's sources, or the outputs of an image")
    lineage.add_argument("direction", choices=["output", "image"],
                         help="output: list the source photos of an output; image: list outputs trained on it")
    lineage.add_argument("target", help="output folder or weights file / photo file or its sha256")
    lineage.add_argument("--format", choices=["table", "json"], default="table")
    args = parser.parse_args(argv)
    return {"demo": cmd_demo, "lineage": cmd_lineage}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
