"""Eight fake CPU devices, set before JAX starts, so every test can build a mesh."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
