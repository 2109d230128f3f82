"""The ``loctex`` command. Each sub-command lives in its own module, which defines
``add_arguments(parser)`` and ``main(args) -> int | None``; this file only routes to them, so a new
command is one line here and its module is imported only when it runs."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "synth": ("loctex.synth", "generate the embedded data set in the Localized Narratives format"),
    "tokenizer": ("loctex.data.tokenizer", "train a tokenizer on narrative captions"),
    "prepare": ("loctex.data.prepare", "validate, align and pack narratives for training"),
    "export": ("loctex.export", "export backbone weights for torchvision / detectron2"),
    "eval": ("loctex.eval.cli", "downstream evaluations (voc07, localization, detection)"),
    "reproduce": ("loctex.reproduce", "the paper's comparison in miniature on the embedded data set"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loctex", description="LocTex Engine: pre-training from localized narratives.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        # Importing every module to build --help would be slow (torch); commands that need
        # arguments declare them in add_arguments, imported here only for the chosen command.
        if name in sys.argv[1:2] or "-h" in sys.argv[2:3] or "--help" in sys.argv[2:3]:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    saved = sys.argv
    sys.argv = [saved[0], *argv]  # build_parser looks at the command name to import lazily
    try:
        args = build_parser().parse_args(argv)
    finally:
        sys.argv = saved
    rc = importlib.import_module(args._module).main(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
