#!/usr/bin/env bash
# Mutation testing of GF-Screen's core modules with mutmut; see docs/mutation_testing.md. Not run in CI (slow).
# Usage, from anywhere, with mutmut installed next to the project's Python (PY, default .venv/bin/python):
#   tools/mutation_test.sh [grpo] [trainer] [inferer] [metrics] [transforms] [validation]   (default: all six)
# MUTANTS (space-separated fnmatch patterns of mutant names) runs only those, e.g. after changing one function:
#   MUTANTS='scripts.trainer.xǁGRPOTrainerǁ_iteration__mutmut_*' tools/mutation_test.sh trainer
# mutmut names each mutant by its file's path, while the tests import `scripts.*` (from bundle/) and `lib.*` (from
# monailabel_app/), so the run works on a copy laid out the way the tests import it: output/mutation/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
declare -A SOURCE=(
  [grpo]=scripts/grpo.py [trainer]=scripts/trainer.py [inferer]=scripts/inferer.py [metrics]=scripts/metrics.py
  [transforms]=scripts/transforms.py [validation]=lib/validation.py
)
declare -A TESTS=(
  [grpo]="tests/test_grpo.py tests/test_trainer.py" [trainer]=tests/test_trainer.py [inferer]=tests/test_inferer.py
  [metrics]=tests/test_metrics.py [transforms]="tests/test_data.py tests/test_synthesis.py"
  [validation]=tests/test_server_validation.py
)
[ $# -gt 0 ] || set -- grpo trainer inferer metrics transforms validation
sources=() tests=()
for module in "$@"; do
  [ -n "${SOURCE[$module]:-}" ] || { echo "unknown module '$module': choose from ${!SOURCE[*]}" >&2; exit 2; }
  sources+=("${SOURCE[$module]}")
  for t in ${TESTS[$module]}; do [[ " ${tests[*]} " == *" $t "* ]] || tests+=("$t"); done
done

stage=output/mutation
rm -rf "$stage"
mkdir -p "$stage/tests" "$stage/bundle"
cp -r bundle/scripts "$stage/scripts"
cp -r monailabel_app/lib "$stage/lib"
cp -r bundle/configs "$stage/bundle/configs"  # read by some tests; no code, so `scripts` still comes from the copy
cp pytest.ini "$stage/"
cp tests/conftest.py "${tests[@]}" "$stage/tests/"
{
  echo "[mutmut]"
  echo "source_paths ="; printf '    %s\n' scripts lib
  echo "only_mutate ="; printf '    %s\n' "${sources[@]}"
  echo "pytest_add_cli_args_test_selection ="; printf '    %s\n' "${tests[@]}"
  echo "also_copy ="; printf '    %s\n' bundle/configs
  echo "process_isolation = forkserver"  # torch is not fork-safe once it has run: fork workers from a clean server
  echo "use_git_change_detection = false"
} >"$stage/setup.cfg"

cd "$stage"
set -f  # MUTANTS holds patterns for mutmut, not for the shell
# shellcheck disable=SC2086  # a list of patterns
nice -n 19 "$PY" -m mutmut run --max-children "${JOBS:-2}" ${MUTANTS:-}
"$PY" -m mutmut results
