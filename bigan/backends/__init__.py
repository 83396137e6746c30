"""How G and D are wrapped, stepped, precision-cast and saved.

The trainer talks to one small interface that both backends implement: ``wrap``,
``autocast()``, ``backward(loss, which, sync)``, ``step(which) -> grad norm``,
``frozen(which)`` (the model to run where it is not trained, e.g. G in the D step),
``gathered(which)`` / ``plain_copy(which)`` (full weights, on every rank), ``save``/``load``
(backend state in a checkpoint), the attributes ``g``/``d`` (wrapped, for the step that
trains them), ``g_module``/``d_module`` (bare modules, for forwards that must not sync or
train them) and ``d_penalty`` (what gradient penalties differentiate through).
"""
import os

from bigan.backends.plain import PlainBackend


def make_backend(config, accelerator):
    """DeepSpeed when train.deepspeed(_g/_d) names a config or Accelerate was launched with DeepSpeed; else plain."""
    t = config.train
    paths = {"g": t.deepspeed_g or t.deepspeed, "d": t.deepspeed_d or t.deepspeed}
    # Accelerate's own flag, not accelerator.state.deepspeed_plugin: with Accelerator(cpu=True)
    # (how bigan runs on CPU) Accelerate drops the plugin and would silently train plain DDP.
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not any(paths.values()) and not launched:
        return PlainBackend(accelerator, t.precision, t.grad_clip, t.channels_last, config.model.sync_batchnorm, t.compile)
    from bigan.backends.deepspeed import DeepSpeedBackend, DeepSpeedConfigError, load_ds_config

    def ds_config(which):
        source = paths[which] or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if source == "none":
            raise DeepSpeedConfigError("launched with DeepSpeed but without deepspeed_config_file in the "
                                       "Accelerate config; name one there or set train.deepspeed")
        return load_ds_config(source, t.batch_size, t.grad_accum, t.grad_clip, accelerator.num_processes)

    return DeepSpeedBackend(accelerator, t.precision, ds_config("g"), ds_config("d"), t.channels_last, t.compile)


__all__ = ["PlainBackend", "make_backend"]
