"""XLA flags for every process the tests start, set before JAX starts (no imports here).

The tests' programs are tiny and run for a few steps, so compiling them dominates. Without LLVM's
optimisations and XLA's newer CPU fusion emitters the tiny three-branch train step compiled in
about 11 s instead of 24 s on the 2-core CPU and ran as fast; generating its machine code as one
LLVM module, not split into up to 32 for threads that three workers on two cores cannot run at
once, took another 10-20 % off (docs/performance.md). Programs users run keep XLA's defaults: at
the quick config's sizes these flags halve the step's speed.
"""
QUICK_COMPILE = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
                 " --xla_cpu_parallel_codegen_split_count=1")

