#!/usr/bin/env bash
# One-command device check, in two halves.
#
#   scripts/device-check.sh build        # here (Rust toolchain): dist/llama-pro.gz, stripped, --features cuda,wgpu
#   scripts/device-check.sh run          # on the GPU machine, from the repository root (no Rust, no network)
#   scripts/device-check.sh run --here   # the steps a CPU-only machine can run (cpu and wgpu/lavapipe)
#
# `run` executes, each with its own timeout and within a total time budget (BUDGET_S, default 540 s),
# in order of importance:
#   info                  nvidia-smi, driver, torch/transformers versions, the binary's build
#   selftest-cuda         llama-pro selftest --device cuda (golden parity: logits, KV cache, train step, identity)
#   compare-1b-pro-2048   benches/compare_torch.py --device cuda: `bench` 1b pro bf16 seq 2048 and the PyTorch
#                         twin (transformers + sdpa/flash + fused AdamW, bf16 autocast) on the same GPU, with the ratio
#   bench-7b-pro-4096     llama2-7b-pro (Llama-2-7B 32 -> 40 blocks) pro bf16 seq 4096: peak memory vs the planner
#   bench-1b-full-2048    1b full fine-tuning bf16 seq 2048
#   selftest-wgpu         llama-pro selftest --device wgpu
#   dp-cuda               scripts/dp-check.sh: two data-parallel workers on cuda:0 = one worker with their batch
#   bench-1b-{pro,full}-{2048,4096}[-ck]   the remaining 1b cases, activation checkpointing off and on
# Every step writes its JSON and log under $OUT/device-check/, and after every step the whole report is
# (re)written to $OUT/device-report.json (OUT defaults to ./device-check-out), so a run cut short keeps what
# it measured. A step that fails or times out is recorded and the next one runs.
#
# Environment: LLAMA_PRO_BIN (default: dist/llama-pro.gz unpacked to $OUT/bin), OUT, BUDGET_S (total seconds), STEPS/WARMUP (timed and
# warm-up steps of each bench, default 5/2), PYTHON (default python3), ONLY (space-separated step names to run).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
cmd=${1:-}
shift || true

build() {
    local target=${CARGO_TARGET_DIR_GPU:-$HOME/.cache/llama-pro-target-gpu}
    [ "$(uname -m)" = x86_64 ] || { echo "build on x86-64 (the GPU machine is x86-64)" >&2; exit 1; }
    local commit
    commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="$commit+dirty"; fi
    echo "building llama-pro $commit with --features cuda,wgpu into $target (slow on 2 cores)"
    LLAMA_PRO_GIT_COMMIT=$commit CARGO_TARGET_DIR=$target \
        cargo build --release --features cuda,wgpu --bin llama-pro || exit 1
    package "$commit"
}

# package [COMMIT]: dist/ from the last build in the GPU target directory (no compilation).
package() {
    local target=${CARGO_TARGET_DIR_GPU:-$HOME/.cache/llama-pro-target-gpu}
    local commit=${1:-"$(git rev-parse HEAD 2>/dev/null || echo unknown) (packaged later; see the binary's --json reports)"}
    mkdir -p dist
    rm -f dist/llama-pro
    local bin=$target/release/llama-pro-stripped
    cp "$target/release/llama-pro" "$bin" || exit 1
    command -v strip >/dev/null && strip "$bin"
    # gzip: the stripped binary is ~110 MB (three backends), ~26 MB compressed; `run` unpacks it.
    gzip -9 -c "$bin" > dist/llama-pro.gz.tmp && mv dist/llama-pro.gz.tmp dist/llama-pro.gz
    local glibc
    glibc=$(objdump -T "$bin" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
    {
        echo "commit: $commit"
        echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
        echo "rustc: $(rustc -V)"
        echo "features: cuda,wgpu (release, stripped, gzip -9)"
        echo "needs: ${glibc:-unknown} or newer; the NVIDIA driver (libcuda) and NVRTC at run time"
        echo "sha256: $(sha256sum "$bin" | cut -d' ' -f1)"
        echo "size: $(stat -c %s "$bin") bytes ($(stat -c %s dist/llama-pro.gz) compressed)"
    } > dist/BUILD.txt
    cat dist/BUILD.txt
    "$bin" --version
    echo "carry dist/ (git-ignored: llama-pro.gz, BUILD.txt) with the repository to the GPU machine, then:"
    echo "  scripts/device-check.sh run"
}

# The binary to run: LLAMA_PRO_BIN, else dist/llama-pro.gz unpacked (once per checksum) under $OUT.
unpack() {
    if [ -n "${LLAMA_PRO_BIN:-}" ]; then echo "$LLAMA_PRO_BIN"; return; fi
    [ -f "$ROOT/dist/llama-pro.gz" ] || { echo "no dist/llama-pro.gz (scripts/device-check.sh build, then carry dist/)" >&2; return 1; }
    local want bin
    want=$(sed -n 's/^sha256: //p' "$ROOT/dist/BUILD.txt" 2>/dev/null)
    bin=$OUT/bin/llama-pro
    mkdir -p "$OUT/bin"
    if [ ! -x "$bin" ] || { [ -n "$want" ] && [ "$(sha256sum "$bin" | cut -d' ' -f1)" != "$want" ]; }; then
        gzip -dc "$ROOT/dist/llama-pro.gz" > "$bin.tmp" && chmod +x "$bin.tmp" && mv "$bin.tmp" "$bin" || return 1
    fi
    echo "$bin"
}

run() {
    local here=0
    [ "${1:-}" = "--here" ] && here=1
    OUT=${OUT:-$ROOT/device-check-out}
    R=$OUT/device-check
    PY=${PYTHON:-python3}
    BUDGET=${BUDGET_S:-540}
    STEPS=${STEPS:-5}
    WARMUP=${WARMUP:-2}
    START=$(date +%s)
    mkdir -p "$R"
    : > "$R/steps.tsv"
    BIN=$(unpack) || exit 1
    [ -x "$BIN" ] || { echo "no binary at $BIN" >&2; exit 1; }
    export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
    if [ $here = 1 ]; then
        # lavapipe: shader compilation and autotuning are slow on a CPU.
        export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
    fi
    echo "device check: $BIN, report in $OUT/device-report.json, budget ${BUDGET}s"

    # step NAME TIMEOUT_S CMD...: run CMD with a timeout capped by what is left of the budget.
    step() {
        local name=$1 limit=$2
        shift 2
        if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
        local now left t rc
        now=$(date +%s)
        left=$((BUDGET - (now - START)))
        local line
        line=$(printf '%s' "$*" | tr '\n\t' '  ' | tr -s ' ')
        if [ "$left" -lt 20 ]; then
            printf '%s\t%s\t%s\t%s\t%s\n' "$name" skipped 0 "budget spent" "$line" >> "$R/steps.tsv"
            echo "== $name: skipped (budget spent)"
            assemble
            return
        fi
        t=$((limit < left ? limit : left))
        echo "== $name (timeout ${t}s): $*"
        timeout -k 10 "$t" "$@" > "$R/$name.log" 2>&1
        rc=$?
        local secs=$(($(date +%s) - now))
        local status=ok
        if [ $rc = 124 ] || [ $rc = 137 ]; then status=timeout; elif [ $rc != 0 ]; then status=failed; fi
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$rc" "$line" >> "$R/steps.tsv"
        tail -n 12 "$R/$name.log" | sed 's/^/   /'
        echo "== $name: $status (exit $rc, ${secs}s)"
        assemble
    }

    bench() { # bench NAME TIMEOUT DEVICE PRESET MODE SEQ [extra flags...]
        local name=$1 limit=$2 dev=$3 preset=$4 mode=$5 seq=$6
        shift 6
        local sw=(--steps "$STEPS" --warmup "$WARMUP")
        for x in "$@"; do [ "$x" = --steps ] && sw=(); done # the extra flags give both
        step "$name" "$limit" "$BIN" bench --device "$dev" --preset "$preset" --mode "$mode" --seq "$seq" \
            "${sw[@]}" --json "$R/$name.json" "$@"
    }

    step info 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo 'no nvidia-smi';
        $PY -c 'import torch, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), \"transformers\", transformers.__version__)' 2>&1 || echo 'no torch';
        '$BIN' --version; cat '$ROOT/dist/BUILD.txt' 2>/dev/null; uname -a; nproc; free -g | head -2"
    if [ $here = 1 ]; then
        step selftest-cpu 120 "$BIN" selftest --device cpu --json "$R/selftest-cpu.json"
        step selftest-wgpu 900 "$BIN" selftest --device wgpu --json "$R/selftest-wgpu.json"
        bench bench-S-pro-cpu 120 cpu S pro 128
        bench bench-S-pro-wgpu 900 wgpu S pro 128 --steps 2 --warmup 1
        if $PY -c 'import torch, transformers' 2>/dev/null; then
            step compare-S-pro-cpu 300 "$PY" benches/compare_torch.py --device cpu --cases S --modes pro \
                --dtype f32 --steps "$STEPS" --warmup "$WARMUP" --bin "$BIN" --json "$R/compare-S-pro-cpu.json"
        fi
    else
        step selftest-cuda 120 "$BIN" selftest --device cuda --json "$R/selftest-cuda.json"
        step compare-1b-pro-2048 240 "$PY" benches/compare_torch.py --device cuda --cases 1b --modes pro \
            --dtype bf16 --seq 2048 --steps "$STEPS" --warmup "$WARMUP" --bin "$BIN" --timeout 200 \
            --json "$R/compare-1b-pro-2048.json"
        bench bench-7b-pro-4096 150 cuda llama2-7b-pro pro 4096 --dtype bf16 --steps 3 --warmup 1
        bench bench-1b-full-2048 90 cuda 1b full 2048 --dtype bf16
        step selftest-wgpu 120 "$BIN" selftest --device wgpu --json "$R/selftest-wgpu.json"
        step dp-cuda 90 bash scripts/dp-check.sh "$BIN" cuda:0 "$R/dp-cuda"
        bench bench-1b-pro-2048-ck 60 cuda 1b pro 2048 --dtype bf16 --checkpointing
        bench bench-1b-pro-4096 60 cuda 1b pro 4096 --dtype bf16
        bench bench-1b-full-4096 60 cuda 1b full 4096 --dtype bf16
        bench bench-1b-full-2048-ck 60 cuda 1b full 2048 --dtype bf16 --checkpointing
        bench bench-1b-pro-4096-ck 60 cuda 1b pro 4096 --dtype bf16 --checkpointing
        bench bench-1b-full-4096-ck 60 cuda 1b full 4096 --dtype bf16 --checkpointing
    fi
    assemble
    echo "total $(($(date +%s) - START))s; report: $OUT/device-report.json"
    summary
}

# The report: every step (status, time, command, its JSON, the tail of its log) and the key figures.
assemble() {
    "${PY:-python3}" - "$R" "$OUT/device-report.json" "$START" "$BUDGET" <<'EOF' || echo "(could not assemble the report: python3?)"
import json, os, sys, time
r, out, start, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
steps, figures = [], {}
for line in open(os.path.join(r, "steps.tsv")):
    name, status, secs, rc, cmd = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
    s = {"name": name, "status": status, "seconds": int(secs or 0), "exit": rc, "command": cmd}
    j = os.path.join(r, name + ".json")
    if os.path.exists(j):
        try:
            s["json"] = json.load(open(j))
        except ValueError as e:
            s["json_error"] = str(e)
    log = os.path.join(r, name + ".log")
    if os.path.exists(log):
        s["log_tail"] = open(log, errors="replace").read().splitlines()[-40:]
    steps.append(s)
    v = s.get("json")
    if not v:
        continue
    if name.startswith("selftest"):
        figures[name] = {"passed": v["passed"], "failed": v["failed"], "skipped": v["skipped"],
                         "failing": [f"{c['name']} {c['model']} {c['dtype']}: {c['max_abs_diff']} > {c['tolerance']} {c['note']}"
                                     for c in v["checks"] if c["status"] == "fail"]}
    elif name.startswith("bench"):
        m = v.get("memory", {})
        plan = (v.get("memory_plan") or {}).get("total_bytes")
        peak = m.get("peak_in_use_bytes") or m.get("peak_bytes")
        smi = (m.get("nvidia_smi") or {})
        figures[name] = {"tokens_per_s": v["tokens_per_s"], "step_s_mean": v["step_s"]["mean"],
                         "peak_bytes": m.get("peak_bytes"), "memory_measure": m.get("measure"),
                         "step_s_min": v["step_s"]["min"], "mfu": v.get("mfu"), "mfu_causal": v.get("mfu_causal"),
                         "peak_in_use_bytes": m.get("peak_in_use_bytes"), "peak_reserved_bytes": m.get("peak_reserved_bytes"),
                         "nvidia_smi_peak_bytes": smi.get("peak_bytes"), "nvidia_smi_before_bytes": smi.get("before_bytes"),
                         "planned_bytes": plan,
                         "planned_over_measured_in_use": (plan / peak) if plan and peak else None,
                         "device_name": v.get("device_name"), "loss_first": v.get("loss_first"), "loss_last": v.get("loss_last")}
    elif name.startswith("compare"):
        for row in v.get("results", []):
            o, t = row.get("llama-pro", {}), row.get("torch", {})
            figures[name] = {"ratio_tokens_per_s": row.get("ratio_tokens_per_s"),
                             "ours_tokens_per_s": o.get("tokens_per_s"), "torch_tokens_per_s": t.get("tokens_per_s"),
                             "ours_mfu": o.get("mfu"), "torch_mfu": t.get("mfu"),
                             "ours_peak_in_use_bytes": (o.get("memory") or {}).get("peak_in_use_bytes"),
                             "torch_max_memory_allocated_bytes": t.get("max_memory_allocated_bytes"),
                             "torch_attention": t.get("attn_implementation"), "flops_agree": row.get("flops_agree"),
                             "errors": [x["error"][-500:] for x in (o, t) if "error" in x]}
report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)), "elapsed_s": int(time.time()) - start,
          "budget_s": budget, "host": os.uname().nodename, "figures": figures, "steps": steps}
tmp = out + ".tmp"
json.dump(report, open(tmp, "w"), indent=1)
os.replace(tmp, out)
EOF
}

summary() {
    "${PY:-python3}" - "$OUT/device-report.json" <<'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
print(f"\n{'step':<24}{'status':<9}{'s':>5}  figures")
figs = r["figures"]
for s in r["steps"]:
    f = figs.get(s["name"], {})
    if "tokens_per_s" in f:
        mfu = f"MFU {100 * f['mfu']:.1f}%" if f.get("mfu") is not None else "MFU ?"
        used = f.get("peak_in_use_bytes")
        mem = f"peak {used / 1e9:.2f} GB in use" if used else f"peak RSS {(f.get('peak_bytes') or 0) / 1e9:.2f} GB"
        smi = f.get("nvidia_smi_peak_bytes")
        plan = f.get("planned_bytes")
        d = (f"{f['tokens_per_s']:.0f} tok/s, {mfu}, {mem}" + (f" (nvidia-smi {smi / 1e9:.1f} GB)" if smi else "")
             + (f", plan {plan / 1e9:.2f} GB" if plan else ""))
    elif "passed" in f:
        d = f"{f['passed']} passed, {f['failed']} failed, {f['skipped']} skipped"
    elif "ratio_tokens_per_s" in f:
        ratio = f["ratio_tokens_per_s"]
        d = (f"ours/torch {ratio:.2f} ({f['ours_tokens_per_s']:.0f} vs {f['torch_tokens_per_s']:.0f} tok/s)" if ratio
             else "errors: " + " | ".join(e.strip().splitlines()[-1][:100] for e in f["errors"] if e.strip()))
    else:
        d = ""
    if not d and s["status"] != "ok":
        tail = [l for l in s.get("log_tail", []) if l.strip()]
        d = tail[-1].strip()[:110] if tail else ""
    print(f"{s['name']:<24}{s['status']:<9}{s['seconds']:>5}  {d}")
EOF
}

case "$cmd" in
    build) build "$@" ;;
    package) package "$@" ;;
    run) run "$@" ;;
    *)
        sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
