#!/usr/bin/env bash
# numbaconv's benchmark workflow, spelled out on top of asv (asv stays the engine: every command
# below is one asv call, printed before it runs). Run from anywhere:
#
#   asv_benchmarks/run.sh smoke            asv check + a quick dry run of the reduced preset in
#                                          the current environment (what CI runs; saves nothing)
#   asv_benchmarks/run.sh current [ARGS]   the suite on the checked-out code in the current
#                                          environment (torch series included when torch is
#                                          installed), saved under HEAD's commit hash
#   asv_benchmarks/run.sh history [ARGS]   every commit of main since the suite was added, each
#                                          built into asv's virtualenv; commits with results
#                                          already are skipped
#   asv_benchmarks/run.sh compare A B [ARGS]
#                                          asv continuous: run commits A and B, list the
#                                          benchmarks that changed by more than 10 %
#   asv_benchmarks/run.sh publish          the dashboard, in .asv/html
#   asv_benchmarks/run.sh preview [ARGS]   serve it (http://127.0.0.1:8080 by default)
#
# ARGS go to asv as they are, e.g. --bench REGEX. With NUMBACONV_BENCH_QUICK=1 (the reduced
# preset) results are filed under the machine name "<machine>-quick", apart from full-size ones.
# ASV_MACHINE overrides the machine name (default: the host name); PYTHON the interpreter whose
# asv runs (default: python).
set -euo pipefail
cd "$(dirname "$0")"

# Measure what users get: they don't set these (benchmarks/__init__.py removes them as well).
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE

python=${PYTHON:-python}
machine=${ASV_MACHINE:-$("$python" -c 'import platform; print(platform.node())')}
if [[ -n "${NUMBACONV_BENCH_QUICK:-}" && "${NUMBACONV_BENCH_QUICK}" != 0 ]]; then
    machine="$machine-quick"
fi

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
        asv run --python=same --machine "$machine" --set-commit-hash "$(git rev-parse HEAD)" "$@"
        ;;
    history)
        ensure_machine
        first=$(first_suite_commit)
        if [[ -z "$first" ]]; then
            echo "error: no commit of main has asv_benchmarks/asv.conf.json yet" >&2
            exit 1
        fi
        if git rev-parse --quiet --verify "$first^" >/dev/null; then
            range="$first^..main"
        else
            range=main
        fi
        asv run --machine "$machine" --skip-existing-commits "$range" "$@"
        ;;
    compare)
        if [[ $# -lt 2 ]]; then
            echo "usage: $0 compare BASE_COMMIT CONTENDER_COMMIT [asv options]" >&2
            exit 2
        fi
        ensure_machine
        base=$1 contender=$2
        shift 2
        asv continuous --machine "$machine" --factor 1.1 "$base" "$contender" "$@"
        ;;
    publish)
        asv publish "$@"
        ;;
    preview)
        asv preview "$@"
        ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
