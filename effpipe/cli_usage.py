"""How the binaries answer their command line: bad input in one line, help by section.

A flag absl refuses, or a `UsageError`, ends with `PROGRAM: error: MESSAGE` on
stderr and exit status 2, the fix named where absl names none. `--help` and
`--helpshort` list the program's own flags, then the shared flags of
`effpipe.cli_flags` under the sections of `config.SECTION_TITLES` in the order they
are defined (absl's own help sorts them alphabetically); `--helpfull` stays absl's
list of every flag of every module. The binaries reach these through
`effpipe.cli_flags`.
"""

import re
import sys

from absl import app, flags

from effpipe import config as config_lib
from effpipe.errors import UsageError

FLAGS = flags.FLAGS


def exit_with_usage_error(program: str, error: Exception) -> None:
    """Prints `program: error: MESSAGE` as one line on stderr and exits with status 2."""
    # absl prefixes some of its messages with "ERROR:: "; the line says error once.
    message = " ".join(str(error).split()).removeprefix("ERROR:: ")
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)


def refuse_arguments(program: str, argv: list[str]) -> None:
    """Exits with one line and status 2 when `argv` holds more than the program."""
    if len(argv) > 1:
        exit_with_usage_error(
            program,
            UsageError(f"unexpected arguments {' '.join(argv[1:])}: flags take --name=value"),
        )


def make_flags_parser(program: str):
    """An absl `flags_parser` for `app.run`: a bad flag is one line and exit status 2,
    and --help and --helpshort list the flags by section."""
    _define_sectioned_help_flags(program)

    def parse(argv: list[str]) -> list[str]:
        try:
            return FLAGS(argv)
        except flags.Error as error:
            exit_with_usage_error(program, UsageError(_flag_error_with_fix(program, error)))

    return parse


def sectioned_help(program: str, module_name: str) -> str:
    """The key flags of a module by section: its own first, under `program`, then
    the configuration's.

    Args:
      program: the heading of the module's own flags ("effpipe.train").
      module_name: absl's name of the module; the main module's is sys.argv[0].
    """
    # Flag names are the configuration's field names (effpipe.cli_flags).
    groups = {"own": [], **{section: [] for section in config_lib.SECTION_TITLES}}
    for flag in FLAGS.get_key_flags_for_module(module_name):
        groups[config_lib.FIELD_SLICES.get(flag.name, "own")].append(flag)
    lines = []
    titles = {"own": program, **config_lib.SECTION_TITLES}
    for section, section_flags in groups.items():
        if section_flags:
            lines += ["", f"{titles[section]}:"]
            lines += [_describe_flag(flag) for flag in section_flags]
    return "\n".join(lines)


def _describe_flag(flag: flags.Flag) -> str:
    name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
    default = f" (default: {flag.default_as_str})" if flag.default_as_str else ""
    return flags.text_wrap(f"{name}: {flag.help}{default}", indent="      ", firstline_indent="  ")


class _SectionedHelpFlag(flags.BooleanFlag):
    """absl's --help or --helpshort, listing the flags by section; exits with status 0."""

    def __init__(self, name: str, short_name: str | None, program: str):
        self.program = program
        super().__init__(
            name,
            False,
            "show this help: the program's flags by section (--helpfull: every flag of "
            "every module)",
            short_name=short_name,
            allow_override=True,
        )

    def parse(self, argument) -> None:
        super().parse(argument)
        if self.value:
            doc = sys.modules["__main__"].__doc__ or ""
            print(doc.rstrip() + "\n" + sectioned_help(self.program, sys.argv[0]))
            print("\nTry --helpfull to get a list of all flags.")
            sys.exit(0)


def _define_sectioned_help_flags(program: str) -> None:
    """Puts _SectionedHelpFlag in the place of absl's --help (-?) and --helpshort."""
    # absl defines its help flags once (app.run would, after this); ours replace them.
    app.define_help_flags()
    for name, short_name in (("help", "?"), ("helpshort", None)):
        flags.DEFINE_flag(_SectionedHelpFlag(name, short_name, program))


# What to pass instead of a value absl cannot parse, by the flag's type; an enum's
# message already lists its choices.
_VALUE_HINTS = {
    "int": "pass a whole number, e.g. --{name}={default}",
    "float": "pass a number, e.g. --{name}={default}",
    "bool": "pass --{name} or --no{name}",
}


def _flag_error_with_fix(program: str, error: flags.Error) -> str:
    """absl's message for a flag it refused, with the fix added where it names none."""
    message = " ".join(str(error).split()).removeprefix("ERROR:: ")
    if isinstance(error, flags.CantOpenFlagFileError):
        return (
            f"{message}: check the --flagfile path (a relative path, nested flagfiles' "
            "too, resolves from the current directory: run from the repo root)"
        )
    if isinstance(error, flags.UnrecognizedFlagError) and "Did you mean" not in message:
        return f"{message}: `python -m {program} --helpfull` lists the flags"
    refused = re.match(r"flag --(\w+)=", message)
    if isinstance(error, flags.IllegalFlagValueError) and refused and refused[1] in FLAGS:
        flag = FLAGS[refused[1]]
        hint = _VALUE_HINTS.get(flag.flag_type())
        if hint:
            return f"{message}: {hint.format(name=flag.name, default=flag.default)}"
    return message
