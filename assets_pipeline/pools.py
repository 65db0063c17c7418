"""Who holds the instance's pool slots (the `gpu` pool: every GPU step takes one), since when, and how to free them.

A step waiting for a slot gets only Dagster's DEBUG line "Step blocked by limit for pool gpu". When the run that
holds the slot died without anything noticing (kill -9 of `dagster asset materialize`, which runs in its own
process: no launcher marks it failed), the run stays STARTED, keeps the slot, and every later GPU step waits
forever. So:

- :data:`pool_slot_sensor` (every 30 s) writes, at INFO, into the log of each run whose step waits for a slot:
  which runs hold the pool's slots, their status, since when, and the command that frees them; again whenever the
  holders change.
- ``assets-pipeline slots`` lists the same for every pool; ``assets-pipeline slots free RUN_ID`` frees the slots of
  a run that ended, and with ``--force`` of one that is still STARTED but whose process is gone (it is marked
  failed first, which also stops its trainer: resources/run_watch.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

import dagster as dg

# A step that has waited less than this is not reported (slots change hands all the time).
REPORT_AFTER_S = 10
FREE = "assets-pipeline slots free"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _age(since: datetime | None, now: datetime) -> str:
    if since is None:
        return "unknown"
    s = max(0, int((now - since).total_seconds()))
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h {s % 3600 // 60:02d} min"


def _when(since: datetime | None, now: datetime) -> str:
    return "an unknown time" if since is None else f"{since:%Y-%m-%d %H:%M:%S} UTC ({_age(since, now)} ago)"


@dataclass(frozen=True)
class Holder:
    """A claimed slot: the run and step holding it, since when, and what the run record says of the run."""

    pool: str
    run_id: str
    step_key: str
    since: datetime | None  # when the slot was assigned to the step
    status: str | None  # the run's status (DagsterRunStatus value); None: no run record
    job_name: str | None = None
    partition: str | None = None

    @property
    def ended(self) -> bool:
        """The run is over (or has no record): its slots can be freed without asking."""
        from dagster._core.storage.dagster_run import FINISHED_STATUSES

        return self.status is None or dg.DagsterRunStatus(self.status) in FINISHED_STATUSES

    def describe(self, now: datetime) -> str:
        run = f"run {self.run_id} (no run record)" if self.status is None else (
            f"run {self.run_id} (job {self.job_name}" + (f", partition {self.partition}" if self.partition else "")
            + f", status {self.status})")
        return f"{run}, step {self.step_key!r}, since {_when(self.since, now)}"

    def free_command(self) -> str:
        return f"{FREE} {self.run_id}" + ("" if self.ended else " --force")

    def how_to_free(self, monitoring_s: int | None) -> str:
        if self.status is None:
            return f"its run record is gone: free it with `{self.free_command()}`"
        if self.ended:
            later = (f"the daemon's run monitoring frees it about {monitoring_s} s after the run ended, if the "
                     "daemon runs; " if monitoring_s else "")
            return f"the run has ended: {later}free it now with `{self.free_command()}`"
        return (f"it is {self.status}: if its process is gone (killed outright, e.g. kill -9 of `dagster asset "
                "materialize`, or its machine restarted: nothing then marks the run failed), free the slot with "
                f"`{self.free_command()}` (the run is marked failed, then its slots are freed) or terminate the run "
                "in the UI ticking 'Force termination immediately'; if it is still working, the waiting steps run "
                "when it is done")


@dataclass(frozen=True)
class Waiting:
    """A step waiting for a slot of the pool."""

    pool: str
    run_id: str
    step_key: str
    since: datetime  # when it started waiting


@dataclass(frozen=True)
class PoolState:
    pool: str
    limit: int | None
    holders: tuple[Holder, ...]
    waiting: tuple[Waiting, ...]


def pool_state(instance: dg.DagsterInstance, pool: str) -> PoolState:
    """The pool's limit, the slots claimed (holders, oldest first) and the steps waiting, from the instance's
    event log storage, with each holder's run as its run record has it."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    assigned = {(p.run_id, p.step_key): p.assigned_timestamp for p in info.pending_steps if p.assigned_timestamp}
    runs = {r.run_id: r for r in instance.get_runs(dg.RunsFilter(run_ids=sorted(info.active_run_ids)))} \
        if info.active_run_ids else {}
    holders = []
    for slot in info.claimed_slots:
        run = runs.get(slot.run_id)
        holders.append(Holder(pool, slot.run_id, slot.step_key, assigned.get((slot.run_id, slot.step_key)),
                              run.status.value if run else None, run.job_name if run else None,
                              run.tags.get("dagster/partition") if run else None))
    waiting = [Waiting(pool, p.run_id, p.step_key, p.enqueued_timestamp)
               for p in info.pending_steps if p.assigned_timestamp is None]
    oldest = datetime.max.replace(tzinfo=timezone.utc)
    return PoolState(pool, info.limit, tuple(sorted(holders, key=lambda h: h.since or oldest)),
                     tuple(sorted(waiting, key=lambda w: w.since)))


def pool_states(instance: dg.DagsterInstance) -> list[PoolState]:
    """Every pool the instance knows (limits set, or slots claimed)."""
    return [pool_state(instance, pool) for pool in sorted(instance.event_log_storage.get_concurrency_keys())]


def monitoring_seconds(instance: dg.DagsterInstance) -> int | None:
    """How long after a run ended the daemon's run monitoring frees its slots (at most one poll later)."""
    if not instance.run_monitoring_enabled:
        return None
    settings = instance.run_monitoring_settings
    free_after = settings.get("free_slots_after_run_end_seconds")
    return free_after + settings.get("poll_interval_seconds", 0) if free_after else None


def waiting_message(state: PoolState, step: Waiting, monitoring_s: int | None, now: datetime) -> str:
    """What the waiting step's run log says: which runs hold the slots, since when, and how to free each."""
    held = "; ".join(f"{h.describe(now)}: {h.how_to_free(monitoring_s)}" for h in state.holders)
    return (f"step {step.step_key!r} has waited {_age(step.since, now)} for a slot of pool {state.pool!r} (limit "
            f"{state.limit}, {len(state.holders)} taken). Held by {held}. `assets-pipeline slots` lists every pool's "
            "holders.")


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def pool_slot_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Tells each run whose step waits for a pool slot (the `gpu` pool), at INFO in its own log: which runs hold
    the slots, since when, and how to free them. Once per waiting step and set of holders (cursor: {pool:run:step:
    holders}); requests no runs."""
    from dagster._core.events import EngineEventData

    told = json.loads(context.cursor) if context.cursor else {}
    cursor, reported = {}, []
    now = _now()
    monitoring_s = monitoring_seconds(context.instance)
    for state in pool_states(context.instance):
        holders = ",".join(sorted(f"{h.run_id}/{h.step_key}" for h in state.holders))
        for step in state.waiting:
            if not state.holders or (now - step.since).total_seconds() < REPORT_AFTER_S:
                continue
            key = f"{state.pool}:{step.run_id}:{step.step_key}"
            cursor[key] = holders
            run = context.instance.get_run_by_id(step.run_id)
            if told.get(key) == holders or run is None or run.is_finished:
                continue
            message = waiting_message(state, step, monitoring_s, now)
            metadata = {"pool": state.pool, **{f"held_by_run_{i}": dg.MetadataValue.dagster_run(h.run_id)
                                               for i, h in enumerate(state.holders)},
                        "free_with": "; ".join(h.free_command() for h in state.holders)}
            context.instance.report_engine_event(message, run, step_key=step.step_key,
                                                 engine_event_data=EngineEventData(metadata=metadata))
            context.log.info(f"run {step.run_id}: {message}")
            reported.append(step.run_id)
    return dg.SensorResult(cursor=json.dumps(cursor, sort_keys=True), skip_reason=(
        f"told {len(reported)} waiting run(s) who holds their pool's slots" if reported
        else "no step has waited for a pool slot since the holders last changed"))


def free_run_slots(instance: dg.DagsterInstance, run_id: str, force: bool = False) -> list[Holder]:
    """Free every pool slot ``run_id`` holds (and drop its waiting steps); returns the slots freed. A run that has
    not ended is refused (ValueError saying what to check) unless ``force``: it is then marked failed first, as
    its process is gone, so that nothing of it runs on."""
    holding = [h for state in pool_states(instance) for h in state.holders if h.run_id == run_id]
    run = instance.get_run_by_id(run_id)
    if not holding:
        known = f"run {run_id} is {run.status.value}" if run else f"no run {run_id} is known to this instance"
        raise ValueError(f"{known} and holds no pool slot (`assets-pipeline slots` lists the holders)")
    if run is not None and not run.is_finished:
        if not force:
            raise ValueError(
                f"run {run_id} is {run.status.value}: if its process is gone (killed outright, its machine "
                f"restarted), rerun with --force to mark it failed and free its slots; if it is still working, "
                "wait for it or terminate it (the UI's Terminate)")
        instance.report_run_failed(run, message=(
            f"marked failed by `{FREE} {run_id} --force` (its process was reported gone); its pool slots "
            f"({', '.join(f'{h.pool}: {h.step_key}' for h in holding)}) were freed"))
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    return holding


def resolve_run_id(instance: dg.DagsterInstance, prefix: str) -> str:
    """The holder's run id that ``prefix`` starts (the UI shows the first 8 characters), else ``prefix``."""
    matches = {h.run_id for state in pool_states(instance) for h in state.holders if h.run_id.startswith(prefix)}
    if len(matches) > 1:
        raise ValueError(f"{prefix!r} starts several holders' run ids ({', '.join(sorted(matches))}): give more of it")
    return matches.pop() if matches else prefix


def report(instance: dg.DagsterInstance, pools: list[str] | None = None) -> list[str]:
    """``assets-pipeline slots``: each pool's limit, holders (since when, how to free) and waiting steps."""
    now = _now()
    monitoring_s = monitoring_seconds(instance)
    lines = []
    states = [pool_state(instance, p) for p in pools] if pools else pool_states(instance)
    for state in states:
        lines.append(f"pool {state.pool}: limit {state.limit}, {len(state.holders)} slot(s) taken, "
                     f"{len(state.waiting)} step(s) waiting")
        for h in state.holders:
            lines.append(f"  held by {h.describe(now)}")
            lines.append(f"    {h.how_to_free(monitoring_s)}")
        for w in state.waiting:
            lines.append(f"  waiting: run {w.run_id}, step {w.step_key!r}, since {_when(w.since, now)}")
    return lines or ["no pools: no step has asked for a slot on this instance yet"]
