"""How a family's networks are wrapped, stepped, precision-cast and saved, by name.

The trainer talks to one small interface that both backends implement, every method keyed by
network name: ``wrap({name: (module, optimizer)})``, ``autocast()``, ``backward(loss, name, sync)``,
``step(name) -> grad norm``, ``trained(name)`` (the network as the phase that trains it runs it:
DDP or a ZeRO engine), ``module(name)`` (the bare network, for forwards that must neither sync nor
train it), ``inference(name)`` (for forwards under no_grad: G in the D step), ``penalty(name)``
(what gradient penalties differentiate through), ``whole(name)`` and ``begin_micro_batch(name)`` (for a
phase whose second-order backward reaches the weights outside their modules: Phase.whole), ``optimizer(name)``, ``gathered(name)`` /
``plain_copy(name, everywhere=True)`` (full weights, on every rank or on the main process only),
``ema_partitioned(name)`` / ``ema(name, half_life_kimg, rampup)`` (whether the backend keeps the network's
EMA itself, partitioned, and that EMA), ``save``/``load`` (backend state in a checkpoint).
"""
import os

from bigan.backends.plain import PlainBackend


def make_backend(config, accelerator, names: list):
    """DeepSpeed when train.deepspeed(_<name>) names a config or Accelerate was launched with DeepSpeed;
    else plain. `names` are the family's networks."""
    t = config.train
    per_network = {"g": t.deepspeed_g, "d": t.deepspeed_d, **config.deepspeed_networks}
    unknown = sorted(n for n, path in per_network.items() if path and n not in names)
    if unknown:
        from bigan.backends.deepspeed import DeepSpeedConfigError

        raise DeepSpeedConfigError(f"train.deepspeed_{unknown[0]}: model.arch={config.model.arch} has no network "
                                   f"{unknown[0]!r} (its networks: {', '.join(names)})")
    paths = {n: per_network.get(n) or t.deepspeed for n in names}
    # Accelerate's own flag, not accelerator.state.deepspeed_plugin: with Accelerator(cpu=True)
    # (how bigan runs on CPU) Accelerate drops the plugin and would silently train plain DDP.
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not any(paths.values()) and not launched:
        return PlainBackend(accelerator, t.precision, t.grad_clip, t.channels_last, config.model.sync_batchnorm, t.compile)
    from bigan.backends.deepspeed import DeepSpeedBackend, DeepSpeedConfigError, load_ds_config

    def ds_config(name):
        source = paths[name] or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if source == "none":
            raise DeepSpeedConfigError("launched with DeepSpeed but without deepspeed_config_file in the "
                                       "Accelerate config; name one there or set train.deepspeed")
        return load_ds_config(source, t.batch_size, t.grad_accum, t.grad_clip, accelerator.num_processes)

    configs = {n: ds_config(n) for n in names}
    return DeepSpeedBackend(accelerator, t.precision, configs, t.channels_last, t.compile, t.zero3_shadow)


__all__ = ["PlainBackend", "make_backend"]
