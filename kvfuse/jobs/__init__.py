"""Many models at once: `kvfuse optimize-many MODELS.json OUT_ROOT`.

Each model of the JSON file is one isolated job (export → optimize → benchmark) in a process of
its own, run on this machine (`run_local`) or as Ray tasks (`run_ray`); `run.run_many` plans,
resumes and indexes. Jobs use kvfuse's public functions only (export, optimize, load).
"""
