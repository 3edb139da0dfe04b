"""GRPOTrainer: MONAI iteration events, loss terms, Glance updates, the frozen reference policy and its refresh."""

import copy
import inspect
import os
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from ignite.metrics import Metric
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer, default_prepare_batch
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointSaver, ValidationHandler
from monai.inferers import Inferer
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import nn

from scripts import grpo
from scripts.networks import GlanceFocusNet, GlanceNet
from scripts.trainer import LOG_KEYS, GRPOTrainer, ReferencePolicyRefresh, log_terms, resume_latest

GROUP = 4
WINDOW = (16, 16, 16)
TRAIN_JSON = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "train.json"


def _net(seed: int = 0) -> GlanceFocusNet:
    torch.manual_seed(seed)
    glance = GlanceNet(in_channels=1, downsample=2, channels=(4, 8, 8), strides=(2, 2, 1))
    focus = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    return GlanceFocusNet(glance, focus)


def _batch(n_windows: int = 2 * GROUP, seed: int = 0) -> dict:
    """Windows of two scans; half of each group holds a bright cube labelled as lesion."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n_windows, 1, *WINDOW, generator=g) * 0.2
    label = torch.zeros(n_windows, 1, *WINDOW)
    for i in range(0, n_windows, 2):
        image[i, :, 4:10, 4:10, 4:10] += 0.8
        label[i, :, 4:10, 4:10, 4:10] = 1
    return {"image": image, "label": label}


def _trainer(net, batches, max_epochs=1, optimizer=None, **kwargs) -> GRPOTrainer:
    kwargs.setdefault("group_size", GROUP)
    kwargs.setdefault("amp", False)
    return GRPOTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=batches,
        network=net,
        optimizer=optimizer or torch.optim.AdamW(net.parameters(), lr=1e-2),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        decollate=False,
        **kwargs,
    )


class BrightFocus(nn.Module):
    """A Focus that marks voxels brighter than 0.5 as lesion: it finds exactly the lesions that are bright."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.gain * (x - 0.5)
        return torch.cat([-z, z], 1)


def _windows(kinds: str, seed: int = 0) -> dict:
    """One 16^3 window per letter: "L" a bright labelled lesion (BrightFocus finds it), "M" a labelled lesion as
    dark as the background (BrightFocus misses it), "F" lesion-free."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(len(kinds), 1, *WINDOW, generator=g) * 0.2
    label = torch.zeros(len(kinds), 1, *WINDOW)
    for i, kind in enumerate(kinds):
        label[i, :, 4:10, 4:10, 4:10] = float(kind in "LM")
        image[i, :, 4:10, 4:10, 4:10] += 0.8 * (kind == "L")
    return {"image": image, "label": label}


def _fixed_actions(monkeypatch, actions: list[int]) -> None:
    """Replace the policy's sampling by ``actions`` (keep = 1), so rewards and advantages are known in advance."""

    def sample(glance_logits, generator=None):
        assert glance_logits.shape == (len(actions), 2)
        return torch.tensor(actions)

    monkeypatch.setattr(grpo, "sample_actions", sample)


def _spy_grpo_loss(monkeypatch) -> dict:
    """Record the actions, advantages, eps and beta the trainer passes to the policy loss (which still runs)."""
    seen = {}
    real_loss = grpo.grpo_loss

    def spy(glance_logits, ref_logits, actions, advantage, eps, beta):
        seen.update(actions=actions.clone(), advantage=advantage.clone(), eps=eps, beta=beta)
        return real_loss(glance_logits, ref_logits, actions, advantage, eps, beta)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    return seen


def _p_keep(glance: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """p(keep) per window as the trainer computes it (training mode: batch statistics)."""
    with torch.no_grad():
        return glance.train()(image).softmax(-1)[:, 1]


def _equal(a: dict, b: dict) -> bool:
    """Same weights and normalisation statistics (BatchNorm's step counter aside)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.endswith("num_batches_tracked"))


def test_rl_warmup_epochs_leave_the_policy_loss_out_until_they_are_over():
    """Epochs 1-2 of rl_warmup_epochs=2: loss = seg + alpha * CE; epoch 3: the GRPO term is added."""
    seen = []
    trainer = _trainer(_net(), [_batch()], max_epochs=3, alpha=0.1, rl_warmup_epochs=2)
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: seen.append({k: e.state.output[k].detach() for k in ("loss", "seg_loss", "glance_ce", "rl_loss")}),
    )
    trainer.run()
    for epoch, out in enumerate(seen, 1):
        rl = out["rl_loss"] if epoch > 2 else 0.0
        torch.testing.assert_close(out["loss"], out["seg_loss"] + 0.1 * out["glance_ce"] + rl, rtol=1e-6, atol=1e-6)
    assert float(seen[-1]["rl_loss"]) != 0.0  # the last epoch's sum really holds a policy term


def test_trainer_warns_when_the_crop_context_is_less_than_the_glance_needs(caplog):
    net = _net()  # receptive field 70 voxels: 32 voxels of context needed
    with caplog.at_level("WARNING"):
        _trainer(net, [_batch()], glance_context=(8, 8, 8))
    assert (
        "glance_context [8, 8, 8] is less than the 32 voxels the Glance's receptive field (70 voxels) needs: its "
        "scores on training crops will differ from its scores on whole volumes at inference." in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING"):
        _trainer(net, [_batch()], glance_context=(32, 32, 32))
    assert "glance_context" not in caplog.text


def test_iteration_fires_monai_events_in_order():
    trainer = _trainer(_net(), [_batch()])
    fired = []
    for event in (
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    ):
        trainer.add_event_handler(event, lambda e, name=event.name: fired.append(name))
    trainer.run()
    assert fired == ["FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED"]
    assert trainer.state.iteration == 1


def test_loss_terms_add_up():
    batch = _batch()
    trainer = _trainer(_net(), [batch], alpha=0.1)
    trainer.run()
    out = trainer.state.output
    assert set(LOG_KEYS) <= set(out) and {"loss", "pred", "image", "label"} <= set(out)
    rl_weight = getattr(trainer, "rl_weight", 1.0)
    expected = out["seg_loss"] + 0.1 * out["glance_ce"] + rl_weight * out["rl_loss"]
    torch.testing.assert_close(out["loss"].detach(), expected, rtol=1e-6, atol=1e-6)
    # the segmentation term is the configured loss on the Focus logits of this batch
    torch.testing.assert_close(
        out["seg_loss"],
        DiceCELoss(to_onehot_y=True, softmax=True)(out["pred"].detach(), batch["label"]),
        rtol=1e-5,
        atol=1e-6,
    )
    assert out["pred"].shape == (2 * GROUP, 2, *WINDOW)
    assert 0.0 <= float(out["reward"]) <= 1.0
    kept = float(out["kept_fraction"])
    assert 0.0 <= kept <= 1.0 and (kept * 2 * GROUP) == pytest.approx(round(kept * 2 * GROUP))
    assert float(out["kl"]) >= 0.0  # k3 estimator is non-negative per window
    for key in LOG_KEYS:  # logged terms must not keep the autograd graph alive
        assert not out[key].requires_grad, key
    logged = log_terms(out)
    assert set(logged) == {"loss", *LOG_KEYS} and all(isinstance(v, float) for v in logged.values())
    assert logged["loss"] == pytest.approx(float(out["loss"]))
    assert log_terms([out]) == logged  # decollated output (list) gives the same


def test_glance_learns_and_reference_stays_frozen():
    net = _net()
    glance_before = copy.deepcopy(net.glance.state_dict())
    focus_before = copy.deepcopy(net.focus.state_dict())
    trainer = _trainer(net, [_batch()])
    assert _equal(trainer.reference.state_dict(), glance_before)
    assert not any(p.requires_grad for p in trainer.reference.parameters())
    trainer.run()

    after = net.glance.state_dict()
    changed = [k for k in after if after[k].is_floating_point() and not torch.equal(after[k], glance_before[k])]
    params = {k for k, _ in net.glance.named_parameters()}
    assert params <= set(changed), f"glance parameters not updated: {sorted(params - set(changed))}"
    assert any(not torch.equal(v, focus_before[k]) for k, v in net.focus.state_dict().items())
    # the reference did not move with the policy, although it normalised with batch statistics like it
    assert trainer.reference.training
    assert _equal(trainer.reference.state_dict(), glance_before)
    assert not _equal(trainer.reference.state_dict(), net.glance.state_dict())

    ReferencePolicyRefresh()(trainer)
    assert _equal(trainer.reference.state_dict(), net.glance.state_dict())
    assert trainer.reference is not net.glance  # a copy, not an alias that would follow every step
    assert not any(p.requires_grad for p in trainer.reference.parameters())


def test_reference_refresh_every_k_epochs():
    net = _net()
    trainer = _trainer(net, [_batch()], max_epochs=4)
    ReferencePolicyRefresh(interval=2).attach(trainer)
    synced = {}

    @trainer.on(Events.EPOCH_COMPLETED)
    def _check(engine):  # registered after the refresh handler, so it sees its effect
        synced[engine.state.epoch] = _equal(engine.reference.state_dict(), net.glance.state_dict())

    trainer.run()
    assert synced == {1: False, 2: True, 3: False, 4: True}
    with pytest.raises(ValueError, match="interval"):
        ReferencePolicyRefresh(interval=0)


def test_reference_refresh_defaults_to_every_epoch():
    net = _net()
    trainer = _trainer(net, [_batch()], max_epochs=1)
    ReferencePolicyRefresh().attach(trainer)
    trainer.run()
    assert _equal(trainer.reference.state_dict(), net.glance.state_dict())


def test_batch_not_divisible_by_group_size():
    trainer = _trainer(_net(), [_batch(n_windows=6)])
    with pytest.raises(ValueError, match=r"6 windows is not a whole number of groups of 4: set the crop transform's "):
        trainer.run()
    with pytest.raises(ValueError, match=r"^Must provide batch data for current iteration\.$"):
        trainer._iteration(trainer, None)


def test_groups_of_two_are_allowed(monkeypatch):
    """The smallest group (two windows of one scan) is accepted, and its advantages are relative within the pair."""
    _fixed_actions(monkeypatch, [1, 0, 1, 1])  # L kept (1) and F discarded (1); L kept (1) and F kept (0)
    seen = _spy_grpo_loss(monkeypatch)
    torch.manual_seed(0)
    net = GlanceFocusNet(GlanceNet(1, downsample=2, channels=(4, 8, 8), strides=(2, 2, 1)), BrightFocus())
    _trainer(net, [_windows("LFLF")], group_size=2).run()
    assert seen["advantage"].tolist() == [0.0, 0.0, 1.0, -1.0]


def test_defaults_are_the_papers(monkeypatch):
    """Left at their defaults: alpha 0.1 (loss = seg + 0.1 CE + policy loss from the first epoch), eps 0.1 and beta
    0.01 in the policy loss, std floor 0.01 and clamp 5 in the group advantage, the binary detection reward."""
    actions = [1, 1, 0, 0, 1, 0, 1, 0]
    _fixed_actions(monkeypatch, actions)
    seen = _spy_grpo_loss(monkeypatch)
    real_advantage = grpo.group_advantage

    def advantage_spy(rewards, std_floor, clamp):
        seen.update(rewards=rewards.clone(), std_floor=std_floor, clamp=clamp)
        return real_advantage(rewards, std_floor, clamp)

    monkeypatch.setattr(grpo, "group_advantage", advantage_spy)
    torch.manual_seed(0)
    net = GlanceFocusNet(GlanceNet(1, downsample=2, channels=(4, 8, 8), strides=(2, 2, 1)), BrightFocus())
    batch = _windows("LFLF" "MFFL")
    trainer = GRPOTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        decollate=False,
        group_size=GROUP,
    )
    trainer.run()
    out = trainer.state.output
    assert (seen["eps"], seen["beta"], seen["std_floor"], seen["clamp"]) == (0.1, 0.01, 0.01, 5.0)
    torch.testing.assert_close(out["loss"].detach(), out["seg_loss"] + 0.1 * out["glance_ce"] + out["rl_loss"])
    assert float(out["rl_loss"]) != 0.0
    found = grpo.detection_reward(out["pred"].detach().argmax(1, keepdim=True), batch["label"], torch.tensor(actions))
    # kept L, kept F, discarded L, discarded F | kept M (missed), discarded F, kept F, discarded L
    assert seen["rewards"].flatten().tolist() == found.tolist() == [1, 0, 0, 1, 0, 1, 0, 0]


def test_positional_arguments_reach_the_supervised_trainer():
    """device, max_epochs, data loader, network, optimizer and loss may be given by position, as to MONAI's."""
    net, loader, loss = _net(), [_batch()], DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = GRPOTrainer(torch.device("cpu"), 3, loader, net, optimizer, loss, group_size=GROUP)
    assert (trainer.state.max_epochs, trainer.data_loader, trainer.network) == (3, loader, net)
    assert (trainer.optimizer, trainer.loss_function) == (optimizer, loss)


def test_iteration_prepares_the_batch_for_the_device_and_clears_gradients_as_configured():
    """The batch goes through the configured prepare_batch with the engine's device and non_blocking flag (a
    prepare_batch may return extra inputs after image and label), and gradients are cleared with
    optim_set_to_none."""
    calls = []

    def prepare(batch, device, non_blocking, **kwargs):
        calls.append((device, non_blocking))
        return batch["image"].to(device), batch["label"].to(device), (), {}

    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    cleared = []
    zero_grad = optimizer.zero_grad
    optimizer.zero_grad = lambda set_to_none=True: cleared.append(set_to_none) or zero_grad(set_to_none)
    trainer = _trainer(
        net, [_batch()], optimizer=optimizer, prepare_batch=prepare, non_blocking=True, optim_set_to_none=True
    )
    trainer.run()
    assert calls == [(torch.device("cpu"), True)]
    assert cleared == [True]


class RecordingScaler:
    """A GradScaler stand-in that records its calls and passes the loss and the step through unscaled."""

    def __init__(self) -> None:
        self.calls = []

    def scale(self, loss):
        self.calls.append(("scale", loss))
        return loss

    def step(self, optimizer):
        self.calls.append(("step", optimizer))
        optimizer.step()

    def update(self):
        self.calls.append(("update", None))


@pytest.mark.parametrize("amp", [True, False])
def test_amp_computes_the_losses_under_cuda_autocast_and_steps_through_the_grad_scaler(monkeypatch, amp):
    """With amp (a GPU run), the losses are computed under ``torch.autocast("cuda", **amp_kwargs)`` and the update
    goes through the GradScaler (scale the loss, backward, step, update) between MONAI's iteration events; without,
    neither is used. Checked on the CPU with a recording autocast and GradScaler."""
    scaler, autocasts, events = RecordingScaler(), [], []

    class RecordingAutocast:
        def __init__(self, device_type, **kwargs):
            autocasts.append((device_type, kwargs))

        def __enter__(self):
            events.append("autocast")

        def __exit__(self, *exc):
            events.append("autocast exit")

    monkeypatch.setattr(torch, "autocast", RecordingAutocast)
    monkeypatch.setattr(torch.cuda.amp, "GradScaler", lambda: scaler)
    net = _net()
    trainer = _trainer(net, [_batch()], amp=amp, amp_kwargs={"dtype": torch.bfloat16})
    losses = trainer._losses
    monkeypatch.setattr(trainer, "_losses", lambda *a: events.append("losses") or losses(*a))
    for event in (IterationEvents.LOSS_COMPLETED, IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED):
        trainer.add_event_handler(event, lambda e, name=event.name: events.append(name))
    before = copy.deepcopy(net.state_dict())
    trainer.run()
    assert not _equal(net.state_dict(), before)  # the optimiser stepped
    updates = ["LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED"]
    if amp:
        assert autocasts == [("cuda", {"dtype": torch.bfloat16})]
        assert [name for name, _ in scaler.calls] == ["scale", "step", "update"]
        assert scaler.calls[0][1] is trainer.state.output["loss"] and scaler.calls[1][1] is trainer.optimizer
        assert events == ["autocast", "losses", "autocast exit", *updates]
    else:
        assert autocasts == [] and scaler.calls == []
        assert events == ["losses", *updates]


@pytest.mark.parametrize("kwargs, match", [({"group_size": 1}, "group_size"), ({"reward": "iou"}, "reward")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _trainer(_net(), [_batch()], **kwargs)


def _saver(tmp_path, net, trainer) -> CheckpointSaver:
    """The train.json checkpoint: model, optimizer, engine state and reference, every epoch."""
    saver = CheckpointSaver(
        str(tmp_path),
        {"model": net, "optimizer": trainer.optimizer, "trainer": trainer, "reference": trainer.reference},
        save_interval=1,
        n_saved=1,
        epoch_level=True,
    )
    saver.attach(trainer)
    return saver


def test_resume_latest_in_process(tmp_path):
    """resume_latest loads model, optimizer, engine state and reference from the newest checkpoint."""
    net = _net()
    trainer = _trainer(net, [_batch()], max_epochs=2)
    saver = _saver(tmp_path, net, trainer)
    assert resume_latest(trainer, saver) is None  # fresh start: nothing to load
    trainer.run()
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pt")) == ["checkpoint_epoch=2.pt"]

    net2 = _net(seed=5)
    trainer2 = _trainer(net2, [_batch()], max_epochs=3)
    saver2 = _saver(tmp_path, net2, trainer2)
    path = resume_latest(trainer2, saver2)
    assert path is not None and path.endswith("checkpoint_epoch=2.pt")
    epochs = []
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    loaded = {}
    trainer2.add_event_handler(
        Events.EPOCH_STARTED,
        lambda e: loaded.setdefault("ref", _equal(e.reference.state_dict(), trainer.reference.state_dict())),
    )
    trainer2.run()
    assert epochs == [3]  # continued after epoch 2, did not restart at 1
    assert loaded["ref"]
    assert trainer2.state.epoch == 3 and trainer2.state.iteration == 3


def test_resume_skips_a_truncated_checkpoint(tmp_path, caplog):
    """A run killed while saving leaves a truncated newest checkpoint (MONAI saves in place): resume from the
    newest complete one instead of crashing in torch.load."""
    net = _net()
    trainer = _trainer(net, [_batch()], max_epochs=1)
    save = {"model": net, "optimizer": trainer.optimizer, "trainer": trainer, "reference": trainer.reference}
    saver = CheckpointSaver(str(tmp_path), save, save_interval=1, n_saved=1, epoch_level=True)
    saver.attach(trainer)
    trainer.run()
    good = tmp_path / "checkpoint_epoch=1.pt"
    bad = tmp_path / "checkpoint_epoch=2.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    os.utime(bad, (good.stat().st_mtime + 5, good.stat().st_mtime + 5))

    with caplog.at_level("WARNING"):
        resumed, epochs = _resume_and_run(tmp_path, max_epochs=2, n_saved=1)
    assert resumed == str(good)
    assert epochs == [2]
    assert f"skipping incomplete checkpoint {bad} (the run was killed while saving it)" in caplog.text

    bad.rename(tmp_path / "checkpoint_epoch=9.pt")
    good.write_bytes(b"")  # nothing complete left: a fresh start, not a crash
    assert resume_latest(_trainer(_net(), [_batch()]), saver) is None


def test_glance_context_crops_feed_the_centre_window_to_the_focus():
    """With glance_context, the Glance reads the whole crop (its map cut to the centre window before pooling);
    the Focus, the loss, the reward and the CE label use the centre window only."""
    torch.manual_seed(0)
    glance = GlanceNet(in_channels=1, downsample=2, channels=(4, 8, 8), strides=(2, 2, 1), context=(8, 8, 8))
    focus = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    net = GlanceFocusNet(glance, focus)
    seen = []
    focus.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    crops = _batch(n_windows=GROUP)
    crops = {k: torch.nn.functional.pad(v, [8] * 6) for k, v in crops.items()}  # 32^3 crops around 16^3 windows
    trainer = _trainer(net, [crops], glance_context=(8, 8, 8))
    trainer.run()
    assert seen == [(GROUP, 1, 16, 16, 16)]
    out = trainer.state.output
    assert out["label"].shape[2:] == WINDOW and out["pred"].shape[2:] == WINDOW
    # the glance's window logits are the pooled centre cells of the crop's map (margin 8 voxels = 1 cell)
    x = crops["image"][:1]
    with torch.no_grad():
        net.eval()
        full = glance.logit_map(x)
        assert torch.allclose(glance(x), full[:, :, 1:-1, 1:-1, 1:-1].mean((2, 3, 4)))
    with pytest.raises(ValueError, match="multiples"):
        GlanceNet(1, context=(3, 0, 0))


def test_reward_advantage_and_ce_are_wired_per_scan_from_the_actions_taken(monkeypatch):
    """Two scans of four windows with known actions: the reward of each window follows from the Focus prediction,
    the label and the action taken; advantages are relative within each scan and clamped at the trainer's bound;
    the policy loss gets the trainer's eps and beta; the CE label is "holds a lesion"."""
    batch = _windows("LFMF" "FLFL")
    actions = [1, 1, 1, 0, 1, 0, 0, 0]
    _fixed_actions(monkeypatch, actions)
    seen = _spy_grpo_loss(monkeypatch)
    torch.manual_seed(0)
    net = GlanceFocusNet(GlanceNet(1, downsample=2, channels=(4, 8, 8), strides=(2, 2, 1)), BrightFocus())
    glance_before = copy.deepcopy(net.glance)
    trainer = _trainer(net, [batch], alpha=0.1, eps=0.2, beta=0.05, advantage_clamp=1.5)
    trainer.run()
    out = trainer.state.output

    # recomputed here from the prediction, the label and the actions: keeping earns 1 where the prediction touches
    # the lesion, discarding earns 1 where there is no lesion
    pred, label = out["pred"].detach().argmax(1) > 0, out["label"][:, 0] > 0
    found, lesion = (pred & label).flatten(1).any(1), label.flatten(1).any(1)
    reward = torch.where(torch.tensor(actions).bool(), found, ~lesion).float()
    assert reward.tolist() == [1, 0, 0, 1, 0, 0, 1, 0]  # L, F, M (missed) kept, F discarded | F kept, L, F, L discarded
    assert float(out["reward"]) == pytest.approx(3 / 8)
    # scan 1: mean 1/2, std 1/2; scan 2: mean 1/4, std sqrt(3)/4 (its one success's sqrt(3) clamped to 1.5)
    expected = [1.0, -1.0, -1.0, 1.0, -1 / 3**0.5, -1 / 3**0.5, 1.5, -1 / 3**0.5]
    assert seen["actions"].tolist() == actions
    assert seen["advantage"].tolist() == pytest.approx(expected, abs=1e-5)
    assert (seen["eps"], seen["beta"]) == (0.2, 0.05)
    # the CE term is the balanced CE of the Glance's logits against "window holds a lesion"
    logits = glance_before.train()(batch["image"]).detach()
    ce = grpo.balanced_ce(logits, grpo.window_has_lesion(batch["label"]))
    torch.testing.assert_close(out["glance_ce"], ce, rtol=1e-5, atol=1e-6)
    # the kept fraction is the share of windows whose keep logit is the larger
    kept = sum(float(keep > discard) for discard, keep in logits.tolist()) / len(actions)
    assert float(out["kept_fraction"]) == pytest.approx(kept)


def test_one_step_with_positive_advantage_on_kept_lesion_windows_raises_their_p_keep(monkeypatch):
    """GRPO alone (alpha 0), one SGD step on two identical scans: keeping a found lesion (A > 0) and discarding a
    lesion-free window (A > 0) are reinforced, keeping a lesion-free window and discarding a lesion (A < 0) are
    penalised, so p(keep) rises on every lesion window and falls on every lesion-free one."""
    batch = _windows("LFFL" "LFFL")
    _fixed_actions(monkeypatch, [1, 1, 0, 0] * 2)  # rewards 1, 0, 1, 0 per scan: A = +1, -1, +1, -1
    torch.manual_seed(0)
    net = GlanceFocusNet(GlanceNet(1, downsample=2, channels=(4, 8, 8), strides=(2, 2, 1)), BrightFocus())
    before = _p_keep(net.glance, batch["image"])
    trainer = _trainer(net, [batch], alpha=0.0, optimizer=torch.optim.SGD(net.parameters(), lr=0.05))
    trainer.run()
    change = _p_keep(net.glance, batch["image"]) - before
    lesion = torch.tensor([True, False, False, True] * 2)
    assert (change[lesion] > 0.01).all(), change
    assert (change[~lesion] < -0.01).all(), change


def test_resume_maps_a_gpu_checkpoint_to_the_training_device(tmp_path, monkeypatch, caplog):
    """A run trained on a GPU (storages tagged 'cuda:0') resumes on a CPU-only machine, and says from where."""
    net = _net()
    trainer = _trainer(net, [_batch()], max_epochs=1)
    _saver(tmp_path, net, trainer)
    with monkeypatch.context() as m:  # what torch.save writes for tensors on a GPU
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        trainer.run()
    net2 = _net(seed=3)
    trainer2 = _trainer(net2, [_batch()], max_epochs=2)
    with caplog.at_level("INFO"):
        path = resume_latest(trainer2, _saver(tmp_path, net2, trainer2))
    assert f"resuming from {path}" in caplog.text
    trainer2.run()  # loads the checkpoint at the start of the run
    assert trainer2.state.epoch == 2 and trainer2.state.iteration == 2


def test_resume_takes_the_newest_checkpoint_by_time(tmp_path):
    """Two complete checkpoints: the run resumes from the one written last, even where file names sort the other
    way (epoch 10 sorts before epoch 9 as text)."""
    net = _net()
    trainer = _trainer(net, [_batch()], max_epochs=2)
    save = {"model": net, "optimizer": trainer.optimizer, "trainer": trainer, "reference": trainer.reference}
    CheckpointSaver(str(tmp_path), save, save_interval=1, n_saved=2, epoch_level=True).attach(trainer)
    trainer.run()
    older, newer = tmp_path / "checkpoint_epoch=9.pt", tmp_path / "checkpoint_epoch=10.pt"
    (tmp_path / "checkpoint_epoch=1.pt").rename(older)
    (tmp_path / "checkpoint_epoch=2.pt").rename(newer)
    os.utime(older, (1_000_000, 1_000_000))
    os.utime(newer, (2_000_000, 2_000_000))

    resumed, epochs = _resume_and_run(tmp_path, max_epochs=3, n_saved=2)
    assert resumed == str(newer)
    assert epochs == [3]  # the epoch-2 state was loaded, not the epoch-1 one


def _resume_and_run(ckpt_dir, max_epochs: int, n_saved: int) -> tuple[str | None, list[int]]:
    """A fresh trainer resumed by resume_latest from ``ckpt_dir``: the checkpoint it loaded and the epochs it ran."""
    net = _net(seed=3)
    trainer = _trainer(net, [_batch()], max_epochs=max_epochs)
    save = {"model": net, "optimizer": trainer.optimizer, "trainer": trainer, "reference": trainer.reference}
    saver = CheckpointSaver(str(ckpt_dir), save, save_interval=1, n_saved=n_saved, epoch_level=True)
    resumed = resume_latest(trainer, saver)
    epochs: list[int] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    trainer.run()
    return resumed, epochs


class RecordingInferer(Inferer):
    """SimpleInferer that records each call (input type and shape, extra positional and keyword arguments) and its
    result; the network gets only ``glance``, the one argument it takes."""

    def __init__(self) -> None:
        self.calls: list[tuple[type, tuple, tuple, dict]] = []
        self.results: list[torch.Tensor] = []

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        self.calls.append((type(inputs), tuple(inputs.shape), args, dict(kwargs)))
        self.results.append(network(inputs, **{k: v for k, v in kwargs.items() if k == "glance"}))
        return self.results[-1]


def _tagged_prepare_batch(seen: list):
    """default_prepare_batch that records its keyword arguments and asks for extra network arguments: ``"extra"``
    and the keyword ``tag``."""

    def prepare(batchdata, device=None, non_blocking=False, **kwargs):
        seen.append(kwargs)
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        return image, label, ("extra",), {"tag": "from prepare_batch"}

    return prepare


def test_inferer_and_to_kwargs_are_used_for_both_forward_passes():
    """train#inferer and to_kwargs are MONAI's knobs: the Focus pass on the windows and the Glance pass on the
    crops go through the inferer, with prepare_batch's extra arguments, and the loss uses what it returns."""
    inferer, seen = RecordingInferer(), []
    trainer = _trainer(
        _net(), [_batch()], inferer=inferer, prepare_batch=_tagged_prepare_batch(seen), to_kwargs={"copy": True}
    )
    trainer.run()
    assert seen == [{"copy": True}]
    shape = (2 * GROUP, 1, *WINDOW)
    tag = {"tag": "from prepare_batch"}
    assert [c[1:] for c in inferer.calls] == [(shape, ("extra",), tag), (shape, ("extra",), {**tag, "glance": True})]
    assert trainer.state.output["pred"] is inferer.results[0]
    assert inferer.results[1].shape == (2 * GROUP, 2)  # the Glance's keep/discard logits


@pytest.mark.parametrize("compile", [False, True])
def test_compile_compiles_the_network_and_feeds_it_plain_tensors(monkeypatch, compile):
    """compile=True: SupervisedTrainer compiles the network and, as MONAI does for torch.compile, the iteration
    hands it plain tensors, not MetaTensors, and leaves plain ones as they are (torch.compile is replaced by a
    recorder: compiling takes minutes)."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net, **kwargs: compiled.append(kwargs) or net)
    batch = _batch()
    batch["image"] = MetaTensor(batch["image"])  # the label stays a plain tensor
    inferer = RecordingInferer()
    trainer = _trainer(_net(), [batch], inferer=inferer, compile=compile, compile_kwargs={"mode": "default"})
    trainer.run()
    assert compiled == ([{"mode": "default"}] if compile else [])
    assert [c[0] for c in inferer.calls] == [torch.Tensor if compile else MetaTensor] * 2


@pytest.mark.skipif(
    "accumulation_steps" not in inspect.signature(SupervisedTrainer).parameters, reason="MONAI < 1.6 has no such knob"
)
def test_gradient_accumulation_is_refused():
    """MONAI 1.6's accumulation_steps would be ignored by the GRPO iteration: it is refused, not silently dropped."""
    with pytest.raises(ValueError, match="does not accumulate gradients"):
        _trainer(_net(), [_batch()], accumulation_steps=2)
    _trainer(_net(), [_batch()], accumulation_steps=1)


class ScriptedScore(Metric):
    """A key metric that reports the given scores, one per validation."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = iter(scores)
        super().__init__()

    def reset(self) -> None:
        pass

    def update(self, output) -> None:
        pass

    def compute(self) -> float:
        return next(self.scores)


def _validated_run(ckpt_dir, scores: list[float], max_epochs: int, resume: bool) -> list[bool]:
    """A tiny training with train.json's two checkpoint savers (``train#checkpoint``, ``validate#checkpoint``)
    wired as there: a validation after each epoch scores ``scores`` in turn. Returns, per validation, whether
    ``model.pt`` then holds the weights just validated (i.e. the best-model saver saved them)."""
    net = _net()
    trainer = _trainer(net, [_batch()], max_epochs=max_epochs)
    parser = ConfigParser()
    parser.read_config(str(TRAIN_JSON))
    parser.update({"ckpt_dir": str(ckpt_dir), "network": net, "optimizer": trainer.optimizer, "train#trainer": trainer})
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=[_batch()],
        network=net,
        key_val_metric={"val_lesion_dice": ScriptedScore(scores)},
        val_handlers=[parser.get_parsed_content("validate#checkpoint")],
    )
    saved = []
    evaluator.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: saved.append(_equal(torch.load(Path(ckpt_dir) / "model.pt", weights_only=True), net.state_dict())),
    )
    ValidationHandler(interval=1, validator=evaluator).attach(trainer)  # a train handler: before the checkpoint
    checkpoint = parser.get_parsed_content("train#checkpoint")
    checkpoint.attach(trainer)
    if resume:
        assert resume_latest(trainer, checkpoint) is not None
    trainer.run()
    return saved


def test_a_resumed_run_keeps_the_best_model_when_its_first_validation_is_worse(tmp_path):
    """Scores 0.6, 0.9, then (resumed) 0.4, 0.95: ``model.pt`` keeps epoch 2's weights through the worse epoch 3 and
    takes epoch 4's. A resumed run once forgot the best score and saved epoch 3 over it."""
    assert _validated_run(tmp_path, [0.6, 0.9], max_epochs=2, resume=False) == [True, True]
    best = torch.load(tmp_path / "model.pt", weights_only=True)
    assert _validated_run(tmp_path, [0.4, 0.95], max_epochs=4, resume=True) == [False, True]
    assert not _equal(torch.load(tmp_path / "model.pt", weights_only=True), best)  # epoch 4's


def test_a_checkpoint_without_the_best_model_record_resumes_with_a_warning(tmp_path, caplog):
    """Checkpoints written before the record was saved with them resume the model, optimizer and engine state,
    and say that the best score is forgotten (the next validation saves ``model.pt``)."""
    _validated_run(tmp_path, [0.6], max_epochs=1, resume=False)
    ckpt = tmp_path / "checkpoint_epoch=1.pt"
    old = torch.load(ckpt, weights_only=True)
    del old["best_model"]
    torch.save(old, ckpt)
    with caplog.at_level("WARNING"):
        assert _validated_run(tmp_path, [0.4], max_epochs=2, resume=True) == [True]
    assert f"{ckpt} has no 'best_model'" in caplog.text
