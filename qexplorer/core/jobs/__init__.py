"""Running jobs, parent side only: the queue, one worker process per job and what watches it.

``queue``    :class:`JobQueue`: the session's jobs, one consumer, frozen views
``runner``   one job = one worker process, composed of the parts below
``channel``  the worker's event lines, its stdin, its stop
``watch``    its memory from outside and the guard pool
``clock``    its phases' costs, waiting split off, and the stall timeout
``guard``    when to stop a job before the machine runs out of memory
``overlap``  the gate: phases that run alone, and what may prepare beside them

The worker side is :func:`qexplorer.core.pipeline.run_job`; both speak :mod:`qexplorer.core.domain`.
"""
