"""The feedback loop: prediction log, joins with ground truth, live quality."""
