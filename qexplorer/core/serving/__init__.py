"""How a serving engine will be started and what it will run, decided from the plan alone (no torch, no
subprocess): shared by the parent (the plan, the queue's admission, the compare screen) and the worker (the job
that starts the engine), so both build the same command and read the same kernel lines."""
