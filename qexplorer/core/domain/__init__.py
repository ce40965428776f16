"""The data model at the bottom of the house: frozen, typed values every other part speaks, importing nothing
above serialisation.

``bench``   :class:`BenchConfig` and :class:`Stat` (llama-bench's method as settings and mean ± sd)
``record``  :class:`RunRecord`, the versioned result every reader uses
``events``  the frozen events a job emits, and their JSON-line wire form
``phases``  every phase a job can be in, and every rule that depends on it
``spec``    :class:`JobSpec`, what a worker is asked to do
"""
