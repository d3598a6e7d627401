"""CLI: every bad input gives one line naming the problem and the fix, exit 2, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from paradecode.cli import main
from paradecode.models.loading import resolve_model_path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("paradecode: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """A tiny Llama saved as a HF directory with the default model's tokenizer, 64-token context."""
    from paradecode.models.tiny import tiny_hf_model

    d = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_hf_model("llama", vocab_size=49152, hidden=32, layers=1, heads=2, kv_heads=1,
                          intermediate=64, max_context=64)
    model.save_pretrained(d)
    src = resolve_model_path(None)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).exists():
            shutil.copy(src / f, d / f)
    return d


@pytest.mark.parametrize("args, needles", [
    (["--model", "/does/not/exist"], ["does not exist", "--model"]),
    (["--max-new-tokens", "0"], ["max new tokens", "≥ 1"]),
    (["--max-new-tokens", "-5"], ["max new tokens"]),
    (["--temperature", "-0.5"], ["temperature", "greedy"]),
    (["--top-p", "0"], ["top-p", "(0, 1]"]),
    (["--top-p", "1.2"], ["top-p"]),
    (["--top-k", "-1"], ["top-k"]),
    (["--method", "no-such-method"], ["unknown method", "plain"]),
    (["--method", "plain", "-o", "nope=1"], ["no option", "nope"]),
    (["-o", "novalue"], ["KEY=VALUE"]),
    (["--backend", "onnx"], ["unknown backend", "native"]),
    (["--dtype", "float8"], ["unknown dtype", "float32"]),
    # nothing given is dropped or crashes (audit, session 24)
    (["--threads", "100000"], ["threads must be in 1..1024"]),                 # torch segfaulted
    (["--temperature", "inf"], ["temperature", "finite"]),
    (["--temperature", "0.5", "--seed", "-1"], ["seed", "0..2**64-1"]),
    (["--top-k", "3"], ["--top-k", "greedy decoding (--temperature 0), which takes none"]),
    (["--top-p", "0.5", "--seed", "5"], ["--top-p and --seed", "--temperature"]),
    (["--method", "pld", "-o", "num_draft_tokens=0", "-o", "num_draft_tokens=5"], ["given twice"]),
    (["--method", "pld", "-o", "max_ngram=1000000000"], ["max_ngram", "1..16"]),
    (["--method", "selfspec", "-o", "skip_layers=1,,2"], ["empty item"]),
    (["--method", "selfspec", "-o", "skip_layers=3,3,5"], ["lists a layer twice"]),
    (["--method", "selfspec", "-o", "skip_layers=3", "-o", "skip_ratio=0.5"], ["skip_ratio", "no effect"]),
    (["--method", "quantspec", "-o", "draft_format=int8", "-o", "draft_activations=16"],
     ["draft_activations", "int4 twin only"]),
])
def test_bad_generate_options(capsys, args, needles):
    code, _, err = run_cli(capsys, "generate", "--prompt", "Hello", *args)
    assert_one_line_error(code, err, *needles)


def test_a_prompt_that_is_not_utf8_is_one_clear_line(capsys):
    code, _, err = run_cli(capsys, "generate", "--prompt", "ab\udcffcd")     # how Python keeps argv's byte 0xFF
    assert_one_line_error(code, err, "byte 0xFF", "not UTF-8")


def test_closed_stdin_and_an_unwritable_stdout_are_one_clear_line(capsys, monkeypatch):
    import paradecode.api

    monkeypatch.setattr(sys, "stdin", None)                                   # started with 0<&-
    code, _, err = run_cli(capsys, "generate")
    assert_one_line_error(code, err, "prompt is empty")

    def full(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(paradecode.api, "generate", full)                     # as writing to >/dev/full does
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi")
    assert code == 1 and err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err


@pytest.mark.parametrize("args, needles", [
    (["--out", "same.png"], ["is not an .html file"]),                        # the PNG would overwrite it
    (["--png", "v.xyz"], ["is not a .png file"]),
    (["--png", "v.png", "--no-png"], ["both --png and --no-png"]),
])
def test_bad_viz_outputs_are_refused_before_the_decode(capsys, tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "viz", "--prompt", "hi", *args)
    assert_one_line_error(code, err, *needles)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, needles", [
    (["--max-new-tokens", "0"], ["max new tokens"]),
    (["--prompt", "  "], ["prompt is empty"]),
    (["--method", "pld", "-o", "nope=1"], ["no option", "nope"]),
])
def test_bad_demo_options_are_refused_before_the_model_loads(capsys, monkeypatch, args, needles):
    import paradecode.commands.demo as demo

    def no_model(args):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(demo, "model_from_args", no_model)
    code, out, err = run_cli(capsys, "demo", *args)
    assert_one_line_error(code, err, *needles)
    assert not out


def test_empty_prompt(capsys):
    code, _, err = run_cli(capsys, "generate", "--prompt", "   ")
    assert_one_line_error(code, err, "prompt is empty")


def test_missing_prompt_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--prompt-file", str(tmp_path / "missing.txt"))
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run_cli(capsys, "generate", "--prompt-file", str(tmp_path))
    assert_one_line_error(code, err, "is a folder", "text file")


def test_empty_prompt_file(capsys, tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("\n\n")
    code, _, err = run_cli(capsys, "generate", "--prompt-file", str(p))
    assert_one_line_error(code, err, "prompt is empty")


def test_model_dir_without_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--model", str(tmp_path))
    assert_one_line_error(code, err, "config.json")


def test_model_file_not_gguf(capsys, tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"junk")
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--model", str(f))
    assert_one_line_error(code, err, "not a .gguf")


def test_broken_gguf(capsys, tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"not really a gguf file")
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--model", str(f))
    assert_one_line_error(code, err, "GGUF")


def test_unsupported_architecture(capsys, tmp_path):
    import transformers as tf

    cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                         bos_token_id=1, eos_token_id=2)
    tf.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    capsys.readouterr()                # transformers' own progress bar while saving is not the CLI's output
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--model", str(tmp_path))
    assert_one_line_error(code, err, "GPT2LMHeadModel", "LlamaForCausalLM", "--backend transformers")


def test_prompt_longer_than_context(capsys, small_model_dir):
    code, _, err = run_cli(capsys, "generate", "--model", str(small_model_dir), "--prompt", "word " * 200)
    assert_one_line_error(code, err, "context window", "shorten the prompt")


def test_prompt_plus_tokens_beyond_context(capsys, small_model_dir):
    code, _, err = run_cli(capsys, "generate", "--model", str(small_model_dir), "--prompt", "word " * 20,
                           "--max-new-tokens", "60")
    assert_one_line_error(code, err, "context window", "--max-new-tokens")


def test_small_model_dir_generates_on_both_backends(capsys, small_model_dir):
    outs = []
    for backend in ("native", "transformers"):
        code, out, err = run_cli(capsys, "generate", "--model", str(small_model_dir), "--backend", backend,
                                 "--dtype", "float32", "--prompt", "one two three", "--max-new-tokens", "8", "--json")
        assert code == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1])["token_ids"])
    assert outs[0] == outs[1] and len(outs[0]) == 8


def test_methods_and_models_commands(capsys):
    code, out, _ = run_cli(capsys, "methods", "--json")
    assert code == 0
    names = {m["name"] for m in json.loads(out)}
    assert "plain" in names
    code, out, _ = run_cli(capsys, "models", "--json")
    info = json.loads(out)
    assert code == 0 and info["installed"] and info["converted"] and info["name"] == "SmolLM2-135M-Instruct"
    assert info["prepared_files"] >= 0 and info["prepared_dir"].endswith("prepared")
    from paradecode.models import kernels
    from paradecode.models.loading import auto_dtype

    assert info["auto_dtype"] == auto_dtype() and info["kernels"] == kernels.describe()   # what this CPU runs
    code, out, _ = run_cli(capsys, "models")
    assert f"kernels on this CPU: {kernels.describe()}" in out and f"(auto here: {auto_dtype()})" in out
    code, out, _ = run_cli(capsys, "models", "--prepare", "--json")       # the default format's weights too
    assert code == 0 and json.loads(out)["prepared_files"] >= 1


def test_generate_end_to_end_default_model():
    """A real process: streams text, then prints one JSON object on the last line."""
    proc = subprocess.run(
        [sys.executable, "-m", "paradecode", "generate", "--chat", "--prompt", "What is the capital of France?",
         "--max-new-tokens", "12", "--json"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Paris" in data["text"]
    assert data["stats"]["model_calls"] >= 1 and data["stats"]["tokens_per_s"] > 0
    assert len(data["token_ids"]) == data["stats"]["new_tokens"]


def test_generate_streams_from_stdin():
    proc = subprocess.run([sys.executable, "-m", "paradecode", "generate", "--chat", "--max-new-tokens", "8"],
                          input="Name one colour.", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "model calls" in proc.stderr


def test_stdin_that_is_not_utf8_is_one_clear_line_under_a_strict_locale():
    import os

    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}      # as an en_US.UTF-8 locale reads stdin
    proc = subprocess.run([sys.executable, "-m", "paradecode", "generate", "--max-new-tokens", "2"],
                          input=b"Hi \xff there", capture_output=True, timeout=300, env=env)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "byte 0xFF" in err and "Traceback" not in err, err


def test_an_unwritable_cache_is_one_clear_line(capsys, tmp_path, monkeypatch):
    """A first use whose cache cannot be written: the GGUF's conversion stops before it starts."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    code, _, err = run_cli(capsys, "generate", "-p", "hi", "--max-new-tokens", "2")
    assert_one_line_error(code, err, "cannot write the model cache", "XDG_CACHE_HOME")


@pytest.mark.parametrize("change, needles", [
    ({"hidden_size": None}, ["hidden_size must be a positive integer"]),
    ({"num_attention_heads": "nine"}, ["num_attention_heads must be a positive integer"]),
    ({"num_key_value_heads": 3}, ["not a multiple of num_key_value_heads"]),
    ({"hidden_size": 128}, ["has the shape", "config.json belongs to these weights"]),   # weights are 32 wide
])
def test_a_config_that_does_not_fit_is_one_clear_line(capsys, small_model_dir, tmp_path, change, needles):
    d = tmp_path / "edited"
    shutil.copytree(small_model_dir, d)
    config = json.loads((d / "config.json").read_text())
    config.update({k: v for k, v in change.items() if v is not None})
    for k in [k for k, v in change.items() if v is None]:
        del config[k]
    (d / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "generate", "--model", str(d), "-p", "hi", "--max-new-tokens", "2")
    assert_one_line_error(code, err, *needles)


def test_running_without_the_kernels_says_so(capsys, small_model_dir, monkeypatch):
    from paradecode.models import kernels

    monkeypatch.setattr(kernels, "attention_kernel", lambda: None)
    monkeypatch.setattr(kernels, "FAILURE", "no C compiler found (set CC)")
    code, out, err = run_cli(capsys, "generate", "--model", str(small_model_dir), "-p", "hi", "--max-new-tokens", "2")
    assert code == 0 and "note: the compiled kernels are unavailable (no C compiler found" in err
    monkeypatch.setenv("PARADECODE_KERNELS", "0")                  # asked for: no note
    code, out, err = run_cli(capsys, "generate", "--model", str(small_model_dir), "-p", "hi", "--max-new-tokens", "2")
    assert code == 0 and "note:" not in err


@pytest.mark.parametrize("damage", ["garbage", "cut in the header", "cut in the data"])
def test_damaged_weights_are_one_clear_line(capsys, small_model_dir, tmp_path, damage):
    d = tmp_path / "damaged"
    shutil.copytree(small_model_dir, d)
    f = next(d.glob("*.safetensors"))
    data = f.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    f.write_bytes({"garbage": b"\xff" * 8 + b"{not json", "cut in the header": data[:header // 2],
                   "cut in the data": data[:header + (len(data) - header) // 2]}[damage])
    code, _, err = run_cli(capsys, "generate", "--model", str(d), "-p", "hi", "--max-new-tokens", "2")
    assert_one_line_error(code, err, "not a whole safetensors file", str(f.name))


def test_serve_on_a_port_in_use_is_one_clear_line_before_the_model_loads(capsys, monkeypatch):
    import socket

    from paradecode.commands import serve

    monkeypatch.setattr(serve, "model_from_args", lambda args: pytest.fail("the model loaded first"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", "--port", str(port))
    assert_one_line_error(code, err, f"cannot listen on 127.0.0.1:{port}", "--port")


CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def test_generate_from_a_messages_file(capsys, tmp_path, monkeypatch, default_model):
    from paradecode import generate

    lib = generate(default_model, CONVERSATION, max_new_tokens=10).token_ids
    f = tmp_path / "conv.json"
    f.write_text(json.dumps(CONVERSATION))
    code, out, err = run_cli(capsys, "generate", "--messages", str(f), "--max-new-tokens", "10", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["token_ids"] == lib
    import io                                                    # an object with its messages, on stdin
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"messages": CONVERSATION})))
    code, out, err = run_cli(capsys, "generate", "-m", "-", "--max-new-tokens", "10", "--json", "--method", "pld")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["token_ids"] == lib
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"messages": CONVERSATION, "max_tokens": 2})))
    code, out, err = run_cli(capsys, "generate", "-m", "-", "--max-new-tokens", "10")   # a whole OpenAI request
    assert_one_line_error(code, err, "max_tokens beside its messages", "--max-new-tokens")


@pytest.mark.parametrize("content, extra, needles", [
    ('[{"role": "user", "content": "hi"', (), ("is not valid JSON", "line 1")),
    ('{"role": "user", "content": "hi"}', (), ("does not hold a list of chat messages",)),
    ("[]", (), ("does not hold a list of chat messages",)),
    ('["hi"]', (), ("does not hold a list of chat messages",)),
    ('[{"role": "wizard", "content": "hi"}]', (), ("role 'wizard'",)),
    ('[{"role": "user", "content": 3}]', (), ('"content" as text, got int',)),
    ('[{"role": "user", "content": "hi", "name": "bob"}]', (), ("the key 'name'", "does not read")),
    ('[{"role": "user", "content": "hi"}]', ("--prompt", "hi"), ("both --messages and a prompt given",)),
])
def test_bad_messages_files(capsys, tmp_path, content, extra, needles):
    f = tmp_path / "conv.json"
    f.write_text(content)
    code, _, err = run_cli(capsys, "generate", "--messages", str(f), "--max-new-tokens", "2", *extra)
    assert_one_line_error(code, err, *needles)


def test_messages_file_missing_or_a_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--messages", str(tmp_path / "nope.json"))
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run_cli(capsys, "generate", "--messages", str(tmp_path))
    assert_one_line_error(code, err, "is a folder")


def test_the_default_dtype_is_chosen_for_the_cpu(capsys, small_model_dir, monkeypatch):
    """auto: bfloat16 where the CPU multiplies bfloat16 in hardware and the kernels are built, else float32;
    the transformers backend float32. The choice is reported, never hidden."""
    from paradecode.models import kernels, loading

    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2", "fma"})
    assert loading.auto_dtype() == "float32"
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert loading.auto_dtype("transformers") == "float32"
    expected = "bfloat16" if kernels.attention_kernel() is not None else "float32"
    assert loading.auto_dtype() == expected
    code, out, err = run_cli(capsys, "generate", "--model", str(small_model_dir), "--prompt", "one two",
                             "--max-new-tokens", "2", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["dtype"] == expected
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"amx_bf16"})
    assert loading.load_model(str(small_model_dir)).info.dtype == expected
    monkeypatch.setattr(loading, "cpu_flags", lambda: set())
    assert loading.load_model(str(small_model_dir)).info.dtype == "float32"
    code, _, err = run_cli(capsys, "generate", "--model", str(small_model_dir), "--dtype", "float16", "-p", "hi")
    assert_one_line_error(code, err, "unknown dtype 'float16'", "auto")


def test_serve_with_an_empty_api_key_is_one_clear_line(capsys, monkeypatch):
    from paradecode.commands import serve

    monkeypatch.setattr(serve, "model_from_args", lambda args: pytest.fail("the model loaded first"))
    code, _, err = run_cli(capsys, "serve", "--api-key", " ")
    assert_one_line_error(code, err, "--api-key is empty")
    code, _, err = run_cli(capsys, "serve", "--draft-model", "/does/not/exist")
    assert_one_line_error(code, err, "does not exist")


def _piped(monkeypatch, text: str) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


def test_chat_keeps_the_conversation(capsys, monkeypatch, default_model):
    """Piped lines are the user's turns; each answer is the library's answer to the conversation so far."""
    from paradecode import generate

    _piped(monkeypatch, "Name a colour.\n\nAnd a fruit?\n")
    code, out, err = run_cli(capsys, "chat", "--dtype", "float32", "--max-new-tokens", "10", "--method", "pld")
    assert code == 0, err
    turns = [{"role": "user", "content": "Name a colour."}]
    first = generate(default_model, turns, max_new_tokens=10).text
    turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "And a fruit?"}]
    second = generate(default_model, turns, max_new_tokens=10).text
    assert out == f"{first}\n{second}\n"
    assert err.count("[pld:") == 2


def test_chat_reset_system_and_a_started_conversation(capsys, monkeypatch, tmp_path, default_model):
    from paradecode import generate

    system = {"role": "system", "content": "Answer in French."}
    _piped(monkeypatch, "Hello!\n/reset\nHello!\n/exit\nnot read\n")
    code, out, err = run_cli(capsys, "chat", "--dtype", "float32", "--max-new-tokens", "8", "-q",
                             "--system", system["content"])
    assert code == 0, err
    answer = generate(default_model, [system, {"role": "user", "content": "Hello!"}], max_new_tokens=8).text
    assert out == f"{answer}\n{answer}\n" and "starts over" in err and "[plain" not in err
    f = tmp_path / "conv.json"                      # a conversation ending in a user message is answered first
    f.write_text(json.dumps([system, {"role": "user", "content": "Hello!"}]))
    _piped(monkeypatch, "")
    code, out, err = run_cli(capsys, "chat", "--dtype", "float32", "--max-new-tokens", "8", "-m", str(f))
    assert code == 0 and out == f"{answer}\n"
    code, _, err = run_cli(capsys, "chat", "-m", str(f), "--system", "x")
    assert_one_line_error(code, err, "both --system and a system message")


def test_chat_commands_reset_to_the_started_conversation_and_unknown_ones_are_refused(capsys, monkeypatch,
                                                                                       tmp_path, default_model):
    from paradecode import generate

    f = tmp_path / "conv.json"                      # ends with a user turn, answered first
    f.write_text(json.dumps([{"role": "user", "content": "Hello!"}]))
    _piped(monkeypatch, "/reset\n//reset is a word\n")
    code, out, err = run_cli(capsys, "chat", "--dtype", "float32", "--max-new-tokens", "6", "-q", "-m", str(f))
    assert code == 0, err
    first = generate(default_model, [{"role": "user", "content": "Hello!"}], max_new_tokens=6).text
    after = generate(default_model, [{"role": "user", "content": "/reset is a word"}], max_new_tokens=6).text
    assert out == f"{first}\n{after}\n"            # the reset dropped the answered turn, // sent the text
    _piped(monkeypatch, "/exti\n")
    code, out, err = run_cli(capsys, "chat", "--dtype", "float32", "--max-new-tokens", "6", "-q")
    assert_one_line_error(code, err, "unknown command /exti", "//")
    assert not out


def test_chat_from_a_pipe_stops_at_an_error(capsys, monkeypatch, small_model_dir):
    _piped(monkeypatch, "word " * 80 + "\n")          # longer than the small model's 64-token window
    code, _, err = run_cli(capsys, "chat", "--model", str(small_model_dir), "--max-new-tokens", "4")
    assert_one_line_error(code, err, "context window")


def test_ctrl_c_during_an_answer_stops_it_and_keeps_the_session():
    import os
    import signal
    import threading

    from paradecode.commands.chat import _interrupt_sets

    event = threading.Event()
    before = signal.getsignal(signal.SIGINT)
    with _interrupt_sets(event):
        os.kill(os.getpid(), signal.SIGINT)            # no KeyboardInterrupt: the event is set instead
        assert event.wait(5)
    assert signal.getsignal(signal.SIGINT) is before
