"""What the trainer does about non-finite steps: the train step skips their update (steps.py);
`NonFiniteGuard` counts them and stops the run, naming the steps and the likely cause, after
`train.max_nonfinite` in a row."""

from __future__ import annotations

from collections.abc import Callable


class NonFiniteError(ValueError):
    """Too many consecutive steps with a non-finite loss or gradient: the run stopped."""

    exit_code = 3  # the CLI's exit code: tells a sweep a diverged run from a config error


class NonFiniteGuard:
    """Reads each step's `nonfinite` metric (1: the update was skipped); raises NonFiniteError
    once `limit` steps in a row were skipped."""

    def __init__(
        self, limit: int, *, lr: float, dtype: str, latest_saved: Callable[[], int | None]
    ):
        self.limit, self.lr, self.dtype, self.latest_saved = limit, lr, dtype, latest_saved
        self.in_a_row, self.skipped, self.first = 0, 0, None

    def update(self, step: int, metrics) -> None:
        if not int(metrics["nonfinite"]):
            self.in_a_row, self.first = 0, None
            return
        self.in_a_row += 1
        self.skipped += 1
        self.first = self.first or step
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        print(
            f"step {step}: loss {loss}, gradient norm {grad_norm}: not finite, update skipped "
            f"({self.in_a_row} in a row; the run stops at train.max_nonfinite={self.limit})",
            flush=True,
        )
        if self.in_a_row >= self.limit:
            raise NonFiniteError(self._message(step, loss, grad_norm))

    def _message(self, step: int, loss: float, grad_norm: float) -> str:
        if self.first == 1:
            cause = (
                "the very first step fails, so the start is broken rather than the run: check "
                "model.init_std, model.rms_eps and the checkpoint.init_from weights"
            )
        elif self.dtype == "float16":
            cause = "float16 activations likely overflowed: use model.dtype=bfloat16"
        else:
            cause = (
                f"the run likely diverged: optim.lr={self.lr:g} is too high for it (lower it, "
                "lengthen optim.warmup_steps or set optim.grad_clip)"
            )
        saved = self.latest_saved()
        kept = (
            f"checkpoints hold finite states only, the latest is step {saved}"
            if saved is not None
            else "no checkpoint was written"
        )
        steps = f"step {step}" if self.first == step else f"steps {self.first}-{step}"
        return (
            f"train.max_nonfinite: {steps} gave a non-finite loss ({loss}) or gradient norm "
            f"({grad_norm}) {self.in_a_row} times in a row; {cause}. None of those updates was "
            f"applied and {kept}."
        )
