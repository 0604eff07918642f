"""Errors the compiler raises for bad input. The CLI turns each into one line, exit 2."""

from pathlib import Path


class SpecError(ValueError):
    """A model, device, pool or option is malformed or out of range; the message names it."""


class FitError(ValueError):
    """The model cannot be placed on the pool (too little memory); the message says how many devices it needs."""


def read_file(path, what: str, parse, form: str):
    """`parse(text)` of a file, with a missing file or a parse failure (parsers raise
    ValueError subclasses: json.JSONDecodeError, tomllib.TOMLDecodeError) as a SpecError
    naming `what` and the path, e.g. "pool file 'x.toml' is not valid TOML: ..."."""
    try:
        return parse(Path(path).read_text())
    except FileNotFoundError:
        raise SpecError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"{what} {str(path)!r} is not {form}: {exc}") from None
