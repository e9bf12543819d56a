#!/usr/bin/env bash
# numbaconv's benchmark workflow, spelled out on top of asv (asv stays the engine: every asv call
# below is printed before it runs). Run from anywhere:
#
#   asv_benchmarks/run.sh smoke            asv check + a quick dry run of the reduced preset in
#                                          the current environment (what CI runs; saves nothing)
#   asv_benchmarks/run.sh current [ARGS]   the suite on the checked-out code in the current
#                                          environment (torch series included when torch is
#                                          installed), saved under HEAD's commit hash
#   asv_benchmarks/run.sh history [ARGS]   every commit of main since the suite was added, each
#                                          built into asv's virtualenv; commits with results
#                                          already are skipped. Without --bench: the default
#                                          selection (HISTORY_BENCH below). Ends with the
#                                          seconds per commit
#   asv_benchmarks/run.sh compare A B [ARGS]
#                                          asv continuous: run commits A and B, list only the
#                                          benchmarks whose change asv finds significant (its
#                                          statistics on the samples) and larger than 5 %
#   asv_benchmarks/run.sh compare --saved A B [ARGS]
#                                          the same comparison of results already saved
#   asv_benchmarks/run.sh publish [--local-assets] [ARGS]
#                                          the dashboard, in .asv/html; --local-assets: its
#                                          scripts and styles fetched with npm into the html
#                                          folder, so that it loads without internet access
#   asv_benchmarks/run.sh preview [--port P]  serve it on http://127.0.0.1:8080 (or P) only
#   asv_benchmarks/run.sh check-page       open the published page in headless Chromium and
#                                          check that its charts drew (check_page.py)
#
# ARGS go to asv as they are, e.g. --bench REGEX. With NUMBACONV_BENCH_QUICK=1 (the reduced
# preset) results are filed under the machine name "<machine>-quick", apart from full-size ones.
# ASV_MACHINE overrides the machine name (default: the host name); PYTHON the interpreter whose
# asv runs (default: python); HISTORY_RANGE the commits of `history` (a git range such as
# HEAD^! for the last commit alone; default: every commit of main since the suite was added).
set -euo pipefail
cd "$(dirname "$0")"

# Measure what users get: they don't set these (benchmarks/__init__.py removes them as well).
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE

python=${PYTHON:-python}
machine=${ASV_MACHINE:-$("$python" -c 'import platform; print(platform.node())')}
if [[ -n "${NUMBACONV_BENCH_QUICK:-}" && "${NUMBACONV_BENCH_QUICK}" != 0 ]]; then
    machine="$machine-quick"
fi

# The default selection of `history`: what the dashboard follows from commit to commit. The
# kernels users run (auto, and the im2col and winograd families it picks from) forward and
# backward on the resnet3x3 and pointwise layers in float32, and the teaching ConvLayer's
# training step. A second run of one commit lands within 5 % of the first on every benchmark of
# this selection (README, "Benchmarks"; the sampling settings are in benchmarks/common.py).
HISTORY_BENCH="conv2d\.(Forward|Backward)\.time_\w+\('(auto|im2col|winograd)', '(resnet3x3|pointwise)', 'float32'\)|layer\.ConvLayerTrainStep\.time_train_step\('(auto|im2col|numpy)', 'float32'\)"

has_bench() {
    local arg
    for arg in "$@"; do
        case "$arg" in
            -b | --bench | --bench=*) return 0 ;;
        esac
    done
    return 1
}

result_files() {
    # One file per commit and environment measured on this machine (none before the first).
    if [[ -d ".asv/results/$machine" ]]; then
        find ".asv/results/$machine" -name '*.json' ! -name machine.json | sort
    fi
}

asv() {
    echo "+ asv $*" >&2
    "$python" -m asv "$@"
}

ensure_machine() {
    # asv describes machines in ~/.asv-machine.json and asks interactively for a missing one;
    # a fresh machine gets the detected defaults.
    if ! "$python" - "$machine" <<'EOF'
import json, os, sys
path = os.path.expanduser("~/.asv-machine.json")
sys.exit(not (os.path.isfile(path) and sys.argv[1] in json.load(open(path))))
EOF
    then
        asv machine --yes --machine "$machine" >/dev/null
    fi
}

first_suite_commit() {
    # The oldest commit of main that has the suite: older commits have nothing to benchmark.
    git log main --format=%H --diff-filter=A -- asv.conf.json | tail -n 1
}

command=${1:-}
shift || true
case "$command" in
    smoke)
        ensure_machine
        asv check --python=same
        NUMBACONV_BENCH_QUICK=1 asv run --python=same --machine "$machine" --quick --dry-run \
            --show-stderr "$@"
        ;;
    current)
        ensure_machine
        if [[ -n "$(git status --porcelain --untracked-files=no -- ..)" ]]; then
            echo "warning: uncommitted changes; they are measured but filed under HEAD" >&2
        fi
        asv run --python=same --machine "$machine" --record-samples \
            --set-commit-hash "$(git rev-parse HEAD)" "$@"
        ;;
    history)
        ensure_machine
        first=$(first_suite_commit)
        if [[ -z "$first" ]]; then
            echo "error: no commit of main has asv_benchmarks/asv.conf.json yet" >&2
            exit 1
        fi
        if [[ -n "${HISTORY_RANGE:-}" ]]; then
            range=$HISTORY_RANGE
        elif git rev-parse --quiet --verify "$first^" >/dev/null; then
            range="$first^..main"
        else
            range=main
        fi
        if ! has_bench "$@"; then
            set -- --bench "$HISTORY_BENCH" "$@"
            echo "history: the default selection (HISTORY_BENCH in $0)" >&2
        fi
        before=$(result_files)
        started=$SECONDS
        asv run --machine "$machine" --record-samples --skip-existing-commits "$range" "$@"
        seconds=$((SECONDS - started))
        measured=$(comm -13 <(echo "$before") <(result_files) | grep -c . || true)
        if [[ $measured -gt 0 ]]; then
            echo "history: $measured commit(s) measured in $seconds s," \
                "$((seconds / measured)) s per commit" >&2
        else
            echo "history: no new commit measured ($seconds s)" >&2
        fi
        ;;
    compare)
        # Significant: asv's statistical test on the recorded samples says the two commits
        # differ, and by more than 5 %. (--quick records one sample: nothing is significant.)
        saved=0
        if [[ "${1:-}" == --saved ]]; then
            saved=1
            shift
        fi
        if [[ $# -lt 2 ]]; then
            echo "usage: $0 compare [--saved] BASE_COMMIT CONTENDER_COMMIT [asv options]" >&2
            exit 2
        fi
        ensure_machine
        base=$1 contender=$2
        shift 2
        report=(--factor 1.05 --only-changed --split --sort ratio)
        if [[ $saved == 1 ]]; then
            asv compare --machine "$machine" "${report[@]}" "$base" "$contender" "$@"
        else
            asv continuous --machine "$machine" --record-samples --interleave-rounds \
                "${report[@]}" "$base" "$contender" "$@"
        fi
        ;;
    publish)
        local_assets=0
        if [[ "${1:-}" == --local-assets ]]; then
            local_assets=1
            shift
        fi
        asv publish "$@"
        if [[ $local_assets == 1 ]]; then
            echo "+ $python local_assets.py" >&2
            "$python" local_assets.py
        fi
        ;;
    preview)
        # asv preview listens on every interface; the dashboard is for this machine only.
        port=8080
        if [[ "${1:-}" == --port || "${1:-}" == -p ]]; then
            port=${2:?"--port needs a number"}
            shift 2
        fi
        if [[ $# -gt 0 ]]; then
            echo "usage: $0 preview [--port PORT]" >&2
            exit 2
        fi
        html=$("$python" -c 'import json, re, sys; text = open("asv.conf.json").read()
text = re.sub(r"^\s*//.*$", "", text, flags=re.M); print(json.loads(text)["html_dir"])')
        echo "+ $python -m http.server --bind 127.0.0.1 --directory $html $port" >&2
        echo "serving http://127.0.0.1:$port/" >&2
        exec "$python" -m http.server --bind 127.0.0.1 --directory "$html" "$port"
        ;;
    check-page)
        echo "+ $python check_page.py $*" >&2
        exec "$python" check_page.py "$@"
        ;;
    *)
        sed -n '2,/^set -euo/p' "$(basename "$0")" | sed '$d' | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
