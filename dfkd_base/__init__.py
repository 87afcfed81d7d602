"""The vocabulary that ``dfkd`` and ``generators`` share, and nothing else: named registries
filled by decorators (:mod:`dfkd_base.registry`) and the error types that the command line reports
in one line (:mod:`dfkd_base.errors`). Both packages stand on it; it imports neither, so
``generators`` needs no part of ``dfkd`` and ``dfkd`` depends on ``generators``, not the other way
round."""
