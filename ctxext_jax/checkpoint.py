"""Orbax checkpoints: save, resume exactly, reshard onto any mesh, and start from another run.

A step directory holds five items:
  params     the model parameters (a pure dict of arrays)
  opt_state  {"step", "opt_state"}: the optimizer state and the step counter
  data       the Grain iterator state, one JSON file per host
  config     the whole run config (JSON), for the record
  model      the ModelConfig (JSON): what `init_from`, evaluation and export rebuild the model from
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import weakref
from collections.abc import Iterator
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from ctxext_jax.data.streams import StreamCheckpointHandler, StreamRestore, StreamSave
from ctxext_jax.errors import fail

ITEMS = ("params", "opt_state", "data", "config", "model")


def handler_registry(items: tuple[str, ...]) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Orbax handlers (with their save and restore argument types) for the named items."""
    handlers = {
        "params": (ocp.StandardCheckpointHandler, ocp.args.StandardSave, ocp.args.StandardRestore),
        "opt_state": (ocp.StandardCheckpointHandler, ocp.args.StandardSave,
                      ocp.args.StandardRestore),
        "data": (StreamCheckpointHandler, StreamSave, StreamRestore),
        "config": (ocp.JsonCheckpointHandler, ocp.args.JsonSave, ocp.args.JsonRestore),
        "model": (ocp.JsonCheckpointHandler, ocp.args.JsonSave, ocp.args.JsonRestore),
    }  # fmt: skip
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for name in items:
        handler, save, restore = handlers[name]
        handler = handler()
        registry.add(name, save, handler)
        registry.add(name, restore, handler)
    return registry


def _step_dirs(directory: epath.Path) -> list[epath.Path]:
    return sorted(
        (p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )


def brief(error: Exception, limit: int = 300) -> str:
    """The first line of an Orbax / TensorStore error, without its multi-kB driver spec."""
    text = str(error).split(" [tensorstore_spec")[0].strip().splitlines()[0] if str(error) else ""
    return text if len(text) <= limit else text[:limit] + " ..."


def resolve_init_from(path: str) -> epath.Path:
    """A run's workdir, its `checkpoints/` dir or one step dir -> the step dir to load weights
    from (the latest finished step). Raises FileNotFoundError / ValueError saying what to give."""
    root = epath.Path(os.path.abspath(os.path.expanduser(path)))
    if not root.exists():
        raise FileNotFoundError(
            f"{path} does not exist; give a training run's workdir (e.g. runs/tiny), its "
            "checkpoints/ folder or one step folder inside it."
        )
    if not root.is_dir():
        raise ValueError(
            f"{path} is a file; give a training run's workdir, its checkpoints/ folder or one "
            "step folder inside it."
        )
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if (root / "params").is_dir():
        step_dir = root
    else:
        steps = [p for p in _step_dirs(root) if (p / "params").is_dir()]
        if not steps:
            raise ValueError(
                f"{path} holds no checkpoint (no <step>/params folder); point it at a finished "
                "run's workdir or checkpoint folder."
            )
        step_dir = steps[-1]
    if not (step_dir / "model").is_dir():
        raise ValueError(f"{step_dir} has no 'model' item: it is not a ctxext_jax checkpoint.")
    return step_dir


def check_init_from(source: str) -> None:
    """Raises ConfigError naming `checkpoint.init_from` unless it is a Hugging Face folder with a
    usable config.json or a run / checkpoint folder holding a finished step."""
    from ctxext_jax import hf

    try:
        if hf.is_hf_folder(source):
            hf.model_json(source)
        else:
            read_model_json(resolve_init_from(source))
    except (FileNotFoundError, ValueError) as e:
        fail("checkpoint.init_from", str(e))


def read_model_json(step_dir: epath.Path) -> dict[str, Any]:
    """The ModelConfig fields saved beside a checkpoint's parameters."""
    files = list((step_dir / "model").glob("*"))
    try:
        meta = ocp.JsonCheckpointHandler().restore(step_dir / "model")
    except Exception as e:  # orbax raises several types for a damaged JSON item
        raise ValueError(
            f"{step_dir}/model ({[f.name for f in files]}) is unreadable ({brief(e)}); the "
            "checkpoint is damaged: use an earlier step or re-run the source training."
        ) from None
    return meta


# Fields that may differ between a source run and one initialised from it: they change no shape.
MAY_CHANGE = frozenset(
    {"max_position_embeddings", "rope", "local_rope", "alibi", "layer_pattern", "window", "chunk",
     "sinks", "attention_impl", "dtype", "remat", "loss_chunk", "scan_layers", "init_std"}
)  # fmt: skip


def _layer_stacking(fields: dict[str, Any]) -> tuple:
    """How the blocks are laid out in the parameter tree: scanned, [repeats] x pattern length
    blocks; unscanned, n_layers blocks. A different layout is a different tree."""
    if fields.get("scan_layers", True):
        return ("scanned", len(fields.get("layer_pattern", "G")))
    return ("unscanned", fields.get("n_layers"))


def check_compatible(source: dict[str, Any], target) -> None:
    """Raises ValueError naming each shape-changing model field that differs from the source."""
    target_fields = json.loads(target.to_json())
    diffs = {
        k: (source.get(k), v)
        for k, v in target_fields.items()
        if k not in MAY_CHANGE and source.get(k) != v
    }
    if _layer_stacking(source) != _layer_stacking(target_fields):
        diffs["layer_pattern"] = (source.get("layer_pattern"), target_fields["layer_pattern"])
        diffs["scan_layers"] = (source.get("scan_layers"), target_fields["scan_layers"])
    if diffs:
        listing = ", ".join(
            f"model.{k}: source {a!r} vs this run {b!r}" for k, (a, b) in diffs.items()
        )
        raise ValueError(
            f"checkpoint.init_from: the source model differs in shape-defining fields ({listing}); "
            "set them to the source's values (positions, windows, lengths and a layer_pattern of "
            "the same length may change)."
        )


def load_params(step_dir: epath.Path, abstract_params: Any) -> Any:
    """Restores the `params` item onto the shardings of `abstract_params` (ShapeDtypeStructs)."""
    try:
        return ocp.StandardCheckpointer().restore(step_dir / "params", abstract_params)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ValueError(
            f"could not load parameters from {step_dir}/params: {brief(e)}. The checkpoint's model "
            "shape must match model.* of this run (only positions and attention patterns may "
            "change)."
        ) from None


@contextlib.contextmanager
def _hold_stderr_on_failure(settle_seconds: float = 0.5) -> Iterator[None]:
    """Holds what is written to stderr while the block runs: passed on if it succeeds, dropped
    if it raises. When a restore fails on a damaged file, TensorStore reads still in flight
    resolve into Orbax's already closed event loop and print 'Event loop is closed' tracebacks
    from their threads; the error raised instead says what happened."""
    real, held = sys.stderr, io.StringIO()
    sys.stderr = held
    try:
        yield
    except BaseException:
        time.sleep(settle_seconds)  # let the stragglers print into `held`
        raise
    else:
        real.write(held.getvalue())
    finally:
        sys.stderr = real


# Checkpointers with writes possibly in flight, for `finish_writes` on an error exit.
_OPEN: weakref.WeakSet = weakref.WeakSet()


def finish_writes() -> None:
    """Waits for every open Checkpointer's asynchronous writes (before exiting on an error)."""
    for ckpt in list(_OPEN):
        with contextlib.suppress(Exception):  # a failed write already said why
            ckpt.manager.wait_until_finished()


class Checkpointer:
    """A CheckpointManager over `workdir/checkpoints` that saves and restores the whole run."""

    def __init__(self, workdir: str, *, every: int, keep: int):
        self.directory = epath.Path(os.path.abspath(workdir)) / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            # Orbax decides when to save: every `every` steps, and at a preemption sync point
            # (a SIGTERM on a Cloud TPU pod), after which the trainer stops. Only finite states
            # are ever saved (the trainer skips non-finite updates), so keeping the latest
            # `keep` never deletes the last finite one.
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=every,
                preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
                create=True,
            ),
            handler_registry=handler_registry(ITEMS),
        )
        _OPEN.add(self)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_iterator, *, config_json, model_json, force=False):
        """Saves when Orbax's policy says so (interval, preemption) or `force`; arrays are
        written asynchronously while training goes on."""
        if step in self.manager.all_steps() or not (force or self.manager.should_save(step)):
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                opt_state=ocp.args.StandardSave(
                    {"step": state["step"], "opt_state": state["opt_state"]}
                ),
                data=StreamSave(data_iterator),
                config=ocp.args.JsonSave(json.loads(config_json)),
                model=ocp.args.JsonSave(json.loads(model_json)),
            ),
            force=True,
        )

    def saved_config(self, step: int) -> dict | None:
        """The run config saved with `step` (None when the step has no readable one)."""
        try:
            return ocp.JsonCheckpointHandler().restore(
                self.directory / str(step) / "config", args=ocp.args.JsonRestore()
            )
        except Exception:  # a damaged item: the restore reports the step
            return None

    def restore(self, abstract_state: dict, data_iterator, step: int | None = None):
        """-> (state, data_iterator) at `step` (default latest), placed like `abstract_state`;
        data_iterator=None leaves the saved iterator state unread (returns None for it)."""
        step = self.latest_step() if step is None else step
        items = {}
        if data_iterator is not None:
            items["data"] = StreamRestore(data_iterator)
        try:
            with _hold_stderr_on_failure():
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(abstract_state["params"]),
                        opt_state=ocp.args.StandardRestore(
                            {
                                "step": abstract_state["step"],
                                "opt_state": abstract_state["opt_state"],
                            }
                        ),
                        **items,
                    ),
                )
        except Exception as e:  # orbax/tensorstore raise many types for a damaged step
            raise ValueError(
                f"checkpoint step {step} under {self.directory} could not be restored "
                f"({brief(e)}). If the run's model config changed, use a new --workdir with "
                "checkpoint.init_from instead; if that step is damaged, delete "
                f"{self.directory / str(step)} to resume from the previous one."
            ) from None
        state = {
            "step": restored.opt_state["step"],
            "params": restored.params,
            "opt_state": restored.opt_state["opt_state"],
        }
        return state, restored.data if data_iterator is not None else None

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
        _OPEN.discard(self)
