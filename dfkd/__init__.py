"""dfkd: data-free and adversarial knowledge distillation."""

__version__ = "0.1.0"
