"""The privacy mechanisms on the mechanism protocol (``fedrec.mechanisms``): ``privacy=dpsgd|user_dp|node_dp``.

Each class is the glue between the protocol's hooks and the mechanism's arithmetic, which lives in
its own module: DP-SGD in ``fedrec.privacy.dpsgd`` (Opacus), user-level DP-FedAvg in
``strategies.user_dp`` (a server wrapper) and ``fedrec.federated.device_node.ClippedSumFold`` (the
nodes' clipped sums), node-level DP in ``strategies.node_dp`` (Flower's DP wrapper). Every DP
mechanism also keeps the model away from data-dependent pieces outside its accountant
(``fedrec.privacy.public_only``).
"""

from __future__ import annotations

import math

from fedrec.errors import ConfigError
from fedrec.mechanisms import Mechanism, register
from fedrec.run_config import federation


class DPMechanism(Mechanism):
    kind = "privacy"

    def check(self, cfg) -> None:
        from fedrec.privacy.public_only import check_side_data

        check_side_data(cfg)  # no private item graph under DP, before any file is read

    def adjust_config(self, cfg, data) -> list[str]:
        from fedrec.privacy.public_only import enforce_public_only

        return enforce_public_only(cfg, data)


@register
class DPSGD(DPMechanism):
    """DP-SGD (Abadi et al., CCS 2016) with Opacus: on the centralised trainer, or inside every silo
    (the silo's users are the privacy unit; each silo keeps its accountant history in its state)."""

    name = "dpsgd"
    modes = ("none", "silo")
    keeps_node_state = True

    from fedrec.privacy.dpsgd import DPSGDConfig as Config  # noqa: E402  (the typed block)

    def check_model(self, cfg, model, data) -> None:
        if model.input_kind == "sequence":
            raise ConfigError(f"privacy=dpsgd: model {model.name!r} reads sequences, which DP-SGD does not support yet")
        if not model.trains_by_sgd:
            raise ConfigError(f"privacy=dpsgd: model {model.name!r} is training-free (a closed form of the whole "
                              "training matrix), so there are no per-user gradients to clip and noise")
        if model.couples_users:
            raise ConfigError(f"privacy=dpsgd: model {model.name!r} {model.coupling}, so one "
                              "user's row enters other users' losses and per-user clipping bounds nothing")

    # ---------------------------------------------------------------- centralised
    def central_trainer(self, model, optimizer, rows, cfg, resume):
        from fedrec.privacy.dpsgd import DPSGDTrainer

        if resume is not None:
            raise ConfigError("resume: resuming a DP-SGD run is not supported (the accountant's history "
                              "would restart); start it again")
        self.trainer = DPSGDTrainer(model, optimizer, rows, int(cfg.model.optim.batch_size), self.config,
                                    int(cfg.train.epochs), int(cfg.seed))
        return self.trainer

    # ---------------------------------------------------------------- silo
    def local_training(self, ctx, train):
        from fedrec.privacy.dpsgd import local_dpsgd_round
        from fedrec.rng import stream_seed

        cfg = ctx.cfg

        def private_training(model, optimizer, rows):
            if not len(rows):
                return train(model, optimizer, rows)
            history = [tuple(h) for h in ctx.state.get(self.kind, {}).get("history", [])]
            out = local_dpsgd_round(model, optimizer, rows, int(cfg.model.optim.batch_size), self.config,
                                    int(cfg.federation.rounds), int(cfg.train.local_epochs), history,
                                    seed=stream_seed(int(cfg.seed), ctx.partition_id, ctx.round))
            ctx.state[self.kind] = {"history": out["history"]}
            extra = {"dp-noise-multiplier": out["noise_multiplier"], "dp-delta": out["delta"]}
            if math.isfinite(out["epsilon"]):
                extra["dp-epsilon"] = out["epsilon"]
            return out["losses"], extra

        return private_training

    # ---------------------------------------------------------------- report
    def report(self, ctx) -> dict:
        if ctx.strategy is None:  # centralised
            t = self.trainer
            return {"mechanism": "dpsgd", "grad_sample_mode": t.mode, "noise_multiplier": t.noise_multiplier,
                    "delta": t.delta, "epsilon": t.epsilon()}
        # a silo at noise multiplier 0 reports no epsilon: infinite; the weakest silo's guarantee
        lt = ctx.strategy.last_train
        if not lt:  # before the first round
            return {"mechanism": "dpsgd", "scope": "each silo's users (epsilon: the largest over silos)", "epsilon": 0.0}
        noisy = float(lt.get("dp-noise-multiplier", 0.0)) > 0 and "dp-epsilon" in lt
        return {"mechanism": "dpsgd", "scope": "each silo's users (epsilon: the largest over silos)",
                "epsilon": float(lt["dp-epsilon"]) if noisy else math.inf,
                "noise_multiplier": float(lt.get("dp-noise-multiplier", 0.0))}


@register
class UserDP(DPMechanism):
    """User-level DP-FedAvg (McMahan et al., ICLR 2018) in cross-device mode: each node clips every
    sampled user's update and uploads the sum (``user_fold``); the server wrapper
    (``strategies.user_dp.UserLevelDP``) adds noise, divides by q N and accounts."""

    name = "user_dp"
    modes = ("device",)

    from strategies.user_dp import UserDPConfig as Config  # noqa: E402

    def check(self, cfg) -> None:
        super().check(cfg)
        if federation(cfg).sampling != "poisson":
            raise ConfigError("privacy=user_dp: needs federation.sampling=poisson (each user sampled independently "
                              "for the amplification analysis)")
        from strategies import STRATEGIES

        rule = STRATEGIES.get(str(cfg.strategy.name))
        if rule is not None and rule.batch_rule is not None:
            raise ConfigError(f"privacy=user_dp: strategy={cfg.strategy.name} needs every user's update, but nodes "
                              "upload only clipped sums; use a mean-based strategy (fedavg, fedadam, fedyogi, fedavgm)")
        if federation(cfg).upload == "per_user":
            raise ConfigError("privacy=user_dp: nodes upload only clipped sums; federation.upload=per_user "
                              "would show the server single users' updates")

    def user_fold(self, ctx, start):
        from fedrec.federated import protocol as P
        from fedrec.federated.device_node import ClippedSumFold

        if P.CLIP not in ctx.config:
            raise ConfigError("privacy=user_dp: the server sent no clipping bound (is it running user_dp?)")
        return ClippedSumFold(start, float(ctx.config[P.CLIP]))

    def wrap_strategy(self, runner, ctx):
        from fedrec.federated.device_node import sampling_threshold
        from strategies.user_dp import UserLevelDP

        fed = federation(ctx.cfg)
        self.wrapper = UserLevelDP(runner, self.config, n_users=ctx.data.n_users,
                                   sample_rate=sampling_threshold(fed, ctx.data.n_users, int(ctx.cfg.seed), 1),
                                   seed=int(ctx.cfg.seed), rounds=int(fed.rounds))
        return self.wrapper

    def report(self, ctx) -> dict:
        w = self.wrapper
        return {"mechanism": "user_dp", "noise_multiplier": w.dp.noise_multiplier, "delta": w.delta,
                "sample_rate": w.q, "epsilon": w.epsilon()}

    def state(self) -> dict:
        return self.wrapper.state()

    def load_state(self, state: dict) -> None:
        self.wrapper.load_state(state)


@register
class NodeDP(DPMechanism):
    """Node-level DP-FedAvg through Flower's ``DifferentialPrivacyServerSideFixedClipping`` and RDP
    accountant (``strategies.node_dp``): the silo is the privacy unit."""

    name = "node_dp"
    modes = ("silo",)
    strategies = ("fedavg",)  # Flower's DP wrapper noises FedAvg's equal-weight mean

    from strategies.node_dp import NodeDPConfig as Config  # noqa: E402

    def check(self, cfg) -> None:
        super().check(cfg)
        if federation(cfg).fraction != 1.0:
            raise ConfigError("privacy=node_dp: needs federation.fraction=1.0 (every node every round: the "
                              "accounting takes no amplification by sampling)")

    def strategy_overrides(self) -> dict:
        from strategies.node_dp import UNIT_WEIGHT

        return {"weighted_by_key": UNIT_WEIGHT}  # equal node weights, as the sensitivity C / n_nodes assumes

    def wrap_strategy(self, runner, ctx):
        from strategies.node_dp import NodeDPFedAvg

        fed = federation(ctx.cfg)
        self.wrapper = NodeDPFedAvg(runner, self.config, fed.num_nodes, fed.rounds, seed=int(ctx.cfg.seed))
        return self.wrapper

    def report(self, ctx) -> dict:
        w = self.wrapper
        return {"mechanism": "node_dp", "noise_multiplier": w.noise_multiplier, "clipping_norm": w.clipping_norm,
                "delta": w.cfg.delta, "accountant": "flower-rdp",
                "epsilon": 0.0 if w.accountant_ is not None and not w.rounds_released else w.epsilon()}

    def state(self) -> dict:
        return self.wrapper.state()

    def load_state(self, state: dict) -> None:
        self.wrapper.load_state(state)
