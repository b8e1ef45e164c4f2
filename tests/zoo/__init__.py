"""A zoo of models at their library-default random init, for testing the diagnosis the way users meet it.

- :data:`STOCK`: published architectures built from library code and configs (Hugging Face ``transformers``
  config classes, torch's own recurrent/Transformer stacks) or, where no pure-PyTorch library ships them here,
  written with the init code of the public reference implementation. Sizes are reduced (fewer layers, narrower,
  small images and sequences) so the whole zoo runs in seconds on a CPU; the init code and the architecture are
  the library's. Every stock model must get no error-level finding and (almost) no warning.
- :data:`BROKEN`: stock models whose library default itself blocks training (verified with a plain backward):
  the diagnosis must report it.
- :data:`GOOD`: deliberate inits that look odd and are not mistakes (zero-init residual, zero-init heads,
  LayerScale): no warning or error.
- :data:`CONTROLS`: known-bad models, each with the codes and modules it must get and the fix that removes them.
- :mod:`tests.zoo.wider` (diagnosis v3): ``STOCK_WIDER`` (speech, mixture-of-experts, multimodal, state-space,
  softcapped, LayerScale-module, averaged-head and in-forward-loss models) and ``GOOD_WIDER`` (the literature's
  deliberate inits); :mod:`tests.zoo.applied`: ``APPLIED``, bad controls where depth is applications of weights.

Nothing is downloaded: every model is instantiated from a config class directly.
"""

from tests.zoo.controls import CONTROLS, Control
from tests.zoo.entry import ZooEntry
from tests.zoo.stock import BROKEN, GOOD, STOCK

__all__ = ["BROKEN", "CONTROLS", "GOOD", "STOCK", "Control", "ZooEntry"]
