"""MaskGIT generation throughput (images/s): mimfast's on-device sampler vs the official MAGE sampler's loop.

``maskgit_sample`` (no host sync in the loop, fused Gumbel-max token draws, torch RNG choice noise on the device) and
``official_sampler`` (a faithful port of the official ``gen_image``: numpy Gumbel noise drawn on the host every step
and copied to the device, host reads of the mask length) run over the *same* ``logits_fn``. Token ids only: decoding
through the tokenizer is excluded from every figure (it is the same for both samplers).

GPU cases:

* ``mage_vit_base_patch16`` (MAGE ViT-B/16, 256 tokens, codebook 1024) in bf16 autocast, 12 and 20 steps, batch 64
  and 256 (skipped with a reason until the model is registered). PERF target: >= 3x the host-noise sampler at batch
  64. The model's forward is shared by both samplers and is most of a step at these batches, so this ratio is
  bounded by (model + official sampler overhead) / (model + mimfast sampler overhead); extra_info records both.
* ``table``: a logits_fn returning a fixed (B, 256, 1024) fp32 logits tensor, no model: the samplers' own cost
  (what the device-side loop removes: per-step host syncs, host noise and copies, the multinomial draw).

CPU case (the smoke pass): the same ``table`` logits_fn at a small shape (64 tokens, 64 codes); the mimfast CPU path
is its plain-torch reference, not a speed claim.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from mimfast.models import list_models
from mimfast.models.maskgit import maskgit_sample, official_sampler

with contextlib.suppress(ImportError):  # registers the MAGE models until mimfast.models imports the module itself
    import mimfast.models.mage  # noqa: F401

CUDA = torch.cuda.is_available()
MAGE_B16 = "mage_vit_base_patch16"
PROVIDERS = ["mimfast", "official"]
SAMPLERS = {"mimfast": maskgit_sample, "official": official_sampler}
CASES = [
    *(pytest.param("mage_b16", b, t, "cuda", id=f"cuda-mage_b16-B{b}-T{t}-bf16") for b in (64, 256) for t in (12, 20)),
    *(pytest.param("table", b, 12, "cuda", id=f"cuda-table-B{b}-T12") for b in (64, 256)),
    pytest.param("table", 8, 12, "cpu", id="cpu-table-B8-T12"),
]
_IMG_PER_S: dict[tuple, dict[str, float]] = {}  # (case) -> {provider: images/s}, for the side-by-side ratio


def _mage_logits_fn(device: str):
    """MAGE ViT-B/16's predict_logits in bf16 autocast, fp32 logits; (fn, seq_len, mask_id, codebook_size)."""
    if MAGE_B16 not in list_models():
        pytest.skip(f"{MAGE_B16} is not registered yet (mimfast/models/mage.py)")
    from mimfast.models import create_model

    torch.manual_seed(0)
    model = create_model(MAGE_B16).to(device).eval()
    seq_len = model.grid_size**2

    def fn(ids):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model.predict_logits(ids)

    return fn, seq_len, int(model.mask_token_id), int(model.config.codebook_size)


def _table_logits_fn(batch: int, seq_len: int, k: int, device: str):
    """A fixed random logits tensor (B, L, K) fp32: the samplers without a model."""
    g = torch.Generator(device=device).manual_seed(0)
    table = torch.randn(batch, seq_len, k, generator=g, device=device) * 2.0
    return (lambda ids: table), seq_len, k, k


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("logits,batch,steps,device", CASES)
def test_generate(benchmark, provider, logits, batch, steps, device):
    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    if device == "cpu" and CUDA:
        pytest.skip("CPU shapes run only on CPU-only machines")
    if logits == "mage_b16":
        fn, seq_len, mask_id, k = _mage_logits_fn(device)
    else:
        seq_len, k = (256, 1024) if device == "cuda" else (64, 64)
        fn, seq_len, mask_id, k = _table_logits_fn(batch, seq_len, k, device)
    sampler = SAMPLERS[provider]
    gen = torch.Generator(device=device).manual_seed(0)

    def run():
        return sampler(fn, batch, seq_len, mask_id=mask_id, steps=steps, choice_temperature=4.5, generator=gen,
                       device=device)  # fmt: skip

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ctx = torch.no_grad() if logits == "mage_b16" else contextlib.nullcontext()
    with ctx:
        ids = run()  # warm-up: Triton compilation, cuBLAS / SDPA autotuning here, not in the timing
        sync()
        assert ids.shape == (batch, seq_len) and not (ids == mask_id).any() and int(ids.max()) < k

        def target():
            run()
            sync()

        benchmark.group = f"generate {logits} {device} B={batch} T={steps}"
        rounds = 5 if device == "cuda" else 3
        benchmark.pedantic(target, warmup_rounds=1, rounds=rounds, iterations=1)
    per_call = benchmark.stats.stats.median
    img_s = batch / per_call
    info = dict(provider=provider, logits=logits, batch=batch, steps=steps, seq_len=seq_len, codebook=k,
                device=device, torch=torch.__version__, img_per_s=img_s, ms_per_step=1e3 * per_call / steps,
                decode="excluded (token ids only)")  # fmt: skip
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["dtype"] = "bf16 autocast" if logits == "mage_b16" else "fp32 logits"
    else:
        info["dtype"] = "fp32"
    key = (logits, batch, steps, device)
    _IMG_PER_S.setdefault(key, {})[provider] = img_s
    both = _IMG_PER_S[key]
    if len(both) == 2:  # the second provider of a case reports the side-by-side ratio
        info["speedup_vs_official"] = both["mimfast"] / both["official"]
        if logits == "mage_b16" and batch == 64:
            info["perf_target"] = ">= 3x the host-noise sampler at batch 64 (PERF.md, issue 15)"
    benchmark.extra_info.update(info)
