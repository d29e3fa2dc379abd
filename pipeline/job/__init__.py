"""Jobs: a YAML file validated into a configuration, planned, then executed where it says.

``config`` the job schema; ``plan`` what a job will do (the dry run); ``run``
load, plan, execute; ``blocks`` the task of one block; ``finish`` per-image
finishing (model, diagnostics); ``executors`` where tasks run; ``progress``
the progress display; ``systems`` the table of batch systems; ``batch`` Dask
workers as batch jobs; ``submit`` the whole job as one batch job.
"""
