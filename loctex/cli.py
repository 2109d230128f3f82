"""The ``loctex`` command. Each sub-command lives in its own module, which defines
``add_arguments(parser)`` and ``main(args) -> int | None``; this file only routes to them, so a new
command is one line here and its module is imported only when it runs.

Errors are one line on stderr, ``loctex <cmd>: <file>: <reason>`` (or ``loctex <cmd>: <reason>``
when no file is involved), and a non-zero exit; ``--debug`` (anywhere on the command line) lets
the traceback through instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "synth": ("loctex.synth", "generate the embedded data set in the Localized Narratives format"),
    "tokenizer": ("loctex.data.tokenizer", "train a tokenizer on narrative captions"),
    "prepare": ("loctex.data.prepare", "validate, align and pack narratives for training"),
    "export": ("loctex.export", "export backbone weights for torchvision / detectron2"),
    "eval": ("loctex.eval.cli", "downstream evaluations (voc07, localization, detection, dense)"),
    "reproduce": ("loctex.reproduce", "the paper's comparison in miniature on the embedded data set"),
}
DEBUG_FLAG = "--debug"
EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loctex", description="LocTex Engine: pre-training from localized narratives.")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show the full traceback of an error (allowed anywhere)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module, _command=name)
        # Importing every module to build --help would be slow (torch); commands that need
        # arguments declare them in add_arguments, imported here only for the chosen command.
        if name in argv[:1]:
            importlib.import_module(module).add_arguments(p)
    return parser


def describe(exc: BaseException) -> str:
    """One line for an error: ``<file>: <reason>`` when the error names a file, else ``<reason>``."""
    filename = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and filename is not None:
        reason = exc.strerror or type(exc).__name__
        where = f"{filename} -> {exc.filename2}" if exc.filename2 else str(filename)
        return f"{where}: {reason}"
    text = " ".join(str(exc).split()) if str(exc) else ""
    if isinstance(exc, (KeyError, AttributeError, TypeError, NameError, AssertionError)) or not text:
        # messages of programming errors mean little without their type
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


def _exit_message(message: str, command: str) -> str:
    """A sub-command's ``SystemExit`` message as ``loctex <cmd>: ...``; it may already name its
    command (``eval dense: ...``, ``loctex tokenizer train: ...``)."""
    if message.startswith("loctex "):
        return message
    if command and message.startswith((command.split()[0] + " ", command.split()[0] + ":")):
        return f"loctex {message}"
    return f"{_program(command)}: {message}"


def _program(command: str) -> str:
    return f"loctex {command}" if command else "loctex"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    try:
        args = build_parser(argv).parse_args(argv)  # usage errors exit 2 through argparse
        command = args._command
        return int(importlib.import_module(args._module).main(args) or 0)
    except SystemExit as exc:
        if not isinstance(exc.code, str) or debug:
            raise  # argparse's usage errors and plain exit codes
        print(_exit_message(exc.code, command), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{_program(command)}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every error ends as one line unless --debug
        if debug:
            raise
        print(f"{_program(command)}: {describe(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
