"""Errors the compiler raises for bad input. The CLI turns each into one line, exit 2."""


class SpecError(ValueError):
    """A model, device, pool or option is malformed or out of range; the message names it."""


class FitError(ValueError):
    """The model cannot be placed on the pool (too little memory); the message says how many devices it needs."""
