"""The data layer: datasets held in memory as uint8 tensors and the registry of named ones
(:mod:`~dfkd.data.datasets`), the batch loader (:mod:`~dfkd.data.loader`), a user's paired
samples (:mod:`~dfkd.data.pairs`), parts of a split (:mod:`~dfkd.data.splits`), built-in second
modalities (:mod:`~dfkd.data.modalities`), the batch a phase trains on (:mod:`~dfkd.data.batch`)
and the differentiable augmentation of synthetic batches (:mod:`~dfkd.data.augment`). In a
data-free run, real data is read for evaluation only."""
