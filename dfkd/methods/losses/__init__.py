"""Loss terms, one module per family of knowledge: the framework (:mod:`~.base`), response
(:mod:`~.response`), feature (:mod:`~.feature`), relation between samples and between layers
(:mod:`~.relation`), self-distillation (:mod:`~.self_distill`), data-free priors and objectives
(:mod:`~.datafree`), contrastive (:mod:`~.contrastive`), and adversarial and online
(:mod:`~.adversarial`). Every term registers itself in :data:`~.base.LOSSES` by name when its module
is imported, which importing any of them does; a new term is one function or class in the module
of its family, or a module of its own added to this list."""
from dfkd.methods.losses import (adversarial, contrastive, datafree, feature, relation, response,  # noqa: F401
                                 self_distill)
