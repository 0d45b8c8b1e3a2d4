"""sm_90 compile gate: compile every launch mimfast's launchers make, for a Hopper target, without a GPU.

    python bench/compile_report.py              # writes bench/COMPILE_REPORT.md (and prints it)
    python bench/compile_report.py --check      # exits 1 when a gate rule fails (CI: tests/test_compile_gate.py)
    python bench/compile_report.py --json rows.json --out /tmp/report.md --only vq_search --grep "D=256"

How: every launcher (vq_search, token gather/restore and its backward, block masks, Gumbel-softmax fwd / bwd, the
linear + cross-entropy chunk loop's row kernels) is called on ``meta`` tensors at PERF.md's benchmark shapes and at
awkward test shapes, with its kernels swapped for recorders, so the launches (kernel, grid, arguments, constexprs,
num_warps / num_stages) are exactly what the launcher would make on the GPU.
For an autotuned kernel every candidate its pruning keeps is recorded. Each distinct specialization is compiled
with ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), ...)`` (the
signature and divisibility attributes follow triton's own JIT rules), then the wheel's ptxas is run with ``-v`` on the
PTX for registers and spills; ``metadata.shared`` gives the shared memory. Per launch the report gives:

* path: ``wgmma`` (Hopper tensor cores), ``mma`` (sm_80-style tensor cores), ``FMA`` (a tl.dot on CUDA cores), or
  ``-`` (no dot), read from the PTX;
* registers per thread, spill stores / loads (bytes), shared memory per CTA;
* CTAs per SM from registers, shared memory and warps against the target's limits, and the grid size against the
  SM count (132 on an H100 / H200 SXM);
* approximate math in the PTX (``sqrt.approx``, ``div.full``, ...), which the cosine path must not contain.

Gate rules (``--check``): at benchmark shapes no spills and shared memory within the target's per-CTA limit (227 KB
on sm_90, 99 KB on the sm_86 fallback rows); every autotune candidate at a benchmark shape compiles without spills;
the rows marked ``expect`` hold (the bf16-activation + fp32-codebook search on wgmma, correctly rounded cosine math).

Results are cached per specialization under ``~/.cache/mimfast/compile-gate`` (``MIMFAST_COMPILE_CACHE``), keyed by
the triton and ptxas versions, the kernel's source hash, the signature, constexprs and options: a rerun after a
kernel change recompiles only what changed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JIT functions, not the interpreter's
os.environ.pop("MIMFAST_POISON_OUTPUTS", None)
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without an install
    sys.path.insert(0, str(ROOT))

KERNEL_MODULES = (
    "mimfast.kernels.vq_search",
    "mimfast.kernels.token_gather",
    "mimfast.kernels.block_mask",
    "mimfast.kernels.gumbel_softmax",
    "mimfast.kernels.linear_cross_entropy",
)


# ------------------------------------------------------------------------------------------------------ targets
@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits of a compile target (CUDA occupancy rules)."""

    name: str
    capability: int
    sms: int  # SM count of the reference part
    max_warps_per_sm: int
    max_ctas_per_sm: int
    regs_per_sm: int = 65536
    smem_per_sm: int = 233472
    smem_per_cta: int = 232448  # opt-in maximum of dynamic shared memory per CTA
    reserved_smem_per_cta: int = 1024  # the driver reserves 1 KB per CTA on sm_80 and later
    part: str = ""


SM90 = Arch("sm_90", 90, 132, 64, 32, smem_per_sm=233472, smem_per_cta=232448, part="H100 / H200 SXM")
SM86 = Arch("sm_86", 86, 82, 48, 16, smem_per_sm=102400, smem_per_cta=101376, part="RTX 3090 / A10 class")


def ctas_per_sm(arch: Arch, regs: int, smem: int, warps: int) -> tuple[int, str]:
    """Resident CTAs per SM and the limiting resource (registers are allocated per warp in units of 256)."""
    regs_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = (arch.regs_per_sm // regs_warp) // warps
    by_smem = arch.smem_per_sm // (smem + arch.reserved_smem_per_cta)
    by_warps = arch.max_warps_per_sm // warps
    limits = {"regs": by_regs, "smem": by_smem, "warps": by_warps, "ctas": arch.max_ctas_per_sm}
    lim = min(limits, key=limits.get)
    return limits[lim], lim


# ------------------------------------------------------------------------------------------------ launch capture
@dataclasses.dataclass
class Launch:
    module: str
    kernel: str
    grid: tuple
    args: tuple
    kwargs: dict
    configs: list | None = None  # autotune: the candidates left after pruning


class _Recorder:
    def __init__(self, module: str, name: str, obj, sink: list):
        self.module, self.name, self.obj, self.sink = module, name, obj, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            configs = None
            if isinstance(self.obj, triton.runtime.autotuner.Autotuner):
                configs = list(self.obj.configs)
                named = dict(zip(self.obj.arg_names, args, strict=False))
                prune = getattr(self.obj, "early_config_prune", None)
                if prune is not None and len(configs) > 1:
                    configs = list(prune(configs, named, **kwargs))
            self.sink.append(Launch(self.module, self.name, grid, args, dict(kwargs), configs))

        return launch


@contextlib.contextmanager
def capture(sink: list):
    """Swap every Triton kernel (JIT or autotuned) of the kernel modules for a recorder; restore on exit."""
    saved = []
    for modname in KERNEL_MODULES:
        mod = importlib.import_module(modname)
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, (triton.runtime.jit.JITFunction, triton.runtime.autotuner.Autotuner)):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(modname, name, obj, sink))
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def jit_fn(launch: Launch):
    obj = getattr(importlib.import_module(launch.module), launch.kernel)
    while not isinstance(obj, triton.runtime.jit.JITFunction):
        obj = obj.fn
    return obj


# ------------------------------------------------------------------------------------------------ specialization
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _backend(arch: Arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch.capability, 32)
    return target, make_backend(target)


def specialize(fn, args: tuple, kwargs: dict, backend) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) exactly as triton's JIT would build them for these arguments."""
    from triton._C.libtriton import native_specialize_impl

    params = fn.params
    bound = dict(zip(fn.arg_names, args, strict=False))
    options = {}
    for k, v in kwargs.items():
        if k in fn.arg_names:
            bound[k] = v
        else:
            options[k] = v
    for p in params:  # defaults
        if p.name not in bound and p.has_default:
            bound[p.name] = p.default
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        val = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = val
            continue
        spec = native_specialize_impl(
            backend, val, getattr(p, "is_const", False), not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        ty, attr = spec[0], spec[1]
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = attr if attr is not None else val
        elif isinstance(attr, str) and attr:
            attrs[(i,)] = backend.parse_attr(attr)
    return signature, constexprs, attrs, options


def _ptxas_path(arch: Arch) -> str:
    from triton.backends.nvidia import compiler as nvc

    return nvc.get_ptxas(arch.capability).path


def _ptxas_version(arch: Arch) -> str:
    out = subprocess.run([_ptxas_path(arch), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\S+),", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


APPROX = ("sqrt.approx", "div.full", "div.approx", "rcp.approx.f32", "rcp.approx.ftz.f32", "rsqrt.approx")


def parse_ptxas_log(log: str) -> dict | None:
    m = re.search(r"Used (\d+) registers", log)
    if m is None:
        return None
    s = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack, st, ld = (int(g) for g in s.groups()) if s else (0, 0, 0)
    return dict(regs=int(m.group(1)), stack=stack, spill_stores=st, spill_loads=ld)


def ptxas_stats(ptx: str, arch: Arch, fp_fusion: bool) -> dict:
    """Registers and spills from ``ptxas -v`` with the flags triton's own cubin step uses."""
    gpu = f"sm_{arch.capability}{'a' if arch.capability >= 90 else ''}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        base = [_ptxas_path(arch), "-lineinfo", "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(d) / "k.o")]
        if not fp_fusion:
            base.insert(2, "--fmad=false")
        proc = subprocess.run(base[:3] + ["--regAllocOptLevel=2"] + base[3:], capture_output=True, text=True)
        if proc.returncode != 0:  # older ptxas without the option
            proc = subprocess.run(base, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    return parse_ptxas_log(proc.stderr + proc.stdout)


def dot_path(ptx: str, ttir: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "FMA" if "tt.dot" in ttir else "-"


def _key(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def compile_one(task: dict) -> dict:
    """Compile one specialization for its target; returns the metrics (cached on disk)."""
    from triton.compiler import ASTSource

    arch = task["arch"]
    fn = task["fn"]
    target, backend = _backend(arch)
    cache_dir = Path(os.environ.get("MIMFAST_COMPILE_CACHE", Path.home() / ".cache" / "mimfast" / "compile-gate"))
    key = hashlib.sha256(
        _key(
            [
                triton.__version__,
                task["ptxas"],
                arch.name,
                fn.cache_key,
                task["signature"],
                sorted((str(k), v) for k, v in task["constexprs"].items()),
                sorted(task["attrs"].items()),
                task["options"],
            ]
        ).encode()  # fmt: skip
    ).hexdigest()[:32]
    path = cache_dir / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text()) | {"cached": True}
        except ValueError:
            pass
    t0 = time.time()
    src = ASTSource(fn, task["signature"], task["constexprs"], task["attrs"])
    log = io.StringIO()
    knobs = getattr(triton, "knobs", None)
    with contextlib.ExitStack() as stack:
        if knobs is not None:  # triton's own ptxas run, with its own flags, prints its -v log: read that one
            for group, name in (("compilation", "always_compile"), ("nvidia", "dump_ptxas_log")):
                stack.enter_context(getattr(knobs, group).scope())
                setattr(getattr(knobs, group), name, True)
        stack.enter_context(contextlib.redirect_stdout(log))
        k = triton.compile(src, target=target, options=dict(task["options"]))
    ptx, ttir = k.asm["ptx"], k.asm["ttir"]
    fusion = getattr(k.metadata, "enable_fp_fusion", True)
    stats = parse_ptxas_log(log.getvalue())
    stats_from = "triton's ptxas run"
    if stats is None:  # no log (older triton): run the wheel's ptxas on the PTX with triton's usual flags
        stats, stats_from = ptxas_stats(ptx, arch, fusion), "ptxas rerun"
    row = dict(
        path=dot_path(ptx, ttir),
        shared=int(k.metadata.shared),
        num_warps=int(k.metadata.num_warps),
        approx=sorted({a.split(".")[0] + "." + a.split(".")[1] for a in APPROX if a in ptx}),
        compile_s=round(time.time() - t0, 2),
        ptxas_log=stats_from,
        **stats,
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(row))
    tmp.replace(path)
    return row | {"cached": False}


_TASKS: list[dict] = []


def _compile_index(i: int) -> dict:
    try:
        return compile_one(_TASKS[i])
    except Exception as exc:  # noqa: BLE001 - a failed compile is a gate failure, reported in its row
        return {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}


# ------------------------------------------------------------------------------------------------ the launch plan
@dataclasses.dataclass
class Case:
    op: str
    group: str  # what the rows of one table line share (dtype, D, mode ...)
    shape: str  # what varies inside a line (N x K, batch ...)
    bench: bool  # a PERF.md benchmark shape: the gate's spill / smem rules apply
    run: Callable[[], None]
    arch: Arch = SM90
    expect: dict = dataclasses.field(default_factory=dict)  # e.g. {"path": "wgmma", "no_approx": True}


def _meta(shape, dtype, strides=None):
    if strides is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty_strided(shape, strides, dtype=dtype, device="meta")


@contextlib.contextmanager
def _launch_target(arch: Arch):
    """Make the launchers size their grids and tiles for ``arch`` (SM count, shared memory per CTA)."""
    from mimfast.kernels import _common

    setter = getattr(_common, "set_launch_target", None)
    if setter is None:  # launchers that do not take the device into account
        yield
        return
    prev = setter(_common.LaunchTarget(num_sms=arch.sms, smem_per_cta=arch.smem_per_cta, capability=arch.capability))
    try:
        yield
    finally:
        setter(prev)


def _vq_cases() -> list[Case]:
    import inspect

    vq = importlib.import_module("mimfast.kernels.vq_search")
    launcher = vq._vq_search_triton
    new_api = "precision" in inspect.signature(launcher).parameters
    bf16, fp32, fp16 = torch.bfloat16, torch.float32, torch.float16
    cases = []

    def add(n, k, d, xdt, edt, *, bench, label_extra="", precision=None, cosine=False, valid=False, strided=False,
            arch=SM90, expect=None):  # fmt: skip
        def run():
            x = _meta((n, d), xdt) if not strided else _meta((n, d), xdt, strides=(1, n))
            e = _meta((k, d), edt)
            v = _meta((n,), torch.bool) if valid else None
            if new_api:
                launcher(x, e, v, cosine, False, True, 1e-12, precision or vq.resolve_precision(x, e, None))
            else:
                launcher(x, e, v, cosine, False, True, 1e-12)

        dt = str(xdt)[6:] if xdt == edt else f"x={str(xdt)[6:]} e={str(edt)[6:]}"
        group = f"{'cosine' if cosine else 'l2'} D={d} {dt}{label_extra}"
        cases.append(Case("vq_search", group, f"{n}x{k}", bench, run, arch, expect or {}))

    for n in (16384, 65536, 262144):
        for k in (1024, 8192, 16384):
            for d in (32, 64, 256):
                add(n, k, d, bf16, bf16, bench=True)
                add(n, k, d, fp32, fp32, bench=True)
                add(n, k, d, bf16, fp32, bench=True, precision="bf16" if new_api else None,
                    label_extra=" autocast(bf16)", expect={"path": "wgmma"})  # fmt: skip
    if new_api:  # fp32 on tensor cores (torch.set_float32_matmul_precision("high"), or precision="tf32x3")
        for d in (32, 64, 256):
            add(65536, 8192, d, fp32, fp32, bench=True, precision="tf32", label_extra=" tf32", expect={"path": "wgmma"})
        add(65536, 8192, 64, fp32, fp32, bench=True, precision="tf32x3", label_extra=" tf32x3")
    add(65536, 8192, 64, bf16, bf16, bench=True, cosine=True, expect={"no_approx": True})
    add(65536, 8192, 64, fp32, fp32, bench=True, cosine=True, expect={"no_approx": True})
    for d in (32, 64, 256):  # the fallback tile set on a ~99 KB shared-memory part
        add(65536, 8192, d, bf16, bf16, bench=True, arch=SM86)
        add(65536, 8192, d, fp32, fp32, bench=True, arch=SM86)
        add(65536, 8192, d, bf16, fp32, bench=True, arch=SM86, precision="bf16" if new_api else None,
            label_extra=" autocast(bf16)")  # fmt: skip
        if new_api:
            add(65536, 8192, d, fp32, fp32, bench=True, arch=SM86, precision="tf32", label_extra=" tf32")
    # D past the resident limit (the dot walks D in chunks): gated like a benchmark shape
    add(65536, 8192, 512, bf16, bf16, bench=True)
    add(65536, 8192, 512, bf16, fp32, bench=True, precision="bf16" if new_api else None, label_extra=" autocast(bf16)")
    add(16384, 8192, 512, fp32, fp32, bench=True)
    # awkward test shapes (reported, not gated)
    for n, k, d in ((1, 3, 1), (97, 1000, 40), (1025, 8193, 3), (1025, 1000, 257), (97, 8193, 257)):
        add(n, k, d, fp32, fp32, bench=False)
        add(n, k, d, bf16, bf16, bench=False, cosine=True)
    add(1025, 1000, 40, fp16, fp16, bench=False, valid=True, strided=True, label_extra=" valid, column-major x")
    return cases


def _token_cases() -> list[Case]:
    tg = importlib.import_module("mimfast.kernels.token_gather")
    bf16, fp32 = torch.bfloat16, torch.float32
    cases = []
    for b in (32, 64, 256, 1024):
        bench = True
        for seq, keep, d in ((196, 49, 768), (256, 128, 768)):
            for pos_dt in (bf16, fp32):  # bf16 activations, bf16 or fp32 (autocast) position embeddings
                out_dt = torch.promote_types(bf16, pos_dt)
                tag = f"L={seq} keep={keep} D={d} x=bf16 pos={str(pos_dt)[6:]}"

                def gather(b=b, seq=seq, keep=keep, d=d, pos_dt=pos_dt, out_dt=out_dt):
                    x, ids = _meta((b, seq, d), bf16), _meta((b, keep), torch.int32)
                    tg._gather_tokens_triton(x, ids, _meta((seq, d), pos_dt), _meta((1, d), pos_dt), out_dt)

                cases.append(Case("gather_tokens", "fwd " + tag, f"B={b}", bench, gather))
        for seq, keep, d in ((196, 49, 512), (256, 128, 768)):
            tag = f"L={seq} keep={keep} D={d}"

            def restore(b=b, seq=seq, keep=keep, d=d):
                x, r = _meta((b, 1 + keep, d), bf16), _meta((b, seq), torch.int32)
                tg._restore_tokens_triton(x, r, _meta((d,), bf16), _meta((1 + seq, d), bf16), 1, bf16)

            def restore_bwd(b=b, seq=seq, keep=keep, d=d):
                g, r = _meta((b, 1 + seq, d), bf16), _meta((b, seq), torch.int32)
                tg._restore_tokens_bwd_triton(g, r, 1 + keep, 1, bf16, True, True)

            def gather_bwd(b=b, seq=seq, keep=keep, d=d):  # the gather's backward: a restore with a zero filler
                g, r = _meta((b, keep, d), bf16), _meta((b, seq), torch.int32)
                tg._restore_tokens_triton(g, r, None, None, 0, bf16)

            shape = f"B={b}"
            cases.append(Case("restore_tokens", "fwd " + tag + " bf16, fill + pos", shape, bench, restore))
            cases.append(Case("restore_tokens", "bwd " + tag + " bf16, fill grad", shape, bench, restore_bwd))
            cases.append(Case("gather_tokens", "bwd " + tag + " bf16 (restore, zero fill)", shape, bench, gather_bwd))
    for b, seq, keep, d in ((2, 7, 3, 3), (3, 13, 4, 257), (1, 97, 0, 5)):  # awkward test shapes (not gated)
        tag = f"L={seq} keep={keep} D={d} fp32"

        def awk_gather(b=b, seq=seq, keep=keep, d=d):
            x, ids = _meta((b, seq, d), torch.float32), _meta((b, keep), torch.int64)
            tg._gather_tokens_triton(x, ids, _meta((seq, d), torch.float32), None, torch.float32)

        def awk_restore_bwd(b=b, seq=seq, keep=keep, d=d):
            g, r = _meta((b, 1 + seq, d), torch.float32), _meta((b, seq), torch.int64)
            tg._restore_tokens_bwd_triton(g, r, 1 + keep, 1, torch.float32, True, False)

        cases.append(Case("gather_tokens", "fwd " + tag, f"B={b}", False, awk_gather))
        cases.append(Case("restore_tokens", "bwd " + tag + ", fill grad", f"B={b}", False, awk_restore_bwd))
    return cases


def _mask_cases() -> list[Case]:
    bm = importlib.import_module("mimfast.kernels.block_mask")
    cases = []
    grids = [(14, 14, 75, 16), (14, 14, 98, 16), (16, 16, 128, 16)]
    grids += [(1, 1, 1, 1), (2, 2, 2, 1), (3, 3, 4, 1), (4, 4, 6, 2), (5, 6, 12, 4), (8, 8, 24, 4), (12, 12, 60, 8),
              (20, 20, 160, 16), (32, 32, 400, 16), (45, 45, 800, 16), (64, 64, 1600, 16), (64, 128, 3200, 16),
              (128, 128, 6400, 16), (1, 16384, 100, 1), (64, 256, 6000, 16)]  # fmt: skip
    for h, w, target, mn in grids:
        for exact in (False, True):
            for b in (32, 256, 1024) if (h, w) == (14, 14) else (256,):

                def run(h=h, w=w, target=target, mn=mn, exact=exact, b=b):
                    a = bm.default_max_attempts(exact)
                    u = _meta((b, a, 4), torch.float32)
                    noise = _meta((b, h * w), torch.float32) if exact else None
                    bm._block_mask_triton(u, noise, h, w, target, mn, target, 0.3, 1 / 0.3, exact)

                mode = "CAE exact" if exact else "BEiT"
                cases.append(Case("block_mask", f"{h}x{w} target={target} {mode}", f"B={b}", True, run))
    return cases


def _gumbel_cases() -> list[Case]:
    """Every launch of the Gumbel-softmax launchers at PERF.md's shapes (N x K in {16384 x 1024, 65536 x 8192},
    bf16 and fp32): F.gumbel_softmax's soft and hard forwards, the indices-only forward, Regularized VQ's forward
    (per-row sample flags + best match) and the backward with and without row flags; awkward test shapes (K past
    one tile: the two-pass path) are reported."""
    gs = importlib.import_module("mimfast.kernels.gumbel_softmax")
    modes = {  # name: (fwd?, hard, write_y, with_best, sample_rows)
        "fwd soft": (True, False, True, False, False),
        "fwd hard": (True, True, True, False, False),
        "fwd indices-only": (True, True, False, False, False),
        "fwd hard, sample_rows + best (Reg-VQ)": (True, True, True, True, True),
        "bwd": (False, False, True, False, False),
        "bwd, sample_rows": (False, False, True, False, True),
    }
    cases = []
    shapes = [((16384, 1024), True), ((65536, 8192), True), ((1, 1), False), ((97, 3), False), ((1025, 1000), False),
              ((1025, 8193), False), ((97, 65536), False)]  # fmt: skip
    for (n, k), bench in shapes:
        for dt in (torch.bfloat16, torch.float32):
            for mode, (fwd, hard, write_y, best, rows) in modes.items():

                def run(n=n, k=k, dt=dt, fwd=fwd, hard=hard, write_y=write_y, best=best, rows=rows):
                    logits = _meta((n, k), dt)
                    philox = _meta((2,), torch.int64)
                    flags = _meta((n,), torch.bool) if rows else None
                    if fwd:
                        gs._gumbel_fwd_triton(logits, flags, philox, 1.0, hard, write_y, best)
                    else:
                        gs._gumbel_bwd_triton(_meta((n, k), dt), logits, flags, philox, _meta((n,), torch.float32), 1.0)

                cases.append(Case("gumbel_softmax", f"{mode} {str(dt)[6:]}", f"{n}x{k}", bench, run))
    return cases


def _lce_cases() -> list[Case]:
    """The linear + cross-entropy chunk loop at PERF.md's shapes (M, D, V) = (9600 / 19600 / 32768, 768, 8192),
    (32768, 1024, 16384) and MAGE's slice (32768, 768, 2025 scoring 1024) in bf16: the forward with the gradient
    written in place ('mean' / 'sum' training), the forward without it (evaluation), and the recomputing backward
    ('none'). Every chunk's launch is recorded (the last chunk may be shorter); awkward test shapes are reported."""
    lce = importlib.import_module("mimfast.kernels.linear_cross_entropy")
    bf16 = torch.bfloat16
    modes = {"fwd + grad (mean)": ("mean", True, None), "fwd (no grad)": ("mean", False, None),
             "bwd recompute (none)": ("none", True, "bwd")}  # fmt: skip
    shapes = [((9600, 768, 8192, 8192), True), ((19600, 768, 8192, 8192), True), ((32768, 768, 8192, 8192), True),
              ((32768, 1024, 16384, 16384), True), ((32768, 768, 2025, 1024), True), ((97, 40, 1000, 1000), False),
              ((1025, 40, 8193, 8193), False), ((1, 3, 1, 1), False)]  # fmt: skip
    cases = []
    for (m, d, v, vp), bench in shapes:
        for dt in (bf16, torch.float32) if not bench else (bf16,):
            for mode, (reduction, grads, bwd) in modes.items():

                def run(m=m, d=d, v=v, vp=vp, dt=dt, reduction=reduction, grads=grads, bwd=bwd):
                    h, w, t, b = _meta((m, d), dt), _meta((v, d), dt), _meta((m,), torch.int64), _meta((v,), dt)
                    g = _meta((m,), torch.float32) if bwd else None
                    lse = _meta((m,), torch.float32) if bwd else None
                    lce._chunk_loop(h, w, t, b, -100, 0.1, reduction, vp, grads, grads, grads, g, lse, lce._rows_triton)

                vtxt = f"V={v}" + (f" V'={vp}" if vp != v else "")
                cases.append(Case("linear_cross_entropy", f"{mode} D={d} {vtxt} {str(dt)[6:]}", f"M={m}", bench, run))
    return cases


PLANS = {"vq_search": _vq_cases, "tokens": _token_cases, "block_mask": _mask_cases, "gumbel_softmax": _gumbel_cases,
         "linear_cross_entropy": _lce_cases}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ driver
def collect(only: set[str] | None, grep: str | None = None) -> list[dict]:
    rows = []
    for plan, make in PLANS.items():
        if only and plan not in only:
            continue
        for case in make():
            if grep and not re.search(grep, f"{case.arch.name} {case.group} {case.shape}"):
                continue
            sink: list[Launch] = []
            with _launch_target(case.arch), capture(sink):
                case.run()
            for launch in sink:
                configs = launch.configs or [None]
                for ci, cfg in enumerate(configs):
                    kwargs = dict(launch.kwargs)
                    if cfg is not None:
                        kwargs.update(cfg.all_kwargs() if hasattr(cfg, "all_kwargs") else cfg.kwargs)
                    grid = launch.grid(kwargs) if callable(launch.grid) else launch.grid
                    rows.append(dict(case=case, launch=launch, kwargs=kwargs, grid=tuple(grid),
                                     candidate=(ci, len(configs)) if cfg is not None else None))  # fmt: skip
    return rows


def _config_text(fn, kwargs: dict) -> str:
    keep = [k for k in kwargs if k.startswith(("BLOCK", "SPLIT", "D_PAD", "RESIDENT", "SINGLE"))]
    parts = [f"{k}={kwargs[k]}" for k in keep]
    parts.append(f"w{kwargs.get('num_warps', 4)}")
    if "num_stages" in kwargs:
        parts.append(f"s{kwargs['num_stages']}")
    return " ".join(parts)


def build(only: set[str] | None = None, jobs: int | None = None, verbose: bool = False, grep=None) -> list[dict]:
    rows = collect(only, grep)
    versions: dict[str, str] = {}
    tasks: dict[str, int] = {}
    for r in rows:
        arch = r["case"].arch
        if arch.name not in versions:
            versions[arch.name] = _ptxas_version(arch)
        fn = jit_fn(r["launch"])
        target, backend = _backend(arch)
        sig, consts, attrs, opts = specialize(fn, r["launch"].args, r["kwargs"], backend)
        opts = {k: v for k, v in opts.items() if k in _OPTION_KEYS}
        task = dict(arch=arch, fn=fn, signature=sig, constexprs=consts, attrs=attrs, options=opts,
                    ptxas=versions[arch.name])  # fmt: skip
        tkey = _key([arch.name, r["launch"].module, r["launch"].kernel, sig, sorted((str(k), str(v)) for k, v in
                     consts.items()), sorted((str(k), v) for k, v in attrs.items()), opts])  # fmt: skip
        if tkey not in tasks:
            tasks[tkey] = len(_TASKS)
            _TASKS.append(task)
        r["task"] = tasks[tkey]
        r["options"] = opts
    jobs = jobs or min(len(_TASKS), os.cpu_count() or 1)
    t0 = time.time()
    if jobs > 1 and len(_TASKS) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_index, range(len(_TASKS)), chunksize=1)
    else:
        results = [_compile_index(i) for i in range(len(_TASKS))]
    if verbose:
        fresh = sum(1 for r in results if not r.get("cached"))
        print(f"compiled {fresh} of {len(_TASKS)} specializations ({len(_TASKS) - fresh} cached) "
              f"in {time.time() - t0:.1f} s", file=sys.stderr)  # fmt: skip
    out = []
    for r in rows:
        case, launch, res = r["case"], r["launch"], results[r["task"]]
        fn = jit_fn(launch)
        grid = int(torch.tensor(r["grid"]).prod()) if r["grid"] else 1
        row = dict(op=case.op, group=case.group, shape=case.shape, case=f"{case.group} {case.shape}",
                   bench=case.bench, arch=case.arch.name, kernel=fn.__name__,
                   config=_config_text(fn, r["kwargs"] | r["options"]), grid=grid,
                   candidate=r["candidate"], expect=case.expect)  # fmt: skip
        if "error" in res:
            row["error"] = res["error"]
        else:
            ctas, lim = ctas_per_sm(case.arch, res["regs"], res["shared"], res["num_warps"])
            row.update({k: res[k] for k in ("path", "regs", "stack", "spill_stores", "spill_loads", "shared",
                                            "num_warps", "approx")})  # fmt: skip
            row.update(ctas_per_sm=ctas, limiter=lim, sms=case.arch.sms)
        out.append(row)
    return out


def failures(rows: list[dict]) -> list[str]:
    """The gate's rules; an empty list means pass."""
    bad = []
    limits = {SM90.name: SM90, SM86.name: SM86}
    for r in rows:
        where = f"{r['op']} [{r['arch']}] {r['case']} :: {r['kernel']} ({r['config']})"
        if "error" in r:
            bad.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["bench"]:
            if r["spill_stores"] or r["spill_loads"]:
                bad.append(f"{where}: spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded")
            if r["shared"] > limits[r["arch"]].smem_per_cta:
                bad.append(f"{where}: {r['shared']} B shared memory > {limits[r['arch']].smem_per_cta} B per CTA")
        exp = r.get("expect") or {}
        if "path" in exp and r["kernel"].endswith("search_fwd_kernel") and r["path"] != exp["path"]:
            bad.append(f"{where}: path {r['path']}, expected {exp['path']}")
        if exp.get("no_approx") and r["approx"]:
            bad.append(f"{where}: approximate math in the PTX: {', '.join(r['approx'])}")
    return bad


def _fmt_kb(b: int) -> str:
    return f"{b / 1024:.1f}"


def _shapes(rows: list[dict]) -> str:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    return ", ".join(shapes) if len(shapes) <= 4 else f"{', '.join(shapes[:3])}, ... ({len(shapes)} shapes)"


def render(rows: list[dict], title_extra: str = "") -> str:
    """One table per op; launches with the same group, kernel, config and compile result share a line."""
    lines = [
        "# Compile report (sm_90 gate)",
        "",
        f"Generated by `python bench/compile_report.py` with triton {triton.__version__}, torch {torch.__version__}; "
        "no GPU needed (see the script's docstring). One line per kernel configuration: the shapes it serves, path "
        "(wgmma / mma = tensor cores, FMA = a tl.dot on CUDA cores, - = no dot), registers per thread, ptxas spill "
        "bytes stored/loaded, shared memory per CTA, resident CTAs per SM (limiter), and the grid in CTAs against "
        "the SM count (*italic*: fewer CTAs than SMs; min-max over the shapes). Benchmark lines (PERF.md shapes) "
        "must show 0 spills and shared memory within the target's per-CTA limit "
        f"(sm_90: {SM90.smem_per_cta // 1024} KB, sm_86 fallback tiles: {SM86.smem_per_cta // 1024} KB); "
        f"test-shape lines are reported only.{title_extra}",
        "",
    ]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [f"## {op}", ""]
        lines.append("| target | case | shapes | kernel | config | path | regs | spills | smem KB | CTAs/SM "
                     "| grid / SMs | approx math |")  # fmt: skip
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["op"] != op:
                continue
            res = tuple(r.get(k) for k in ("error", "path", "regs", "spill_stores", "spill_loads", "shared",
                                           "ctas_per_sm", "limiter"))  # fmt: skip
            cand = r["candidate"][0] if r["candidate"] else None
            groups.setdefault((r["arch"], r["group"], r["bench"], r["kernel"], r["config"], cand, res), []).append(r)
        for (arch, group, bench, kernel, cfg, _cand, _), rs in groups.items():
            r = rs[0]
            case = group + ("" if bench else " (test shape)")
            if r["candidate"]:
                cfg += f" [autotune {r['candidate'][0] + 1}/{r['candidate'][1]}]"
            grids = sorted({x["grid"] for x in rs})
            gtxt = f"{grids[0]}" if len(grids) == 1 else f"{grids[0]}-{grids[-1]}"
            name = kernel.strip("_")
            if "error" in r and r["error"]:
                lines.append(f"| {arch} | {case} | {_shapes(rs)} | {name} | {cfg} | **compile error** | | | | | "
                             f"{gtxt} | |")  # fmt: skip
                continue
            spill = f"{r['spill_stores']}/{r['spill_loads']}"
            if r["spill_stores"] or r["spill_loads"]:
                spill = f"**{spill}**"
            grid = f"{gtxt} / {r['sms']}"
            if grids[0] < r["sms"]:
                grid = f"*{grid}*"
            approx = ", ".join(r["approx"]) or "-"
            lines.append(f"| {arch} | {case} | {_shapes(rs)} | {name} | {cfg} | {r['path']} | {r['regs']} | "
                         f"{spill} | {_fmt_kb(r['shared'])} | {r['ctas_per_sm']} ({r['limiter']}) | {grid} | "
                         f"{approx} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "COMPILE_REPORT.md"), help="markdown table to write")
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    ap.add_argument("--only", action="append", choices=sorted(PLANS), help="restrict to one plan (repeatable)")
    ap.add_argument("--grep", default=None, help="only cases matching this regex (target, case, shape)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a gate rule fails")
    ap.add_argument("--quiet", action="store_true", help="do not print the table")
    a = ap.parse_args(argv)
    rows = build(set(a.only) if a.only else None, a.jobs, verbose=True, grep=a.grep)
    text = render(rows)
    bad = failures(rows)
    if bad:
        text += "\n## Gate failures\n\n" + "\n".join(f"- {b}" for b in bad) + "\n"
    Path(a.out).write_text(text)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str))
    if not a.quiet:
        print(text)
    print(f"{len(rows)} launches, {len(bad)} gate failures; table in {a.out}", file=sys.stderr)
    return 1 if (a.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
