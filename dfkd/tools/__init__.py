"""The tools layer: what runs the loop many times or reads its results. Chains of distillations
(:mod:`~dfkd.tools.chain`), architecture search (:mod:`~dfkd.tools.search`), the privacy audit
(:mod:`~dfkd.tools.audit`), ONNX export and its check (:mod:`~dfkd.tools.export`), and the state
files of a multi-run folder (:mod:`~dfkd.tools.folders`)."""
