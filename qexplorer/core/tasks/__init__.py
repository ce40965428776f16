"""Task accuracy: HumanEval and a generated arithmetic probe, the sandbox that runs model-written code,
and the statistics that say whether two precisions differ."""
