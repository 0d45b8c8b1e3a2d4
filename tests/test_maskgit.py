"""MaskGIT generation (mimfast.models.maskgit) and ``mimfast generate`` (mimfast.train.generate).

The schedule against SPEC.md's formula written out independently (numpy, as the official ``gen_image``), the mask
counts each step of both samplers actually feed the model, known tokens never re-masked or changed, no mask id in
the result, seeded reproducibility, sampling that follows the logits (a dominant token wins; the draw matches the
softmax; the lowest-confidence positions are the ones re-masked), the errors, and the command on a tiny stand-in
model and tokenizer (the end-to-end test on a trained ``mage_debug`` run lives with the MAGE task).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import DEVICE
from mimfast.models.maskgit import (
    cosine_schedule,
    generate,
    mask_len_schedule,
    maskgit_sample,
    official_sampler,
    unknown_schedule,
)

SAMPLERS = {"maskgit": maskgit_sample, "official": official_sampler}


def spec_mask_lens(seq_len: int, steps: int) -> list[int]:
    """SPEC.md / the official loop, step by step: r = (t+1)/T, floor(L cos(pi/2 r)), max(1, min(unknown-1, .))."""
    out, unknown = [], seq_len
    for step in range(steps):
        ratio = 1.0 * (step + 1) / steps
        mask_len = np.floor(seq_len * np.cos(math.pi / 2.0 * ratio))
        mask_len = max(1, min(unknown - 1, int(mask_len)))
        out.append(mask_len)
        unknown = mask_len
    return out


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


class Recorder:
    """logits_fn over a fixed random table (L, K) that records every input it sees."""

    def __init__(self, seq_len: int, k: int, seed: int = 0, scale: float = 2.0):
        g = torch.Generator().manual_seed(seed)
        self.table = (torch.randn(seq_len, k, generator=g) * scale).to(DEVICE)
        self.inputs: list[torch.Tensor] = []

    def __call__(self, ids, class_ids=None):
        self.inputs.append(ids.clone())
        return self.table.expand(ids.shape[0], -1, -1)


# ------------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("seq_len,steps", [(256, 12), (256, 20), (64, 12), (64, 20), (4, 12), (1, 3), (256, 1)])
def test_schedule_matches_the_spec_formula(seq_len, steps):
    assert mask_len_schedule(seq_len, steps) == spec_mask_lens(seq_len, steps)
    assert unknown_schedule(seq_len, steps) == [seq_len] + spec_mask_lens(seq_len, steps)[:-1]


def test_schedule_pinned_values():
    # independent of both implementations above: MAGE's defaults, L = 256, T = 12 and 20
    assert mask_len_schedule(256, 12) == [253, 247, 236, 221, 203, 181, 155, 128, 97, 66, 33, 1]
    assert mask_len_schedule(256, 20)[:4] == [255, 252, 248, 243]
    assert mask_len_schedule(256, 20)[-3:] == [40, 20, 1]
    assert cosine_schedule(0.0) == 1.0 and 0 <= cosine_schedule(1.0) < 1e-15
    # more steps than tokens: the clamp keeps one position unknown until the last step
    assert mask_len_schedule(3, 6) == [2, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("bad,err", [(dict(steps=0), ValueError), (dict(steps=2.0), TypeError),
                                     (dict(seq_len=0), ValueError), (dict(steps=True), TypeError)])  # fmt: skip
def test_schedule_errors(bad, err):
    kw = dict(seq_len=16, steps=4) | bad
    with pytest.raises(err, match=next(iter(bad))):
        mask_len_schedule(**kw)


# ---------------------------------------------------------------------------------------- sampler mechanics
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("seq_len,steps", [(256, 12), (256, 20), (64, 12)])
def test_mask_counts_per_step_and_known_tokens_kept(sampler, seq_len, steps):
    k, b = 16, 2
    rec = Recorder(seq_len, k)
    out = SAMPLERS[sampler](rec, b, seq_len, mask_id=k, steps=steps, generator=gen(3), device=DEVICE)
    assert len(rec.inputs) == steps
    expected = unknown_schedule(seq_len, steps)
    for t, ids in enumerate(rec.inputs):
        counts = (ids == k).sum(dim=1).tolist()
        assert counts == [expected[t]] * b, f"step {t}"
    # a token known at step t is known, and the same, at every later step and in the result
    for prev, nxt in zip(rec.inputs, rec.inputs[1:] + [out], strict=True):
        known = prev != k
        assert torch.equal(nxt[known], prev[known])
    assert out.dtype == torch.int64 and out.shape == (b, seq_len)
    assert not (out == k).any() and int(out.min()) >= 0 and int(out.max()) < k


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_any_steps_and_no_mask_left(steps):
    k = 7
    out = maskgit_sample(Recorder(10, k), 3, 10, mask_id=100, steps=steps, generator=gen(0), device=DEVICE)
    assert out.shape == (3, 10) and not (out == 100).any() and int(out.max()) < k


def test_seeded_reproducible_and_seeds_differ():
    k, seq_len = 32, 64

    def run(seed):
        return maskgit_sample(Recorder(seq_len, k, scale=0.5), 2, seq_len, mask_id=k, steps=6, generator=gen(seed),
                              device=DEVICE)  # fmt: skip

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the default generator is used when none is given, and torch.manual_seed reproduces it
    torch.manual_seed(11)
    d = maskgit_sample(Recorder(seq_len, k), 2, seq_len, mask_id=k, steps=3, device=DEVICE)
    torch.manual_seed(11)
    e = maskgit_sample(Recorder(seq_len, k), 2, seq_len, mask_id=k, steps=3, device=DEVICE)
    assert torch.equal(d, e)


def test_official_sampler_seeded():
    rec = Recorder(32, 8, scale=0.5)
    a = official_sampler(rec, 2, 32, mask_id=8, steps=4, generator=gen(1), device=DEVICE)
    b = official_sampler(rec, 2, 32, mask_id=8, steps=4, generator=gen(1), device=DEVICE)
    c = official_sampler(rec, 2, 32, mask_id=8, steps=4, generator=gen(2), device=DEVICE)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_dominant_token_is_returned(sampler):
    seq_len, k = 64, 50
    target = torch.randint(0, k, (seq_len,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    table = torch.zeros(seq_len, k, device=DEVICE)
    table[torch.arange(seq_len, device=DEVICE), target] = 40.0  # p(others) ~ 50 e^-40

    out = SAMPLERS[sampler](lambda ids: table.expand(ids.shape[0], -1, -1), 3, seq_len, mask_id=k, steps=8,
                            generator=gen(0), device=DEVICE)  # fmt: skip
    assert torch.equal(out, target.expand(3, -1))


def test_greedy_sampling_temperature_zero():
    seq_len, k = 16, 9
    table = torch.randn(seq_len, k, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out = maskgit_sample(lambda ids: table.expand(ids.shape[0], -1, -1), 2, seq_len, mask_id=k, steps=4,
                         sample_temperature=0.0, generator=gen(0), device=DEVICE)  # fmt: skip
    assert torch.equal(out, table.argmax(-1).expand(2, -1))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_tokens_are_drawn_from_the_softmax(temperature):
    # L = 1, T = 1: one categorical draw per row from softmax(logits / temperature)
    logits = torch.tensor([0.0, 1.0, -1.0, 0.5], device=DEVICE)
    n = 6000
    out = maskgit_sample(lambda ids: logits.expand(ids.shape[0], 1, -1), n, 1, mask_id=4, steps=1,
                         sample_temperature=temperature, generator=gen(9), device=DEVICE)  # fmt: skip
    freq = torch.bincount(out.view(-1).cpu(), minlength=4).double() / n
    p = torch.softmax(logits.cpu().double() / temperature, -1)
    assert torch.allclose(freq, p, atol=4 * math.sqrt(0.25 / n)), (freq, p)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_lowest_confidence_positions_are_remasked(sampler):
    # every position has a dominant token, with a margin (hence log p(sampled)) that differs per position; without
    # choice noise the positions re-masked after step 0 are the n_0 least confident ones
    seq_len, k, steps = 8, 4, 2
    margins = torch.tensor([30.0, 1.0, 25.0, 0.5, 2.0, 35.0, 1.5, 3.0], device=DEVICE)
    table = torch.zeros(seq_len, k, device=DEVICE)
    table[:, 0] = margins
    rec = []

    def fn(ids):
        rec.append(ids.clone())
        return table.expand(ids.shape[0], -1, -1)

    SAMPLERS[sampler](fn, 2, seq_len, mask_id=k, steps=steps, choice_temperature=0.0, generator=gen(0),
                      device=DEVICE)  # fmt: skip
    n0 = mask_len_schedule(seq_len, steps)[0]
    assert n0 == 5
    # sampled tokens may not all be 0 on low-margin positions; their confidence is then even lower (still re-masked)
    want = set(torch.argsort(margins)[:n0].tolist())
    for row in rec[1]:
        assert set(torch.nonzero(row == k).view(-1).tolist()) == want


def test_class_ids_reach_logits_fn():
    k, seq_len = 12, 9

    def fn(ids, class_ids=None):
        assert class_ids is not None and class_ids.dtype == torch.int64
        logits = torch.full((ids.shape[0], seq_len, k), -30.0, device=ids.device)
        logits[torch.arange(ids.shape[0]), :, class_ids] = 30.0
        return logits

    cls = torch.tensor([3, 7, 0], device=DEVICE)
    out = maskgit_sample(fn, 3, seq_len, mask_id=k, steps=3, generator=gen(0), device=DEVICE, class_ids=cls,
                         num_classes=10)  # fmt: skip
    assert torch.equal(out, cls[:, None].expand(-1, seq_len))
    out = maskgit_sample(fn, 2, seq_len, mask_id=k, steps=2, generator=gen(0), device=DEVICE, class_ids=[1, 2])
    assert out[0].eq(1).all() and out[1].eq(2).all()
    out = official_sampler(fn, 2, seq_len, mask_id=k, steps=2, generator=gen(0), device=DEVICE, class_ids=4)
    assert out.eq(4).all()


# ----------------------------------------------------------------------------------------------------- errors
def _fn(ids, class_ids=None):
    return torch.zeros(ids.shape[0], ids.shape[1], 5, device=ids.device)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=1.5), TypeError, "steps"),
        (dict(choice_temperature=-1.0), ValueError, "choice_temperature"),
        (dict(choice_temperature=float("inf")), ValueError, "choice_temperature"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(seq_len=0), ValueError, "seq_len"),
        (dict(mask_id=3), ValueError, "mask_id"),
        (dict(mask_id=None), TypeError, "mask_id"),
        (dict(class_ids=[0, 10], num_classes=10), ValueError, "class_ids: 10"),
        (dict(class_ids=torch.tensor([0, -1]), num_classes=10), ValueError, "class_ids: -1"),
        (dict(class_ids=[1, 2, 3]), ValueError, "class_ids"),
        (dict(class_ids=torch.tensor([0.0, 1.0])), TypeError, "class_ids"),
        (dict(class_ids=1, num_classes=0), ValueError, "class_ids"),
        (dict(logits_fn=lambda ids: torch.zeros(ids.shape[0], 3, 5)), ValueError, "logits_fn"),
        (dict(logits_fn=lambda ids: torch.zeros(ids.shape, dtype=torch.long)), ValueError, "logits_fn"),
        (dict(logits_fn="nope"), TypeError, "logits_fn"),
        (dict(generator="seed"), TypeError, "generator"),
    ],
)
def test_sampler_errors(sampler, kwargs, err, match):
    kw = dict(logits_fn=_fn, batch_size=2, seq_len=4, mask_id=5, steps=3, device=DEVICE) | kwargs
    fn, b, n = kw.pop("logits_fn"), kw.pop("batch_size"), kw.pop("seq_len")
    with pytest.raises(err, match=match):
        SAMPLERS[sampler](fn, b, n, **kw)


@pytest.mark.parametrize("bad", [dict(sample_temperature=-0.1), dict(sample_temperature=float("nan"))])
def test_sample_temperature_errors(bad):
    with pytest.raises(ValueError, match="sample_temperature"):
        maskgit_sample(_fn, 2, 4, mask_id=5, device=DEVICE, **bad)


def test_nan_logits_raise_after_the_loop():
    def fn(ids):
        out = torch.zeros(ids.shape[0], ids.shape[1], 5, device=ids.device)
        out[0, 1, 2] = float("nan")
        return out

    with pytest.raises(ValueError, match="logits_fn: returned logits with a NaN"):
        maskgit_sample(fn, 2, 4, mask_id=5, steps=3, generator=gen(0), device=DEVICE)


# --------------------------------------------------------------------------------------------------- generate
class StandInMAGE(nn.Module):
    """The MAGE generation interface over a per-position table: token = (position + class) % K dominates."""

    task = "mage"

    def __init__(self, codebook_size=8, grid=3, num_classes=4):
        super().__init__()
        self.config = SimpleNamespace(codebook_size=codebook_size, num_classes=num_classes)
        self.grid_size = grid
        self.mask_token_id = codebook_size + num_classes
        self.scale = nn.Parameter(torch.tensor(20.0))
        self.calls = 0

    def predict_logits(self, token_ids, class_ids=None):
        self.calls += 1
        b, n = token_ids.shape
        k = self.config.codebook_size
        pos = torch.arange(n, device=token_ids.device)[None, :].expand(b, n)
        tok = (pos + (class_ids[:, None] if class_ids is not None else 0)) % k
        return torch.nn.functional.one_hot(tok, k).float() * self.scale


class StandInTokenizer(nn.Module):
    def __init__(self, codebook_size=8, grid=3, up=2):
        super().__init__()
        self.codebook_size, self.grid_size, self.up = codebook_size, grid, up
        self.register_buffer("dummy", torch.zeros(1))

    @torch.no_grad()
    def decode(self, ids):
        x = ids.float()[:, None] / (self.codebook_size - 1) * 2 - 1  # [-1, 1]: mean/std 0.5 space
        x = x.repeat_interleave(self.up, -1).repeat_interleave(self.up, -2)
        return x.expand(-1, 3, -1, -1).contiguous()


def test_generate_batches_classes_and_reproducibility():
    model, tok = StandInMAGE().to(DEVICE), StandInTokenizer()
    imgs, ids = generate(model, tok, 5, steps=3, batch_size=2, generator=gen(0), return_ids=True,
                         class_ids=[0, 1, 2, 3, 0])  # fmt: skip
    assert imgs.shape == (5, 3, 6, 6) and imgs.dtype == torch.float32 and imgs.device.type == "cpu"
    assert ids.shape == (5, 3, 3)
    want = (torch.arange(9)[None] + torch.tensor([0, 1, 2, 3, 0])[:, None]) % 8
    assert torch.equal(ids.view(5, 9), want)
    assert model.calls == 3 * 3  # three batches (2, 2, 1) of three steps
    assert torch.equal(imgs, tok.decode(ids))
    a = generate(model, tok, 3, steps=2, generator=gen(4))
    b = generate(model, tok, 3, steps=2, generator=gen(4))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_images=0), "num_images"),
        (dict(steps=0), "steps"),
        (dict(class_ids=[0, 9]), "class_ids: 9"),
        (dict(batch_size=0), "batch_size"),
        (dict(tok=StandInTokenizer(codebook_size=16)), "tokenizer: has 16 codes"),
    ],
)
def test_generate_errors(kwargs, match):
    model = StandInMAGE().to(DEVICE)
    kw = dict(num_images=2, tok=StandInTokenizer()) | kwargs
    tok, n = kw.pop("tok"), kw.pop("num_images")
    with pytest.raises(ValueError, match=match):
        generate(model, tok, n, **kw)


# -------------------------------------------------------------------------------------------- the CLI command
@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """``mimfast generate`` over a stand-in MAGE run: the checkpoint loader and the tokenizer loader return the
    stand-ins (a trained mage_debug run is exercised end to end elsewhere)."""
    pytest.importorskip("PIL.Image", reason="the grid PNG needs Pillow ('.[train]')")
    import mimfast.train.generate as gmod
    import mimfast.train.tasks.token_prediction as tp

    state = SimpleNamespace(model=StandInMAGE(), tok=StandInTokenizer(), loss={"tokenizer": "tok-run"})

    def fake_load_pretrained(checkpoint, **kw):
        cfg = SimpleNamespace(model=SimpleNamespace(name="mage_standin", loss=state.loss),
                              data=SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))  # fmt: skip
        return state.model, cfg, 7

    def fake_load_tokenizer(spec, data_cfg):
        assert spec == "tok-run"
        return state.tok

    monkeypatch.setattr(gmod, "load_pretrained", fake_load_pretrained)
    monkeypatch.setattr(tp, "load_tokenizer", fake_load_tokenizer)
    monkeypatch.delenv("MIMFAST_DEBUG", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    return run, state


def test_cli_generate_writes_a_grid(fake_run, tmp_path, capsys):
    from PIL import Image

    from mimfast.cli import main

    run, state = fake_run
    state.loss = {"tokenizer": "tok-run", "class_conditional": True}
    out = tmp_path / "g" / "grid.png"
    rc = main(["generate", "--checkpoint", str(run), "--num-images", "5", "--steps", "3", "--class-id", "1", "2",
               "--device", "cpu", "--batch-size", "2", "--out", str(out), "--seed", "1"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "images/s" in text and str(out) in text
    img = np.asarray(Image.open(out))
    tile = 6 * round(128 / 6)  # 6 px images, scaled to about 128 px, 3 x 2 tiles with 2 px padding
    assert img.shape == (2 * (tile + 2) + 2, 3 * (tile + 2) + 2, 3)
    # first tile: class 1, token of position 0 = 1 -> pixel 1 / 7 (denormalised from [-1, 1])
    assert abs(int(img[2, 2, 0]) - round(255 * 1 / 7)) <= 1
    assert int(img[0, 0, 0]) == 255  # padding


def test_renormalized_tokenizer_decodes_into_the_run_space():
    from types import SimpleNamespace

    from mimfast.train.tasks.token_prediction import _Renormalize

    class Inner(nn.Module):
        config = SimpleNamespace(codebook_size=4, grid_size=2, img_size=8)

        def decode(self, ids):  # (B, 2, 2) -> (B, 3, 8, 8) in the tokenizer run's normalised space
            return ids.float()[:, None].repeat_interleave(4, -1).repeat_interleave(4, -2).expand(-1, 3, -1, -1)

    w = _Renormalize(Inner(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    ids = torch.tensor([[[0, 1], [3, 2]]])
    view = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    pixels = Inner().decode(ids) * view([0.2, 0.3, 0.4]) + view([0.4, 0.5, 0.6])  # the tokenizer run's pixels
    torch.testing.assert_close(w.decode(ids), (pixels - 0.5) / 0.25)  # in the MAGE run's space


@pytest.mark.parametrize(
    "args,setup,match",
    [
        (["--steps", "0"], None, "--steps: expected an int >= 1"),
        (["--num-images", "0"], None, "--num-images"),
        (["--temperature", "-1"], None, "--temperature"),
        (["--class-id", "4"], None, "--class-id: 4 is not a class"),
        ([], "not_mage", "not a MAGE run"),
        ([], "vocab", "has 16 codes but the MAGE model"),
        ([], "no_decode", "has no decode"),
    ],
)
def test_cli_generate_errors(fake_run, capsys, args, setup, match):
    from mimfast.cli import main

    run, state = fake_run
    if setup == "not_mage":
        state.model = nn.Linear(2, 2)
    elif setup == "vocab":
        state.tok = StandInTokenizer(codebook_size=16)
    elif setup == "no_decode":
        state.tok = SimpleNamespace(codebook_size=8, encode=lambda x: x)
    rc = main(["generate", "--checkpoint", str(run), "--device", "cpu", "--num-images", "2", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1
