"""The task interface of the training loop: a method plugs in with a Task (losses per optimizer, metrics, FLOPs,
probe features, reconstruction columns), never with a branch in the loop.

A toy two-optimizer "GAN" (a generator and a discriminator with a late start, as a VQGAN tokenizer has) checks that
each optimizer updates only its own parameters, that the discriminator's zero loss before its start step leaves it
untouched, that task metrics reach metrics.jsonl, and that a 2 + 3-step resume is bit-identical to 5 straight steps
with both optimizers' state.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from test_train import needs_dali

from mimfast.models import register_model
from mimfast.train import get_config, load_checkpoint, pretrain
from mimfast.train.tasks import OptimizerSpec, Task, register_task, task_for, tasks


class ToyGAN(nn.Module):
    task = "toy_gan"

    def __init__(self, img_size: int = 32):
        super().__init__()
        self.img_size = img_size
        self.gen = nn.Linear(3, 3)
        self.disc = nn.Linear(3, 1)

    def forward(self, x):
        return self.gen(x)


@register_model
def toy_gan_debug(**kwargs) -> ToyGAN:
    """A two-part toy model for the task-interface tests."""
    return ToyGAN(**kwargs)


@register_task
class ToyGANTask(Task):
    name = "toy_gan"
    DISC_START = 3

    def optimizer_specs(self, model):
        return [OptimizerSpec("gen", [{"params": list(model.gen.parameters()), "weight_decay": 0.0}]),
                OptimizerSpec("disc", [{"params": list(model.disc.parameters()), "weight_decay": 0.0}],
                              lr_scale=2.0)]  # fmt: skip

    def losses(self, model, batch, device, step):
        x = batch.images.to(device).mean(dim=(2, 3))  # (B, 3)
        inner = getattr(model, "module", model)
        fake = model(x)
        frozen = {k: v.detach() for k, v in inner.disc.named_parameters()}  # no discriminator grads from the G loss
        g = -torch.func.functional_call(inner.disc, frozen, (fake,)).mean() + (fake - x).abs().mean()
        d = torch.relu(1 - inner.disc(x)).mean() + torch.relu(1 + inner.disc(fake.detach())).mean()
        d = d * float(step >= self.DISC_START)  # taming's disc_start: a zero loss (and zero gradients) before
        return {"gen": g, "disc": d}, {"rec_l1": (fake - x).abs().mean()}


def _cfg(out, *extra):
    return get_config("mae_debug", [f"train.out_dir={out}", "model.name=toy_gan_debug", "train.progress=lines",
                                    "train.log_every=1", "optim.blr=0.5", *extra])  # fmt: skip


def test_registry_finds_the_task_of_a_model():
    assert "mae" in tasks() and "toy_gan" in tasks()
    from mimfast.models import create_model

    assert type(task_for(create_model("mae_vit_tiny_patch4_dec64d2b_debug"))).__name__ == "MAETask"
    with pytest.raises(TypeError, match="names no registered training task"):
        task_for(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs a new, non-empty name"):
        register_task(type("Again", (Task,), {"name": "mae"}))


@needs_dali
def test_two_optimizers_late_start_metrics_and_exact_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    seen = []

    def on_step(step, model, m):
        seen.append((step, {k: v.detach().clone() for k, v in model.state_dict().items()}))

    straight = tmp_path / "straight"
    pretrain(_cfg(straight, "train.max_steps=5"), on_step=on_step)
    out = capsys.readouterr().out
    for (step, sd), (_, prev) in zip(seen[1:], seen[:-1], strict=True):
        assert not torch.equal(sd["gen.weight"], prev["gen.weight"]), f"generator did not move at step {step}"
        moved = not torch.equal(sd["disc.weight"], prev["disc.weight"])
        assert moved == (step > ToyGANTask.DISC_START), f"discriminator moved={moved} at step {step}"
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss", "disc", "rec_l1"} <= set(r) for r in rows) and len(rows) == 5
    assert "| disc " in out and "| rec_l1 " in out
    # resume: 2 + 3 steps == 5 steps, both optimizers' state included
    resumed = tmp_path / "resumed"
    pretrain(_cfg(resumed, "train.max_steps=2"))
    pretrain(_cfg(resumed, "train.max_steps=5", "train.resume=auto"))
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert set(a["optimizer"]["state"]) == {"gen.weight", "gen.bias", "disc.weight", "disc.bias"}
    for fqn, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][fqn][k]), (fqn, k)
    assert rows == [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
