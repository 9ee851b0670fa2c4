"""Hub names (datasets and models) fail with ONE sentence when the Hugging Face hub cannot be reached: the library's
own error (its type and first line), and how to go on from local copies (common.one_sentence).

Each script runs in a subprocess with an empty hub cache (HF_HOME in a temp folder), once with HF_HUB_OFFLINE=1
and once without it. The latter really tries the network, so it is skipped where huggingface.co is reachable
(there it would download), and it takes ~25 s (dataset) or ~55 s (model): huggingface_hub retries five times
with backoff before giving up, printing one warning per try, which we leave as they are.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import toy_math
from conftest import ROOT

# huggingface_hub's own retry warnings, printed before our sentence when the network is tried for real
HUB_RETRY_LINES = ("thrown while requesting", "Retrying in ")


def hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


ONLINE = pytest.param(
    False,
    id="network-tried",
    marks=pytest.mark.skipif(
        hub_reachable(), reason="huggingface.co is reachable from here, so the hub names would load"
    ),
)
OFFLINE = pytest.param(True, id="HF_HUB_OFFLINE")
LOCAL_COPIES = "; without the network, pass local copies: a model folder (`hf download ID --local-dir DIR`) or a .jsonl"
pytestmark = pytest.mark.slow


def run_offline(
    tmp_path: Path, argv: list[str], offline: bool, toy_cache: Path
) -> tuple[subprocess.CompletedProcess, str]:
    """Run a script (or `-c code`) with an empty hub cache; returns the process and its one error sentence."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    }
    env.update(HF_HOME=str(tmp_path / "hf_home"), CMDP_DISTILL_CACHE=str(toy_cache), PYTHONPATH=str(ROOT))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, str(ROOT / argv[0]), *argv[1:]] if argv[0].endswith(".py") else [sys.executable, *argv]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    ours = [line for line in lines if not any(s in line for s in HUB_RETRY_LINES)]
    assert len(ours) == 1 and ours[0] == lines[-1], proc.stderr[-3000:]  # one sentence, last
    if offline:
        assert len(lines) == 1, proc.stderr[-3000:]
    return proc, ours[0]


@pytest.fixture
def toy_cache(tiny_toy, tmp_path) -> Path:
    """A $CMDP_DISTILL_CACHE whose default toy build is the tiny one, so that 'toy' resolves without a build."""
    cache = tmp_path / "toy_cache"
    cache.mkdir()
    (cache / toy_math.default_dir(0).name).symlink_to(tiny_toy)
    return cache


@pytest.mark.parametrize("offline", [OFFLINE, ONLINE])
def test_hub_dataset_fails_in_one_sentence(tmp_path, offline):
    empty_cache = tmp_path / "empty_cache"
    empty_cache.mkdir()
    _, sentence = run_offline(tmp_path, ["eval_math.py", "--dataset", "gsm8k"], offline, empty_cache)
    assert sentence.startswith(("ConnectionError: ", "OSError: ")) and LOCAL_COPIES in sentence
    if offline:
        assert sentence.startswith("ConnectionError: Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")
    assert not any(empty_cache.iterdir())  # the dataset fails before the (default) toy models are built


def test_gsm_symbolic_names_their_hub_repository_offline(tmp_path):
    _, sentence = run_offline(tmp_path, ["eval_math.py", "--dataset", "gsm_symbolic_p2"], True, tmp_path)
    assert (
        sentence.startswith("ConnectionError: Couldn't reach 'apple/GSM-Symbolic' on the Hub")
        and LOCAL_COPIES in sentence
    )


def test_gsm_symbolic_has_no_train_split(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval_math.py"), "--dataset", "gsm_symbolic", "--split", "train"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "dataset gsm_symbolic (apple/GSM-Symbolic, config main) has only the split(s) test, not 'train': "
        "to train, pass a local .jsonl file as --dataset and gsm_symbolic as --eval-dataset."
    )


@pytest.mark.parametrize("offline", [OFFLINE, ONLINE])
def test_hub_student_fails_in_one_sentence(tmp_path, toy_cache, offline):
    argv = ["cmdp_distill.py", "--student", "Qwen/Qwen2.5-Math-1.5B", "--teacher", "Qwen/Qwen2.5-Math-7B-Instruct"]
    _, sentence = run_offline(tmp_path, argv, offline, toy_cache)
    assert sentence.startswith("OSError: ") and sentence.endswith(LOCAL_COPIES + " file of problems.")


def test_hub_teacher_fails_in_one_sentence_offline(tmp_path, toy_cache, tiny_toy):
    argv = [
        "lagrangian_distill.py",
        "--student",
        str(tiny_toy / "student"),
        "--teacher",
        "Qwen/Qwen2.5-Math-7B-Instruct",
    ]
    _, sentence = run_offline(tmp_path, argv, True, toy_cache)
    assert sentence.startswith("OSError: We couldn't connect to 'https://huggingface.co'") and LOCAL_COPIES in sentence


def test_local_paths_keep_their_own_errors(tmp_path):
    """A local folder is never looked up on the hub; what is wrong with it is the library's error, unchanged."""
    for load in (common.load_tokenizer, lambda path: common.load_model(path, torch.device("cpu"), torch.float32)):
        with pytest.raises((OSError, ValueError)) as info:  # an empty folder: transformers' own error, not SystemExit
            load(str(tmp_path))
        assert "Hugging Face hub" not in str(info.value)
