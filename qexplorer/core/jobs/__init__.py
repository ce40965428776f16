"""Jobs: the typed path from a plan to a stored result.

``spec``    :class:`JobSpec` and :func:`plan_jobs` (plan → specs)
``events``  the frozen events a job emits, and their JSON-line wire form
``record``  :class:`RunRecord`, the versioned result every reader uses
``runner``  one job = one worker process, watched by the memory guard
``queue``   :class:`JobQueue`: the session's jobs, one consumer, frozen views

The worker side is :func:`qexplorer.core.pipeline.run_job`.
"""
