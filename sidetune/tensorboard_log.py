"""TensorBoard logs of stage two (`--log tensorboard`; `pip install 'sidetune[tensorboard]'`):
per configuration, a run folder with its loss, training and eval top-1 and learning rate per
epoch, and an entry in the HParams plugin's table (every setting, and the final top-1), so a
sweep can be explored in TensorBoard's HParams view."""

from __future__ import annotations

import math
from pathlib import Path

from sidetune.errors import SidetuneError
from sidetune.training import EpochStats, TrainConfig
from sidetune.training.loop import lr_multiplier


class TensorBoardLog:
    """Event files under `folder`: one sub-folder per configuration, named by the caller."""

    def __init__(self, folder: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise SidetuneError("--log tensorboard needs the tensorboard package: pip install 'sidetune[tensorboard]' "
                                "(or pip install tensorboard).") from error
        self.folder, self.writer_class, self.writers = Path(folder), SummaryWriter, {}

    def _writer(self, name: str):
        if name not in self.writers:
            self.writers[name] = self.writer_class(log_dir=str(self.folder / name))
        return self.writers[name]

    def epoch(self, names: list[str], configs: list[TrainConfig], stats: EpochStats, num_images: int) -> None:
        """One epoch of a stack: `names[j]` and `configs[j]` for the j-th stacked configuration."""
        for j, (name, config) in enumerate(zip(names, configs)):
            writer = self._writer(name)
            steps = math.ceil(num_images / config.batch_size)
            last_step = stats.epoch * steps - 1
            writer.add_scalar("loss", stats.loss[j], stats.epoch)
            writer.add_scalar("train_top1", stats.train_top1[j], stats.epoch)
            if stats.eval_top1 is not None:
                writer.add_scalar("eval_top1", stats.eval_top1[j], stats.epoch)
            scale = lr_multiplier(last_step, steps * config.epochs, steps * config.warmup_epochs)
            writer.add_scalar("lr", config.lr * scale, stats.epoch)

    def result(self, name: str, config: TrainConfig, top1: float | None, extra: dict | None = None) -> None:
        """The configuration's settings and final top-1 in the HParams table."""
        writer = self._writer(name)
        settings = {key: value for key, value in {**config.hyperparameters(), **(extra or {})}.items()
                    if isinstance(value, (int, float, str, bool))}
        writer.add_hparams(settings, {"hparam/top1": math.nan if top1 is None else top1}, run_name=".")
        writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
