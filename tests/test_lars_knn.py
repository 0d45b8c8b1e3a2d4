"""LARS and MAE's linear-probe protocol (mimfast.train.lars, ``mimfast probe --protocol lars``) and DINO's weighted
k-NN (mimfast.train.knn, ``mimfast knn``).

LARS and the k-NN classifier are checked against float64 references written from their definitions (hand-computed
numbers for LARS); the commands run end to end on a 3-step pretraining run over a 4-class dataset. Whether the
pretrained encoder beats random ones is a claim about the long main-job run, stated in the README, not tested here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import DEVICE, tol
from mimfast.train import knn as knn_mod
from mimfast.train.knn import knn_classify
from mimfast.train.lars import LARS, PAPER_STEPS, fit_lars_probe, probe_schedule, topk_accuracy


# ------------------------------------------------------------------------------------------------------- LARS
def _lars_ref(params, grads_per_step, lrs, *, wd, mu, eta):
    """The update of LARS's docstring, in float64 with plain tensor arithmetic; params with a None grad are left."""
    ps = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ps]
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        for i, (p, g) in enumerate(zip(ps, grads, strict=True)):
            if g is None:
                continue
            g = g.double()
            if p.ndim > 1:
                u = g + wd * p
                pn, un = math.sqrt(float((p * p).sum())), math.sqrt(float((u * u).sum()))
                u = u * (eta * pn / un if pn > 0 and un > 0 else 1.0)
            else:
                u = g
            bufs[i] = mu * bufs[i] + u
            ps[i] = p - lr * bufs[i]
    return ps


def _run_lars(params, grads_per_step, lrs, **kw):
    opt = LARS(params, **kw)
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.to(p.dtype).clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    return opt


def test_lars_hand_computed_steps():
    # ||p|| = 5, ||g|| = 1: q = 0.001 * 5 / 1, m1 = q g, p1 = p - 0.1 m1; then ||p1|| = 4.9995 and lr 0.05
    w = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)  # 1-D: SGD-momentum, no decay
    g_w, g_b = torch.tensor([[0.6, 0.8]], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    opt = _run_lars([w, b], [[g_w, g_b], [g_w, g_b]], [0.1, 0.05], weight_decay=0.0)
    torch.testing.assert_close(w.detach(), torch.tensor([[2.999415015, 3.99922002]], dtype=torch.float64))
    torch.testing.assert_close(opt.state[w]["mu"], torch.tensor([[0.0056997, 0.0075996]], dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.tensor([1 - 0.05 - 0.0475, -2 - 0.05 - 0.0475], dtype=torch.float64))
    # weight decay alone: u = 0.1 p, ||u|| = 0.5, q = 0.001 * 5 / 0.5 = 0.01: p shrinks by lr * 0.001 * p
    w = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    _run_lars([w], [[torch.zeros(1, 2, dtype=torch.float64)]], [0.1], weight_decay=0.1)
    torch.testing.assert_close(w.detach(), torch.tensor([[3 - 3e-4, 4 - 4e-4]], dtype=torch.float64))


def test_lars_zero_norm_edge_cases():
    # ||p|| = 0 (a zero-initialised matrix): trust ratio 1, the raw gradient (plus decay, zero here) is the update
    z = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    _run_lars([z], [[g]], [0.1], weight_decay=0.5)
    torch.testing.assert_close(z.detach(), -0.1 * g)
    # ||update|| = 0 (zero grad, no decay): ratio 1 and a zero update; the momentum keeps moving the weight
    w = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    g1 = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    _run_lars([w], [[g1], [torch.zeros_like(g1)]], [0.1, 0.1])
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]], dtype=torch.float64) - 0.1 * 0.005 * g1 * 1.9)
    # no grad: the parameter is skipped and gets no state; nothing is NaN anywhere
    skip = torch.ones(3, 3, requires_grad=True)
    opt = _run_lars([skip, z], [[None, torch.zeros(2, 2, dtype=torch.float64)]], [0.1])
    assert torch.equal(skip.detach(), torch.ones(3, 3)) and skip not in opt.state
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lars_matches_reference_over_steps(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (2, 3, 4), (7,), (), (1, 1), (4, 1)]
    params = [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]
    params[4].data.zero_()  # a zero-norm matrix among them
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(4)]
    grads[2][5] = torch.zeros(4, 1, dtype=torch.float64)  # a zero gradient on one step
    grads[1][1] = None  # a step without a gradient for one parameter
    lrs = [0.0, 0.3, 1.5, 0.7]
    kw = dict(weight_decay=0.05, momentum=0.9, trust_coefficient=0.02)
    ref = _lars_ref(params, grads, lrs, wd=0.05, mu=0.9, eta=0.02)
    _run_lars(params, grads, lrs, **kw)
    t = tol(torch.float64) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach().double(), r, **t)
    # low precision: norms in fp32, the step stays finite and close to the float64 one
    pb = torch.randn(16, 8, generator=g).bfloat16().requires_grad_()
    gb = torch.randn(16, 8, generator=g, dtype=torch.float64)
    (rb,) = _lars_ref([pb], [[gb]], [1.0], wd=0.0, mu=0.9, eta=0.001)
    _run_lars([pb], [[gb]], [1.0])
    torch.testing.assert_close(pb.detach().double(), rb, **tol(torch.bfloat16))


def test_lars_closure_and_bad_options():
    w = torch.ones(2, 2, requires_grad=True)
    opt = LARS([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 4.0 and not torch.equal(w.detach(), torch.ones(2, 2))
    for kw, name in (({"lr": -1.0}, "lr"), ({"momentum": 1.0}, "momentum"), ({"trust_coefficient": 0.0}, "trust"),
                     ({"weight_decay": float("nan")}, "weight_decay"), ({"lr": True}, "lr")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            LARS([w], **kw)


# --------------------------------------------------------------------------------------- the probe protocol
def test_probe_schedule_is_the_papers_on_imagenet_and_keeps_its_steps_on_small_splits():
    s = probe_schedule(1_281_167)
    assert (s["epochs"], s["warmup_epochs"], s["batch_size"], s["lr"], s["steps"]) == (90, 10, 16384, 6.4, 7020)
    assert PAPER_STEPS == 7020
    s = probe_schedule(2000)  # the built-in dataset: one full batch per epoch, the paper's 7020 steps
    assert (s["epochs"], s["warmup_epochs"], s["batch_size"], s["steps"]) == (7020, 780, 2000, 7020)
    assert s["lr"] == pytest.approx(0.1 * 2000 / 256)
    s = probe_schedule(2000, batch_size=256)  # 7 steps per epoch (ragged tail dropped)
    assert (s["epochs"], s["steps_per_epoch"], s["lr"]) == (1003, 7, 0.1) and s["steps"] >= 7020
    s = probe_schedule(2000, epochs=90, blr=0.2)
    assert (s["epochs"], s["warmup_epochs"], s["lr"]) == (90, 10, pytest.approx(0.2 * 2000 / 256))
    for kw, name in (({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"), ({"blr": 0.0}, "blr"),
                     ({"epochs": 5, "warmup_epochs": 6}, "warmup_epochs")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            probe_schedule(100, **kw)


def _blobs(n_train=300, n_val=150, classes=5, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    ty, vy = torch.randint(0, classes, (n_train,), generator=g), torch.randint(0, classes, (n_val,), generator=g)
    tx, vx = centres[ty] + torch.randn(n_train, dim, generator=g), centres[vy] + torch.randn(n_val, dim, generator=g)
    return tx, ty, vx, vy


def test_fit_lars_probe_learns_separable_features_and_not_noise():
    tx, ty, vx, vy = _blobs()
    r = fit_lars_probe(tx, ty, vx, vy, num_classes=5, epochs=150, batch_size=64, blr=4.0)
    assert r["top1"] > 0.95 and r["train_top1"] > 0.95 and r["top5"] == 1.0
    assert (r["steps"], r["batch_size"], r["lr"]) == (150 * (300 // 64), 64, 4.0 * 64 / 256)
    assert r["warmup_epochs"] == pytest.approx(150 / 9)
    again = fit_lars_probe(tx, ty, vx, vy, num_classes=5, epochs=150, batch_size=64, blr=4.0)
    assert again == r  # seeded: the same numbers
    # features unrelated to the labels: at chance on val (per-image noise, no clusters a random head could hit)
    g = torch.Generator().manual_seed(1)
    nx, nv = torch.randn(300, 16, generator=g), torch.randn(150, 16, generator=g)
    noise = fit_lars_probe(nx, ty, nv, vy, num_classes=5, epochs=150, batch_size=64, blr=4.0)
    assert noise["top1"] < 0.35
    # views: epoch e trains on view e % V; one view equal to the training features is the plain probe
    same = fit_lars_probe(tx, ty, vx, vy, num_classes=5, epochs=150, batch_size=64, blr=4.0, train_views=[(tx, ty)])
    assert same == r
    with pytest.raises(ValueError, match="val features"):
        fit_lars_probe(tx, ty, vx[:, :3], vy, num_classes=5)
    with pytest.raises(ValueError, match="labels"):
        fit_lars_probe(tx, ty, vx, vy, num_classes=3)
    with pytest.raises(ValueError, match="train features labels"):
        fit_lars_probe(tx, ty.int(), vx, vy, num_classes=5)
    with pytest.raises(ValueError, match="NaN"):
        fit_lars_probe(tx, ty, vx.clone().fill_(float("nan")), vy, num_classes=5)


def test_topk_accuracy_caps_k_and_breaks_ties_to_the_lower_class():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert topk_accuracy(scores, torch.tensor([0, 1])) == [1.0, 1.0]  # top-5 of 3 classes: every label is a hit
    assert topk_accuracy(scores, torch.tensor([1, 2]), ks=(1, 2)) == [0.0, 1.0]


# --------------------------------------------------------------------------------------------------- k-NN
def _knn_ref(tf, ty, vf, vy, k, T, C):
    """Brute force in float64: the full (M, N) similarity matrix, neighbours by (similarity desc, index asc)."""
    tn = tf.double() / tf.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    vn = vf.double() / vf.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    sims = vn @ tn.T
    nbrs, preds = [], []
    for row in sims.tolist():
        nb = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        votes: dict[int, float] = {}
        for j in nb:
            votes[int(ty[j])] = votes.get(int(ty[j]), 0.0) + math.exp(row[j] / T)
        ranked = sorted(votes, key=lambda c: (-votes[c], c))[: min(5, C)]
        nbrs.append(nb)
        preds.append(ranked + [-1] * (min(5, C) - len(ranked)))
    preds_t = torch.tensor(preds)
    top1 = (preds_t[:, 0] == vy).double().mean().item()
    top5 = (preds_t == vy[:, None]).any(1).double().mean().item()
    return torch.tensor(nbrs), sims, preds_t, top1, top5


@pytest.mark.parametrize("k", [1, 5, 20, 61])
def test_knn_equals_brute_force_for_any_chunking(k, monkeypatch):
    g = torch.Generator().manual_seed(k)
    n, m, d, c = 61, 23, 40, 7
    tf, vf = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)
    ty, vy = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (m,), generator=g)
    nb, sims, preds, top1, top5 = _knn_ref(tf, ty, vf, vy, k, 0.07, c)
    seen = []
    real = knn_mod._chunk_topk
    monkeypatch.setattr(knn_mod, "_chunk_topk", lambda s, kk: seen.append(tuple(s.shape)) or real(s, kk))
    for tc, trc in ((1, 1), (7, 13), (m, n), (1000, 1000), (3, n - 1), (40, 2)):
        seen.clear()
        r = knn_classify(tf, ty, vf, vy, k=k, temperature=0.07, num_classes=c, test_chunk=tc, train_chunk=trc,
                         return_neighbors=True)  # fmt: skip
        assert torch.equal(r["neighbors"], nb), (tc, trc)
        torch.testing.assert_close(r["similarities"], sims.gather(1, nb), **tol(torch.float64))
        assert torch.equal(r["predictions"], preds) and (r["top1"], r["top5"]) == (top1, top5)
        assert max(s[0] for s in seen) <= tc and max(s[1] for s in seen) <= trc  # never a bigger block than asked
    # float32 features: the same neighbours and scores here (no near-ties in this draw)
    r32 = knn_classify(tf.float(), ty, vf.float(), vy, k=k, num_classes=c, test_chunk=7, train_chunk=13)
    assert (r32["top1"], r32["top5"]) == (top1, top5)
    assert r32 == knn_classify(tf.float(), ty, vf.float(), vy, k=k, num_classes=c)


def test_knn_ties_go_to_the_lower_index_and_class():
    # train row i is the unit vector e_(i % 3) with label i // 3: a test row e_0 has 4 neighbours at similarity 1
    # (rows 0, 3, 6, 9, labels 0..3), every other row at 0
    tf = torch.eye(3)[torch.arange(12) % 3]
    ty = torch.arange(12) // 3
    vf = torch.stack([torch.eye(3)[0], torch.eye(3)[1], torch.zeros(3)])
    vy = torch.tensor([1, 0, 0])
    results = []
    for tc, trc in ((1, 1), (2, 5), (3, 12), (1, 7)):
        r = knn_classify(tf, ty, vf, vy, k=5, test_chunk=tc, train_chunk=trc, return_neighbors=True)
        results.append(r)
        assert r["neighbors"].tolist() == [[0, 3, 6, 9, 1], [1, 4, 7, 10, 0], [0, 1, 2, 3, 4]]
    for r in results[1:]:
        assert all(torch.equal(r[key], results[0][key]) for key in ("neighbors", "similarities", "predictions"))
    # k = 2: neighbours 0 and 3 (labels 0 and 1) vote equally: class 0 wins the tie; 1 is the second class
    r = knn_classify(tf, ty, vf[:1], vy[:1], k=2, train_chunk=4, return_neighbors=True)
    assert r["neighbors"].tolist() == [[0, 3]] and r["predictions"].tolist() == [[0, 1, -1, -1]]
    assert (r["top1"], r["top5"]) == (0.0, 1.0)


def test_knn_top5_with_few_classes_and_few_neighbours():
    g = torch.Generator().manual_seed(1)
    tf, vf = torch.randn(60, 8, generator=g), torch.randn(30, 8, generator=g)
    ty, vy = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (30,), generator=g)
    r = knn_classify(tf, ty, vf, vy, k=30, return_neighbors=True)  # 3 classes: top-5 is top-3, all voted here
    assert r["predictions"].shape == (30, 3) and r["top5"] == 1.0 and r["top1"] < 1.0
    r1 = knn_classify(tf, ty, vf, vy, k=1, return_neighbors=True)  # one neighbour votes for one class only
    assert r1["top5"] == r1["top1"] and (r1["predictions"][:, 1:] == -1).all()
    assert r1["predictions"][:, 0].tolist() == ty[r1["neighbors"][:, 0]].tolist()


def test_knn_bad_inputs_name_the_argument():
    tf, ty, vf, vy = torch.randn(10, 4), torch.arange(10) % 3, torch.randn(5, 4), torch.arange(5) % 3
    cases = [
        (dict(k=0), "k: expected an int >= 1"),
        (dict(k=-3), "k:"),
        (dict(k=2.5), "k:"),
        (dict(k=True), "k:"),
        (dict(k=11), "k: expected at most the 10 training rows"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(num_classes=2), "num_classes"),
        (dict(test_chunk=0), "test_chunk"),
        (dict(train_chunk=1.5), "train_chunk"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            knn_classify(tf, ty, vf, vy, **{"k": 3, **kw})
    bad_args = [
        ((tf[0], ty, vf, vy), "train_feats: expected a floating-point tensor"),
        ((tf.long(), ty, vf, vy), "train_feats"),
        ((tf[:0], ty[:0], vf, vy), "train_feats: expected at least one row"),
        ((tf, ty, vf[:, :3], vy), "test_feats: expected 4 features"),
        ((tf, ty.float(), vf, vy), "train_labels: expected an integer tensor"),
        ((tf, ty, vf, vy[:4]), r"test_labels: expected shape \(5,\)"),
        ((tf, ty - 1, vf, vy), "train_labels: expected labels >= 0"),
        ((tf, ty.bool(), vf, vy), "train_labels"),
        ((tf.clone().fill_(float("nan")), ty, vf, vy), "train_feats: holds NaN"),
    ]
    for args, msg in bad_args:
        with pytest.raises(ValueError, match=msg):
            knn_classify(*args)
    assert knn_classify(tf, ty.int(), vf, vy.to(torch.uint8), k=3)["top1"] >= 0.0  # any integer label dtype


@pytest.mark.skipif(DEVICE == "cpu", reason="needs a CUDA device")
def test_knn_on_the_device_matches_the_cpu():
    g = torch.Generator().manual_seed(0)
    tf, vf = torch.randn(5000, 64, generator=g), torch.randn(700, 64, generator=g)
    ty, vy = torch.randint(0, 10, (5000,), generator=g), torch.randint(0, 10, (700,), generator=g)
    cpu = knn_classify(tf, ty, vf, vy, return_neighbors=True)
    dev = knn_classify(tf.to(DEVICE), ty.to(DEVICE), vf.to(DEVICE), vy.to(DEVICE), test_chunk=128, train_chunk=1000,
                       return_neighbors=True)  # fmt: skip
    assert dev["neighbors"].device.type == "cuda"
    assert (dev["neighbors"].cpu() == cpu["neighbors"]).float().mean() > 0.999  # fp32 matmul rounding may swap a pair
    assert abs(dev["top1"] - cpu["top1"]) <= 2 / 700


# ------------------------------------------------------------------------------------------ the commands
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-step mae_debug run and a 1-step regvq_debug tokenizer run over a small generated dataset."""
    pytest.importorskip("nvidia.dali", reason="the commands read data through DALI ('.[train]')")
    from mimfast.data import make_builtin_dataset
    from mimfast.train import get_config, pretrain

    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")
    root = tmp_path_factory.mktemp("data") / "shapes"
    make_builtin_dataset(root, num_classes=4, train_per_class=16, val_per_class=5, size=40, progress=False)
    base = tmp_path_factory.mktemp("runs")
    common = [f"data.root={root}", "train.batch_size=8", "train.progress=lines", "train.log_every=1"]
    pretrain(get_config("mae_debug", [f"train.out_dir={base / 'mae'}", "train.max_steps=3", *common]))
    pretrain(get_config("regvq_debug", [f"train.out_dir={base / 'tok'}", "train.max_steps=1", "model.loss.disc=false",
                                        "train.ckpt_every=0", *common]))  # fmt: skip
    yield base / "mae", base / "tok"
    mp.undo()


def test_lars_probe_cli_end_to_end(runs, tmp_path, capsys, monkeypatch):
    from mimfast.cli import main
    from mimfast.train.evaluate import lars_linear_probes

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    mae, _ = runs
    js = tmp_path / "lars.json"
    argv = ["probe", "--protocol", "lars", "--checkpoint", str(mae), "--epochs", "150"]
    assert main([*argv, "--compare-random", "--random-seeds", "2", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "lars, MAE's protocol: 150 epochs (16.6667 warm-up) x 1 step(s) of batch 64, lr 0.025" in out
    assert "eval-transform features" in out and "val top-1 / top-5 (train top-1)" in out
    assert "pretrained (step 3)" in out and "random init (seed 1)" in out and "random init (seed 2)" not in out
    assert out.count("points over the best random init") == 2
    rec = json.loads(js.read_text())
    assert rec["protocol"] == "lars" and rec["num_train"] == 64 and rec["num_val"] == 20
    assert rec["lars"] == {"epochs": 150, "warmup_epochs": pytest.approx(150 / 9), "batch_size": 64, "lr": 0.025,
                           "steps": 150, "blr": 0.1, "augment": 0}  # fmt: skip
    assert [(r["encoder"], r["seed"]) for r in rec["runs"]] == [("pretrained", 0), ("random", 0), ("random", 1)]
    for pool in ("cls", "mean"):
        cell = rec["runs"][0][pool]
        assert 0.0 <= cell["top1"] <= cell["top5"] == 1.0  # 4 classes: top-5 is every class
        assert f"{100 * cell['top1']:.1f}% / 100.0% ({100 * cell['train_top1']:.1f}%)" in out
        s = rec["summary"][pool]
        assert s["random_best"] == max(r[pool]["top1"] for r in rec["runs"][1:])
    api = lars_linear_probes(mae, epochs=150, progress=False)  # the API gives the command's numbers
    assert {p: r.top1 for p, r in api.items()} == {p: rec["runs"][0][p]["top1"] for p in ("cls", "mean")}
    assert api["mean"].protocol == "lars" and api["mean"].recipe["steps"] == 150
    # MAE's augmentation: 2 RandomResizedCrop + flip views cycled over the epochs
    assert main([*argv[:-2], "--epochs", "4", "--augment", "2", "--pool", "mean", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "2 RandomResizedCrop + flip views of the train split" in out and "class token" not in out
    assert json.loads(js.read_text())["lars"]["augment"] == 2
    # options of the other protocol, bad numbers: one line, exit 2
    for extra, msg in ((["--steps", "5"], "--steps applies to --protocol quick"),
                       (["--epochs", "0"], "--epochs 0"), (["--augment", "-1"], "--augment -1")):  # fmt: skip
        assert main([*argv[:-2], *extra]) == 2
        assert msg in capsys.readouterr().err
    assert main(["probe", "--checkpoint", str(mae), "--epochs", "5"]) == 2
    assert "--epochs applies to --protocol lars" in capsys.readouterr().err


def test_knn_cli_end_to_end_and_errors(runs, tmp_path, capsys, monkeypatch):
    from mimfast.cli import main
    from mimfast.train.knn import knn_evaluate

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    mae, tok = runs
    js = tmp_path / "knn.json"
    argv = ["knn", "--checkpoint", str(mae), "--k", "5"]
    assert main([*argv, "--compare-random", "--random-seeds", "2", "--device", "cpu", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "weighted k-NN (k=5, T=0.07" in out and "64 train / 20 val images" in out and "val top-1 (top-5)" in out
    assert out.count("points over the best random init") == 2 and "random init (seed 1)" in out
    rec = json.loads(js.read_text())
    assert rec["k"] == 5 and rec["temperature"] == 0.07 and rec["num_val"] == 20
    assert [(r["encoder"], r["seed"]) for r in rec["runs"]] == [("pretrained", 0), ("random", 0), ("random", 1)]
    for pool in ("cls", "mean"):
        cell = rec["runs"][0][pool]
        assert 0.0 <= cell["top1"] <= cell["top5"] <= 1.0
        assert f"{100 * cell['top1']:.1f}% ({100 * cell['top5']:.1f}%)" in out
    api = knn_evaluate(mae, k=5, progress=False, device="cpu")
    assert api == {p: rec["runs"][0][p] for p in ("cls", "mean")}
    # a tokenizer has only a pooled latent: the default (both poolings) names the fix; --pool mean runs
    assert main(["knn", "--checkpoint", str(tok)]) == 2
    assert "error: pool: the tokenizer task gives no 'cls' feature (it gives mean); pass --pool mean" in (
        capsys.readouterr().err
    )
    assert main(["knn", "--checkpoint", str(tok), "--pool", "mean", "--k", "3"]) == 0
    assert "mean of patches" in capsys.readouterr().out
    assert main(["probe", "--protocol", "lars", "--checkpoint", str(tok), "--epochs", "2"]) == 2
    assert "no 'cls' feature" in capsys.readouterr().err
    for extra, msg in ((["--k", "0"], "--k"), (["--k", "65"], "--k 65 exceeds the 64 training images"),
                       (["--temperature", "0"], "--temperature")):  # fmt: skip
        assert main([*argv[:3], *extra]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and err.startswith("error: ")
    assert main(["knn", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
