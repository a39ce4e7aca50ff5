"""The public face: what `import dolly` gives, and that no module hides behind a function."""
from __future__ import annotations

import importlib
import importlib.util
import inspect

import dolly


def test_every_public_name_resolves_and_is_documented():
    for name in dolly.__all__:
        obj = getattr(dolly, name)
        assert inspect.getdoc(obj), f"dolly.{name} has no docstring"


def test_functions_are_not_shadowed_by_modules_of_their_name():
    for name in ("checkpoint", "restore", "clone", "migrate", "resume", "export", "import_bundle"):
        assert callable(getattr(dolly, name)) and not inspect.ismodule(getattr(dolly, name))
        # `import dolly.<name>` cannot mean a module while `dolly.<name>` means a function.
        assert importlib.util.find_spec(f"dolly.{name}") is None


def test_public_functions_take_options_by_keyword_and_say_what_they_raise():
    for name in dolly.__all__:
        fn = getattr(dolly, name)
        if not inspect.isfunction(fn):
            continue
        assert "Raises:" in (inspect.getdoc(fn) or ""), f"dolly.{name} does not say what it raises"
        params = inspect.signature(fn).parameters.values()
        positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert len(positional) <= 3, f"dolly.{name} takes {positional} by position"
