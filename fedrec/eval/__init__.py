from fedrec.eval.metrics import (METRICS, RankingAccumulator, check_ks, evaluate_model, evaluated_users,
                                 topk_metric_sums)

__all__ = ["METRICS", "RankingAccumulator", "check_ks", "evaluate_model", "evaluated_users", "topk_metric_sums"]
