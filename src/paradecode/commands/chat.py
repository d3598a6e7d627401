"""`paradecode chat`: a conversation in the terminal with one decoding method, each answer's cost shown."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from ._common import (add_generation_args, add_method_args, add_model_args, generation_config, method_options,
                      model_from_args, read_messages)

HELP = "/reset starts over, /exit or Ctrl-D quits, Ctrl-C stops an answer, // sends a line that begins with /"
COMMANDS = ("/reset", "/exit", "/quit")


def register(sub) -> None:
    p = sub.add_parser("chat", help="talk with the model in the terminal (multi-turn, streamed, each answer's cost)",
                       description="A multi-turn conversation: each message's answer streams as its tokens are "
                                   f"accepted; {HELP}. When stdin is not a terminal, each line is one message.")
    p.add_argument("--system", default=None, help="a system message to start with")
    p.add_argument("--messages", "-m", default=None, metavar="FILE",
                   help="start from this conversation (a JSON list of {role, content}); a last user message "
                        "is answered first")
    p.add_argument("--quiet", "-q", action="store_true", help="no cost line after each answer")
    add_model_args(p)
    add_method_args(p)
    add_generation_args(p, max_new_tokens=512)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import generate
    from ..errors import UserError
    from ..methods import get_method
    from ..sampling import check_text

    gen = generation_config(args)                      # cheap checks before the model loads
    method = get_method(args.method, method_options(args))
    start = read_messages(args.messages) if args.messages is not None else []
    if args.system is not None:
        check_text(args.system, "system", "--system")
        if any(m.get("role") == "system" for m in start):
            raise UserError("both --system and a system message in --messages", "give the system message once")
        start = [{"role": "system", "content": args.system}, *start]
    model = model_from_args(args)
    if not getattr(model.tokenizer, "chat_template", None):
        raise UserError("this model has no chat template", "use `paradecode generate` for plain text")
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing, and lines longer than the terminal's 4095 characters)

        print(f"paradecode chat · {model.info.name} ({model.info.dtype}) · method {method.name} · {HELP}",
              file=sys.stderr)

    messages = list(start)
    pending = bool(messages) and messages[-1].get("role") == "user"
    while True:
        if not pending:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:                  # Ctrl-C at the prompt: leave, as Ctrl-D does
                print(file=sys.stderr)
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":                       # a last user message of --messages was answered: drop it
                answered = bool(start) and start[-1].get("role") == "user"
                messages = list(start[:-1] if answered else start)
                print("(the conversation starts over)", file=sys.stderr)
                continue
            if text.startswith("//"):                  # a message that begins with /
                line = line.replace("/", "", 1)
            elif text.startswith("/"):
                e = UserError(f"unknown command {text.split()[0]}", f"the commands are {', '.join(COMMANDS)}; begin "
                              "with // to send a message that starts with /")
                if not interactive:
                    raise e
                print(f"paradecode: error: {e.message}", file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
        pending = False
        cancel = threading.Event()
        try:
            with _interrupt_sets(cancel):
                out = generate(model, messages, method, gen=gen, stream=_print, cancel=cancel.is_set)
        except UserError as e:
            messages.pop()                             # the message that could not be answered
            if not interactive:
                raise
            print(f"\nparadecode: error: {e.message}", file=sys.stderr)
            continue
        print()
        messages.append({"role": "assistant", "content": out.text})    # what was shown, stopped or not
        if not args.quiet:
            stopped = " (stopped)" if out.finish_reason == "cancelled" else ""
            print(f"[{out.stats.summary()}{stopped}]", file=sys.stderr)
    return 0


def _print(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


@contextlib.contextmanager
def _interrupt_sets(event: threading.Event):
    """While an answer is generated, Ctrl-C sets ``event`` (the decode stops after its current model call,
    keeping what it has) instead of raising KeyboardInterrupt mid-call."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
