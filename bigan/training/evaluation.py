"""Evaluation in the loop (eval.every_kimg): the family's metrics of the EMA generator, in fp32."""
from __future__ import annotations

from bigan.training.data import data_source

EVAL_SEED = 0  # the samples' seed, bigan-eval's default too: both score the same samples whatever train.seed is


class Evaluation:
    """The feature extractor and mode classifier are loaded and tried at start (before anything is written),
    so a missing or broken file fails now, not hours in."""

    def __init__(self, family, accelerator):
        from bigan.metrics.features import Extractor, ModeClassifier

        self.family, self.accelerator, self.config = family, accelerator, family.config
        e, res = self.config.eval, self.config.data.resolution
        self.wanted = [m.strip() for m in e.metrics.split(",") if m.strip()]
        self.extractor = self.classifier = None
        if e.every_kimg > 0:
            if set(self.wanted) & {"fid", "kid", "is", "pr"}:  # (the metrics an extractor serves)
                self.extractor = Extractor(e.extractor, accelerator.device, e.inception or None, res)
            if e.modes:
                self.classifier = ModeClassifier(e.modes, accelerator.device, res)
            family.prepare_metrics(self.wanted, accelerator)

    def run(self, g) -> dict:
        """Metrics of generator g against eval.data (every rank generates its share). In fp32 (no
        autocast), as bigan-eval: the loop's scores and bigan-eval's are the same numbers, and the cached
        reference statistics (computed in fp32) fit both."""
        was_training = g.training
        g.eval()
        data = data_source(self.family, held_out=True, accelerator=self.accelerator) if self.wanted else None
        results = self.family.evaluate(g, data, self.extractor, self.classifier, self.accelerator,
                                       self.config.eval.n, self.wanted, seed=EVAL_SEED)
        g.train(was_training)
        return results


def scalars(results: dict) -> dict:
    """The numbers of an evaluation worth plotting."""
    return {k: float(v) for k, v in results.items()
            if isinstance(v, (int, float)) and k not in ("n", "n_ref", "modes_of")}
