"""Known-harmless library warnings are hidden by name; every other warning stays visible."""
from __future__ import annotations

import warnings

from sage_megatron.quiet import KNOWN_HARMLESS, install


def test_named_warnings_hidden_others_visible():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        install()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning)
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("Apex is not installed. Falling back to Torch Norm", RuntimeWarning)   # other category
        warnings.warn("a real problem: Transformer Engine and Apex are not installed", UserWarning)  # not at start
        warnings.warn("something else", UserWarning)
    assert [(type(w.message), str(w.message)) for w in caught] == [
        (RuntimeWarning, "Apex is not installed. Falling back to Torch Norm"),
        (UserWarning, "a real problem: Transformer Engine and Apex are not installed"),
        (UserWarning, "something else")]


def test_every_entry_says_why():
    assert all(why.strip() for _, _, why in KNOWN_HARMLESS)
