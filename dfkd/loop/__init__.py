"""The loop layer: one training loop for every method. A config becomes a run
(:mod:`~dfkd.loop.build`): the device and numerics (:mod:`~dfkd.loop.runtime`), the frozen teachers
(:mod:`~dfkd.loop.teachers`), the trained players (:mod:`~dfkd.loop.players`) and the phases of an
iteration (:mod:`~dfkd.loop.phases`). The engine (:mod:`~dfkd.loop.engine`) runs the phases, each
step's terms reading a :class:`~dfkd.loop.context.StepContext`; callbacks
(:mod:`~dfkd.loop.callbacks`) are told of its events. Around it: evaluation
(:mod:`~dfkd.loop.evaluation`), sample quality (:mod:`~dfkd.loop.quality`), what TensorBoard shows
(:mod:`~dfkd.loop.reporting`), and the run's state, its checkpoints and resume
(:mod:`~dfkd.loop.state`)."""
