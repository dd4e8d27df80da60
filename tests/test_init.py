"""The flat public face: every name in ``rlprim.__all__`` exists, once, and is documented."""

import inspect

import rlprim as rp


def test_all_names_exist_and_are_unique():
    assert len(rp.__all__) == len(set(rp.__all__)), [
        n for n in rp.__all__ if rp.__all__.count(n) > 1
    ]
    missing = [n for n in rp.__all__ if not hasattr(rp, n)]
    assert missing == []


def test_every_public_name_has_a_docstring():
    # Constants (e.g. the ALGORITHMS registry) are documented in their module's docstring.
    undocumented = [
        n
        for n in rp.__all__
        if callable(getattr(rp, n)) and not (inspect.getdoc(getattr(rp, n)) or "").strip()
    ]
    assert undocumented == []


def test_public_functions_document_their_formula_or_shapes():
    # rlax style: a public function's docstring says more than one line.
    thin = [
        n
        for n in rp.__all__
        if inspect.isfunction(getattr(rp, n))
        and len((inspect.getdoc(getattr(rp, n)) or "").splitlines()) < 3
    ]
    assert thin == []
