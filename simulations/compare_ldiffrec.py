"""Step-level equivalence harness: fedrec's L-DiffRec against the official L-DiffRec code.

``python -m simulations.compare_ldiffrec --official /path/to/DiffRec/L-DiffRec [--epochs 2] [overrides...]``

The official code (github.com/YiyanXu/DiffRec, folder ``L-DiffRec``) is imported from the path given,
never copied here. Its ``main.py`` is executed *as written* up to its epoch loop (argument parsing
with its README flags for ML-1M clean, data loading, k-means, the AutoEncoder, DNN and
GaussianDiffusion, both AdamW optimizers, the evaluation masks and its ``evaluate`` function); its
training step is the body of its ``for batch_idx, batch in enumerate(train_loader)`` loop and its
epoch end the loop's ``update_count += 1``, both taken from the file's syntax tree and executed in
the same namespace. Needs ``kmeans_pytorch`` (the official dependency) on ``PYTHONPATH``; the
official ``evaluate_utils`` imports ``bottleneck`` without using it, so a missing one is replaced
by an empty module, and scipy >= 1.14's missing ``spmatrix.A`` (the mirror's main.py uses it) by
``toarray()``.

What it checks, each reported as the largest absolute difference relative to the largest
magnitude of the official value (pass: <= ``--tol``, default 1e-6):

1. Configuration: every official argument against fedrec's ``conf/model/ldiffrec.yaml`` (and the
   official module defaults: encoder dropout 0.1, denoiser dropout 0.5, history of 10, no
   ``beta_fixed``, importance sampling always on, AdamW with the same lr / weight decay per module).
2. Data: the official ``data_load`` matrices against fedrec's loader, the dense training rows, the
   item embeddings, the k-means labels (official ``kmeans_pytorch`` under its ``np.random.seed(1)``
   against :func:`fedrec.models.ldiffrec.kmeans`), the cluster order; batch composition of one
   epoch (the official DataLoader's batch sampler against fedrec's ``train_epoch``).
3. Training, in lock step for ``--epochs`` epochs of fedrec's own ``train_epoch`` (fedrec's
   optimizer from ``make_optimizer``): the official model gets fedrec's weights at the start, the
   same batch, and the *same random draws*: torch's ``randn``/``randn_like``/``randint``/
   ``multinomial`` and ``F.dropout`` are patched so that fedrec's step records each draw and the
   official step replays it, in order (a different order or kind of draw is reported as such).
   Per step: the encoder's cluster-ordered input, the latent, the KL term, the timesteps, the
   importance-sampling distribution (whenever it is used), the diffusion loss after reweighting
   and division by p(t), x0_hat, the decoded scores, lambda and the KL weight, the total loss, every
   parameter's gradient (verdict per tensor, ||diff|| / ||official||; the largest single element is
   shown too), every parameter after the optimizer step, and the loss history per timestep (as a
   set: the official FIFO shifts, fedrec's is a ring buffer).
   ``--resync`` compares each step alone: before it, the official model gets fedrec's parameters,
   AdamW moments and loss history; then the official gradients are also fed through a clone of
   fedrec's optimizer, which must reproduce the official parameters exactly (so any difference of
   the parameters comes from the gradients: Adam turns a gradient difference at an element whose
   gradient is below its eps = 1e-8 into a parameter difference of up to lr * diff / eps, so the
   parameters row has no verdict). Without ``--resync`` nothing is re-synced and the figures are
   the drift accumulated over ``--epochs`` epochs (no verdict for per-step rows).
   ``--float64-reference`` recomputes fedrec's step in float64 from the same state and draws and
   compares both implementations' float32 gradients with it (how far each is from exact arithmetic);
   the gradient verdict is then that fedrec's is no farther from it than the official one (or
   within ``--tol``), tensor by tensor and step by step.
   ``--float64-loss-weights`` is a control, not fedrec's behaviour: fedrec's per-t loss weights in
   float64, the official dtype of the reweighted diffusion loss.
4. Inference with identical weights (the official ones copied into fedrec's model): the scores of
   the first batch of users (official Encode -> p_sample -> Decode, cluster order, against
   ``LDiffRec.scores`` in item order), and the official ``evaluate`` (valid: train items masked;
   test: train and valid items masked; per-user Python metrics, rounded to 4 decimals) against
   ``fedrec.eval.evaluate_model`` rounded the same way.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import sys
import time
import types
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

# The official README's ML-1M (clean) flags, as in the official run logs of docs/RESULTS.md.
OFFICIAL_FLAGS = ["--dataset=ml-1m_clean", "--lr1=0.001", "--lr2=0.0005", "--wd1=0", "--wd2=0", "--batch_size=400",
                  "--n_cate=2", "--in_dims=[300]", "--out_dims=[]", "--lamda=0.03", "--mlp_dims=[300]",
                  "--emb_size=10", "--mean_type=x0", "--steps=40", "--noise_scale=0.005", "--noise_min=0.005",
                  "--noise_max=0.02", "--sampling_steps=0", "--reweight=1"]


# ---------------------------------------------------------------------------- comparison record
class Report:
    def __init__(self, tol: float, drift: bool = False, exact: bool = False):
        self.tol = tol
        self.drift = drift
        self.exact = exact
        self.rows: dict[str, list[float]] = {}  # quantity -> [worst relative diff, worst abs diff, count]
        self.failures: list[str] = []

    def informational(self, name: str) -> bool:
        """Quantities without a verdict: parameters (Adam divides gradient differences below its eps by eps;
        the optimizer row checks it exactly), the largest single gradient element (the verdict is per
        tensor, in norm), with the float64 reference the gradient difference itself (the verdict: fedrec's
        float32 gradient is no farther from exact arithmetic than the official one, or within ``tol``),
        and in drift mode every per-step quantity."""
        if name.startswith("float64 reference: ") and name.endswith(" gradients"):
            return True  # the distances themselves; the verdict is the row comparing them
        if name == "step: gradients (per tensor, norm)" and self.exact:
            return True  # judged against the float64 reference instead
        return name in ("step: parameters after the step", "step: gradients (largest element)") or (self.drift and name.startswith(("step:", "import")))

    def close(self, name: str, official, ours, record: bool = True, norm: bool = False) -> float:
        """Largest |official - ours| over the largest |official| (``norm``: ||official - ours|| / ||official||)."""
        a = torch.as_tensor(official).detach().double().cpu()
        b = torch.as_tensor(ours).detach().double().cpu()
        if a.shape != b.shape:
            self.failures.append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            return float("inf")
        if norm:
            diff, scale = float(torch.linalg.norm(a - b)), max(float(torch.linalg.norm(a)), 1e-30)
        else:
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            scale = max(float(a.abs().max()) if a.numel() else 0.0, 1e-30)
        rel = diff / scale
        if not record:
            return rel
        row = self.rows.setdefault(name, [0.0, 0.0, 0])
        row[0], row[1], row[2] = max(row[0], rel), max(row[1], diff), row[2] + 1
        return rel

    def equal(self, name: str, ok: bool, detail: str = "") -> None:
        row = self.rows.setdefault(name, [0.0, 0.0, 0])
        row[2] += 1
        if not ok:
            row[0] = float("inf")
            self.failures.append(f"{name}: {detail}")

    def print(self) -> bool:
        width = max(len(k) for k in self.rows)
        print(f"\n{'quantity'.ljust(width)}  checks  max rel diff  max abs diff  verdict")
        ok_all = not self.failures
        for name, (rel, diff, n) in self.rows.items():
            ok = rel <= self.tol
            info = self.informational(name)
            ok_all &= ok or info
            verdict = ("drift" if self.drift else "info") if info else ("ok" if ok else "DIFFERS")
            print(f"{name.ljust(width)}  {n:6d}  {rel:12.3e}  {diff:12.3e}  {verdict}")
        for f in self.failures:
            print("  failure:", f)
        return ok_all


# ---------------------------------------------------------------------------- shared random draws
class SharedDraws:
    """Patches torch's samplers so that fedrec's step records every draw and the official step replays it.

    Off (``mode=None``) they are torch's own. Dropout is re-implemented as ATen does it (a Bernoulli
    keep mask divided by 1 - p, times the input) so that both sides apply the recorded mask.
    """

    def __init__(self, report: Report):
        self.report = report
        self.mode: str | None = None
        self.log: list[tuple] = []
        self.pos = 0
        self.orig = {"randn": torch.randn, "randn_like": torch.randn_like, "randint": torch.randint,
                     "multinomial": torch.multinomial, "dropout": F.dropout}

    def record(self) -> None:
        self.mode, self.log = "record", []

    def replay(self) -> None:
        self.mode, self.pos = "replay", 0

    def off(self) -> None:
        if self.mode == "replay" and self.pos != len(self.log):
            self.report.equal("draw sequence", False, f"official used {self.pos} of fedrec's {len(self.log)} draws")
        self.mode = None

    def _take(self, kind: str, shape, extra=None):
        if self.pos >= len(self.log):
            self.report.equal("draw sequence", False, f"official drew an extra {kind} {tuple(shape)}")
            raise RuntimeError("draw sequence differs")
        k, s, value, info = self.log[self.pos]
        self.pos += 1
        ok = k == kind and tuple(s) == tuple(shape) and (extra is None or info == extra)
        self.report.equal("draw sequence", ok, f"draw {self.pos}: fedrec {k} {tuple(s)} {info}, "
                                               f"official {kind} {tuple(shape)} {extra}")
        if not ok:
            raise RuntimeError("draw sequence differs")
        return value, info

    def install(self) -> None:
        me = self

        def randn(*size, generator=None, dtype=None, device=None, **kw):
            if me.mode is None:
                return me.orig["randn"](*size, generator=generator, dtype=dtype, device=device, **kw)
            shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
            if me.mode == "record":
                out = me.orig["randn"](*size, generator=generator, dtype=dtype, device=device, **kw)
                me.log.append(("normal", shape, out.clone(), None))
                return out
            value, _ = me._take("normal", shape)
            return value.to(dtype=dtype or torch.get_default_dtype(), device=device)

        def randn_like(x, **kw):
            if me.mode is None:
                return me.orig["randn_like"](x, **kw)
            if me.mode == "record":
                out = me.orig["randn_like"](x, **kw)
                me.log.append(("normal", tuple(x.shape), out.clone(), None))
                return out
            value, _ = me._take("normal", tuple(x.shape))
            return value.to(dtype=kw.get("dtype") or x.dtype, device=x.device)

        def randint(*args, **kw):
            if me.mode is None:
                return me.orig["randint"](*args, **kw)
            low, high, size = (0, *args) if len(args) == 2 else args
            if me.mode == "record":
                out = me.orig["randint"](*args, **kw)
                me.log.append(("randint", tuple(size), out.clone(), (int(low), int(high))))
                return out
            value, _ = me._take("randint", tuple(size), (int(low), int(high)))
            return value.clone()

        def multinomial(p, num_samples, replacement=False, **kw):
            n = num_samples
            if me.mode is None:
                return me.orig["multinomial"](p, n, replacement, **kw)
            if me.mode == "record":
                out = me.orig["multinomial"](p, n, replacement, **kw)
                me.log.append(("multinomial", (int(n),), out.clone(), p.detach().clone()))
                return out
            value, ours_p = me._take("multinomial", (int(n),))
            me.report.close("importance-sampling p(t)", p, ours_p)
            return value.clone()

        def dropout(x, p=0.5, training=True, inplace=False):
            if me.mode is None or not training or p == 0:
                return me.orig["dropout"](x, p, training, inplace)
            if me.mode == "record":
                mask = torch.empty_like(x).bernoulli_(1 - p)
                me.log.append(("dropout", tuple(x.shape), mask.clone(), float(p)))
            else:
                mask, _ = me._take("dropout", tuple(x.shape), float(p))
            return x * mask.div(1 - p)

        torch.randn, torch.randn_like, torch.randint, torch.multinomial = randn, randn_like, randint, multinomial
        F.dropout = dropout

    def uninstall(self) -> None:
        torch.randn, torch.randn_like = self.orig["randn"], self.orig["randn_like"]
        torch.randint, torch.multinomial, F.dropout = self.orig["randint"], self.orig["multinomial"], self.orig["dropout"]


# ---------------------------------------------------------------------------- the official code, executed
class Official:
    """The official main.py run up to its epoch loop; its step and epoch end as compiled statements."""

    def __init__(self, folder: Path, data_folder: Path, epochs: int):
        main = folder / "main.py"
        if not main.exists():
            raise SystemExit(f"error: --official: {main} not found (give the official L-DiffRec folder)")
        sys.path.insert(0, str(folder))
        try:
            import kmeans_pytorch  # noqa: F401
        except ImportError:
            raise SystemExit("error: the official L-DiffRec needs kmeans_pytorch (pip install kmeans_pytorch, "
                             "or put its source on PYTHONPATH)") from None
        try:
            import bottleneck  # noqa: F401
        except ImportError:  # evaluate_utils imports it and never uses it
            sys.modules["bottleneck"] = types.ModuleType("bottleneck")
        if not hasattr(sp.csr_matrix, "A"):  # removed in scipy 1.14; the mirror's main.py uses it
            sp.csr_matrix.A = property(lambda self: self.toarray())
        tree = ast.parse(main.read_text(), str(main))
        loop = next(i for i, s in enumerate(tree.body) if isinstance(s, ast.For)
                    and isinstance(s.target, ast.Name) and s.target.id == "epoch")
        epoch_loop = tree.body[loop]
        inner = next(s for s in epoch_loop.body if isinstance(s, ast.For)
                     and ast.unparse(s.iter) == "enumerate(train_loader)")
        # epoch start: the statements before the batch loop but its early-stopping test (train modes, counters)
        epoch_start = [s for s in epoch_loop.body[:epoch_loop.body.index(inner)] if not isinstance(s, ast.If)]
        epoch_end = [s for s in epoch_loop.body if isinstance(s, ast.AugAssign)
                     and ast.unparse(s.target) == "update_count"]
        self.epoch_start_code = compile(ast.Module(body=epoch_start, type_ignores=[]), str(main), "exec")
        self.step_code = compile(ast.Module(body=inner.body, type_ignores=[]), str(main), "exec")
        self.epoch_end_code = compile(ast.Module(body=epoch_end, type_ignores=[]), str(main), "exec")
        self.step_source = ast.unparse(ast.Module(body=inner.body, type_ignores=[]))
        setup = compile(ast.Module(body=tree.body[:loop], type_ignores=[]), str(main), "exec")
        flags = OFFICIAL_FLAGS + [f"--data_path={data_folder}/", f"--emb_path={data_folder.parent}/",
                                  f"--epochs={epochs}", "--save_path=/nonexistent/"]
        self.ns: dict = {"__name__": "official_main", "__file__": str(main)}
        argv, sys.argv = sys.argv, [str(main), *flags]
        self.log = io.StringIO()
        try:
            with contextlib.redirect_stdout(self.log):
                exec(setup, self.ns)
        finally:
            sys.argv = argv

    def __getitem__(self, key):
        return self.ns[key]

    def step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.ns["batch"], self.ns["batch_idx"] = batch, batch_idx
        exec(self.step_code, self.ns)

    def epoch_start(self, epoch: int) -> None:
        self.ns["epoch"] = epoch
        exec(self.epoch_start_code, self.ns)

    def epoch_end(self) -> None:
        exec(self.epoch_end_code, self.ns)


def linear_pairs(official, model) -> list[tuple[str, torch.nn.Linear, str, torch.nn.Linear]]:
    """(official name, layer, fedrec name, layer): the Linear layers of both models in construction order."""
    ae, dnn = official["Autoencoder"], official["model"]
    left = [(f"AE.{n}", m) for n, m in ae.named_modules() if isinstance(m, torch.nn.Linear)]
    left += [(f"DNN.{n}", m) for n, m in dnn.named_modules() if isinstance(m, torch.nn.Linear)]
    right = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if len(left) != len(right):
        raise SystemExit(f"error: {len(left)} official Linear layers, {len(right)} in fedrec's model")
    pairs = []
    for (ln, lm), (rn, rm) in zip(left, right):
        if lm.weight.shape != rm.weight.shape:
            raise SystemExit(f"error: {ln} {tuple(lm.weight.shape)} vs {rn} {tuple(rm.weight.shape)}")
        pairs.append((ln, lm, rn, rm))
    return pairs


@torch.no_grad()
def copy_weights(pairs, to_fedrec: bool) -> None:
    for _, lm, _, rm in pairs:
        src, dst = (lm, rm) if to_fedrec else (rm, lm)
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)


# ---------------------------------------------------------------------------- the checks
def check_config(rep: Report, off: Official, cfg, model, optimizer) -> None:
    a, m = off["args"], cfg.model
    pairs = {"lr1": m.lr_autoencoder, "lr2": m.lr_denoiser, "wd1": m.optim.weight_decay, "wd2": m.optim.weight_decay,
             "batch_size": m.optim.batch_size, "n_cate": m.n_cate, "lamda": m.lamda, "anneal_cap": m.anneal_cap,
             "anneal_steps": m.anneal_steps, "vae_anneal_cap": m.vae_anneal_cap,
             "vae_anneal_steps": m.vae_anneal_steps, "reparam": m.reparam, "norm": m.norm, "emb_size": m.emb_size,
             "mean_type": m.mean_type, "steps": m.steps, "noise_schedule": m.noise_schedule,
             "noise_scale": m.noise_scale, "noise_min": m.noise_min, "noise_max": m.noise_max,
             "sampling_noise": m.sampling_noise, "sampling_steps": m.sampling_steps, "reweight": m.reweight}
    for key, ours in pairs.items():
        rep.equal("config: official args", getattr(a, key) == ours, f"{key}: official {getattr(a, key)!r}, ours {ours!r}")
    for key, ours in (("in_dims", m.in_dims), ("out_dims", m.out_dims), ("mlp_dims", m.mlp_dims)):
        rep.equal("config: official args", eval(getattr(a, key)) == list(ours), f"{key}: {getattr(a, key)} vs {ours}")
    rep.equal("config: official args", a.act_func == "tanh" and a.mlp_act_func == "tanh" and a.time_type == "cat",
              "activations / time embedding")
    ae, dnn, diff = off["Autoencoder"], off["model"], off["diffusion"]
    rep.equal("config: module defaults", abs(ae.dropout.p - m.encoder_dropout) == 0, f"encoder dropout {ae.dropout.p}")
    rep.equal("config: module defaults", abs(dnn.dropout.p - m.dropout) == 0, f"denoiser dropout {dnn.dropout.p}")
    rep.equal("config: module defaults", diff.history_num_per_term == model.diffusion.history_per_step, "history")
    rep.equal("config: module defaults", bool(m.importance_sampling), "official always samples by importance")
    rep.equal("config: module defaults", not bool(m.beta_fixed), "official L-DiffRec builds without beta_fixed")
    rep.close("diffusion: betas", diff.betas, model.diffusion.betas)
    rep.close("diffusion: SNR", diff.alphas_cumprod / (1 - diff.alphas_cumprod), model.diffusion.snr)
    rep.close("diffusion: posterior coef1", diff.posterior_mean_coef1, model.diffusion.posterior_coef1)
    rep.close("diffusion: posterior coef2", diff.posterior_mean_coef2, model.diffusion.posterior_coef2)
    groups = optimizer.param_groups
    ae_ids = {id(p) for p in [*model.encoders.parameters(), *model.decoders.parameters()]}
    for name, off_opt, module in (("AE", off["optimizer1"], ae), ("DNN", off["optimizer2"], dnn)):
        og = off_opt.param_groups[0]
        mine = [g for g in groups if {id(p) for p in g["params"]} & ae_ids] if name == "AE" else \
               [g for g in groups if not ({id(p) for p in g["params"]} & ae_ids)]
        rep.equal("config: optimizers", type(off_opt) is type(optimizer) and len(mine) == 1,
                  f"{name}: official {type(off_opt).__name__}, ours {type(optimizer).__name__}")
        for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                    "differentiable", "fused"):
            rep.equal("config: optimizers", og[key] == mine[0][key], f"{name} {key}: {og[key]} vs {mine[0][key]}")
        rep.equal("config: optimizers", sum(p.numel() for p in module.parameters())
                  == sum(p.numel() for p in mine[0]["params"]), f"{name}: parameter count")


def check_data(rep: Report, off: Official, data, model, rows) -> None:
    for name, theirs, ours in (("train", off["train_data"], data.train), ("valid", off["valid_y_data"], data.valid),
                               ("test", off["test_y_data"], data.test)):
        rep.equal("data: matrices", theirs.shape == ours.shape and (theirs != ours).nnz == 0,
                  f"{name}: {theirs.shape} vs {ours.shape}")
    rep.equal("data: training rows", np.array_equal(rows.users, np.arange(off["n_user"])), "user order")
    rep.close("data: training rows", off["train_dataset"].data, rows._dense)
    emb = model_shape_emb(data)
    rep.close("data: item embeddings", off["item_emb"], emb)
    rep.equal("k-means: cluster order", torch.equal(off["Autoencoder"].category_map.long(), model.category_map.cpu()),
              f"official sizes {off['Autoencoder'].category_len}, ours {model.group_sizes}")


def model_shape_emb(data):
    from fedrec.models import data_shape

    return torch.as_tensor(data_shape(data).item_embeddings())


def batch_sizes_of_loader(off: Official) -> tuple[list[int], bool]:
    """One epoch of the official DataLoader's batch sampler (no workers needed to read indices)."""
    batches = [list(b) for b in off["train_loader"].batch_sampler]
    seen = np.concatenate([np.asarray(b) for b in batches])
    return [len(b) for b in batches], bool(np.array_equal(np.sort(seen), np.arange(off["n_user"])))


@torch.no_grad()
def resync_official(off: Official, model, optimizer, off_params, history: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Give the official model fedrec's present state: parameters, AdamW moments and loss history.

    fedrec's history is a ring buffer; the official one a FIFO (oldest first), so each t's row is
    rotated to start at its oldest entry. ``history``: fedrec's (loss_history, loss_written) before
    its step recorded this batch's losses.
    """
    state = optimizer.state
    for name, opt in (("AE.", off["optimizer1"]), ("DNN.", off["optimizer2"])):
        for on, op, rn, rp in off_params:
            if on.startswith(name):
                op.copy_(rp)
                if rp in state:
                    opt.state[op] = {k: v.clone() for k, v in state[rp].items()}
    diff, ours = off["diffusion"], model.diffusion
    h = ours.history_per_step
    hist, count = history
    for t in range(ours.steps):
        written = int(count[t])
        row = torch.zeros(h, dtype=diff.Lt_history.dtype)
        if written >= h:
            row[:] = hist[t, (written + torch.arange(h)) % h].to(row.dtype)
        else:
            row[:written] = hist[t, :written].to(row.dtype)
        diff.Lt_history[t] = row
        diff.Lt_count[t] = min(written, h)


def optimizer_with_grads(optimizer: torch.optim.Optimizer, params_grads) -> list[torch.Tensor]:
    """Copies of ``params`` after one step of a clone of ``optimizer`` (its groups' settings and its state),
    fed the given gradients instead of their own."""
    by_param = dict(params_grads)
    groups, copies = [], {}
    for g in optimizer.param_groups:
        ps = []
        for p in g["params"]:
            q = p.detach().clone().requires_grad_(True)
            q.grad = by_param[p].detach().clone()
            copies[p] = q
            ps.append(q)
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ps})
    shadow = type(optimizer)(groups)
    for p, q in copies.items():
        if p in optimizer.state:
            shadow.state[q] = {k: v.clone() for k, v in optimizer.state[p].items()}
    shadow.step()
    return [copies[p].detach() for p, _ in params_grads]


def float64_gradients(model, cap: dict, draws: SharedDraws) -> dict[str, torch.Tensor]:
    """fedrec's gradients of this step in float64: a double copy of the model in its pre-step state
    (loss history and KL-warm-up counter as before the step), the same batch and the recorded draws."""
    import copy

    twin = copy.deepcopy(model).double()
    for key in ("loss", "encode", "decode", "_weights"):  # the harness's capturing wrappers of ``model``
        twin.__dict__.pop(key, None)
    twin.diffusion.__dict__.pop("training_loss", None)
    # the sinusoidal timestep embedding is built in float32 (an input, the same values on every side)
    twin.denoiser.emb_layer.register_forward_pre_hook(lambda module, args: (args[0].double(),))
    hist, count = cap["history"]
    twin.diffusion.loss_history = hist.clone()  # float32, as fedrec records it
    twin.diffusion.loss_written.copy_(count)
    twin.batches_done.sub_(1)
    batch = copy.copy(cap["batch"])
    batch.x = batch.x.double()
    draws.replay()
    twin.train()
    twin.loss(batch).mean().backward()
    draws.off()
    return {n: p.grad for n, p in twin.named_parameters()}


def lockstep(rep: Report, off: Official, model, optimizer, rows, cfg, epochs: int, draws: SharedDraws,
             resync: bool = False, verbose: bool = False, exact: bool = False) -> dict:
    from fedrec.train import train_epoch

    names = {id(p): n for n, p in model.named_parameters()}
    pairs = linear_pairs(off, model)
    off_params = [(f"{ln}.{k}", getattr(lm, k), f"{rn}.{k}", getattr(rm, k))
                  for ln, lm, rn, rm in pairs for k in ("weight", "bias")]
    state = {"step": 0, "sizes": [], "users": []}
    cap: dict = {}
    real = {"loss": model.loss, "encode": model.encode, "decode": model.decode, "weights": model._weights,
            "training_loss": model.diffusion.training_loss, "step": optimizer.step}

    def encode(*a, **k):
        out = real["encode"](*a, **k)
        cap["encode"] = out
        return out

    def decode(z):
        out = real["decode"](z)
        cap["recon"] = out
        return out

    def weights():
        out = real["weights"]()
        cap["weights"] = out
        return out

    def training_loss(*a, **k):
        out = real["training_loss"](*a, **k)
        cap["terms"] = out
        return out

    def loss(batch):
        cap.clear()
        cap["history"] = (model.diffusion.loss_history.clone(), model.diffusion.loss_written.clone())
        draws.record()
        out = real["loss"](batch)
        draws.off()
        cap["batch"], cap["per_example"] = batch, out
        state["sizes"].append(len(batch.users))
        state["users"].append(batch.users.cpu().numpy())
        return out

    def step(*a, **k):
        x = cap["batch"].x.detach().clone()
        grads = {names[id(p)]: p.grad.detach().clone() for p in model.parameters() if p.grad is not None}
        if resync:
            resync_official(off, model, optimizer, off_params, cap["history"])
        draws.replay()
        off.step(x, state["step"])
        draws.off()
        ns = off.ns
        x_cate, z, kl = cap["encode"]
        terms, (lamda, beta) = cap["terms"], cap["weights"]
        rep.close("step: encoder input (cluster order)", ns["batch_cate"], x_cate)
        rep.close("step: latent z", ns["batch_latent"], z)
        rep.close("step: KL (batch mean)", ns["vae_kl"], kl.mean())
        rep.close("step: diffusion loss / p(t)", ns["terms"]["loss"], terms["loss"])
        rep.close("step: x0_hat", ns["terms"]["pred_xstart"], terms["pred_x0"])
        rep.close("step: decoded scores", ns["batch_recon"], cap["recon"])
        rep.close("step: lambda", ns["lamda"], lamda)
        rep.close("step: KL weight", ns["anneal"], beta)
        rep.close("step: total loss", ns["loss"], cap["per_example"].mean())
        trace = {"z": rep.close("step: latent z", ns["batch_latent"], z, record=False)}
        for on, op, rn, rp in off_params:
            rep.close("step: gradients (per tensor, norm)", op.grad, grads[rn], norm=True)
        grad_rels = [(rep.close("step: gradients (largest element)", op.grad, grads[rn]), rn)
                     for on, op, rn, rp in off_params]
        trace["grad"], trace["grad_at"] = max(grad_rels)
        if exact:  # both float32 gradients against fedrec's step recomputed in float64 with the same draws
            ref = float64_gradients(model, cap, draws)
            for on, op, rn, rp in off_params:
                e_off = rep.close("float64 reference: official gradients", ref[rn], op.grad, norm=True)
                e_ours = rep.close("float64 reference: fedrec gradients", ref[rn], grads[rn], norm=True)
                rep.equal("float64 reference: fedrec no farther than official", e_ours <= max(rep.tol, e_off),
                          f"step {state['step'] + 1} {rn}: fedrec {e_ours:.2e}, official {e_off:.2e} from float64")
        if resync:  # the official gradients through fedrec's optimizer (same state) give the official parameters
            shadow = optimizer_with_grads(optimizer, [(rp, op.grad) for on, op, rn, rp in off_params])
            for (on, op, rn, rp), q in zip(off_params, shadow):
                rep.close("optimizer: official grads, fedrec's AdamW", op, q)
        real["step"](*a, **k)
        rels = [(rep.close("step: parameters after the step", op, rp), rn, op, rp) for on, op, rn, rp in off_params]
        trace["param"], worst, op, rp = max(rels, key=lambda r: r[0])
        j = int((op.detach() - rp.detach()).abs().argmax())
        trace["where"] = (f"{worst}[{j}]: |grad| {float(grads[worst].flatten()[j].abs()):.1e} "
                          f"(max {float(grads[worst].abs().max()):.1e})")
        if verbose:
            print(f"  step {state['step'] + 1:3d}: max rel diff  z {trace['z']:.2e}  gradients {trace['grad']:.2e} "
                  f"({trace['grad_at']})  "
                  f"parameters {trace['param']:.2e} at {trace['where']}")
        hist_off = torch.sort(off["diffusion"].Lt_history, dim=1).values
        hist_ours = torch.sort(model.diffusion.loss_history, dim=1).values
        rep.close("step: loss history per t", hist_off, hist_ours)
        rep.equal("step: loss history per t", torch.equal(off["diffusion"].Lt_count,
                                                          model.diffusion.loss_written.clamp(max=10)), "counts")
        state["step"] += 1

    model.loss, model.encode, model.decode, model._weights = loss, encode, decode, weights
    model.diffusion.training_loss, optimizer.step = training_loss, step
    rng = np.random.default_rng(int(cfg.seed))
    draws.install()
    try:
        for epoch in range(epochs):
            state["sizes"], state["users"] = [], []
            t0 = time.perf_counter()
            off.epoch_start(epoch + 1)
            train_epoch(model, optimizer, rows, int(cfg.model.optim.batch_size), rng)
            off.epoch_end()
            rep.equal("epoch: annealing counters", int(off["update_count"]) == int(model.epochs_done)
                      and int(off["update_count_vae"]) == int(model.batches_done),
                      f"official {off['update_count']}/{off['update_count_vae']}, "
                      f"ours {int(model.epochs_done)}/{int(model.batches_done)}")
            covered = np.array_equal(np.sort(np.concatenate(state["users"])), np.sort(rows.users))
            rep.equal("epoch: every user once", covered, f"epoch {epoch + 1}")
            print(f"epoch {epoch + 1}: {len(state['sizes'])} steps in lock step, {time.perf_counter() - t0:.1f} s")
    finally:
        draws.uninstall()
        for key in ("loss", "encode", "decode", "_weights"):
            model.__dict__.pop(key, None)
        model.diffusion.__dict__.pop("training_loss", None)
        optimizer.__dict__.pop("step", None)
    return state


@torch.no_grad()
def check_inference(rep: Report, off: Official, model, data, n_batch_users: int) -> dict:
    from fedrec.eval import evaluate_model
    from fedrec.models.base import Batch

    copy_weights(linear_pairs(off, model), to_fedrec=True)
    ae, dnn, diff, a = off["Autoencoder"], off["model"], off["diffusion"], off["args"]
    ae.eval(), dnn.eval(), model.eval()
    x = off["train_dataset"].data[:n_batch_users]
    _, latent, _ = ae.Encode(x)
    official = ae.Decode(diff.p_sample(dnn, latent, a.sampling_steps, a.sampling_noise))
    ours = model.scores(Batch(users=torch.arange(n_batch_users), x=x))
    rep.close("inference: scores (first batch)", official, ours[:, model.category_map])
    top_n = eval(a.topN)
    t0 = time.perf_counter()
    valid = off["evaluate"](off["test_loader"], off["valid_y_data"], off["mask_train"], top_n)
    test = off["evaluate"](off["test_loader"], off["test_y_data"], off["mask_tv"], top_n)
    t_off = time.perf_counter() - t0
    t0 = time.perf_counter()
    mine = evaluate_model(model, data, top_n)
    t_ours = time.perf_counter() - t0
    out = {}
    for split, res in (("valid", valid), ("test", test)):
        for j, metric in enumerate(("precision", "recall", "ndcg", "mrr")):
            theirs = torch.tensor([float(v) for v in res[j]])
            ours_r = torch.tensor([round(mine[split][f"{metric}@{k}"], 4) for k in top_n])
            rep.close(f"inference: {split} metrics (4 decimals)", theirs, ours_r)
            out[f"{split} {metric}"] = (res[j], [round(mine[split][f"{metric}@{k}"], 6) for k in top_n])
    print(f"evaluation: official {t_off:.1f} s, fedrec {t_ours:.1f} s")
    for key, (theirs, ours_v) in out.items():
        print(f"  {key:16s} official {theirs}  fedrec {ours_v}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", required=True, type=Path, help="the official L-DiffRec folder (main.py, models/)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of lock-step training (default 2)")
    p.add_argument("--resync", action="store_true",
                   help="before each official step give it fedrec's parameters, AdamW state and loss history, "
                        "so that each step is compared alone (default: no re-sync, the drift accumulates)")
    p.add_argument("--float64-loss-weights", action="store_true",
                   help="control: give fedrec's model float64 loss weights, as the official code multiplies "
                        "the diffusion loss in float64 (fedrec: float32); not fedrec's behaviour")
    p.add_argument("--float64-reference", action="store_true",
                   help="also recompute fedrec's step in float64 (same draws) and compare both float32 "
                        "implementations' gradients with it")
    p.add_argument("--trace", action="store_true", help="print the largest differences of every step")
    p.add_argument("--tol", type=float, default=1e-6, help="largest relative difference that passes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="fedrec config overrides (default: the ML-1M clean L-DiffRec run)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fedrec.config import compose
    from fedrec.data import load_dataset
    from fedrec.data.loaders import resolve_data_path
    from fedrec.models import build_model, data_shape
    from fedrec.train import make_optimizer, model_rows

    cfg = compose(["dataset=diffrec-ml-1m-clean", "model=ldiffrec", "federation=none", *args.overrides])
    data = load_dataset(cfg.dataset, int(cfg.seed))
    folder = Path(resolve_data_path(cfg.dataset)).resolve()
    t0 = time.perf_counter()
    off = Official(args.official.resolve(), folder, args.epochs)
    print(f"official main.py set up in {time.perf_counter() - t0:.1f} s "
          f"(its k-means: sizes {off['Autoencoder'].category_len})")
    print("official training step (executed from main.py):\n    " + off.step_source.replace("\n", "\n    "))
    model = build_model(cfg.model, data_shape(data, seed=int(cfg.seed)))
    optimizer = make_optimizer(model, cfg.model.optim)
    rows = model_rows(model, data, np.arange(data.n_users))
    copy_weights(linear_pairs(off, model), to_fedrec=True)
    rep = Report(args.tol, drift=not args.resync, exact=args.float64_reference)
    if args.float64_loss_weights:  # the control: fedrec's loss weights in float64, the official dtype
        model.diffusion.loss_weight_x0 = model.diffusion.loss_weight_x0.double()
        model.diffusion.loss_weight_eps = model.diffusion.loss_weight_eps.double()
    check_config(rep, off, cfg, model, optimizer)
    check_data(rep, off, data, model, rows)
    sizes, covered = batch_sizes_of_loader(off)
    draws = SharedDraws(rep)
    state = lockstep(rep, off, model, optimizer, rows, cfg, args.epochs, draws, args.resync, args.trace, args.float64_reference)
    rep.equal("data: batch composition", covered and sorted(sizes) == sorted(state["sizes"]),
              f"official batch sizes {sizes}, ours {state['sizes']}")
    print(f"batches per epoch: official {sizes}, fedrec {state['sizes']} (last epoch)")
    check_inference(rep, off, model, data, int(off["args"].batch_size))
    print("selection: official: valid Recall@20 rounded to 4 decimals, strictly better, every 5 epochs; "
          "fedrec: train.select_metric unrounded, strictly better, every train.eval_every epochs")
    ok = rep.print()
    scope = " (drift mode: per-step rows have no verdict; --resync judges them)" if rep.drift else ""
    print(("EQUIVALENT within tol" if ok else "DIFFERENCES FOUND") + f" (tol {args.tol:g}){scope}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
