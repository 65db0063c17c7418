#!/usr/bin/env bash
# The wheels an offline GPU machine lacks to run scripts/gpu_e2e.py (Python 3.12, manylinux x86_64, versions
# pinned in constraints.txt), downloaded into .whl/. The machine already has torch, transformers, peft,
# accelerate and the packages in MACHINE below; installing those again would shadow its torch-compatible builds,
# so only what is missing is carried, found by following every wheel's Requires-Dist (extras skipped).
# Packages the machine has but perhaps too old for what we carry go to .whl/fallback/: `--install` adds each
# one only where the machine's version is older than the carried one.
#
#   bash scripts/device_wheels.sh                          # here, with internet: fills .whl/ (~21 MiB)
#   bash scripts/device_wheels.sh --install /tmp/site      # there, offline: installs into /tmp/site
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=.whl

if [ "${1:-}" = "--install" ]; then
  TARGET=${2:?usage: bash scripts/device_wheels.sh --install TARGET_DIR}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" "$OUT"/*.whl
  for wheel in "$OUT"/fallback/*.whl; do
    [ -e "$wheel" ] || continue
    if "$PY" - "$wheel" <<'PYEOF'
import sys
from importlib import metadata
from pathlib import Path

from packaging.version import Version

name, version = Path(sys.argv[1]).name.split("-")[:2]
try:
    have = metadata.version(name)
except metadata.PackageNotFoundError:
    have = None
older = have is None or Version(have) < Version(version)
print(f"{name}: the machine has {have}, carried {version}: " + ("installing it" if older else "keeping the machine's"))
sys.exit(0 if older else 1)
PYEOF
    then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" "$wheel"
    fi
  done
  echo "installed into $TARGET; now: export PYTHONPATH=$TARGET:\$PWD"
  exit 0
fi

# What the project imports that the machine lacks (their dependencies are found from their metadata).
# torchao: LoRA's base_quantization float8/int8 (bitsandbytes, for nf4, is a ~100 MB wheel: install it on the
# machine's image rather than carry it).
ROOTS="diffusers dagster dagster-pipes dagster-shared open_clip_torch controlnet_aux torchao"
# name==version, not from constraints.txt: huggingface-hub 1.33.0 meets diffusers 0.42 (>=1.32) and the machine's
# transformers 5.17 (<2.0; our pin 2.4.0 needs a newer transformers); typing-extensions 4.16.0 is pydantic
# 2.14's minimum (pure Python, backward compatible by design).
FALLBACK="huggingface-hub==1.33.0 typing-extensions==4.16.0"
# The GPU machine's installed distributions (pip list, names only).
MACHINE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numpy numpyro nvidia-* onnx onnxruntime opencv-python-headless optax opt-einsum packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest python-dateutil pytorch-lightning pyyaml regex requests rich
sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"
mkdir -p "$OUT/fallback"
if [ -d .git/info ] && ! grep -qxF '/.whl/' .git/info/exclude 2>/dev/null; then echo '/.whl/' >> .git/info/exclude; fi

ROOTS="$ROOTS" FALLBACK="$FALLBACK" MACHINE="$MACHINE" OUT="$OUT" "$PY" - <<'PYEOF'
import os, re, subprocess, sys, zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare python3: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement

OUT = Path(os.environ["OUT"])
# The GPU machine's environment, for evaluating Requires-Dist markers.
ENV = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


machine = [norm(m.rstrip("*")) + ("*" if m.endswith("*") else "") for m in os.environ["MACHINE"].split()]
on_machine = lambda n: any(n == m or (m.endswith("*") and n.startswith(m[:-1])) for m in machine)
pins = {norm(l.split("==")[0]): l.split("==")[1].strip()
        for l in Path("constraints.txt").read_text().splitlines() if "==" in l and not l.startswith("#")}
fallback = {norm(s.split("==")[0]): s.split("==")[1] for s in os.environ["FALLBACK"].split()}


def download(name: str, version: str, dest: Path) -> Path:
    def find():
        return next((w for w in dest.glob("*.whl") if norm(w.name.split("-")[0]) == name
                     and w.name.split("-")[1] == version), None)

    if find() is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp",
                        *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), f"{name}=={version}"],
                       check=True)
    return find()


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(l.split(":", 1)[1].strip()) for l in lines if l.startswith("Requires-Dist:")]
    return [r for r in reqs if not r.marker or r.marker.evaluate(ENV)]


carried, todo, ranges = {}, [norm(n) for n in os.environ["ROOTS"].split()], set()
while todo:
    name = todo.pop()
    if name in carried:
        continue
    if name not in pins:
        sys.exit(f"{name} is needed but not pinned in constraints.txt: pin it there first")
    carried[name] = download(name, pins[name], OUT)
    for req in requirements(carried[name]):
        dep = norm(req.name)
        if on_machine(dep):
            if req.specifier:
                ranges.add(f"{dep}{req.specifier}  (for {name})")
        elif dep not in carried:
            todo.append(dep)
extra = {name: download(name, version, OUT / "fallback") for name, version in fallback.items()}

stale = [w for d in (OUT, OUT / "fallback") for w in d.glob("*.whl") if w not in {*carried.values(), *extra.values()}]
for w in stale:
    w.unlink()
bad = []
for name, wheel in {**carried, **extra}.items():
    for req in requirements(wheel):
        dep = norm(req.name)
        version = fallback.get(dep) or pins.get(dep)
        if dep in carried or dep in fallback:
            if req.specifier and not req.specifier.contains(version, prereleases=True):
                bad.append(f"{name} needs {req}, carried {version}")
        elif not on_machine(dep):
            bad.append(f"{name} needs {req}, neither carried nor on the machine")
total = 0
for wheel in sorted([*carried.values(), *extra.values()]):
    total += wheel.stat().st_size
    print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.relative_to(OUT)}")
print(f"{total / 2**20:7.2f} MiB  total: {len(carried)} wheels in {OUT}/, {len(extra)} in {OUT}/fallback/"
      + (f" ({len(stale)} stale removed)" if stale else ""))
print("\nversion ranges on packages the machine has (its versions are not known here):\n  "
      + "\n  ".join(sorted(ranges)))
if bad:
    sys.exit("unsatisfied requirements:\n  " + "\n  ".join(bad))
PYEOF

# Every wheel must install for CPython 3.12 on manylinux x86_64 from .whl/ alone.
for dir in "$OUT" "$OUT/fallback"; do
  "$PY" -m pip install -q --dry-run --ignore-installed --no-index --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --target /tmp/device_wheels_dry_run "$dir"/*.whl
done
echo "dry run: every wheel installs for CPython 3.12, manylinux x86_64, without an index"
