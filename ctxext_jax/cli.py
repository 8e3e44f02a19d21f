"""What every command-line main shares: flag parsing that reports a bad config in one line, and
an exit path for user errors that lets checkpoint writes in flight finish first.

A config error is `error: <key>: <problem and fix>` on stderr and exit code 2; CTXEXT_TRACEBACK=1
shows the traceback instead.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator

# Config fields that hold a dict with open keys (a Hugging Face rope block, a mixture's
# {source: weight}): `--config.model.rope='{"rope_type": ...}'` replaces the whole dict,
# `--config.model.rope.factor=4` or `--config.data.mixture.kv=0.5` sets one key of it.
DICT_FIELDS = {
    "model.rope": '{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}',
    "model.local_rope": '{"rope_type": "default", "rope_theta": 10000.0}',
    "data.mixture": '{"text": 0.7, "kv": 0.3}',
}
_DICT_FLAG = re.compile(
    r"^--config\.(" + "|".join(re.escape(f) for f in DICT_FIELDS) + r")(?:\.(\w+))?=(.*)$", re.S
)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _dict_value(text: str):
    """A command-line value as JSON ('4' -> 4, 'true' -> True, '{"factor": 4}') or a Python
    literal ("{'factor': 4}", 'True'), else the text itself ('yarn')."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def split_dict_flags(argv: list[str]) -> tuple[list[str], list[tuple[str, str | None, str]]]:
    """argv without the overrides of `DICT_FIELDS`, and those as (field, key or None, raw value).
    ml_collections cannot add keys to a dict field from the command line, so these are applied
    after the config file loads (`apply_dict_flags`)."""
    rest, found = [], []
    for arg in argv:
        match = _DICT_FLAG.match(arg)
        if match:
            found.append((match[1], match[2], match[3]))
        else:
            rest.append(arg)
    return rest, found


def apply_dict_flags(config, overrides: list[tuple[str, str | None, str]]) -> None:
    """Applies `split_dict_flags` overrides in command-line order; a whole dict given as JSON
    must be an object (ConfigError naming the field otherwise)."""
    from ctxext_jax.errors import fail

    for field, key, raw in overrides:
        group, name = field.split(".")
        block = config[group][name]
        block = block.to_dict() if hasattr(block, "to_dict") else dict(block or {})
        if key is None:
            value = _dict_value(raw)
            if not isinstance(value, dict):
                fail(field, f"expected a JSON object, got {raw!r}; e.g. "
                     f"--config.{field}='{DICT_FIELDS[field]}'.")  # fmt: skip
            block = value
        else:
            block[key] = _dict_value(raw)
        with config.unlocked():
            config[group][name] = block


def _flag_error_message(error: BaseException) -> str:
    """One line for an exception raised while absl / ml_collections parsed the flags."""
    root = error
    while root.__cause__ or root.__context__:
        root = root.__cause__ or root.__context__
    text = str(error)
    bad_override = re.search(r"flag --(config\.[\w.]+)=(.*?):", text)
    if isinstance(root, KeyError | AttributeError):
        return (
            f"--config: no field {root} to override; check the --config.<group>.<key> names "
            "against the config reference in the README."
        )
    if bad_override and isinstance(root, ValueError | TypeError):
        key, value = bad_override[1].removeprefix("config."), bad_override[2]
        reason = str(root)
        want = next(
            (kind for word, kind in [("int()", "an integer"), ("float", "a number"),
                                     ("bool", "true or false")] if word in reason),
            f"a value of the field's type ({reason})",
        )  # fmt: skip
        return f"{key}: expected {want}, got {value!r}."
    if missing := re.search(r"No such file or directory: '([^']+)'", str(root)):
        return f"--config: no file {missing[1]!r}; give configs/<name>.py[:variant]."
    # ml_collections embeds the config file's traceback: its last line says it.
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    return re.sub(r"^[A-Za-z]*(Error|Exception): ", "", lines[-1] if lines else repr(root))


def parse_flags(argv: list[str]) -> list[str]:
    """absl `flags_parser` for the CLIs. ml_collections loads the config file and applies the
    `--config.a.b=v` overrides while flags are parsed, so a missing file, an unknown variant
    or override key, a value of the wrong type or an error raised by `get_config` surfaces
    here: `error: <message>` alone and exit 2 (CTXEXT_TRACEBACK=1 shows the traceback)."""
    from absl import flags

    from ctxext_jax.errors import ConfigError

    asked = {"-h", "-?", "--help", "--helpshort", "--helpfull"}.intersection(argv[1:])
    if asked:  # absl's own help flag exits 1; asking for help is not an error
        from absl import app

        app.usage(shorthelp="--helpfull" not in asked, writeto_stdout=True, exitcode=0)
    argv, dict_overrides = split_dict_flags(argv)
    # ml_collections finds the --config.* overrides in sys.argv itself: drop these there too.
    sys.argv[:] = split_dict_flags(sys.argv)[0]
    try:
        remaining = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        if config is not None:
            # A file that failed to load is a stand-in that raises on first attribute access.
            config.keys  # noqa: B018
            apply_dict_flags(config, dict_overrides)
        return remaining
    except ConfigError as e:
        if os.environ.get("CTXEXT_TRACEBACK"):
            raise
        _error(str(e))
    except (flags.Error, OSError, AttributeError, KeyError, ValueError, TypeError) as e:
        if os.environ.get("CTXEXT_TRACEBACK"):
            raise
        _error(_flag_error_message(e))


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For command-line mains: a config, data or checkpoint mistake (ValueError, missing file)
    prints `error: <message>` alone and exits 2 (or the error's `exit_code`: 3 for a diverged
    run) once every checkpoint write in flight has finished; CTXEXT_TRACEBACK=1 shows the
    traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("CTXEXT_TRACEBACK"):
            raise
        from ctxext_jax import checkpoint

        checkpoint.finish_writes()
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Skip interpreter teardown: Orbax / TensorStore worker threads can still hold callbacks
        # for an event loop that teardown closes, and print tracebacks about it after the
        # message. Nothing is lost: checkpoint writes have finished, metrics are flushed per line.
        os._exit(getattr(e, "exit_code", 2))
