"""The GF-Screen training engine: Focus segmentation plus GRPO for the Glance, one Ignite iteration at a time."""

from __future__ import annotations

import copy
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils import CommonKeys as Keys

from . import grpo
from .networks import KEEP, unwrap

LOG_KEYS = ("seg_loss", "glance_ce", "rl_loss", "reward", "kept_fraction", "kl")


class GRPOTrainer(SupervisedTrainer):
    """SupervisedTrainer whose iteration trains the Focus on a group of windows and the Glance by GRPO.

    Each batch holds ``group_size`` windows per scan, scan-major (what ``RandCropByPosNegLabeld(num_samples=N)``
    and MONAI's list collate give). Per iteration: the Focus segments every window (DiceCE loss); the Glance
    samples keep/discard per window; the reward credits keeping a window where the Focus finds the lesion and
    discarding a lesion-free one (:func:`scripts.grpo.detection_reward`); advantages are relative
    within each scan's group. Loss = seg_loss + alpha * balanced CE + GRPO policy loss (eps clip, beta k3-KL to
    the frozen reference Glance ``self.reference``, refreshed by :class:`ReferencePolicyRefresh`).

    Args:
        group_size: windows per scan in a batch (N of the paper).
        alpha, beta, eps: weights of the glance CE and KL terms, and the ratio clip.
        reward: "binary" (the paper's default) or "dice".
        rl_weight: weight of the GRPO policy loss; 0 trains the Glance by balanced CE alone (the ablation).
        rl_warmup_epochs: epochs trained with the policy loss off (Glance by balanced CE, Focus as always) before
            GRPO starts. The reward is the Focus result, which means nothing until the Focus segments: from the
            first epoch, GRPO pushed every healthy window to "discard" while lesion windows got no signal, and
            the Glance collapsed to keep nothing (measured on phantoms: kept fraction 0 from epoch 2 to 53).
        glance_context: voxels each crop extends past its window on each side (the Glance's ``context``): the
            Glance reads the whole crop, the Focus, the reward and the CE label use the centre window.
        std_floor, advantage_clamp: numerical guards of the group advantage.
        other args: as :class:`monai.engines.SupervisedTrainer`; ``network`` is a GlanceFocusNet (maybe DDP).
            As there, ``prepare_batch`` gets ``to_kwargs``, both forward passes (the Focus on the windows, the
            Glance on the crops, ``glance=True``) go through ``inferer`` with the extra arguments that
            ``prepare_batch`` returns, and ``compile`` compiles the network and feeds it plain tensors (MONAI's
            workaround for MetaTensors under ``torch.compile``). ``accumulation_steps`` (MONAI >= 1.6) is refused:
            the frozen reference and the group statistics are per iteration.
    """

    def __init__(
        self,
        *args: Any,
        group_size: int,
        alpha: float = 0.1,
        beta: float = 0.01,
        eps: float = 0.1,
        reward: str = "binary",
        rl_weight: float = 1.0,
        rl_warmup_epochs: int = 0,
        glance_context: Sequence[int] = (0, 0, 0),
        std_floor: float = 0.01,
        advantage_clamp: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "accumulation_steps", 1) != 1:
            raise ValueError(
                f"GRPOTrainer does not accumulate gradients, got accumulation_steps={self.accumulation_steps}."
            )
        if reward not in grpo.REWARDS:
            raise ValueError(f"reward must be one of {sorted(grpo.REWARDS)}, got {reward!r}.")
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}.")
        self.group_size = group_size
        self.alpha, self.beta, self.eps = alpha, beta, eps
        self.reward_fn = grpo.REWARDS[reward]
        self.rl_weight, self.rl_warmup_epochs = rl_weight, rl_warmup_epochs
        self.context = [int(c) for c in glance_context]
        glance = unwrap(self.network).glance
        if hasattr(glance, "required_context") and min(self.context) < glance.required_context():
            self.logger.warning(
                f"glance_context {self.context} is less than the {glance.required_context()} voxels the Glance's "
                f"receptive field ({glance.receptive_field} voxels) needs: its scores on training crops will differ "
                "from its scores on whole volumes at inference."
            )
        self.std_floor, self.advantage_clamp = std_floor, advantage_clamp
        self.reference = copy.deepcopy(unwrap(self.network).glance).requires_grad_(False)
        # The reference normalises like the policy (batch statistics in training, so the ratio is exactly 1
        # right after a refresh) but must not drift: momentum 0 keeps its running statistics fixed.
        for m in self.reference.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                m.momentum = 0.0

    def _iteration(self, engine: GRPOTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[:2]
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        if engine.compile:  # as SupervisedTrainer: torch.compile takes plain tensors (pytorch issue 117026)
            inputs, targets = (x.as_tensor() if isinstance(x, MetaTensor) else x for x in (inputs, targets))
        if inputs.shape[0] % engine.group_size:
            raise ValueError(
                f"a batch of {inputs.shape[0]} windows is not a whole number of groups of {engine.group_size}: "
                "set the crop transform's num_samples to train#trainer#group_size."
            )
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = engine.amp and engine.scaler is not None
        with torch.autocast("cuda", **engine.amp_kwargs) if use_amp else nullcontext():
            engine.state.output.update(engine._losses(inputs, targets, *args, **kwargs))
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss = engine.state.output[Keys.LOSS]
        if use_amp:
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _losses(
        self, crops: torch.Tensor, crop_targets: torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Forward both models on the windows and return the loss terms and the logged statistics."""
        centre = (..., *(slice(c, n - c) for c, n in zip(self.context, crops.shape[2:])))
        inputs, targets = crops[centre], crop_targets[centre]
        seg_logits = self.inferer(inputs, self.network, *args, **kwargs)
        glance_logits = self.inferer(crops, self.network, *args, glance=True, **kwargs)
        with torch.no_grad():
            ref_logits = self.reference.train(self.network.training)(crops)
            seg = seg_logits.argmax(1, keepdim=True)
            actions = grpo.sample_actions(glance_logits)
            rewards = self.reward_fn(seg, targets, actions).view(-1, self.group_size)
            advantage = grpo.group_advantage(rewards, self.std_floor, self.advantage_clamp).flatten()
            has_lesion = grpo.window_has_lesion(targets)
        seg_loss = self.loss_function(seg_logits, targets)
        glance_ce = grpo.balanced_ce(glance_logits, has_lesion)
        rl_loss, kl = grpo.grpo_loss(glance_logits, ref_logits, actions, advantage, self.eps, self.beta)
        kept = glance_logits.detach().argmax(-1).eq(KEEP).float().mean()
        return {
            Keys.IMAGE: inputs,
            Keys.LABEL: targets,
            Keys.PRED: seg_logits,
            Keys.LOSS: seg_loss + self.alpha * glance_ce + self.current_rl_weight() * rl_loss,
            "seg_loss": seg_loss.detach(),
            "glance_ce": glance_ce.detach(),
            "rl_loss": rl_loss.detach(),
            "reward": rewards.mean(),
            "kept_fraction": kept,
            "kl": kl,
        }

    def current_rl_weight(self) -> float:
        """``rl_weight``, or 0 during the first ``rl_warmup_epochs`` epochs."""
        return self.rl_weight if self.state.epoch > self.rl_warmup_epochs else 0.0


class ReferencePolicyRefresh:
    """Copy the trained Glance into the trainer's frozen reference policy every ``interval`` epochs."""

    def __init__(self, interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        self.interval = interval

    def attach(self, engine: GRPOTrainer) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: GRPOTrainer) -> None:
        engine.reference.load_state_dict(unwrap(engine.network).glance.state_dict())


def log_terms(output: Mapping[str, Any] | list) -> dict[str, float]:
    """The per-iteration loss terms of a GRPOTrainer output, for StatsHandler / TensorBoard / MLflow handlers."""
    out = output[0] if isinstance(output, list) else output
    return {k: float(torch.as_tensor(out[k]).detach()) for k in (Keys.LOSS, *LOG_KEYS)}


class BestModelSaver(CheckpointSaver):
    """MONAI's key-metric CheckpointSaver that also gives its record of the best score (``state_dict``), so that the
    training checkpoints carry it and :func:`resume_latest` restores it (MONAI's ``load_state_dict``).

    MONAI keeps that record only inside the best model's own file (``key_metric_save_state``), which would add a
    ``checkpointer`` entry to the flat ``model.pt`` that inference loads strictly. Without the record, a resumed
    run forgot its best score and its first validation overwrote ``model.pt`` even when it was worse."""

    def state_dict(self) -> dict:
        """The best key-metric scores saved so far and their files: ``{"saved": [(score, filename), ...]}``."""
        state = self._key_metric_checkpoint.state_dict()
        key = "_saved" if "_saved" in state else "saved"  # ignite 0.5 renamed ignite 0.4's "saved"
        return {key: [(float(score), name) for score, name in state[key]]}  # plain floats: torch.load(weights_only)


def resume_latest(trainer: GRPOTrainer, saver: CheckpointSaver) -> str | None:
    """Load the newest checkpoint that ``saver`` wrote (model, optimizer, engine state, reference, and the best-model
    saver's record of its best score) into the run, so a killed training continues from its last completed epoch.
    Returns the path, or None on a fresh start.

    MONAI's CheckpointSaver writes in place (not atomically), so a run killed while saving leaves a truncated
    newest file: such files (not a complete zip archive, as ``torch.save`` writes) are skipped with a warning.
    Checkpoints written before the best-model record was saved with them resume without it, with a warning."""
    ckpts = sorted(Path(saver.save_dir).glob("checkpoint_*.pt"), key=lambda p: p.stat().st_mtime)
    while ckpts and not zipfile.is_zipfile(ckpts[-1]):
        trainer.logger.warning(f"skipping incomplete checkpoint {ckpts.pop()} (the run was killed while saving it)")
    if not ckpts:
        return None
    saved = torch.load(ckpts[-1], map_location="cpu", mmap=True).keys()  # mmap: the entries' names, not their data
    load_dict = {k: v for k, v in saver.save_dict.items() if k in saved or not isinstance(v, CheckpointSaver)}
    for k in saver.save_dict.keys() - load_dict.keys():
        trainer.logger.warning(f"{ckpts[-1]} has no {k!r}: the next validation replaces the best model even if worse")
    CheckpointLoader(load_path=str(ckpts[-1]), load_dict=load_dict, map_location=trainer.state.device).attach(trainer)
    trainer.logger.info(f"resuming from {ckpts[-1]}")
    return str(ckpts[-1])
