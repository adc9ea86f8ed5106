"""Stage two's training: one job per module, data flowing down the list.

- `config`: a configuration (`TrainConfig`) and what training it gave (`TrainResult`).
- `build`: a side network checked against a cache (`sidenet_blueprint`), restored from a run.
- `data`: a split's features on the training device (resident, streamed or live).
- `stacking`: which configurations train together, and how many fit the device.
- `step`: one training step of a stack (loss, non-finite bookkeeping, backward, optimizer).
- `optim`: AdamW over a stack's parameters in a few kernels.
- `augment`: feature-space augmentation of training batches.
- `state`: per-epoch statistics and the resumable state of a group.
- `loop`: `train_group`, the one training loop.
- `scoring`: predicted classes and accuracy on a split.

Nothing here imports timm or the backbone; a live split is scored through sidetune/live.py,
imported only when one is asked for."""

from sidetune.training.build import SideNetBlueprint, restore_sidenet, sidenet_blueprint
from sidetune.training.config import TrainConfig, TrainResult
from sidetune.training.loop import train_group
from sidetune.training.scoring import score
from sidetune.training.state import EpochStats, GroupState

__all__ = ["EpochStats", "GroupState", "SideNetBlueprint", "TrainConfig", "TrainResult", "restore_sidenet", "score",
           "sidenet_blueprint", "train_group"]
