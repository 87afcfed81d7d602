"""Architecture search: a student chosen for the user's teacher under a budget. The space of a
model family and what a candidate costs (:mod:`~.space`), the search config (:mod:`~.config`), the
zero-cost proxy (:mod:`~.proxy`), the Optuna study of short distillations through the loop, and
the retraining (:mod:`~.study`), and its tables and plot (:mod:`~.report`)."""
