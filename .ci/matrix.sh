#!/usr/bin/env bash
# The version matrix (issue 16), which .ci/run runs beside the main job: the test suite on every
# other supported Python, each in a fresh virtual environment with the newest releases pip finds
# for it, and once more on the oldest releases that pyproject.toml admits (.ci/oldest.txt).
#
#   .ci/matrix.sh                        every environment: oldest py3.10 py3.12 py3.13
#   .ci/matrix.sh oldest py3.13          some of them
#   .ci/matrix.sh py3.13                 one of them, with the whole suite
#   MATRIX_PYTEST_ARGS="tests/test_cli.py -x" .ci/matrix.sh oldest    a subset of the tests
#
# Each environment lives in .venv-matrix/NAME (made afresh on every run; git ignores .venv*/),
# with its own NUMBA_CACHE_DIR in it, so every environment compiles every kernel from cold and
# none loads another's cache: the tests begin with `numbaconv compile` of every kernel at both
# dtypes, and tests/test_compile.py checks that afterwards no call compiles. The tests are then
# shared out: with N environments, the i-th runs part i of N of the suite
# (NUMBACONV_TESTS_SHARD=i/N, tests/conftest.py: a hash of each test's id picks its part) and,
# whole, the files whose outcome depends on the versions installed (EVERY_SHARD there). So a
# CI run compiles everything in every environment and runs every test twice: in the main job
# (Python 3.11, the newest releases) and in one of these. Why not the whole suite everywhere:
# compiling is most of each environment's time, and on a 2-core AMD EPYC (Zen 3) the whole
# suite in all five environments took past CI's 90 minutes (stop 32: oldest 85 min, py3.13
# stopped half-way). With the parts, the Numba 0.59 environment was still compiling after 64
# minutes (0.59 compiles the kernels 3-4 times as slowly as 0.68), so the floor is now 0.62.1.
# Each environment installs numbaconv (editable) with what the tests import: the
# "test" extra of pyproject.toml less asv, virtualenv and ruff, which only the main job's lint
# and benchmark smoke run use (a test that needs one of them fails here; it is not skipped).
# The environments run MATRIX_JOBS (default 2) at a time: most of a run is Numba compiling, on
# one core per process, so two at once nearly halve the matrix's wall time on 2 cores. Each one's
# output goes to .venv-matrix/NAME.log, printed whole when it ends. With MATRIX_DEADLINE (a Unix
# time; .ci/run sets it from CI's 90 minutes) pytest is stopped at that time and the environment
# fails with exit 124, so that a slow machine gets this table instead of CI's silent timeout.
# The log ends with a table: the versions each environment got, its threading layer and BLAS
# path (`numbaconv info`), pytest's summary and the minutes it took. The exit status is 1 if
# any environment failed, after all of them have run.
set -uo pipefail
cd "$(dirname "$0")/.."

envs=("$@")
# The oldest releases first: older releases have compiled more slowly (Numba 0.59 3-4 times as
# slowly as 0.68), so that environment must not start last.
[[ ${#envs[@]} -gt 0 ]] || envs=(oldest py3.10 py3.12 py3.13)
# The oldest supported Python (requires-python); it has wheels of all the oldest releases, as
# 3.11 has (numpy 1.24 and scipy 1.10 have none for 3.12, numba 0.62 has them).
oldest_python=3.10
read -ra pytest_args <<< "${MATRIX_PYTEST_ARGS:-}"

# The python executable of version $1 (e.g. 3.10): pyenv's, else one on PATH that runs.
interpreter() {
    local prefix
    if command -v pyenv > /dev/null && prefix=$(pyenv prefix "$1" 2> /dev/null) \
        && [[ -x $prefix/bin/python$1 ]]; then
        echo "$prefix/bin/python$1"
    elif "python$1" -c "" 2> /dev/null; then
        command -v "python$1"
    else
        return 1
    fi
}

# pyproject's "test" extra as pip arguments: -e .[other extras it names] and its own
# requirements, less the tools only the main job runs.
mapfile -t test_requirements < <(python3 - << 'EOF'
import re
import tomllib

with open("pyproject.toml", "rb") as fh:
    requirements = tomllib.load(fh)["project"]["optional-dependencies"]["test"]
main_job_only = {"asv", "virtualenv", "ruff", "bench"}
extras, other = [], []
for requirement in requirements:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
    if name == "numbaconv":
        names = re.search(r"\[(.*)\]", requirement).group(1).split(",")
        extras += [n.strip() for n in names if n.strip() not in main_job_only]
    elif name not in main_job_only:
        other.append(requirement)
print("-e", f".[{','.join(extras)}]" if extras else ".", *other, sep="\n")
EOF
)
if [[ ${#test_requirements[@]} -lt 2 ]]; then
    echo "matrix: could not read the test extra from pyproject.toml (python3 with tomllib needed)"
    exit 2
fi

# Check that the oldest environment got exactly the releases of .ci/oldest.txt.
check_oldest='
import importlib.metadata, sys
wrong = []
for line in open(".ci/oldest.txt"):
    line = line.split("#")[0].strip()
    if line:
        name, wanted = line.split("==")
        got = importlib.metadata.version(name)
        if got != wanted:
            wrong.append(f"{name} {got} (wanted {wanted})")
sys.exit(f"oldest environment: {wrong}" if wrong else 0)
'
versions='
import importlib.metadata, platform
def v(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"
print(platform.python_version(), *(v(n) for n in ("numpy", "numba", "scipy", "tbb")))
'

# One environment, in a subshell: create it, install, `numbaconv info`, the tests.
run_env() {
    local name=$1 shard=$2 version constraints=() python dir
    case $name in
        oldest) version=$oldest_python constraints=(-c .ci/oldest.txt) ;;
        py3.*) version=${name#py} ;;
        *) echo "matrix: unknown environment '$name'" && return 2 ;;
    esac
    if ! python=$(interpreter "$version"); then
        echo "matrix: this machine has no Python $version (pyenv prefix $version, python$version)"
        return 3
    fi
    dir=.venv-matrix/$name
    rm -rf "$dir"
    (
        set -ex
        "$python" -m venv "$dir"
        # shellcheck disable=SC1091
        source "$dir/bin/activate"
        export NUMBA_CACHE_DIR=$PWD/$dir/numba-cache
        export NUMBACONV_TESTS_SHARD=$shard
        python -m pip install --quiet --upgrade pip
        pip install "${constraints[@]}" "${test_requirements[@]}"
        pip check
        [[ $name != oldest ]] || python -c "$check_oldest"
        python -c "$versions" > "$dir/versions.txt"
        numbaconv info | tee "$dir/info.txt"
        stop=()
        if [[ -n ${MATRIX_DEADLINE:-} ]]; then
            left=$((MATRIX_DEADLINE - $(date +%s)))
            [[ $left -gt 60 ]] || { echo "matrix: past MATRIX_DEADLINE, no time left"; exit 124; }
            stop=(timeout --kill-after=30 "$left")
        fi
        "${stop[@]}" python -m pytest -p no:cacheprovider "${pytest_args[@]}" 2>&1 \
            | tee "$dir/pytest.log"
    )
}

start=$SECONDS
at_once=${MATRIX_JOBS:-2}
mkdir -p .venv-matrix
for name in "${envs[@]}"; do
    rm -f ".venv-matrix/$name.log" ".venv-matrix/$name.status"
done
shard=0
for name in "${envs[@]}"; do
    while [[ $(jobs -rp | wc -l) -ge $at_once ]]; do
        wait -n || true
    done
    echo "=== matrix: $name started ($(((SECONDS - start) / 60)) min in) ==="
    (
        began=$SECONDS
        run_env "$name" "$shard/${#envs[@]}" > ".venv-matrix/$name.log" 2>&1
        code=$?
        echo "$code $(((SECONDS - began + 30) / 60))" > ".venv-matrix/$name.status"
        echo "=== matrix: $name ended, exit $code, after $(((SECONDS - began + 30) / 60)) min ==="
        cat ".venv-matrix/$name.log"
        echo "=== matrix: end of $name's log ==="
    ) &
    shard=$((shard + 1))
done
wait

declare -A status minutes
failed=0
for name in "${envs[@]}"; do
    read -r status[$name] minutes[$name] < ".venv-matrix/$name.status" 2> /dev/null \
        || status[$name]=1 minutes[$name]=-
    [[ ${status[$name]} -eq 0 ]] || failed=1
done
echo
echo "=== matrix summary ($(((SECONDS - start + 30) / 60)) min) ==="
printf '%-8s %-8s %-7s %-7s %-7s %-9s %-5s %-4s %s\n' \
    env python numpy numba scipy tbb layer min "pytest (or the step that failed)"
for name in "${envs[@]}"; do
    dir=.venv-matrix/$name
    read -r py np nb sp tbb < "$dir/versions.txt" 2> /dev/null || py=- np=- nb=- sp=- tbb=-
    layer=$(sed -n 's/^threading layer: *\([a-z]*\).*/\1/p' "$dir/info.txt" 2> /dev/null)
    result=$(grep -E '^=* ?[0-9]+ (passed|failed|error).* in [0-9.]+s' "$dir/pytest.log" 2> /dev/null \
        | tail -1 | tr -d '=')
    [[ ${status[$name]} -eq 0 ]] || result="FAILED (exit ${status[$name]}):${result:- set-up}"
    printf '%-8s %-8s %-7s %-7s %-7s %-9s %-5s %-4s %s\n' \
        "$name" "$py" "$np" "$nb" "$sp" "$tbb" "${layer:--}" "${minutes[$name]}" "$result"
    sed -n 's/^blas: */         blas: /p' "$dir/info.txt" 2> /dev/null
done
exit $failed
