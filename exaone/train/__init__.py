"""Training the embedded demo model: synthetic tasks (data), the loop (trainer), `exaone train` (cli)
and the reasoning vs non-reasoning report (report)."""
