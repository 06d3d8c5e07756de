"""The TensorBoard tag groups every run shares. TensorBoard's Time Series orders groups naturally (digits before
letters) and opens the first two, so the training, validation and test groups are numbered: they come first, in that
order, and every other group (readouts, the learned loss, phase 1, a search, pre-training) follows alphabetically."""

TRAIN, VAL, TEST = "1_train", "2_val", "3_test"
PHASE_1 = "phase1"  # AdaLFL's and ML3's offline phase: its own tags (and run), against offline meta steps
