"""Errors a user can cause, each with a message that says what to change."""


class InputError(ValueError):
    """Bad user input (image, prompt, settings, paths). The message is shown as is."""


def check_layer(name: str, value, lo: int, hi: int) -> int:
    """``value`` as a layer index in ``lo..hi``, or an InputError naming ``name`` and the range
    (the one layer / depth check of the project: interventions, CAM, skip and substitution
    grids). Booleans and non-integers are refused (no silent rounding)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= int(value) <= hi:
        raise InputError(f"{name} must be an integer in {lo}..{hi} for this model, got {value!r}")
    return int(value)
