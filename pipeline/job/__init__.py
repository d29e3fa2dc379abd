"""Jobs: a YAML file validated into a configuration, planned, then executed where it says.

``config`` the job schema; ``plan`` what a job will do; ``run`` running it;
``finish`` per-image finishing (model, diagnostics); ``executors`` where tasks
run; ``batch`` the batch systems; ``submit`` whole-job batch scripts.
"""
