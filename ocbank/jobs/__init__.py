"""Jobs over datasets: batch builds (local or Ray), evaluation, prediction and reports."""

# Here, not in jobs/build.py, so the CLI shows it without importing torch.
DEFAULT_CHECKPOINT_EVERY = 100  # a build rewrites <class>.partial.h5 every this many images
