"""The defaults that several commands and functions share, each written once (the CLI's help shows them)."""

CALIB_SAMPLES = 32  # calibration sequences
CALIB_SEQ_LEN = 2048  # tokens per calibration sequence
OPRUNE_BUDGET = 100_000  # o-prune tries every expert subset if there are at most this many, else this many
EVAL_MAX_TOKENS = 65_536  # evaluation tokens of --data
EVAL_SEQ_LEN = 2048  # evaluation window
