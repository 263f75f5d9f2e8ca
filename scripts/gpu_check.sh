#!/usr/bin/env bash
# The prepared GPU check (issue 18): on one NVIDIA GPU, with nothing but this repository, in
# under 8 minutes, check the CUDA/NCCL path end to end and write one JSON of results.
#
#   bash scripts/gpu_check.sh                    # on the GPU host, from anywhere
#   bash scripts/gpu_check.sh --fetch-wheels [DIR]   # beforehand, where PyPI is reachable
#
# Steps (each under `timeout`, all within GPU_CHECK_BUDGET_S seconds, default 455; every step
# runs even when an earlier one failed, except that nothing runs without a Python with torch):
#   setup          a Python with torch: .venv reused if its torch imports; else a host python3
#                  whose torch is a CUDA build, the packages it lacks (megatron-core, pydantic,
#                  easy-vqa, ...) installed with pip --target into build/gpu_check/site, from the
#                  wheels in GPU_CHECK_WHEELS (default .whl, see --fetch-wheels) when that folder
#                  holds any, else from the index; else `bash scripts/setup.sh` (needs PyPI).
#   make           make -C csrc -j$(nproc)                     (build/csrc/libepruntime_cuda.so)
#   pytest         the GPU tests: tests/test_csrc.py, tests/test_gpu_check.py and the cuda
#                  cases of tests/test_kernels.py (every op against the reference, every dtype)
#   train_alltoall the tiny config on one GPU over NCCL (epruntime.train under torchrun)
#   train_dedup    the same with dispatch.kind=dedup
#   permute        profiling/bench.py permute --device cuda: megatron-unfused, torch, cuda and
#                  compiled triton (TRITON_INTERPRET unset), float32 and bfloat16
#
# Results: ${GPU_CHECK_OUT:-$OUT}/gpu_check.json when either is set, else
# runs/gpu_check/gpu_check.json, rewritten after every step, with each step's log beside it
# (7 files). Scratch (training runs, benchmark JSONs) goes to GPU_CHECK_WORK
# (default runs/gpu_check/work).
#
# Also read: GPU_CHECK_PYTHON (the host Python to try first), GPU_CHECK_TRAIN_STEPS (200),
# GPU_CHECK_PYVER (3.12, --fetch-wheels' target CPython), GPU_CHECK_NO_GPU_OK=1 (skip the GPU
# check: a dry run of the script itself on a CPU host, where the GPU steps fail).
#
# Exit codes: 0 all passed, 1 a check failed, 2 bad usage, 3 no NVIDIA GPU on this host.
set -uo pipefail
export LC_ALL=C

usage() { sed -n '2,32p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

case ${BASH_SOURCE[0]} in */*) HERE=${BASH_SOURCE[0]%/*} ;; *) HERE=. ;; esac
ROOT=$(cd "$HERE/.." && pwd) || exit 2
cd "$ROOT" || exit 2

# Pins of what the GPU image's Python lacks (its torch, numpy, triton, pytest... are used as they
# are); keep them at the versions this project is tested with.
WHEEL_REQS=(megatron-core==0.16.1 easy-vqa==1.0 pydantic==2.14.4 pydantic-core==2.50.5
            annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0)

fetch_wheels() {
  local dir=$1 py=${GPU_CHECK_PYVER:-3.12} pip_py=python3
  [ -x .venv/bin/python ] && pip_py=.venv/bin/python
  mkdir -p "$dir" || return 1
  "$pip_py" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "${WHEEL_REQS[@]}" || return 1
  echo "gpu_check: wheels for CPython $py in $dir:"
  ls -1 "$dir"
}

case ${1:-} in
  "") ;;
  -h|--help) usage; exit 0 ;;
  --fetch-wheels) fetch_wheels "${2:-.whl}"; exit $? ;;
  *) echo "gpu_check: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac

# ---- 1. a GPU, or refuse before touching anything ----------------------------------------------
no_gpu() {
  printf 'gpu_check: error: no NVIDIA GPU found (%s); this script checks the CUDA/NCCL path and runs only on a GPU host\n' "$1" >&2
  exit 3
}
SMI_OUT=""
if [ "${GPU_CHECK_NO_GPU_OK:-}" != 1 ]; then  # GPU_CHECK_NO_GPU_OK=1: dry runs of this script
  command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi -L: command not found"
  if command -v timeout >/dev/null 2>&1; then
    SMI_OUT=$(timeout 30 nvidia-smi -L 2>&1); smi_rc=$?
  else
    SMI_OUT=$(nvidia-smi -L 2>&1); smi_rc=$?
  fi
  smi_first=${SMI_OUT%%$'\n'*}
  [ "$smi_rc" -eq 0 ] || no_gpu "nvidia-smi -L exited $smi_rc${smi_first:+: $smi_first}"
  [[ $SMI_OUT =~ (^|$'\n')GPU\ [0-9]+: ]] ||
    no_gpu "nvidia-smi -L listed no GPU${smi_first:+: $smi_first}"
fi

# ---- bookkeeping -------------------------------------------------------------------------------
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-455}
OUTDIR=${GPU_CHECK_OUT:-${OUT:-runs/gpu_check}}
WORK=${GPU_CHECK_WORK:-runs/gpu_check/work}
mkdir -p "$OUTDIR" "$WORK" || exit 1
OUTDIR=$(cd "$OUTDIR" && pwd) && WORK=$(cd "$WORK" && pwd) || exit 1
STEPS=$WORK/steps.tsv
: >"$STEPS"
printf '%s\n' "$SMI_OUT" >"$WORK/nvidia_smi.txt"
STARTED_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
export ROOT WORK OUTDIR
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # triton compiled for the GPU, never the interpreter
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
NPROC=$(nproc 2>/dev/null || echo 4)
TRAIN_STEPS=${GPU_CHECK_TRAIN_STEPS:-200}

now() { printf '%s' "${EPOCHREALTIME:-$(date +%s.%N)}"; }

# Seconds for the next step: at most $1, leaving $2 for the steps after it.
step_limit() {
  local left=$(( BUDGET - (SECONDS - START) - $2 ))
  if (( left < $1 )); then echo "$left"; else echo "$1"; fi
}

# run_step NAME LIMIT CMD...: CMD under `timeout`, its output in OUTDIR/NAME.log, one line of
# STEPS (name, exit code, start, end, limit, command).
run_step() {
  local name=$1 limit=$2 log=$OUTDIR/$1.log t0 t1 rc
  shift 2
  if (( limit < 5 )); then
    echo "not run: the time budget (GPU_CHECK_BUDGET_S=$BUDGET) is spent" >"$log"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" 124 "$(now)" "$(now)" "$limit" "$*" >>"$STEPS"
    echo "gpu_check: $name: not run, out of time"
    return
  fi
  echo "gpu_check: $name (at most ${limit}s): $*"
  t0=$(now)
  GC_LIMIT=$limit timeout -k 5 "$limit" "$@" >"$log" 2>&1
  rc=$?
  t1=$(now)
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$t0" "$t1" "$limit" "$*" >>"$STEPS"
  echo "gpu_check: $name: exit $rc after $(( SECONDS - START ))s in all"
  write_json >/dev/null
}

# ---- the steps, as functions run by `timeout bash -c NAME` --------------------------------------
gc_setup() {
  local py site=$ROOT/build/gpu_check/site wheels=${GPU_CHECK_WHEELS:-$ROOT/.whl} cand missing
  local -a whl reqs
  read -ra reqs <<<"$WHEEL_REQS_STR"
  write_env() { printf 'PY=%s\nMODE=%s\nSITE=%s\n' "$1" "$2" "$3" >"$WORK/setup.env"; }
  rm -f "$WORK/setup.env" "$WORK/env.json"
  # What epruntime, its tests and the benchmarks import; torch first.
  local probe='import importlib
missing = []
for mod in ("torch", "megatron.core", "pydantic", "yaml", "numpy", "PIL", "prometheus_client",
            "easy_vqa", "tqdm", "rich", "matplotlib", "pytest", "triton", "epruntime"):
    try:
        importlib.import_module(mod)
    except Exception:
        missing.append(mod)
print(" ".join(missing))'
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; then
    echo "setup: reusing .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"
    py=$ROOT/.venv/bin/python
    missing=$(PYTHONPATH=$ROOT "$py" -c "$probe")
    [ -z "$missing" ] || echo "setup: warning: .venv lacks: $missing"
    write_env "$py" venv-reused ""
  else
    [ -x .venv/bin/python ] && echo "setup: .venv/bin/python exists but cannot import torch"
    py=""
    for cand in ${GPU_CHECK_PYTHON:-} python3 python; do
      cand=$(command -v "$cand" 2>/dev/null) || continue
      if "$cand" -c 'import os, sys, torch
sys.exit(torch.version.cuda is None and os.environ.get("GPU_CHECK_NO_GPU_OK") != "1")' 2>/dev/null
      then
        py=$cand
        break
      fi
    done
    if [ -n "$py" ]; then
      echo "setup: host python $py: $("$py" -c 'import sys, torch; print("Python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)')"
      missing=$(PYTHONPATH=$site:$ROOT "$py" -c "$probe")
      if [ -n "$missing" ]; then
        echo "setup: missing: $missing"
        whl=("$wheels"/*.whl)
        if [ -e "${whl[0]}" ]; then
          echo "setup: installing ${#whl[@]} wheels from $wheels into $site"
          "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
            "${whl[@]}"
        else
          echo "setup: no wheels in $wheels: installing ${reqs[*]} from the index"
          "$py" -m pip install -q --no-deps --no-compile --upgrade --retries 0 --timeout 15 \
            --target "$site" "${reqs[@]}"
        fi
        missing=$(PYTHONPATH=$site:$ROOT "$py" -c "$probe")
      fi
      if [ -z "$missing" ]; then
        write_env "$py" host-python "$site"
      else
        echo "setup: host python still lacks: $missing; trying scripts/setup.sh"
      fi
    else
      echo "setup: no python3 here imports a CUDA build of torch; trying scripts/setup.sh"
    fi
    if [ ! -f "$WORK/setup.env" ]; then
      PIP_RETRIES=${PIP_RETRIES:-1} PIP_TIMEOUT=${PIP_TIMEOUT:-30} bash scripts/setup.sh &&
        .venv/bin/python -c 'import torch' && write_env "$ROOT/.venv/bin/python" setup.sh ""
    fi
  fi
  [ -f "$WORK/setup.env" ] || { echo "setup: no Python with torch: nothing else can run"; return 1; }
  # shellcheck disable=SC1091
  . "$WORK/setup.env"
  export PYTHONPATH=${SITE:+$SITE:}$ROOT${PYTHONPATH:+:$PYTHONPATH}
  "$PY" - "$WORK/env.json" <<'PY'
import json, os, platform, sys
import torch
info = {"python": platform.python_version(), "executable": sys.executable,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device_name=p.name, capability=f"{p.major}.{p.minor}",
                memory_gib=round(p.total_memory / 2**30, 1),
                nccl=".".join(map(str, torch.cuda.nccl.version())))
for mod in ("triton", "megatron.core", "pydantic", "numpy"):
    try:
        info[mod.split(".")[0] if mod != "megatron.core" else "megatron_core"] = (
            __import__(mod, fromlist=["__version__"]).__version__)
    except Exception as err:  # recorded, not fatal: the steps say what breaks
        info[mod] = f"not importable: {err!r}"
open(sys.argv[1], "w").write(json.dumps(info, indent=1))
print("setup:", json.dumps(info))
sys.exit(0 if info["cuda_available"] or os.environ.get("GPU_CHECK_NO_GPU_OK") == "1" else 1)
PY
}

gc_make() {
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2
  make -C csrc -j"$NPROC"
}

gc_pytest() {
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_csrc.py tests/test_kernels.py \
    tests/test_gpu_check.py -k "not test_kernels or cuda or combine_is_not_just_any_order"
}

gc_train() {  # $1: alltoall | dedup
  local out=$WORK/train_$1
  rm -rf "$out"
  "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 -m epruntime.train \
    --config launch/configs/tiny-vqa.yaml --set parallel.ep_size=1 --set parallel.backend=nccl \
    --set parallel.timeout_s=60 --set dispatch.kind="$1" --set train.max_steps="$TRAIN_STEPS" \
    --set train.checkpoint_interval="$TRAIN_STEPS" --set train.output_dir="$out" \
    --set train.progress=false --set data.max_eval_items=2000
}

gc_permute() {  # float32 at the default shape, then bfloat16 at a DeepSeek-like hidden size
  local start=$SECONDS left rc rc2=124
  local -a bench=("$PY" profiling/bench.py permute --device cuda
                  --backends "megatron-unfused,torch,cuda,triton,memcpy" --repeats 20 --warmup 3)
  rm -f "$WORK"/permute_*.json
  timeout -k 5 $(( GC_LIMIT / 2 )) "${bench[@]}" --json "$WORK/permute_float32.json"
  rc=$?
  left=$(( GC_LIMIT - (SECONDS - start) - 8 ))
  if (( left >= 5 )); then
    timeout -k 5 "$left" "${bench[@]}" --dtype bfloat16 --tokens 16384 --hidden 4096 \
      --json "$WORK/permute_bfloat16.json"
    rc2=$?
  else
    echo "permute: no time left for the bfloat16 run"
  fi
  (( rc != 0 )) || rc=$rc2
  return "$rc"
}

# ---- the JSON ----------------------------------------------------------------------------------
write_json() {
  local py=${PY:-}
  [ -n "$py" ] || py=$(command -v python3 2>/dev/null) || {
    printf '{"ok": false, "error": "no python to write the results with"}\n' \
      >"$OUTDIR/gpu_check.json"
    return 1
  }
  GC_BUDGET=$BUDGET GC_STARTED=$STARTED_UTC GC_ELAPSED=$(( SECONDS - START )) \
    GC_TRAIN_STEPS=$TRAIN_STEPS "$py" - <<'PY'
import json, os, re, socket, subprocess
from pathlib import Path

work, out = Path(os.environ["WORK"]), Path(os.environ["OUTDIR"])
root = Path(os.environ["ROOT"])


def tail(path, lines=25):
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def error_lines(path, most=12):
    """The log's first lines that name an error (a failed run's cause is rarely in its tail)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    found = [ln[:400] for ln in text.splitlines()
             if re.search(r"error|FAILED|Traceback|timed out|Killed", ln, re.I)
             and not ln.lstrip().startswith("File ") and "Warning" not in ln]
    return found[:most]


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def pytest_highlights(log):
    text = log.read_text(errors="replace") if log.is_file() else ""
    counts = {}
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    if summary:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|"
                                  r"xpassed|warnings?)", summary[-1]):
            counts[what.rstrip("s") if what.startswith(("error", "warning")) else what] = int(n)
    skipped = re.findall(r"^SKIPPED \[\d+\] (.*)$", text, re.M)
    failed = [ln[:400] for ln in re.findall(r"^(?:FAILED|ERROR) .*$", text, re.M)]
    gpu_skips = [s for s in skipped if s.endswith("needs a CUDA device")]
    ok = counts.get("passed", 0) > 0 and not failed and not gpu_skips
    return {"counts": counts, "skipped": skipped, "failed": failed}, ok


def train_highlights(name):
    s = load(work / name / "summary.json")
    if s is None:
        return {"summary": None}, False
    keys = ("steps", "eval_accuracy", "majority_baseline", "final_loss", "eval_loss",
            "tokens_per_s", "prefill_tokens_per_s", "seconds", "world_size", "ep_size",
            "eval_items")
    return {"summary": {k: s.get(k) for k in keys}}, s.get("eval_accuracy") is not None


def permute_highlights():
    runs, ok = {}, True
    for dtype in ("float32", "bfloat16"):
        r = load(work / f"permute_{dtype}.json")
        if r is None:
            runs[dtype], ok = None, False
            continue
        rows = [{k: row.get(k) for k in ("variant", "malloc", "seconds", "gbytes_per_s", "rows",
                                          "bytes", "layout_seconds", "matches_reference")}
                for row in r["rows"]]
        by = {row["variant"]: row for row in rows}
        ok &= all(by.get(v, {}).get("matches_reference") is True for v in ("cuda", "triton"))
        p = r["params"]
        runs[dtype] = {"params": {k: p.get(k) for k in ("device", "dtype", "tokens", "hidden",
                                                        "experts", "topk", "ranks", "repeats")},
                       "rows": rows, "ratios": r["ratios"],
                       "skips": [n for n in r["notes"] if "skipped" in n]}
    return {"runs": runs}, ok


steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, t0, t1, limit, cmd = line.split("\t", 5)
    rc, log = int(rc), out / f"{name}.log"
    step = {"name": name, "command": cmd, "exit_code": rc,
            "seconds": round(float(t1) - float(t0), 2), "timeout_s": int(limit),
            "timed_out": rc in (124, 137), "log": log.name}
    ok = rc == 0
    if name == "setup":
        env = {}
        if (work / "setup.env").is_file():
            env = dict(ln.split("=", 1) for ln in (work / "setup.env").read_text().splitlines()
                       if "=" in ln)
        step["highlights"] = {"mode": env.get("MODE"), "python": env.get("PY"),
                              "site": env.get("SITE") or None}
    elif name == "make":
        lib = root / "build" / "csrc" / "libepruntime_cuda.so"
        step["highlights"] = {"library": str(lib.relative_to(root)) if lib.is_file() else None,
                              "library_bytes": lib.stat().st_size if lib.is_file() else None}
        ok &= lib.is_file()
    elif name == "pytest":
        step["highlights"], good = pytest_highlights(log)
        ok &= good
    elif name.startswith("train_"):
        step["highlights"], good = train_highlights(name)
        ok &= good
    elif name == "permute":
        step["highlights"], good = permute_highlights()
        ok &= good
    step["ok"] = bool(ok)
    if not ok:
        step["error_lines"] = error_lines(log)
        step["log_tail"] = tail(log)
    steps.append(step)

env = load(work / "env.json") or {}
git = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                     text=True)
dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                       capture_output=True, text=True)
planned = ["setup", "make", "pytest", "train_alltoall", "train_dedup", "permute"]
done = [s["name"] for s in steps]
result = {
    "ok": len(steps) == len(planned) and all(s["ok"] for s in steps),
    "failed_steps": [s["name"] for s in steps if not s["ok"]],
    "not_run": [n for n in planned if n not in done],
    "started_utc": os.environ["GC_STARTED"],
    "elapsed_s": int(os.environ["GC_ELAPSED"]),
    "budget_s": int(os.environ["GC_BUDGET"]),
    "host": socket.gethostname(),
    "git_commit": git.stdout.strip() or None,
    "git_dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None,
    "nvidia_smi_L": (work / "nvidia_smi.txt").read_text().strip().splitlines(),
    "python": env.get("python"),
    "torch": env.get("torch"),
    "torch_cuda": env.get("torch_cuda"),
    "env": env,
    "train_steps": int(os.environ["GC_TRAIN_STEPS"]),
    "steps": steps,
}
(out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
for s in steps:
    h = s.get("highlights", {})
    extra = ""
    if s["name"] == "pytest":
        extra = " ".join(f"{k}={v}" for k, v in h.get("counts", {}).items())
    elif s["name"].startswith("train_") and h.get("summary"):
        sm = h["summary"]
        extra = (f"eval_accuracy={sm['eval_accuracy']} tokens_per_s={sm['tokens_per_s']:.0f} "
                 f"seconds={sm['seconds']:.1f}")
    elif s["name"] == "permute":
        for dtype, run in h.get("runs", {}).items():
            if run:
                extra += f" [{dtype}] " + " ".join(
                    f"{r['variant']}={r['gbytes_per_s']:.1f}GB/s" for r in run["rows"])
    print(f"{s['name']:15s} {'ok  ' if s['ok'] else 'FAIL'} exit={s['exit_code']:<4d} "
          f"{s['seconds']:7.1f}s {extra.strip()}")
print(("gpu_check: all passed" if result["ok"] else
       "gpu_check: FAILED: " + ", ".join(result["failed_steps"] + result["not_run"]))
      + f" ({result['elapsed_s']}s) -> {out / 'gpu_check.json'}")
raise SystemExit(0 if result["ok"] else 1)
PY
}

export -f gc_setup gc_make gc_pytest gc_train gc_permute
export NPROC TRAIN_STEPS
WHEEL_REQS_STR="${WHEEL_REQS[*]}"
export WHEEL_REQS_STR

# ---- 2. setup ----------------------------------------------------------------------------------
run_step setup "$(step_limit 180 270)" bash -c gc_setup
if [ ! -f "$WORK/setup.env" ]; then
  echo "gpu_check: setup found no Python with torch: nothing else can run" >&2
  write_json
  exit 1
fi
while IFS='=' read -r key value; do
  case $key in PY) PY=$value ;; SITE) SITE=$value ;; esac
done <"$WORK/setup.env"
export PY
export PYTHONPATH=${SITE:+$SITE:}$ROOT${PYTHONPATH:+:$PYTHONPATH}

# ---- 3-6. build, GPU tests, training over NCCL, permute benchmark -------------------------------
run_step make "$(step_limit 90 240)" bash -c gc_make
run_step pytest "$(step_limit 200 120)" bash -c gc_pytest
run_step train_alltoall "$(step_limit 100 75)" bash -c 'gc_train alltoall'
run_step train_dedup "$(step_limit 100 30)" bash -c 'gc_train dedup'
run_step permute "$(step_limit 120 0)" bash -c gc_permute

# ---- 7. the JSON -------------------------------------------------------------------------------
write_json
