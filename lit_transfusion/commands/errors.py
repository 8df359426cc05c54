"""One error handler for every command: a setting the command cannot run with ends it with one line
``error: <setting>: <what is wrong>`` on stderr and exit status 2, whichever parser or constructor found it; an
error while the command runs (training, sampling) keeps its traceback."""

from __future__ import annotations

import contextlib
import sys

from jsonargparse import ArgumentError

from lit_transfusion.errors import SettingError


class ConfigError(Exception):
    """A constructor rejected its settings: the one-line message, raised from the constructor's own error."""


@contextlib.contextmanager
def one_line_errors(*also: type[BaseException]):
    """Inside: a parse error (jsonargparse's ``ArgumentError``), a :class:`ConfigError`, a
    ``lit_transfusion.errors.SettingError`` or any of ``also`` ends the process with ``error: ...`` (one line) and
    exit status 2."""
    try:
        yield
    except (ArgumentError, ConfigError, SettingError, *also) as e:
        message = one_line(e) if isinstance(e, ArgumentError) else str(e)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def bad_setting_errors() -> tuple[type[Exception], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return ArgumentError, ValueError, TypeError, OSError, MisconfigurationException


BAD_SETTING = bad_setting_errors()  # what a constructor raises for a setting it rejects
# jsonargparse's report of a failed Union (every model / data setting is `class | None`) around the real error.
_UNION = "Does not validate against any of the Union subtypes"
_NOISE = (_UNION, "Subtypes:", "Errors:", "Given value type:", "Given value:", "Expected a <class 'NoneType'>")


def one_line(error: BaseException) -> str:
    """jsonargparse's nested report, or a constructor's error wrapped in it, as its most specific line prefixed
    with the setting, e.g. ``model.init_args: option 'not_a_setting' is not accepted (class_path '...')``."""
    import re

    class_path = None
    while error.__cause__ is not None and str(error).startswith(_UNION):
        class_path = class_path or next(iter(re.findall(r"class_path='([^']+)'", str(error))), None)
        error = error.__cause__  # the constructor's own error
    keys: list[str] = []
    leaves: list[tuple[int, str, int]] = []  # (indent, text, number of keys above it)
    given: list[tuple[int, str]] = []
    for line in str(error).splitlines():
        indent = len(line) - len(line.lstrip())
        text = line.strip().removeprefix("- ")
        if m := re.match(r'Parser key "([^"]+)":\s*(.*)', text):
            keys.append(m[1])
            text = m[2]
        elif m := re.match(r"Problem with given class_path '([^']+)':", text):
            keys.append("init_args")
            class_path = m[1]
            continue
        if text.startswith("Given value:") and not text.endswith(")"):  # a plain value, not a Namespace(...)
            given.append((indent, text.removeprefix("Given value:").strip()))
        if text and not text.startswith(_NOISE):
            leaves.append((indent, text, len(keys)))
    if not leaves:
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    deepest = max(indent for indent, _, _ in leaves)
    texts = [text for indent, text, _ in leaves if indent == deepest]
    n_keys = next(n for indent, _, n in leaves if indent == deepest)
    message = "; ".join(t[0].lower() + t[1:] if keys and t[1:2].islower() else t for t in texts)
    if n_keys and keys[n_keys - 1] == "init_args":  # the class itself (not one of its settings) is the problem
        message += f" (class_path {class_path!r})"
    elif given and "Got value" not in message:
        message += f" (got {max(given)[1]})"
    setting = ".".join(keys[:n_keys])
    if not setting and class_path and not re.match(r"(model|data|trainer)\b", message):
        setting = class_path  # a constructor error that does not name its setting: name the class
    return f"{setting}: {message}" if setting else message
