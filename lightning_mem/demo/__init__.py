"""The demo application beside the core: embedded data, small models and the one-command training job.

Needs the ``demo`` extra (scikit-learn for the digits, FrEIA for the flow): ``pip install "lightning_mem[demo]"``.
"""

from lightning_mem.demo.run import (
    DEFAULT_STEPS,
    DEMO_NUM_EVALUATIONS,
    MODELS,
    DemoResult,
    build_demo,
    fit,
    intra_op_threads,
    run_demo,
)

__all__ = [
    "DEFAULT_STEPS",
    "DEMO_NUM_EVALUATIONS",
    "MODELS",
    "DemoResult",
    "build_demo",
    "fit",
    "intra_op_threads",
    "run_demo",
]
