"""Jobs over datasets: batch builds (local or Ray), evaluation, prediction and reports."""

# Here, not in jobs/build.py, so the CLI shows it without importing torch.
DEFAULT_CHECKPOINT_EVERY = 100  # a build rewrites <class>.partial.h5 every this many images

# The update's gate and growth guard, and the versions it keeps (jobs/update.py, jobs/versions.py),
# here so the CLI shows them without importing torch.
GATE_AUTO, GATE_OFF = "auto", "off"
# The gate multiple of --gate auto: the normalized score above which a new image is held back.
# Chosen from benchmarks/bench_gate.py (docs/learning.md gives the figures): above the false
# alarms measured on the demo textures, below most of the defects the bank catches.
AUTO_GATE_MULTIPLE = 1.1
# The growth guard's default, a fraction of K: more of the same product adds almost no
# centroids, another product's images add a large share of K (benchmarks/bench_gate.py).
DEFAULT_MAX_NEW_CENTROIDS = 0.1
DEFAULT_KEEP_HISTORY = 5  # earlier versions kept per bank: enough to step back over several bad updates
