"""Orbax checkpoints of the whole training state (parameters, optimizer state, step).

Checkpoints live in `<workdir>/checkpoints/<step>/`; the newest is restored automatically. The
data order is a function of the step (training.data), so the step is all a resume needs to continue
the same batches. The state is saved sharded (every host writes its own shards) and restored into
the shardings of the current run, so a checkpoint written on one mesh shape (say 4 x 2) restores
on another (8 x 1, or one device).
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Save every `checkpoint_every` steps (and on demand), keep the newest `keep`."""

    def __init__(self, workdir: str | Path, keep: int):
        self.directory = Path(workdir).resolve() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> Path:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        return self.directory / str(step)

    def restore(self, step: int, target):
        """Restore into the structure (and shardings) of `target`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self):
        self.manager.close()
