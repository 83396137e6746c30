"""How G and D are wrapped, stepped, precision-cast and saved.

The trainer talks to one small interface (see ``PlainBackend``): ``autocast()``,
``backward(loss, which, sync)``, ``step(which) -> grad norm``, ``zero_grad(which)``, and the
attributes ``g``/``d`` (wrapped, for the step that trains them) and ``g_module``/``d_module``
(the bare modules, for forward passes that must not sync or train them).
"""
from bigan.backends.plain import PlainBackend

__all__ = ["PlainBackend"]
