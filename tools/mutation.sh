#!/usr/bin/env bash
# Mutation testing (issue 21): mutmut 3 over the modules whose mistakes would corrupt a result
# without failing loudly (the [mutmut] section of setup.cfg lists them and the fast tests that
# cover them), then the score per module. Runs in a scratch copy, never in the checkout.
#
#   tools/mutation.sh                       # all of them (about an hour on 2 cores)
#   tools/mutation.sh "lit_sft.loss*"       # mutmut's own name filters narrow it
#   MUTATION_VLLM_PYTHON=.venv-vllm/bin/python tools/mutation.sh   # also the vLLM weight swap
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${MUTATION_DIR:-${TMPDIR:-/tmp}/lit-sft-mutation}
export WANDB_MODE=offline LIT_SFT_SHARED_DATA=${LIT_SFT_SHARED_DATA:-$repo/../shared/data}
python -c "import mutmut" 2>/dev/null || python -m pip install -q "mutmut>=3.3"

# A fresh copy of the tracked and untracked-not-ignored files; mutmut keeps its own cache in
# $work/mutants, so a rerun on unchanged code only re-checks what changed.
mkdir -p "$work"
find "$work" -mindepth 1 -maxdepth 1 ! -name mutants -exec rm -rf {} +
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 ls -d 2>/dev/null | tar -cf - -T -) | tar -C "$work" -xf -
modules=$(python - "$work/setup.cfg" <<'PY'
import configparser, sys
c = configparser.ConfigParser(); c.read(sys.argv[1])
print(" ".join(c["mutmut"]["only_mutate"].split()))
PY
)
python "$repo/tools/mutation_prep.py" "$work" $modules

cd "$work"
python -m mutmut run --max-children "${MUTATION_JOBS:-$(nproc)}" "$@" || true
python -m mutmut results --all true | python "$repo/tools/mutation_score.py" --survivors

# Code that runs outside the test's process, which mutmut cannot map to a test ("no tests").
# The forked grading child: against the tests that grade in another thread.
python "$repo/tools/mutation_env.py" "$work" 'grading\.x__child_main__' -- tests/test_grading.py -k "another_thread or child"
# The weight swap inside vLLM's engine: against the real-engine swap tests, in the vLLM venv
# (.ci/run builds it), about a minute per mutant.
if [[ -n "${MUTATION_VLLM_PYTHON:-}" ]]; then
  python "$repo/tools/mutation_env.py" "$work" 'backends\.xǁWeightFileLoaderǁ' --python "$MUTATION_VLLM_PYTHON" -- \
    -m vllm tests/test_vllm_engine.py -k "greedy or bad_files or previous_weights"
fi
