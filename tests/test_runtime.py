"""training/runtime/: the speed levers of the training loop. Settings resolve per device, the optimized loop learns
what the plain loop learns, compiled kernels persist across processes, the micro-batch probe keeps the effective
batch, the step timer measures what it says, and the trainer resource's settings are a typed Dagster Config."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from assets_pipeline.training.runtime.memory import divisors_descending
from assets_pipeline.training.runtime.settings import Performance, compile_mode, plan

PLAIN = {"compile": "none", "channels_last": "off", "fused_optimizer": "off", "micro_batch": "configured"}


def resolve(perf, cuda, steps, accumulation, compile_cache_warm=lambda mode: False, processes=1, shapes=1):
    """The run's settings as the Runtime decides them: the plan, and what compiles once the micro-batch is known."""
    return SimpleNamespace(**dataclasses.asdict(plan(perf, cuda, accumulation)),
                           compile=compile_mode(perf, cuda, steps, accumulation, compile_cache_warm, processes, shapes))


def test_auto_is_fast_on_cuda_and_plain_on_cpu():
    perf = Performance()
    cpu = resolve(perf, cuda=False, steps=5000, accumulation=4, compile_cache_warm=lambda mode: True)
    assert (cpu.compile, cpu.channels_last, cpu.fused_optimizer, cpu.probe_micro_batch) == ("none", False, False, False)
    assert not cpu.cudnn_benchmark
    long_run = resolve(perf, cuda=True, steps=perf.compile_min_steps, accumulation=4)
    assert (long_run.compile, long_run.channels_last, long_run.fused_optimizer) == ("full", True, True)
    # cuDNN's algorithm trials: only when asked for, and never on a CPU, where there is no cuDNN to ask.
    assert not long_run.cudnn_benchmark
    on = Performance(cudnn_benchmark="on")
    assert resolve(on, cuda=True, steps=10, accumulation=1).cudnn_benchmark
    assert not resolve(Performance(cudnn_benchmark="on"), cuda=False, steps=10, accumulation=1).cudnn_benchmark
    assert long_run.probe_micro_batch
    assert resolve(Performance(compile="full"), cuda=False, steps=1, accumulation=1).compile == "full"
    assert resolve(Performance(compile="regional"), cuda=True, steps=10**6, accumulation=1).compile == "regional"


def test_auto_compiles_whole_networks_in_one_process_and_blocks_in_several():
    """A whole compiled backward hands DDP every gradient at once at its end (no all-reduce overlaps it), so
    several processes compile block by block; one process compiles the whole networks, the faster step."""
    perf = Performance()
    long = perf.compile_min_steps
    assert resolve(perf, cuda=True, steps=long, accumulation=1, processes=1).compile == "full"
    assert resolve(perf, cuda=True, steps=long, accumulation=1, processes=2).compile == "regional"
    assert resolve(perf, cuda=True, steps=long - 1, accumulation=1, processes=2).compile == "none"


def test_auto_compiles_a_short_run_only_from_persisted_kernels():
    """A cold compile pays for itself only in a long run; persisted kernels make it cheap, though not free. Each
    mode has its own kernels: a warm mode is used, the one the process count prefers first."""
    perf = Performance()
    mid = perf.compile_min_steps_warm
    assert mid < perf.compile_min_steps

    def warm(*modes):
        return lambda mode: mode in modes

    assert resolve(perf, cuda=True, steps=mid, accumulation=1).compile == "none"
    assert resolve(perf, cuda=True, steps=mid, accumulation=1, compile_cache_warm=warm("full")).compile == "full"
    assert resolve(perf, cuda=True, steps=mid, accumulation=1,
                   compile_cache_warm=warm("regional")).compile == "regional"
    assert resolve(perf, cuda=True, steps=mid - 1, accumulation=1, compile_cache_warm=warm("full")).compile == "none"
    both = warm("full", "regional")
    assert resolve(perf, cuda=True, steps=mid, accumulation=1, compile_cache_warm=both).compile == "full"
    assert resolve(perf, cuda=True, steps=mid, accumulation=1, compile_cache_warm=both,
                   processes=4).compile == "regional"
    assert resolve(perf, cuda=True, steps=mid, accumulation=1, compile_cache_warm=warm("full"),
                   processes=4).compile == "full"  # warm kernels of the other mode beat compiling cold
    assert not resolve(perf, cuda=True, steps=mid, accumulation=1, compile_cache_warm=both).probe_micro_batch


def test_auto_counts_the_compile_thresholds_per_bucket_shape():
    """Every bucket's batch shape compiles (or loads) its own graphs: three buckets cost three warm-ups."""
    perf = Performance()
    cold, warm = perf.compile_min_steps, perf.compile_min_steps_warm
    assert resolve(perf, cuda=True, steps=3 * cold - 1, accumulation=1, shapes=3).compile == "none"
    assert resolve(perf, cuda=True, steps=3 * cold, accumulation=1, shapes=3).compile == "full"
    full_warm = lambda mode: mode == "full"  # noqa: E731
    assert resolve(perf, cuda=True, steps=3 * warm - 1, accumulation=1, compile_cache_warm=full_warm,
                   shapes=3).compile == "none"
    assert resolve(perf, cuda=True, steps=3 * warm, accumulation=1, compile_cache_warm=full_warm,
                   shapes=3).compile == "full"


def test_auto_counts_passes_not_optimizer_steps():
    """Compiling speeds up each forward and backward pass: a step of 4 accumulated micro-batches is 4 of them."""
    perf = Performance()
    cold = perf.compile_min_steps
    assert resolve(perf, cuda=True, steps=cold // 4, accumulation=4).compile == "full"
    assert resolve(perf, cuda=True, steps=cold // 4 - 1, accumulation=4).compile == "none"


def test_the_plan_sets_cudnns_algorithm_trials_for_the_process():
    import torch

    from assets_pipeline.training.runtime.backends import configure_backends

    before = torch.backends.cudnn.benchmark
    try:
        for wanted in (True, False):
            configure_backends(cuda=False, cudnn_benchmark=wanted)
            assert torch.backends.cudnn.benchmark is wanted
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("bad, match", [({"compile": "fast"}, "performance.compile"),
                                        ({"channels_last": True}, "performance.channels_last"),
                                        ({"micro_batch": "max"}, "performance.micro_batch"),
                                        ({"adapter_input_casts": "yes"}, "performance.adapter_input_casts"),
                                        ({"cudnn_benchmark": True}, "performance.cudnn_benchmark must be one of"),
                                        # removed (it did not run on the GPU image's torch): now an unknown key
                                        ({"precompiled_regions": "on"}, "unknown performance settings"),
                                        ({"profile_steps": -1}, "performance.profile_steps must be >= 0, got -1"),
                                        ({"log_evry": 5}, "unknown performance settings")])
def test_bad_settings_name_the_setting(bad, match):
    with pytest.raises(ValueError, match=match):
        Performance.from_dict(bad)


def test_micro_batch_candidates_divide_the_effective_batch():
    assert divisors_descending(12) == [12, 6, 4, 3, 2, 1]
    assert divisors_descending(1) == [1]


@pytest.fixture(scope="module")
def lora_jobs(tmp_path_factory, built_models):
    """The demo concept's dataset half, and a job factory for it (no Dagster run needed for training)."""
    from assets_pipeline.assets.common import spec_from_snapshot
    from assets_pipeline.demo_data import DEMO_CONCEPT
    from tests.conftest import build_dataset_half

    root = tmp_path_factory.mktemp("speed")
    storage = build_dataset_half(root, built_models)
    artifacts = storage.artifact_path()
    spec = spec_from_snapshot(storage, DEMO_CONCEPT)

    def make(method: str, name: str, performance: dict, **overrides):
        from helpers import plan_for
        from assets_pipeline.resources import BaseModelResource, ClipScorerResource, TrainerLauncher

        job = plan_for(storage, BaseModelResource().resolve(artifacts), spec, method, run_id=name,
                       input_versions={}, trainer=TrainerLauncher(device="cpu", performance=performance),
                       clip_scorer=ClipScorerResource(), overrides={"checkpointing_steps": 1000, **overrides})
        return dataclasses.replace(job, output_dir=str(root / name / "out"), checkpoint_dir=str(root / name / "ckpt"),
                                   cache_dir=str(root / name / "cache"))

    return make


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dreambooth", "textual_inversion", "controlnet"])
def test_optimized_loop_gives_the_plain_loops_losses(lora_jobs, method):
    """Compiled networks, by block and whole (graph capture and AOT autograd; the aot_eager backend keeps this
    quick on a CPU), channels_last, fused AdamW, data on the device and one log sync per 3 steps vs. the plain
    settings. Whole-network compilation (~30 s a run here) is checked where the compiled networks differ: LoRA's
    adapted U-Net, textual inversion's text encoder, ControlNet's two networks; DreamBooth trains the same U-Net
    graph with every weight trained."""
    from assets_pipeline.training.loop import train

    overrides = {"max_train_steps": 6, "train_batch_size": 2}
    plain = train(lora_jobs(method, f"{method}-plain", PLAIN, **overrides))
    assert plain.stats["compile"] == "none" and not plain.stats["fused_optimizer"]
    assert "compile_stats" not in plain.stats
    assert plain.losses[0] != plain.losses[1]  # the steps really differ (not one loss repeated)
    for mode in ("regional",) if method == "dreambooth" else ("regional", "full"):
        fast = train(lora_jobs(method, f"{method}-{mode}", {"compile": mode, "compile_backend": "aot_eager",
                                                            "channels_last": "on", "fused_optimizer": "on",
                                                            "log_every": 3}, **overrides))
        assert fast.stats["compile"] == mode and fast.stats["channels_last"] and fast.stats["fused_optimizer"]
        compiled = fast.stats["compile_stats"]  # this run's graphs (per block shape or network, and bucket)
        assert compiled["graphs"] >= 2 and compiled["dynamo_s"] > 0, mode
        assert len(plain.losses) == len(fast.losses) == 6
        assert fast.losses == pytest.approx(plain.losses, rel=2e-3, abs=1e-5), mode
        assert fast.stats["images_per_s"] > 0 and fast.stats["warmup_s"] > 0
        # The one-off cost is the first step plus writing the kernels; the steady rate starts after both.
        assert fast.stats["compile_cache"] == "cold"
        assert 0 <= fast.stats["compile_cache_io_s"] <= fast.stats["warmup_s"]


@pytest.mark.slow
def test_auto_looks_up_each_modes_kernels_under_the_key_a_compiled_run_saves(lora_jobs, monkeypatch):
    """The trainer asks ``auto_compile`` whether a mode is warm under the key a run compiled in that mode
    persisted its kernels to, and passes the run's passes, process count and bucket shapes."""
    from assets_pipeline.training.loop import train
    from assets_pipeline.training.runtime import compilation, settings

    saved = []

    def save(self):  # aot_eager leaves no kernels to persist: write what Inductor's would stand for
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"kernels")
        saved.append(self.path)
        return 7

    monkeypatch.setattr(compilation.CompileCache, "save", save)
    overrides = {"max_train_steps": 2, "train_batch_size": 2}
    compiled = lora_jobs("lora", "keyed-regional", {"compile": "regional", "compile_backend": "aot_eager"},
                         **overrides)
    assert train(compiled).stats["compile"] == "regional" and saved
    asked = []

    def auto(perf, cuda, passes, warm, processes, shapes):
        asked.append({"cuda": cuda, "passes": passes, "processes": processes, "shapes": shapes,
                      "regional": warm("regional"), "full": warm("full")})
        return "none"

    monkeypatch.setattr(settings, "auto_compile", auto)
    later = dataclasses.replace(lora_jobs("lora", "keyed-auto", {"compile": "auto"}, **overrides),
                                cache_dir=compiled.cache_dir)
    assert train(later).stats["compile"] == "none"
    assert asked[-1] == {"cuda": False, "passes": 2, "processes": 1, "shapes": 3,  # the demo concept's 3 buckets
                         "regional": True, "full": False}


def test_peft_input_casts_are_skipped_under_autocast_with_the_same_numbers():
    """Under bf16 autocast an fp32 adapter's matmul runs in bf16 anyway: without PEFT's cast of the input the
    forward and backward are bit-identical. DoRA layers keep the cast; restoring turns every skipped one back."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from torch.utils._python_dispatch import TorchDispatchMode

    from assets_pipeline.training.runtime.backends import skip_adapter_input_casts

    def layers(model):
        return [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]

    class Casts(TorchDispatchMode):  # dtype conversions dispatched, forward and backward
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket.__name__ == "_to_copy"
            return func(*args, **(kwargs or {}))

    def step(model):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        with Casts() as casts:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            out.float().square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return out, grads, casts.count

    # a frozen bf16 layer (Sequential's "0") with a LoRA, and one with a DoRA; fp32 adapter weights, B not zero
    lora = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], init_lora_weights="gaussian"),
                                   torch.nn.Sequential(torch.nn.Linear(16, 16)).requires_grad_(False))
    dora = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], use_dora=True),
                                   torch.nn.Sequential(torch.nn.Linear(16, 16)).requires_grad_(False))
    for model in (lora, dora):
        model.to(torch.bfloat16)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(2))
    kept_out, kept_grads, kept_casts = step(lora)
    restore = skip_adapter_input_casts([lora, dora])
    assert [m.cast_input_dtype_enabled for m in layers(lora)] == [False]
    assert [m.cast_input_dtype_enabled for m in layers(dora)] == [True]
    skipped_out, skipped_grads, skipped_casts = step(lora)
    assert skipped_casts < kept_casts  # the round trip is gone: its cast forward and its cast backward
    assert skipped_out.dtype == kept_out.dtype == torch.bfloat16
    assert torch.equal(skipped_out, kept_out)
    assert all(torch.equal(a, b) for a, b in zip(skipped_grads, kept_grads)) and len(kept_grads) == 2
    restore()
    assert all(m.cast_input_dtype_enabled for m in layers(lora) + layers(dora))


@pytest.mark.slow
def test_the_loop_without_peft_input_casts_learns_the_same_under_bf16(lora_jobs):
    """The whole loop under bf16 mixed precision (accelerate's autocast, on the CPU here): skipping PEFT's input
    casts (the default) gives the losses of keeping them, bit for bit, and leaves the trained U-Net as PEFT made
    it."""
    from accelerate.state import AcceleratorState

    from assets_pipeline.training.loop import train

    def run(name: str, casts: str):
        job = lora_jobs("lora", name, {**PLAIN, "adapter_input_casts": casts}, max_train_steps=3, train_batch_size=2)
        return train(dataclasses.replace(job, mixed_precision="bf16"))

    # accelerate keeps one precision per process (a trainer process trains once); this module's other trainings
    # ran in fp32, so its state is reset around these two, as accelerate's own tests do.
    AcceleratorState._reset_state()
    try:
        kept, skipped = run("casts-kept", "on"), run("casts-skipped", "auto")
    finally:
        AcceleratorState._reset_state()
    assert kept.stats["precision"] == skipped.stats["precision"] == "bf16"
    assert kept.stats["adapter_input_casts"] and not skipped.stats["adapter_input_casts"]
    assert len(kept.losses) == 3 and kept.losses[0] != kept.losses[1]
    assert skipped.losses == kept.losses
    adapted = [m for m in skipped.models.denoiser.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert adapted and all(m.cast_input_dtype_enabled for m in adapted)


@pytest.mark.slow
def test_compiled_kernels_persist_and_the_next_process_starts_warm(tmp_path):
    """torch.compiler's cache artifacts saved by one process make the next one (fresh local Inductor cache)
    load instead of compile."""
    script = textwrap.dedent("""
        import json, sys, time, torch
        from assets_pipeline.training.runtime.compilation import CompileCache, compile_module
        from torch._dynamo.utils import counters
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        net.compile(backend="inductor", dynamic=False)
        cache = CompileCache(sys.argv[1], "key")
        warm = cache.load()
        t = time.perf_counter()
        net(torch.randn(4, 16)).sum().backward()
        print(json.dumps({"warm": warm, "s": time.perf_counter() - t, "saved": 0 if warm else cache.save(),
                          "hits": counters["inductor"]["fxgraph_cache_hit"]}))
    """)
    runs = []
    for i in range(2):
        env = {**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{i}"),
               "TRITON_CACHE_DIR": str(tmp_path / f"triton{i}")}
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store")], check=True,
                             capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert not first["warm"] and first["saved"] > 0 and first["hits"] == 0
    assert second["warm"] and second["hits"] > 0, "the second process compiled again instead of loading"
    assert len(list((tmp_path / "store" / "compile").glob("*.bin"))) == 1


def test_a_corrupt_compile_cache_is_a_miss_not_a_failure(tmp_path, caplog):
    from assets_pipeline.training.runtime.compilation import CompileCache

    cache = CompileCache(str(tmp_path), "k")
    cache.path.parent.mkdir(parents=True)
    cache.path.write_bytes(b"not a cache")
    assert cache.warm and cache.load() is False
    assert str(cache.path) in caplog.text


@pytest.mark.gpu
def test_micro_batch_probe_keeps_the_effective_batch_and_is_cached(lora_jobs):
    from assets_pipeline.training.loop import train

    job = lora_jobs("lora", "probe", {"compile": "none"}, max_train_steps=2, train_batch_size=1,
                    gradient_accumulation_steps=4)
    job = dataclasses.replace(job, device="cuda")
    first = train(job)
    micro, accum = first.stats["micro_batch"], first.stats["gradient_accumulation"]
    assert micro * accum == 4 and micro == 4  # the tiny model fits 4 at once on any card
    cached = list((Path(job.cache_dir) / "micro_batch").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["micro_batch"] == 4


def test_the_timer_times_the_first_step_apart_and_leaves_validations_out_of_the_steady_rate(monkeypatch):
    """The first step (compilation) and the kernels' I/O are the warm-up; the steady rate is the steps after it,
    validations left out, up to the profiled window."""
    from assets_pipeline.training.runtime import timer as timer_mod

    now = [0.0]
    monkeypatch.setattr(timer_mod, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    messages = []
    timer = timer_mod.StepTimer(start=0, steps=5, cuda=False, progress=messages.append)
    io = []

    def first_step(seconds):
        io.append(seconds)
        return 3.0  # reading and writing persisted kernels

    for step, end in zip(range(5), (10.0, 12.0, 19.0, 21.0, 23.0)):
        timer.before(step)
        if step == 2:  # a validation after step 2, 5 s long
            with timer.paused():
                now[0] = 17.0
        now[0] = end
        timer.after(step + 1, 0.5, first_step)
        if step + 1 == 3:
            assert timer.eta(3) == ", ETA 0m09s"  # (19 - 10) s for 2 steady steps, 2 steps to go
    timer.stop()
    assert io == [10.0] and timer.eta(5) == "" and not messages
    # steady: 23 - 10 - 5 s of validation for the 4 steps after the first, 4 images each
    assert timer.stats(images_per_step=4) == {"images_per_s": 2.0, "warmup_s": 13.0, "train_s": 23.0}

    short = timer_mod.StepTimer(start=0, steps=3, cuda=False, profile_steps=2, record=False,
                                progress=messages.append)
    assert short.profile_from is None and "profile_steps = 2 needs 4 steps to go" in messages[0]
    profiled = timer_mod.StepTimer(start=0, steps=5, cuda=False, profile_steps=2, record=False)
    assert profiled.profile_from == 3 and profiled.profiler is None  # another process records the trace


def test_the_trainer_resources_performance_is_a_config_with_each_settings_help():
    """The launchpad shows each key with the dataclass's own help (no second copy to drift) and refuses unknown
    keys; Python keeps taking a dict; the dataclass's checks still run before a trainer starts."""
    import dagster as dg

    from assets_pipeline.resources import TrainerLauncher

    schema = TrainerLauncher.to_config_schema().as_field().config_type.fields["performance"].config_type.fields
    assert {f.name: f.metadata["help"] for f in dataclasses.fields(Performance)} == {
        name: field.description for name, field in schema.items()}
    assert TrainerLauncher(performance={"compile": "full", "log_every": 50}).performance_settings() == Performance(
        compile="full", log_every=50)
    assert TrainerLauncher().performance_settings() == Performance()
    with pytest.raises(ValueError, match="performance.compile must be one of"):
        TrainerLauncher(performance={"compile": "fast"}).performance_settings()

    @dg.asset(required_resource_keys={"trainer"})
    def speed(context) -> int:
        return context.resources.trainer.performance_settings().log_every

    result = dg.materialize([speed], resources={"trainer": TrainerLauncher()},
                            run_config={"resources": {"trainer": {"config": {"performance": {"log_every": 7}}}}})
    assert result.output_for_node("speed") == 7
    with pytest.raises(dg.DagsterInvalidConfigError, match='unexpected config entry "precompiled_regions"'):
        dg.materialize([speed], resources={"trainer": TrainerLauncher()},
                       run_config={"resources": {"trainer": {"config": {
                           "performance": {"precompiled_regions": "on"}}}}})
