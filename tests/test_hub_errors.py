"""Hub names (datasets and models) that cannot load fail in seconds with ONE sentence, before anything loads.

Without the network huggingface_hub retries every file five times with backoff (~50 s before a missing model fails,
minutes before a cached one loads), so the check functions probe the endpoint it uses first (common.check_hub_id):
not cached and unreachable, one sentence naming the flag, the id, the endpoint and what to pass instead; cached and
unreachable, the cached copy loads as with HF_HUB_OFFLINE=1. No test here touches the network: HF_ENDPOINT points at
a closed local port (refused at once) or at a local HTTP server, and every hub cache is an empty or hand-made folder.
With HF_HUB_OFFLINE=1 nothing is probed and the library's own (immediate) error is the sentence, as before.
"""

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import common
import toy_math
from conftest import ROOT

LOCAL_COPIES = "; without the network, pass local copies: a model folder (`hf download ID --local-dir DIR`) or a .jsonl"
RETRIES = ("thrown while requesting", "Retrying in ")  # huggingface_hub's warnings, one per retry


def closed_endpoint() -> str:
    """http://127.0.0.1:PORT on a port that nothing listens on: a connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def listening_endpoint():
    """A local HTTP server that answers every request with 404, as a reachable hub would answer a wrong path."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def cache_model(hf_home: Path, repo_id: str, folder: Path) -> None:
    """Put a model folder into a Hugging Face cache as `hf download` leaves it (refs/main -> one snapshot)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def run_script(tmp_path: Path, argv: list[str], endpoint: str | None, toy_cache: Path, hf_home: Path | None = None):
    """A script as a user runs it, with its own hub cache and toy cache; endpoint None: HF_HUB_OFFLINE=1 instead.
    Returns (process, stderr lines, seconds)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE")
    }
    env.update(
        HF_HOME=str(hf_home or tmp_path / "hf_home"),
        CMDP_DISTILL_CACHE=str(toy_cache),
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
    )
    env.update(HF_ENDPOINT=endpoint) if endpoint else env.update(HF_HUB_OFFLINE="1")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    return proc, [line for line in proc.stderr.splitlines() if line.strip()], time.monotonic() - start


def one_sentence(proc, lines) -> str:
    """The refusal: a failed run whose stderr is one line, with no traceback and no retry warning before it."""
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not any(r in proc.stderr for r in RETRIES)
    return lines[0]


@pytest.fixture
def empty_toy_cache(tmp_path) -> Path:
    """A $CMDP_DISTILL_CACHE that stays empty unless a script builds the toy task: a refusal must come first."""
    cache = tmp_path / "toy_cache"
    cache.mkdir()
    return cache


@pytest.fixture
def toy_cache(tiny_toy, tmp_path) -> Path:
    """A $CMDP_DISTILL_CACHE whose default toy build is the tiny one, so that 'toy' resolves without a build."""
    cache = tmp_path / "toy_cache"
    cache.mkdir()
    (cache / toy_math.default_dir(0).name).symlink_to(tiny_toy)
    return cache


@pytest.fixture
def hub_state(monkeypatch, tmp_path):
    """In-process: an empty hub cache, online mode, and the probe's memory and the offline switch undone after."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored at teardown, whatever check_hub_id writes
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    if "datasets" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(common, "_HUB_WENT_OFFLINE", False)
    probe = common._hub_unreachable  # a test may replace it
    probe.cache_clear()
    yield constants
    probe.cache_clear()


# ---------------------------------------------------------------------------------------------
# The check functions, in-process
# ---------------------------------------------------------------------------------------------


def test_unreachable_hub_refuses_an_uncached_model_in_seconds(hub_state, monkeypatch):
    endpoint = closed_endpoint()
    monkeypatch.setattr(hub_state, "ENDPOINT", endpoint)
    start = time.monotonic()
    with pytest.raises(common.InputError) as info:
        common.check_model_path("Qwen/Qwen2.5-Math-1.5B", "--model")
    assert time.monotonic() - start < 5  # the retries alone would sleep 23 s
    message = str(info.value)
    assert message.startswith("--model Qwen/Qwen2.5-Math-1.5B is not in the local Hugging Face cache")
    assert f"the hub ({endpoint}) cannot be reached (ConnectError" in message
    assert "`hf download Qwen/Qwen2.5-Math-1.5B --local-dir DIR`" in message and "\n" not in message


def test_unreachable_hub_refuses_an_uncached_dataset(hub_state, monkeypatch):
    monkeypatch.setattr(hub_state, "ENDPOINT", closed_endpoint())
    with pytest.raises(common.InputError, match=r"^dataset math500 \(HuggingFaceH4/MATH-500\) is not in the local"):
        common.check_dataset("math500", "test")
    with pytest.raises(common.InputError, match="pass a local .jsonl or .json file of its problems instead"):
        common.load_problems("gsm8k", "test")  # load_problems checks too, before datasets tries the network


def test_reachable_hub_lets_hub_ids_through(hub_state, monkeypatch, listening_endpoint):
    monkeypatch.setattr(hub_state, "ENDPOINT", listening_endpoint)
    common.check_model_path("Qwen/Qwen2.5-Math-1.5B", "--model")  # left to the library, which can download it
    common.check_dataset("gsm8k", "test")
    assert hub_state.HF_HUB_OFFLINE is False and common._hub_unreachable(listening_endpoint) is None


def test_offline_mode_is_not_probed(hub_state, monkeypatch):
    """HF_HUB_OFFLINE=1: huggingface_hub's own error is immediate, so nothing is probed and nothing is refused here."""
    monkeypatch.setattr(hub_state, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(common, "_hub_unreachable", lambda endpoint: pytest.fail("probed in offline mode"))
    common.check_model_path("Qwen/Qwen2.5-Math-1.5B", "--model")
    common.check_dataset("gsm8k", "test")


def test_cached_model_switches_to_offline_mode_when_the_hub_is_unreachable(hub_state, monkeypatch, tmp_path, tiny_toy):
    monkeypatch.setattr(hub_state, "ENDPOINT", closed_endpoint())
    cache_model(tmp_path / "hf_home", "Toy/Student", tiny_toy / "student")
    common.check_model_path("Toy/Student", "--model")
    assert hub_state.is_offline_mode() and os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(common.InputError, match="Other/Model is not in the local Hugging Face cache"):
        common.check_model_path("Other/Model", "--teacher")  # one probe per process: still refused, not offline's error


def test_probe_runs_once_per_endpoint(hub_state, monkeypatch):
    endpoint, calls = closed_endpoint(), []
    monkeypatch.setattr(hub_state, "ENDPOINT", endpoint)
    import huggingface_hub.utils

    real = huggingface_hub.utils.get_session
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: calls.append(1) or real())
    for flag in ("--student", "--teacher"):
        with pytest.raises(common.InputError):
            common.check_model_path("Qwen/Qwen2.5-Math-1.5B", flag)
    with pytest.raises(common.InputError):
        common.check_dataset("gsm8k", "train")
    assert calls == [1]


# ---------------------------------------------------------------------------------------------
# The scripts, as a user runs them
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hub_dataset_fails_in_one_sentence_without_retries(tmp_path, empty_toy_cache):
    endpoint = closed_endpoint()
    proc, lines, _ = run_script(tmp_path, ["eval_math.py", "--dataset", "gsm8k"], endpoint, empty_toy_cache)
    sentence = one_sentence(proc, lines)
    assert sentence.startswith("dataset gsm8k (openai/gsm8k) is not in the local Hugging Face cache")
    assert f"({endpoint}) cannot be reached" in sentence and sentence.endswith("problem/answer fields).")
    assert not any(empty_toy_cache.iterdir())  # refused before the (default) toy models are built


@pytest.mark.slow
@pytest.mark.parametrize("script", ["cmdp_distill.py", "lagrangian_distill.py"])
def test_hub_student_fails_in_one_sentence_without_retries(tmp_path, empty_toy_cache, script):
    argv = [script, "--student", "Qwen/Qwen2.5-Math-1.5B", "--teacher", "Qwen/Qwen2.5-Math-7B-Instruct"]
    proc, lines, seconds = run_script(tmp_path, argv, closed_endpoint(), empty_toy_cache)
    sentence = one_sentence(proc, lines)
    assert sentence.startswith("--student Qwen/Qwen2.5-Math-1.5B is not in the local Hugging Face cache")
    assert sentence.endswith("(`hf download Qwen/Qwen2.5-Math-1.5B --local-dir DIR`).")
    assert not any(empty_toy_cache.iterdir())
    print(f"{script}: refused in {seconds:.1f} s")


@pytest.mark.slow
def test_cached_hub_model_loads_at_once_when_the_hub_is_unreachable(tmp_path, toy_cache, tiny_toy):
    """A model in the hub cache evaluates without one retry (today's library alone: ~200 s of retries first)."""
    hf_home = tmp_path / "hf_home"
    cache_model(hf_home, "Toy/Student", tiny_toy / "student")
    argv = ["eval_math.py", "--model", "Toy/Student", "--limit", "4", "--max-new-tokens", "12"]
    argv += ["--output-dir", str(tmp_path / "eval")]
    proc, lines, _ = run_script(tmp_path, argv, closed_endpoint(), toy_cache, hf_home)
    assert proc.returncode == 0 and not any(r in proc.stderr for r in RETRIES), proc.stderr[-3000:]
    assert any("Toy/Student loads from the local cache, as with HF_HUB_OFFLINE=1" in line for line in lines)
    assert (tmp_path / "eval" / "results.jsonl").is_file()


@pytest.mark.slow
def test_hub_dataset_offline_keeps_the_library_sentence(tmp_path, empty_toy_cache):
    proc, lines, _ = run_script(tmp_path, ["eval_math.py", "--dataset", "gsm8k"], None, empty_toy_cache)
    sentence = one_sentence(proc, lines)
    assert sentence.startswith("ConnectionError: Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")
    assert LOCAL_COPIES in sentence and not any(empty_toy_cache.iterdir())


@pytest.mark.slow
def test_gsm_symbolic_names_their_hub_repository_offline(tmp_path, empty_toy_cache):
    proc, lines, _ = run_script(tmp_path, ["eval_math.py", "--dataset", "gsm_symbolic_p2"], None, empty_toy_cache)
    sentence = one_sentence(proc, lines)
    assert sentence.startswith("ConnectionError: Couldn't reach 'apple/GSM-Symbolic' on the Hub")
    assert LOCAL_COPIES in sentence


@pytest.mark.slow
def test_gsm_symbolic_has_no_train_split(tmp_path, empty_toy_cache):
    proc, lines, _ = run_script(
        tmp_path, ["eval_math.py", "--dataset", "gsm_symbolic", "--split", "train"], None, empty_toy_cache
    )
    assert one_sentence(proc, lines) == (
        "dataset gsm_symbolic (apple/GSM-Symbolic, config main) has only the split(s) test, not 'train': "
        "to train, pass a local .jsonl file as --dataset and gsm_symbolic as --eval-dataset."
    )


@pytest.mark.slow
def test_hub_student_offline_keeps_the_library_sentence(tmp_path, toy_cache):
    argv = ["cmdp_distill.py", "--student", "Qwen/Qwen2.5-Math-1.5B", "--teacher", "Qwen/Qwen2.5-Math-7B-Instruct"]
    proc, lines, _ = run_script(tmp_path, argv, None, toy_cache)
    sentence = one_sentence(proc, lines)
    assert sentence.startswith("OSError: ") and sentence.endswith(LOCAL_COPIES + " file of problems.")


@pytest.mark.slow
def test_hub_teacher_offline_keeps_the_library_sentence(tmp_path, toy_cache, tiny_toy):
    argv = [
        "lagrangian_distill.py",
        "--student",
        str(tiny_toy / "student"),
        "--teacher",
        "Qwen/Qwen2.5-Math-7B-Instruct",
    ]
    proc, lines, _ = run_script(tmp_path, argv, None, toy_cache)
    sentence = one_sentence(proc, lines)
    assert sentence.startswith("OSError: We couldn't connect to 'https://huggingface.co'") and LOCAL_COPIES in sentence


def test_local_paths_keep_their_own_errors(tmp_path):
    """A local folder is never looked up on the hub; what is wrong with it is the library's error, unchanged."""
    for load in (common.load_tokenizer, lambda path: common.load_model(path, torch.device("cpu"), torch.float32)):
        with pytest.raises((OSError, ValueError)) as info:  # an empty folder: transformers' own error, not SystemExit
            load(str(tmp_path))
        assert "Hugging Face hub" not in str(info.value)
