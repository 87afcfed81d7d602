"""The methods layer: what a distillation method is made of besides its config. Loss terms by
family of knowledge (:mod:`~dfkd.methods.losses`), synthesis strategies, one registered class
each with its own options (:mod:`~dfkd.methods.synthesis`), and the ring buffer both keep rows in
(:mod:`~dfkd.methods.ring_buffer`). Nothing here runs a loop: the loop layer calls these."""
