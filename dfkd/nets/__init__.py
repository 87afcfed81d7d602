"""The networks layer: ``create_model`` by name (the zoo, ``wrn<d>_<w>``, ``tv:`` names, and
wrappers such as exits; :mod:`~dfkd.nets.models`, :mod:`~dfkd.nets.zoo`, :mod:`~dfkd.nets.exits`),
rebuilding a model file's network (:mod:`~dfkd.nets.arch`), quantized layers
(:mod:`~dfkd.nets.quant`), discriminators and adapters (:mod:`~dfkd.nets.discriminators`), and
reading networks without editing them: hooks by module path (:mod:`~dfkd.nets.taps`) and
Grad-CAM (:mod:`~dfkd.nets.saliency`). Generators are the ``generators`` package's."""
