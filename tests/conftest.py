"""Eight fake CPU devices, set before JAX starts, so every test can build a mesh."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, inherited by every subprocess the tests
# start: many tests build the same tiny model's step anew (a fresh `jax.jit` per trainer run,
# resume, evaluation) and would otherwise compile identical programs again. A fresh directory
# per run, so a result never depends on an earlier run's cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="ctxext-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )

import pytest  # noqa: E402  (the environment above must be set before anything imports JAX)


@pytest.fixture
def cli_outcome(capsys, monkeypatch):
    """run(check) -> (exit code, stderr lines) of `check()` under the CLIs' error handling
    (`cli.exit_on_user_error`), in-process."""

    def run(check):
        from ctxext_jax import cli

        def exit_(code):
            raise SystemExit(code)

        monkeypatch.setattr(cli.os, "_exit", exit_)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            with cli.exit_on_user_error():
                check()
        return stop.value.code, capsys.readouterr().err.strip().splitlines()

    return run
