"""Target-item metrics of a promotion attack, for every round the run evaluated, on server or nodes.

An attack with target items mixes in :class:`TargetTracking` and names its targets
(``target_ids(data, seed)``). Its summary.json section then carries, flat, the last evaluated round's
``er@K``, ``hr@K``, ``ndcg@K``, ``mean_rank``, ``eligible_pairs`` (``fedrec.eval.targets``) and the
per-round ``history``:

* where the server evaluates (centralised runs; federated runs with server-side evaluation) it scores
  the evaluated model itself;
* where the nodes evaluate (private user rows, e.g. BPR-MF cross-device, or
  ``federation.evaluation=clients``), every evaluating node adds
  the target sums of its genuine users to its evaluation reply (``node_eval``), and the strategy's
  exact pooling of metric sums turns them into the same means: split ``target`` counts (user, target)
  pairs (er, ndcg, rank), split ``target_users`` counts users with an eligible target (hr).
"""

from __future__ import annotations

import math

import numpy as np
import torch


class TargetTracking:
    def target_ids(self, data, seed: int) -> np.ndarray:  # pragma: no cover  (each attack names its own)
        raise NotImplementedError

    # ------------------------------------------------------------------ node: evaluation sums
    def node_eval(self, cfg, model, data, users) -> dict[str, float]:
        from fedrec.devices import model_device
        from fedrec.eval.targets import target_metric_sums
        from fedrec.models.base import Batch, input_matrix

        device = model_device(model)

        def score(rows, x):
            return model.scores(Batch(users=torch.as_tensor(rows, device=device), x=x))

        model.eval()
        sums = target_metric_sums(score, data, self.target_ids(data, int(cfg.seed)), list(cfg.eval.ks),
                                  int(cfg.eval.batch_size), users=users, device=device,
                                  inputs=input_matrix(model, data))
        out = {"target/users": sums["pairs"], "target/rank/sum": sums["rank"], "target_users/users": sums["users"]}
        for key, value in sums.items():
            if key.startswith(("er@", "ndcg@")):
                out[f"target/{key}/sum"] = value
            elif key.startswith("hr@"):
                out[f"target_users/{key}/sum"] = value
        return out

    # ------------------------------------------------------------------ server: the section
    def _evaluated_now(self, ctx) -> tuple[int, dict] | None:
        """(round, metrics) of an evaluation not yet in the history, or None."""
        history = self.__dict__.setdefault("_target_history", {})
        if ctx.client_evaluated_round is None:
            rnd = ctx.evaluated_round  # the server scored this round's model itself
            if rnd is None or rnd in history:
                return None
            from fedrec.eval.targets import target_metrics

            return rnd, target_metrics(ctx.model, ctx.data, self.target_ids(ctx.data, int(ctx.cfg.seed)),
                                       list(ctx.cfg.eval.ks), int(ctx.cfg.eval.batch_size))
        rnd, pooled = ctx.client_evaluated_round, getattr(ctx.strategy, "last_eval", None)
        if rnd is None or rnd in history or pooled is None:
            return None
        pooled = {str(k): float(v) for k, v in dict(pooled).items()}
        if not any(k.startswith("target/") for k in pooled):
            return None
        out = {k.split("/", 1)[1]: v for k, v in pooled.items() if k.startswith(("target/", "target_users/"))}
        out["mean_rank"] = out.pop("rank", math.nan)
        return rnd, out

    def target_section(self, ctx) -> dict:
        history = self.__dict__.setdefault("_target_history", {})
        now = self._evaluated_now(ctx)
        if now is not None:
            history[int(now[0])] = dict(now[1])
        if not history:
            return {}
        last = max(history)
        return {"round": last} | history[last] | {"history": {str(r): history[r] for r in sorted(history)}}

    def state(self) -> dict:
        return {"target_history": {str(k): v for k, v in self.__dict__.get("_target_history", {}).items()}}

    def load_state(self, state: dict) -> None:
        self._target_history = {int(k): dict(v) for k, v in state.get("target_history", {}).items()}

