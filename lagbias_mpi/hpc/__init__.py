"""HPC tools: the planner's problem sizes and memory/time model, benchmarks, scaling series and reports."""
