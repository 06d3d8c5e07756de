"""The independent random streams of a single-task run (batch order and augmentation per phase and split, and
the base-model initialisations of the loss searches' short runs), numbered once for every module that draws."""

TRAIN_STREAM, META_STREAM, INIT_TRAIN_STREAM, INIT_META_STREAM = 0, 1, 2, 3
SEARCH_INIT_STREAM = 10_000_000  # + generation: the base-model initialisation of TaylorGLO's candidates
EVOMAL_STREAM = 20_000_000  # EvoMAL's fitness (and rejection-test) model; + 1 + k: its local search's step k
