"""The project's one command-line style: a dataclass of arguments becomes an argparse parser.

Each field is a flag spelt with dashes (`batch_size` -> `--batch-size`), its `help` metadata the help text, its
`aliases` metadata more spellings. Booleans are switches (`--tiny`). In a program without positional arguments an
explicit value (`--tiny false`, as older command lines give it) is still understood; with positional arguments it
would swallow the next one (`--compare RUN`). A boolean that defaults to on also gets `--no-<flag>` with its own
help (metadata `no_help`). `Literal[...]` gives choices. A field left at None whose value depends on the mode shows
"[full X / tiny Y]" from the mode table instead of "None". Metadata `positional` makes a field positional (its
`nargs` from metadata).

Only the standard library is imported here, so that `--help` and a mistyped flag answer at once, before torch.
Every error is one line, raised as UsageError for the caller to print (exit status 2).
"""
import argparse
import dataclasses
import difflib
import sys
import types
import typing
from typing import Literal


class UsageError(ValueError):
    """Bad input: printed as one line on stderr, exit status 2, before anything is written."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one UsageError line (no usage dump), with a guess for a misspelt flag."""

    def parse_args(self, args=None, namespace=None):
        self.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            message = unknown_argument(message.split(":", 1)[1].split()[0], self)
        elif message.endswith("expected one argument"):
            message += negative_value_hint(message, getattr(self, "argv", []))
        raise UsageError(message)


def negative_value_hint(message: str, argv: list[str]) -> str:
    """argparse reads `--lr -inf` as two flags; if the flag was followed by something negative, say how to give it."""
    names = message.split(":")[0].removeprefix("argument ").split("/")
    for option, value in zip(argv, argv[1:]):
        if option in names and value.startswith("-") and value[1:2] not in ("-", ""):
            return f" (a value that starts with '-' must be attached: {option}={value})"
    return ""


def unknown_argument(argument: str, parser: argparse.ArgumentParser) -> str:
    if not argument.startswith("-"):
        return f"unexpected argument {argument!r}: every setting is a --flag (see --help)"
    options = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    close = difflib.get_close_matches(argument.split("=")[0], options, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "see --help for the flags"
    return f"unknown flag {argument}; {hint}"


def option(default, help: str, **metadata) -> dataclasses.Field:
    """A dataclass field that is a flag: its default, its help text and more metadata (aliases, no_help, ...)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def truthy(value: str) -> bool:
    """An explicit value after a switch (`--tiny false`), as older command lines and scripts give it."""
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"Truthy value expected: got {value!r}, expected true or false (or nothing: "
                                     "a switch is on when given)")


class SwitchHelp(argparse.HelpFormatter):
    """Shows a boolean as the switch it is (`--tiny`), not with the optional value it also accepts."""

    def _format_args(self, action, default_metavar):
        return "" if action.type is truthy else super()._format_args(action, default_metavar)

    def _format_action_invocation(self, action):
        return ", ".join(action.option_strings) if action.type is truthy else super()._format_action_invocation(action)

    def _format_usage(self, usage, actions, groups, prefix):
        return super()._format_usage(usage, actions, groups, prefix).replace(" []", "")


def field_type(hint):
    """The argparse type of a field's annotation: `int | None` -> int, Literal -> itself."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    return options[0]


def mode_default(name: str, modes: dict[str, dict]) -> str:
    """'full 500 / tiny 20': the defaults the modes give a field left at None."""
    return " / ".join(f"{mode} {values[name]:g}" if isinstance(values[name], float) else f"{mode} {values[name]}"
                      for mode, values in modes.items() if name in values)


def add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint, modes: dict[str, dict],
              explicit_values: bool) -> None:
    kind, help_ = field_type(hint), f.metadata.get("help", "")
    names = [flag(f.name), *f.metadata.get("aliases", [])]
    if f.metadata.get("positional"):
        parser.add_argument(f.name, nargs=f.metadata.get("nargs"), help=help_, metavar=f.name.upper())
    elif kind is bool:
        if explicit_values:
            parser.add_argument(*names, dest=f.name, nargs="?", const=True, type=truthy, default=f.default, help=help_)
        else:
            parser.add_argument(*names, dest=f.name, action="store_true", default=f.default, help=help_)
        if f.default:
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                help=f.metadata["no_help"])
    else:
        shown = (f"[{mode_default(f.name, modes)}]" if f.default is None else "" if f.default == "" else
                 f"(default: {f.default})")
        choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else None
        parser.add_argument(*names, dest=f.name, default=f.default, choices=choices,
                            type=type(choices[0]) if choices else kind, metavar=None if choices else f.name.upper(),
                            help=f"{help_} {'' if shown == '[]' else shown}".strip())


def parser_for(cls, modes: dict[str, dict] | None = None, **parser_kwargs) -> OneLineParser:
    """The parser of dataclass `cls`; `modes` maps a mode name to the defaults it gives fields left at None."""
    parser = OneLineParser(allow_abbrev=False, formatter_class=SwitchHelp, **parser_kwargs)
    hints, fields = typing.get_type_hints(cls), dataclasses.fields(cls)
    positionals = any(f.metadata.get("positional") for f in fields)
    for f in fields:
        add_field(parser, f, hints[f.name], modes or {}, explicit_values=not positionals)
    return parser


def parse(cls, argv: list[str], modes: dict[str, dict] | None = None, **parser_kwargs):
    """argv -> an instance of dataclass `cls`; UsageError (one line) on bad input; --help prints and exits 0."""
    return cls(**vars(parser_for(cls, modes, **parser_kwargs).parse_args(argv)))


def parse_or_exit(program: str, parse_argv, argv: list[str]):
    """parse_argv(argv), or the one-line error and exit status 2: for a program's first lines, before its heavy
    imports, so that a mistyped flag answers at once."""
    try:
        return parse_argv(argv)
    except UsageError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(2)
